"""The CLI contract: subcommands, one-line errors, exit codes."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import tifffile
import yaml

from unet_pipe.io import image_metadata, open_image


def test_synth_then_ingest(tmp_path, run_cli, monkeypatch):
    code, _, err = run_cli("synth", tmp_path / "d", "--shape", 3, 64, 80, "--seed", 5)
    assert code == 0, err
    code, _, err = run_cli("ingest", tmp_path / "d" / "raw.tif", tmp_path / "raw.ome.zarr", "--chunks", "1,32,32")
    assert code == 0, err
    meta = image_metadata(tmp_path / "raw.ome.zarr")
    assert meta.shape == (3, 64, 80) and meta.chunks == (1, 32, 32)
    assert meta.voxel_size == (0.05, 0.004, 0.004)  # from the synthetic TIFF's ImageJ metadata
    ms = meta.attrs["multiscales"][0]
    assert ms["datasets"][0]["path"] == "0"
    np.testing.assert_array_equal(open_image(tmp_path / "raw.ome.zarr")[:], tifffile.imread(tmp_path / "d" / "raw.tif"))
    code, _, err = run_cli("ingest", tmp_path / "d" / "labels.tif", tmp_path / "lab.ome.zarr", "--labels",
                           "--like", tmp_path / "raw.ome.zarr", "--compression", "zstd:5:4096")
    assert code == 0, err
    import unet_pipe.io

    pools = []
    original = unet_pipe.io._ChunkWriter.__init__

    def spy(self, workers=None):
        original(self, workers)
        pools.append(self.pool._max_workers)

    monkeypatch.setattr(unet_pipe.io._ChunkWriter, "__init__", spy)
    code, _, err = run_cli("ingest", tmp_path / "d" / "raw.tif", tmp_path / "raw1.ome.zarr", "--threads", 1)
    assert code == 0 and pools == [1], err
    np.testing.assert_array_equal(open_image(tmp_path / "raw1.ome.zarr")[:], open_image(tmp_path / "raw.ome.zarr")[:])
    code, _, err = run_cli("ingest", tmp_path / "d" / "raw.tif", tmp_path / "raw0.ome.zarr", "--threads", 0)
    assert code == 2 and "--threads must be a finite number in [1, 1024]" in err and not (tmp_path / "raw0.ome.zarr").exists()
    compressor = open_image(tmp_path / "lab.ome.zarr").compressors[0]
    assert (compressor.cname, compressor.clevel, compressor.blocksize) == ("zstd", 5, 4096)
    np.testing.assert_array_equal(open_image(tmp_path / "lab.ome.zarr")[:], tifffile.imread(tmp_path / "d" / "labels.tif"))


def test_user_error_is_one_line_without_traceback(tmp_path):
    (tmp_path / "bad.tif").write_bytes(b"not a tiff at all")
    proc = subprocess.run(
        [sys.executable, "-m", "unet_pipe", "ingest", str(tmp_path / "bad.tif"), str(tmp_path / "o.ome.zarr")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unet-pipe: error: ") and "bad.tif: not a readable TIFF" in lines[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tif"]


def test_bad_arguments_and_help(run_cli, capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        run_cli("ingest", "a.tif", "b.ome.zarr", "--chunks", "1,2")
    assert exc.value.code == 2
    assert "chunks must be three positive integers" in capsys.readouterr().err
    for bad in ("zstd", "zstd:10", "brotli:1", "zstd:1:big"):
        with pytest.raises(SystemExit) as exc:
            run_cli("ingest", "a.tif", "b.ome.zarr", "--compression", bad)
        assert exc.value.code == 2
        assert "compression must be CODEC:LEVEL[:BLOCKSIZE]" in capsys.readouterr().err
    for command in ("synth", "ingest", "check-config", "info"):
        with pytest.raises(SystemExit) as exc:
            run_cli(command, "--help")
        assert exc.value.code == 0


def test_check_config(tmp_path, run_cli):
    good = tmp_path / "c.yaml"
    good.write_text("datasets: {demo: {synthetic: {}}}\n")
    assert run_cli("check-config", good)[0] == 0
    bad = tmp_path / "b.yaml"
    bad.write_text("datasets: {demo: {synthetic: {}}}\nweights: {w0: -1}\n")
    code, _, err = run_cli("check-config", bad)
    assert code == 2 and "key 'weights.w0'" in err


def test_check_config_composes_overlays(tmp_path, run_cli):
    base = tmp_path / "preset.yaml"
    base.write_text("datasets: {a: {synthetic: {}}}\nweights: {w0: 3.0, sigma: 2.0}\npredict: {datasets: [a]}\n")
    mine = tmp_path / "mine.yaml"
    mine.write_text("datasets: {b: {synthetic: {seed: 4}}}\nweights: {sigma: 7.0}\n")
    code, out, _ = run_cli("check-config", "--print", base, mine)
    assert code == 0
    cfg = yaml.safe_load(out)
    assert cfg["datasets"] == {
        "b": {"synthetic": {"seed": 4, "shape": [12, 256, 256]}, "voxel_size": None, "labels_offset": None}
    }
    assert (cfg["weights"]["w0"], cfg["weights"]["sigma"]) == (3.0, 7.0)
    assert cfg["predict"]["datasets"] == []
    # In the other order the preset's `a` replaces `b`: order matters.
    code, out, _ = run_cli("check-config", "--print", mine, base)
    assert code == 0 and list(yaml.safe_load(out)["datasets"]) == ["a"]
    # An error names the file that gave the key (the composed files where no one file did).
    mine.write_text("weights: {w0: -1}\n")
    code, _, err = run_cli("check-config", base, mine)
    assert code == 2 and err == f"unet-pipe: error: {mine}: key 'weights.w0': -1 is less than the minimum of 0\n"
