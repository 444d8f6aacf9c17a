"""NGFF 0.5 (zarr format 3) output: same arrays as 0.4, the 0.5 layout, resume, safety, integrity."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from unet_pipe.errors import InputError, OutputError
from unet_pipe.ingest import ingest_tiff
from unet_pipe.io import StagedImage, image_metadata, open_image
from unet_pipe.safety import is_our_store

VOXEL = (0.05, 0.004, 0.004)


@pytest.fixture
def pair(tmp_path) -> dict[str, Path]:
    """The same (3, 9, 10) uint16 stack and its labels ingested as NGFF 0.4 and as 0.5."""
    raw = np.arange(3 * 9 * 10, dtype=np.uint16).reshape(3, 9, 10) * 7
    tifffile.imwrite(tmp_path / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", (raw % 3).astype(np.uint8), photometric="minisblack")
    stores = {}
    for ngff in ("0.4", "0.5"):
        folder = tmp_path / ngff
        folder.mkdir()
        stores[ngff] = ingest_tiff(tmp_path / "raw.tif", folder / "raw.ome.zarr", chunks=(2, 4, 4),
                                   voxel_size=VOXEL, pyramid_levels=2, ngff=ngff)
        stores[f"labels{ngff}"] = ingest_tiff(tmp_path / "labels.tif", folder / "labels.ome.zarr", chunks=(2, 4, 4),
                                              kind="labels", like=stores[ngff], pyramid_levels=2, ngff=ngff)
    return stores


def test_v3_store_holds_the_arrays_and_chunk_bytes_of_the_v2_one(pair):
    raw = np.arange(3 * 9 * 10, dtype=np.uint16).reshape(3, 9, 10) * 7
    for level, shape in enumerate([(3, 9, 10), (3, 4, 5), (3, 2, 2)]):
        v2, v3 = open_image(pair["0.4"], level)[:], open_image(pair["0.5"], level)[:]
        assert v3.shape == shape and v3.dtype == np.uint16
        np.testing.assert_array_equal(v3, v2)
    np.testing.assert_array_equal(open_image(pair["0.5"])[:], raw)
    # 2x2 mean rounded half up: (0 + 7 + 70 + 77) / 4 = 38.5 -> 39.
    assert open_image(pair["0.5"], 1)[0, 0, 0] == 39
    # Same Blosc stream, only the key differs: 0/z/y/x (format 2), 0/c/z/y/x (format 3).
    v2_chunks = sorted(p.relative_to(pair["0.4"] / "0").as_posix() for p in (pair["0.4"] / "0").rglob("*")
                       if p.is_file() and not p.name.startswith("."))
    v3_chunks = sorted(p.relative_to(pair["0.5"] / "0").as_posix() for p in (pair["0.5"] / "0").rglob("*")
                       if p.is_file() and p.name != "zarr.json")
    assert v2_chunks[:3] == ["0/0/0", "0/0/1", "0/0/2"] and len(v2_chunks) == 2 * 3 * 3
    assert v3_chunks == [f"c/{key}" for key in v2_chunks]
    for key in v2_chunks:
        assert (pair["0.5"] / "0" / "c" / key).read_bytes() == (pair["0.4"] / "0" / key).read_bytes()
    # The stream checksum does not depend on the format.
    assert image_metadata(pair["0.5"]).attrs["unet_pipe"]["array_sha256"] == \
        image_metadata(pair["0.4"]).attrs["unet_pipe"]["array_sha256"]


def test_v3_metadata_is_the_ngff_05_layout(pair):
    group = json.loads((pair["0.5"] / "zarr.json").read_text())
    assert group["zarr_format"] == 3 and group["node_type"] == "group"
    assert not (pair["0.5"] / ".zattrs").exists() and not (pair["0.5"] / ".zgroup").exists()
    ome = group["attributes"]["ome"]
    assert ome == {
        "version": "0.5",
        "multiscales": [{
            "name": "raw.ome.zarr",
            "axes": [{"name": ax, "type": "space", "unit": "micrometer"} for ax in "zyx"],
            "datasets": [
                {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [0.05, 0.004 * 2**k,
                                                                                         0.004 * 2**k]}]}
                for k in range(3)
            ],
            "type": "mean",
        }],
    }
    assert group["attributes"]["unet_pipe"]["kind"] == "image"
    labels = json.loads((pair["labels0.5"] / "zarr.json").read_text())["attributes"]["ome"]
    assert labels["image-label"] == {"source": {"image": "../raw.ome.zarr"}}
    assert labels["multiscales"][0]["type"] == "nearest" and "version" not in labels["multiscales"][0]
    array = json.loads((pair["0.5"] / "1" / "zarr.json").read_text())
    assert array["shape"] == [3, 4, 5] and array["data_type"] == "uint16"
    assert array["chunk_grid"]["configuration"]["chunk_shape"] == [2, 4, 4]
    assert array["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
    assert array["dimension_names"] == ["z", "y", "x"]
    assert array["codecs"] == [
        {"name": "bytes", "configuration": {"endian": "little"}},
        {"name": "blosc", "configuration": {"typesize": 2, "cname": "zstd", "clevel": 1, "shuffle": "shuffle",
                                            "blocksize": 262144}},
    ]
    meta = image_metadata(pair["0.5"])
    assert (meta.ngff, meta.shape, meta.chunks, meta.voxel_size, meta.levels) == \
        ("0.5", (3, 9, 10), (2, 4, 4), VOXEL, 2)
    assert image_metadata(pair["0.4"]).ngff == "0.4"


def test_a_partial_v3_store_resumes_and_a_v2_request_starts_over(tmp_path):
    dest = tmp_path / "p.ome.zarr"
    data = np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)

    def staged(ngff: str) -> StagedImage:
        return StagedImage(dest, shape=data.shape, dtype=np.float32, chunks=(1, 8, 8), resume=True,
                           fingerprint="f", ngff=ngff)

    first = staged("0.5")
    first.array[0:2] = data[0:2]
    first.mark_done("0")
    first.mark_done("1")
    del first  # the job dies here
    again = staged("0.5")
    assert again.done_keys() == ["0", "1"]
    np.testing.assert_array_equal(again.array[0:2], data[0:2])
    again.array[2:] = data[2:]
    assert again.commit(pyramid_levels=0) == dest
    np.testing.assert_array_equal(open_image(dest)[:], data)
    # A staging store of the other format is not resumed.
    other = StagedImage(tmp_path / "q.ome.zarr", shape=data.shape, dtype=np.float32, chunks=(1, 8, 8),
                        resume=True, fingerprint="f", ngff="0.5")
    other.mark_done("0")
    del other
    assert StagedImage(tmp_path / "q.ome.zarr", shape=data.shape, dtype=np.float32, chunks=(1, 8, 8),
                       resume=True, fingerprint="f", ngff="0.4").done_keys() == []


def test_a_foreign_v3_store_is_never_replaced_and_ours_is(tmp_path, pair):
    foreign = tmp_path / "theirs.ome.zarr"
    zarr.open_group(str(foreign), mode="w", zarr_format=3).attrs["ome"] = {"version": "0.5", "multiscales": []}
    assert not is_our_store(foreign) and is_our_store(pair["0.5"]) and is_our_store(pair["0.4"])
    with pytest.raises(OutputError, match="was not written by unet-pipe"):
        StagedImage(foreign, shape=(1, 4, 4), dtype=np.uint8, overwrite=True, ngff="0.5")
    assert json.loads((foreign / "zarr.json").read_text())["attributes"]["ome"]["version"] == "0.5"
    # Ours (0.5) is replaced by a 0.4 store: a changed ngff_version rewrites the outputs.
    replaced = StagedImage(pair["0.5"], shape=(1, 4, 4), dtype=np.uint8, overwrite=True, ngff="0.4")
    replaced.commit(pyramid_levels=0)
    assert not (pair["0.5"] / "zarr.json").exists() and image_metadata(pair["0.5"]).ngff == "0.4"


def test_a_truncated_v3_chunk_is_named_not_decoded(pair):
    chunk = pair["0.5"] / "0" / "c" / "1" / "2" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-5])
    with pytest.raises(InputError, match=r"chunk 0/c/1/2/0 is corrupt \(a zarr chunk has \d+ bytes but its Blosc "
                                         r"header says \d+"):
        open_image(pair["0.5"])[:]


def test_cli_writes_either_version_and_the_config_key_chooses(tmp_path, run_cli):
    tifffile.imwrite(tmp_path / "raw.tif", np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8))
    code, _, err = run_cli("ingest", tmp_path / "raw.tif", tmp_path / "a.ome.zarr", "--ngff", "0.5",
                           "--chunks", "1,4,4", "--pyramid-levels", "1")
    assert code == 0, err
    assert image_metadata(tmp_path / "a.ome.zarr").ngff == "0.5"
    assert image_metadata(tmp_path / "a.ome.zarr").attrs["unet_pipe"]["provenance"]["params"]["ngff"] == "0.5"
    config = tmp_path / "c.yaml"
    config.write_text('ngff_version: "0.5"\ndatasets: {d: {synthetic: {shape: [2, 8, 8]}}}\n')
    code, _, err = run_cli("ingest", tmp_path / "raw.tif", tmp_path / "b.ome.zarr", "--config", config)
    assert code == 0, err
    assert (tmp_path / "b.ome.zarr" / "zarr.json").is_file()
    with pytest.raises(SystemExit) as stop:
        run_cli("ingest", tmp_path / "raw.tif", tmp_path / "c.ome.zarr", "--ngff", "0.6")
    assert stop.value.code == 2
