"""Determinism as documented: every row of unet_pipe.determinism.STATEMENTS has tests, these among them."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from test_instances3d import _blobs, _store
from test_predict import PRECISIONS, make_net, write_image
from test_train import _assert_same_checkpoint, _config

from unet_pipe.cli import build_parser
from unet_pipe.determinism import STATEMENTS, help_text, markdown_table
from unet_pipe.instances3d import label_volume
from unet_pipe.io import open_image
from unet_pipe.model import load_checkpoint, save_checkpoint
from unet_pipe.predict import predict
from unet_pipe.synth import synthesize
from unet_pipe.train import train

REPO = Path(__file__).resolve().parents[1]


def test_every_statement_names_tests_that_exist():
    for statement in STATEMENTS:
        assert statement.tests or statement.text.startswith("nothing is promised"), statement
        for node in statement.tests:
            path, name = node.split("::")
            tree = ast.parse((REPO / path).read_text())
            names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert name in names, node


@pytest.mark.parametrize("stage", ["predict", "postprocess", "train"])
def test_help_states_what_is_bit_identical(stage, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([stage, "--help"])
    shown = "".join(capsys.readouterr().out.split())  # argparse rewraps the paragraph (also after hyphens)
    rows = [s for s in STATEMENTS if s.stage == stage]
    assert rows and all("".join(s.text.split()) in shown for s in rows)
    assert help_text(stage).startswith("Determinism. ")
    assert all(s.text in markdown_table() for s in rows)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_predict_is_bit_identical_across_workers_and_threads(tmp_path, precision):
    """One plan (tile, block, batch): the same bytes whatever number of workers and threads runs it."""
    raw = synthesize((3, 70, 90), seed=1).raw
    ckpt = save_checkpoint(tmp_path / "net.pt", make_net(base=16))  # wide enough for oneDNN's blocked kernels
    raw_path = write_image(tmp_path / "raw.ome.zarr", raw, (1, 32, 32))
    outs = {}
    for workers, threads in ((1, 1), (1, 2), (2, 2), (3, 3)):
        dest = tmp_path / f"{workers}-{threads}.ome.zarr"
        predict(ckpt, raw_path, dest, tile=16, block=[1, 64, 64], batch=3, workers=workers, threads=threads,
                precision=precision)
        outs[workers, threads] = open_image(dest)[:]
    assert outs[1, 1].std() > 0.05  # a non-trivial output
    for key, out in outs.items():
        assert out.tobytes() == outs[1, 1].tobytes(), key


def test_3d_watershed_ids_are_bit_identical_across_threads(tmp_path):
    p = _blobs((24, 30, 36), seed=7, level=0.75)
    prob = _store(tmp_path / "p.ome.zarr", p, (8, 10, 12))
    opts = dict(method="watershed", threshold=0.4, seed_threshold=0.5, block=(8, 10, 12), halo=24)
    one = open_image(label_volume(prob, tmp_path / "a.ome.zarr", workers=1, **opts))[:]
    three = open_image(label_volume(prob, tmp_path / "b.ome.zarr", workers=3, **opts))[:]
    assert one.max() > 20  # many cells, across many blocks
    np.testing.assert_array_equal(one, three)


@pytest.fixture(scope="module")
def stores() -> dict:
    stack = synthesize((3, 40, 40), seed=1)
    weights = np.where(stack.labels == 0, 3.0, 1.0).astype(np.float32)
    return {"s": {"raw": stack.raw, "labels": stack.labels, "weights": weights}}


def test_bf16_training_resume_is_bit_identical(tmp_path, stores):
    config = _config(precision="bfloat16")
    train(config, stores, tmp_path / "full.pt", device="cpu", threads=1)
    first = train(config, stores, tmp_path / "r.pt", device="cpu", threads=1, until_step=3)
    assert not first["finished"]
    train(config, stores, tmp_path / "r.pt", device="cpu", threads=1, resume=True)
    _assert_same_checkpoint(load_checkpoint(tmp_path / "full.pt"), load_checkpoint(tmp_path / "r.pt"))


def test_float32_training_threads_change_round_off_only(tmp_path, stores):
    config = _config(precision="float32")
    train(config, stores, tmp_path / "one.pt", device="cpu", threads=1)
    train(config, stores, tmp_path / "two.pt", device="cpu", threads=2)
    one, two = (load_checkpoint(tmp_path / f"{n}.pt")["model_state"] for n in ("one", "two"))
    assert load_checkpoint(tmp_path / "two.pt")["step"] == 6
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 1e-5


def test_the_docs_print_the_same_table():
    """docs/data-safety.md shows the determinism table as unet_pipe.determinism states it."""
    from pathlib import Path

    from unet_pipe.determinism import markdown_table

    text = (Path(__file__).resolve().parents[1] / "docs" / "data-safety.md").read_text()
    assert markdown_table().strip() in text
