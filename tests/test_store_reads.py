"""What a stage reads from a store: only inside it, and only the chunks the store was written with.

* Paths named by NGFF metadata (multiscales dataset paths, the ``labels`` list)
  must stay inside the store given: ``..``, absolute entries and symbolic links
  leading out are refused in one line.
* A store unet-pipe published records its chunks; a chunk file deleted since is
  named in one line by every stage that reads the store, never read as zeros.
  A store of another tool keeps zarr's meaning of a missing chunk (fill value).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from unet_pipe.errors import InputError
from unet_pipe.io import StagedImage, image_metadata, open_image
from unet_pipe.model import UNet, save_checkpoint
from unet_pipe.zarr_input import open_zarr_source


def _store(path: Path, data: np.ndarray, kind: str = "image", levels: int = 0) -> Path:
    staged = StagedImage(path, shape=data.shape, dtype=data.dtype, chunks=(1, 32, 32), kind=kind)
    staged.array[:] = data
    staged.commit(pyramid_levels=levels)
    return path


def _attrs(store: Path) -> dict:
    return json.loads((store / ".zattrs").read_text())


def _one_line(code: int, err: str) -> None:
    assert code == 2 and err.count("\n") == 1 and err.startswith("unet-pipe: error: "), err


# ------------------------------------------------------------------- paths that leave a store


def _foreign_image(path: Path, dataset: str, data: np.ndarray) -> Path:
    """A zarr-format-2 OME-Zarr image (not ours) whose multiscales names ``dataset``."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=data.shape, chunks=data.shape, dtype=data.dtype)[:] = data
    group.attrs.put({"multiscales": [{
        "version": "0.4", "axes": [{"name": a, "type": "space"} for a in "zyx"],
        "datasets": [{"path": dataset, "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1]}]}],
    }]})
    return path


@pytest.mark.parametrize("entry", ["../secret/0", "/abs/0", "0/../../secret/0", "a\\b"])
def test_multiscales_path_outside_the_store_is_refused_by_every_reader(tmp_path, entry, run_cli):
    secret = tmp_path / "secret"
    _foreign_image(secret, "0", np.full((1, 4, 4), 7, np.uint8))
    store = _foreign_image(tmp_path / "in.ome.zarr", "0", np.zeros((1, 4, 4), np.uint8))
    attrs = json.loads((store / ".zattrs").read_text())
    attrs["multiscales"][0]["datasets"][0]["path"] = entry
    (store / ".zattrs").write_text(json.dumps(attrs))
    message = f"multiscales dataset path {entry!r}".replace("\\", "\\\\")
    for read in (image_metadata, open_image, open_zarr_source):
        with pytest.raises(InputError, match=f"in.ome.zarr: {message}"):
            read(store)
    code, _, err = run_cli("-q", "ingest", store, tmp_path / "out.ome.zarr")
    _one_line(code, err)
    assert "multiscales dataset path" in err and not (tmp_path / "out.ome.zarr").exists()


def test_dataset_that_is_a_link_out_of_the_store_is_refused(tmp_path, run_cli):
    """A level folder linked to another store: the name is harmless, where it leads is not."""
    secret = _foreign_image(tmp_path / "secret.ome.zarr", "0", np.full((1, 4, 4), 7, np.uint8))
    store = _foreign_image(tmp_path / "in.ome.zarr", "0", np.zeros((1, 4, 4), np.uint8))
    import shutil

    shutil.rmtree(store / "0")
    (store / "0").symlink_to(secret / "0", target_is_directory=True)
    for read in (image_metadata, open_image, open_zarr_source):
        with pytest.raises(InputError, match=r"in.ome.zarr: multiscales dataset path '0' leads outside the store"):
            read(store)
    code, _, err = run_cli("-q", "ingest", store, tmp_path / "out.ome.zarr")
    _one_line(code, err)
    assert "leads outside the store" in err
    # A link that stays inside the store is fine (some tools link levels to share them).
    shutil.copytree(secret / "0", store / "real0")
    (store / "0").unlink()
    (store / "0").symlink_to("real0", target_is_directory=True)
    np.testing.assert_array_equal(open_image(store)[:], np.full((1, 4, 4), 7, np.uint8))


@pytest.mark.parametrize("entry", ["../../secret", "/etc", "..", ""])
def test_labels_list_naming_a_path_outside_the_group_is_refused(tmp_path, entry, run_cli):
    _foreign_image(tmp_path / "secret", "0", np.full((1, 4, 4), 7, np.uint8))
    labels = tmp_path / "raw.ome.zarr" / "labels"
    zarr.open_group(str(labels), mode="w", zarr_format=2).attrs.put({"labels": [entry]})
    with pytest.raises(InputError, match=r"labels: labels entry .* (is not a relative name|leads outside)"):
        open_zarr_source(labels)
    code, _, err = run_cli("-q", "ingest", labels, tmp_path / "out.ome.zarr")
    _one_line(code, err)
    assert "labels entry" in err


def test_labels_group_of_one_image_inside_it_still_reads(tmp_path):
    root = tmp_path / "raw.ome.zarr"
    zarr.open_group(str(root / "labels"), mode="w", zarr_format=2).attrs.put({"labels": ["cells"]})
    _foreign_image(root / "labels" / "cells", "0", np.full((1, 4, 4), 3, np.uint8))
    np.testing.assert_array_equal(open_zarr_source(root / "labels").read(0, 1), np.full((1, 4, 4), 3, np.uint8))


# ------------------------------------------------------------------- deleted chunks of our stores


@pytest.fixture
def stores(tmp_path, run_cli) -> dict:
    """Each kind of store the pipeline writes, (2, 64, 64) in chunks of (1, 32, 32), and a tiny model."""
    rng = np.random.default_rng(0)
    raw = rng.integers(1, 255, (2, 64, 64), dtype=np.uint8)
    save_checkpoint(tmp_path / "m.pt", UNet(depth=2, base_channels=4))
    stores = {
        "raw": _store(tmp_path / "raw.zarr", raw),
        "labels": _store(tmp_path / "labels.zarr", ((raw > 100) * 255).astype(np.uint8), "labels"),
        "prob": _store(tmp_path / "prob.zarr", (raw / 255).astype(np.float32)),
        "ckpt": tmp_path / "m.pt",
    }
    for name, args in (("weights", ["weights", stores["labels"], tmp_path / "weights.zarr"]),
                       ("instances", ["postprocess", stores["prob"], tmp_path / "instances.zarr"])):
        code, _, err = run_cli("-q", *args, "--pyramid-levels", "0")
        assert code == 0, err
        stores[name] = tmp_path / f"{name}.zarr"
    return stores


def test_published_store_records_its_chunks(stores, tmp_path):
    for name in ("raw", "labels", "prob", "weights", "instances"):
        record = _attrs(stores[name])["unet_pipe"]["chunks"]
        assert record == {"0": {"count": 8, "absent": []}}, name
    # zarr leaves out chunks equal to the fill value: recorded as absent by design, and read as zeros.
    data = np.zeros((2, 64, 64), np.uint8)
    data[1, 40, 40] = 5
    sparse = _store(tmp_path / "sparse.zarr", data, "labels", levels=1)
    record = _attrs(sparse)["unet_pipe"]["chunks"]
    assert record["0"] == {"count": 1, "present": ["1/1/1"]}
    assert record["1"] == {"count": 1, "absent": ["0/0/0"]}  # the shorter list: a tie keeps "absent"
    np.testing.assert_array_equal(open_image(sparse)[:], data)
    (sparse / "0" / "1" / "1" / "1").unlink()
    with pytest.raises(InputError, match=r"sparse.zarr: chunk 0/1/1/1 is missing: the store was written with it"):
        open_image(sparse)
    np.testing.assert_array_equal(open_image(sparse, 1)[1, 20, 20], 5)  # the other level is whole


def test_deleted_chunk_of_an_ngff_05_store_is_named(tmp_path):
    data = np.arange(2 * 64 * 64, dtype=np.uint16).reshape(2, 64, 64) + 1
    staged = StagedImage(tmp_path / "v3.ome.zarr", shape=data.shape, dtype=data.dtype, chunks=(1, 32, 32), ngff="0.5")
    staged.array[:] = data
    store = staged.commit(pyramid_levels=1)
    record = json.loads((store / "zarr.json").read_text())["attributes"]["unet_pipe"]["chunks"]
    assert record == {"0": {"count": 8, "absent": []}, "1": {"count": 2, "absent": []}}
    np.testing.assert_array_equal(open_image(store)[:], data)
    (store / "1" / "c" / "1" / "0" / "0").unlink()
    np.testing.assert_array_equal(open_image(store)[:], data)  # level 0 is whole
    with pytest.raises(InputError, match=r"v3.ome.zarr: chunk 1/c/1/0/0 is missing"):
        open_image(store, 1)


CASES = [  # (store whose chunk 0/1/1/0 is deleted, stage reading it)
    ("raw", "predict"), ("raw", "ingest"), ("raw", "train"),
    ("labels", "weights"), ("labels", "evaluate"), ("labels", "train"),
    ("weights", "train"),
    ("prob", "postprocess"), ("prob", "calibrate"), ("prob", "evaluate"),
    ("instances", "evaluate"),
]


@pytest.mark.parametrize(("kind", "stage"), CASES)
def test_deleted_chunk_is_named_by_every_stage_that_reads_the_store(stores, tmp_path, run_cli, kind, stage):
    from unet_pipe.config import validate_config

    (stores[kind] / "0" / "1" / "1" / "0").unlink()
    out = tmp_path / "out"
    if stage == "predict":
        args = [stores["ckpt"], stores["raw"], out, "--block", "1", "32", "32"]
    elif stage == "ingest":
        args = [stores["raw"], out]
    elif stage == "weights":
        args = [stores["labels"], out]
    elif stage == "postprocess":
        args = [stores["prob"], out]
    elif stage == "evaluate":
        prediction = stores["instances"] if kind == "instances" else stores["labels"]
        args = ["--prediction", prediction, "--truth", stores["labels"], "--out", tmp_path / "out.json"]
        args += ["--probabilities", stores["prob"]] if kind == "prob" else []
    elif stage == "calibrate":
        args = ["--probabilities", f"s={stores['prob']}", "--truth", f"s={stores['labels']}", "--slices", "s=0:2",
                "--out", tmp_path / "out.json"]
    else:
        config = validate_config({
            "datasets": {"s": {"synthetic": {"shape": [2, 64, 64]}}},
            "model": {"depth": 2, "base_channels": 4},
            "train": {"datasets": {"s": {"train": [0, 2]}}, "tile": 44, "steps": 2, "val_every": 2},
        })
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        args = [tmp_path / "c.yaml", "--raw", f"s={stores['raw']}", "--labels", f"s={stores['labels']}",
                "--weights", f"s={stores['weights']}", "--out", tmp_path / "out.pt", "--threads", "1"]
    code, _, err = run_cli("-q", stage, *args)
    _one_line(code, err)
    assert f"{kind}.zarr: chunk 0/1/1/0 is missing" in err, err
    assert not out.exists() and not (tmp_path / "out.json").exists() and not (tmp_path / "out.pt").exists()


def test_missing_chunk_of_a_foreign_store_reads_as_the_fill_value(tmp_path):
    store = _foreign_image(tmp_path / "foreign.ome.zarr", "0", np.ones((2, 4, 4), np.uint8))
    (store / "0" / "0.0.0").unlink()  # its only chunk (zarr format 2, "." separated keys)
    np.testing.assert_array_equal(open_image(store)[:], np.zeros((2, 4, 4), np.uint8))
    np.testing.assert_array_equal(open_zarr_source(store).read(0, 2), np.zeros((2, 4, 4), np.uint8))
