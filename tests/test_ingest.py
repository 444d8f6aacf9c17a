"""Ingest: TIFF reading and OME-Zarr writing (exact values, metadata, streaming, bad input); OME-Zarr
(NGFF 0.4 / 0.5) and plain zarr arrays as inputs (exact ingest, voxel size and translation, labelled crops
placed by their translation, one-line errors)."""
from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.writer import write_multiscale

from unet_pipe.config import check_input_stacks, validate_config
from unet_pipe.errors import ConfigError, InputError, OutputError
from unet_pipe.ingest import INGEST_COMPRESSION, ingest_tiff
from unet_pipe.intensity import IntensitySample, intensity_range
from unet_pipe.io import (
    StagedImage,
    downsample2,
    image_metadata,
    multiscales_metadata,
    open_image,
    open_tiff_stack,
    write_pyramid,
)
from unet_pipe.sampling import TileSampler, volumes_from_config
from unet_pipe.train import open_stores
from unet_pipe.zarr_input import open_input_stack, open_zarr_source


def imwrite(path, data, **kwargs):
    kwargs.setdefault("photometric", "minisblack")
    tifffile.imwrite(path, data, **kwargs)


def _level(path, level):
    return zarr.open_group(str(path), mode="r")[str(level)][:]


# ------------------------------------------------------------------ readers


def test_multipage_tiff_roundtrip_exact(tmp_path, tiny_stack):
    imwrite(tmp_path / "s.tif", tiny_stack)
    dest = ingest_tiff(tmp_path / "s.tif", tmp_path / "s.ome.zarr", chunks=(2, 4, 4), pyramid_levels=1)
    arr = open_image(dest)
    assert arr.dtype == np.uint16
    assert arr.chunks == (2, 4, 4)
    np.testing.assert_array_equal(arr[:], tiny_stack)
    attrs = image_metadata(dest).attrs["unet_pipe"]
    assert attrs["array_sha256"] == hashlib.sha256(tiny_stack.tobytes()).hexdigest()


def test_folder_of_slices_natural_order(tmp_path, tiny_stack):
    folder = tmp_path / "slices"
    folder.mkdir()
    # names that sort wrongly as strings: 2 < 10 only in natural order
    for z, name in zip(range(3), ["s1.tif", "s2.tif", "s10.tif"]):
        imwrite(folder / name, tiny_stack[z])
    (folder / "notes.txt").write_text("ignored: not a TIFF")
    src = open_tiff_stack(folder)
    assert [f.name for f in src.files] == ["s1.tif", "s2.tif", "s10.tif"]
    dest = ingest_tiff(folder, tmp_path / "f.ome.zarr", chunks=(1, 5, 7))
    np.testing.assert_array_equal(open_image(dest)[:], tiny_stack)


@pytest.mark.parametrize("kwargs", [{"bigtiff": True}, {"ome": True}])
def test_bigtiff_and_ome_tiff(tmp_path, tiny_stack, kwargs):
    imwrite(tmp_path / "s.tif", tiny_stack, **kwargs)
    dest = ingest_tiff(tmp_path / "s.tif", tmp_path / "s.ome.zarr", chunks=(1, 5, 7))
    np.testing.assert_array_equal(open_image(dest)[:], tiny_stack)


@pytest.mark.parametrize(
    "write",
    [
        {"compression": "lzw"},
        {"compression": "zlib", "predictor": True},
        {"compression": "zstd"},
        {"tile": (16, 16)},
        {"tile": (16, 16), "compression": "lzw", "bigtiff": True},
    ],
    ids=["lzw", "deflate-predictor", "zstd", "tiled", "tiled-lzw-bigtiff"],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_compressed_and_tiled_pages_roundtrip_exact(tmp_path, write, dtype):
    """Acquisition software often writes LZW/deflate and tiled pages: values stay exact."""
    rng = np.random.default_rng(7)
    data = (rng.normal(size=(3, 40, 37)) * 1000).astype(dtype) if dtype != np.uint8 else rng.integers(0, 256, (3, 40, 37), dtype)
    imwrite(tmp_path / "c.tif", data, **write)
    dest = ingest_tiff(tmp_path / "c.tif", tmp_path / "c.ome.zarr", chunks=(2, 16, 16))
    got = open_image(dest)[:]
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, data)
    assert image_metadata(dest).attrs["unet_pipe"]["array_sha256"] == hashlib.sha256(data.tobytes()).hexdigest()


# Layouts of large slices: plain pages (read at the band's offset, either byte
# order), strips and tiles (zarr view of the page), one compressed strip per page
# (decoded whole), and a folder of slices.
BAND_LAYOUTS = {
    "plain": {},
    "plain-big-endian": {"byteorder": ">"},
    "strips-deflate": {"compression": "zlib", "rowsperstrip": 8},
    "tiles-lzw": {"tile": (16, 16), "compression": "lzw"},
    "one-strip-deflate": {"compression": "zlib", "rowsperstrip": 1000},
    "folder": {},
    "bigtiff": {"bigtiff": True},
    "ome": {"ome": True},
}


@pytest.mark.parametrize("layout", BAND_LAYOUTS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_large_slices_are_read_in_bands_with_the_same_result(tmp_path, layout, dtype, monkeypatch):
    rng = np.random.default_rng(11)
    data = (rng.random((3, 150, 70)) * 250).astype(dtype)
    if layout == "folder":
        src = tmp_path / "slices"
        src.mkdir()
        for z in range(3):
            imwrite(src / f"s{z}.tif", data[z])
    else:
        src = tmp_path / "s.tif"
        imwrite(src, data, **BAND_LAYOUTS[layout])
    whole = ingest_tiff(src, tmp_path / "whole.ome.zarr", chunks=(1, 16, 32), pyramid_levels=2)
    import unet_pipe.tiff

    readers = set()
    original = unet_pipe.tiff._band_reader

    def spy(*args):
        reader = original(*args)
        readers.add(reader.__name__)
        return reader

    monkeypatch.setattr(unet_pipe.tiff, "_band_reader", spy)
    banded = ingest_tiff(src, tmp_path / "bands.ome.zarr", chunks=(1, 16, 32), pyramid_levels=2, max_buffer_bytes=1)
    expected = {"strips-deflate": "read_segments", "tiles-lzw": "read_segments", "one-strip-deflate": "read_whole"}
    assert readers == {expected.get(layout, "read_plain")}
    np.testing.assert_array_equal(open_image(banded)[:], data)
    for level in (0, 1, 2):
        np.testing.assert_array_equal(_level(banded, level), _level(whole, level))
    digest = image_metadata(banded).attrs["unet_pipe"]["array_sha256"]
    assert digest == image_metadata(whole).attrs["unet_pipe"]["array_sha256"] == hashlib.sha256(data.tobytes()).hexdigest()


def test_band_reading_reports_nan_and_truncation(tmp_path):
    data = np.ones((2, 150, 70), np.float32)
    data[1, 120, 3] = np.nan
    imwrite(tmp_path / "nan.tif", data)
    with pytest.raises(InputError, match=r"nan\.tif: page 1 contains NaN"):
        ingest_tiff(tmp_path / "nan.tif", tmp_path / "n.ome.zarr", chunks=(1, 16, 32), max_buffer_bytes=1)
    good = np.zeros((2, 150, 70), np.uint8)
    imwrite(tmp_path / "cut.tif", good)
    raw = (tmp_path / "cut.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(raw[: len(raw) - 5000])
    with pytest.raises(InputError, match=r"cut\.tif: .*(corrupt or truncated|not a readable TIFF)"):
        ingest_tiff(tmp_path / "cut.tif", tmp_path / "c.ome.zarr", chunks=(1, 16, 32), max_buffer_bytes=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.tif", "nan.tif"]


def test_voxel_size_from_ome_metadata(tmp_path, tiny_stack):
    imwrite(
        tmp_path / "s.ome.tif",
        tiny_stack,
        ome=True,
        metadata={"axes": "ZYX", "PhysicalSizeZ": 50.0, "PhysicalSizeZUnit": "nm",
                  "PhysicalSizeY": 4.0, "PhysicalSizeYUnit": "nm", "PhysicalSizeX": 4.0, "PhysicalSizeXUnit": "nm"},
    )
    dest = ingest_tiff(tmp_path / "s.ome.tif", tmp_path / "s.ome.zarr")
    assert image_metadata(dest).voxel_size == pytest.approx((0.05, 0.004, 0.004))


def test_voxel_size_from_imagej_metadata_and_override(tmp_path, tiny_stack):
    imwrite(tmp_path / "s.tif", tiny_stack, imagej=True, resolution=(1 / 0.004, 1 / 0.004),
                     metadata={"spacing": 0.05, "unit": "um", "axes": "ZYX"})
    a = ingest_tiff(tmp_path / "s.tif", tmp_path / "a.ome.zarr")
    assert image_metadata(a).voxel_size == pytest.approx((0.05, 0.004, 0.004))
    b = ingest_tiff(tmp_path / "s.tif", tmp_path / "b.ome.zarr", voxel_size=(1.0, 0.5, 0.25))
    assert image_metadata(b).voxel_size == (1.0, 0.5, 0.25)


# ------------------------------------------------------------------ metadata


def test_ngff_multiscales_lists_full_resolution_first(tmp_path):
    data = np.arange(2 * 8 * 12, dtype=np.uint8).reshape(2, 8, 12)
    imwrite(tmp_path / "s.tif", data)
    dest = ingest_tiff(tmp_path / "s.tif", tmp_path / "s.ome.zarr", voxel_size=(0.05, 0.004, 0.004),
                       pyramid_levels=2, chunks=(1, 4, 4))
    attrs = json.loads((dest / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[0.05, 0.004, 0.004], [0.05, 0.008, 0.008], [0.05, 0.016, 0.016]]
    # level 1 is the 2x2 mean, rounded: rows 0-1, cols 0-1 of slice 0 are 0, 1, 12, 13 -> 6.5 -> 7 (round half up)
    level1 = _level(dest, 1)
    assert level1.shape == (2, 4, 6)
    assert level1[0, 0, 0] == 7 and level1[0, 0, 1] == 9
    assert _level(dest, 2).shape == (2, 2, 3)
    assert ".zgroup" in {p.name for p in dest.iterdir()}


def test_labels_pyramid_is_nearest_and_keeps_values():
    labels = np.array([[[0, 255, 255, 0], [255, 0, 0, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(downsample2(labels, "labels"), [[[0, 255]]])
    assert set(np.unique(downsample2(labels, "labels"))) <= {0, 255}


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16])
@pytest.mark.parametrize("shape", [(2, 6, 10), (1, 131, 77), (3, 260, 4)])
def test_integer_downsampling_is_the_rounded_2x2_mean(dtype, shape):
    info = np.iinfo(dtype)
    data = np.random.default_rng(1).integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    z, y, x = shape
    cut = data[:, : y // 2 * 2, : x // 2 * 2].astype(np.float64)
    mean = cut.reshape(z, y // 2, 2, x // 2, 2).mean(axis=(2, 4))
    got = downsample2(data[:, : y // 2 * 2, : x // 2 * 2], "image")
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, np.floor(mean + 0.5).astype(dtype))


@pytest.mark.parametrize("kind", ["image", "labels"])
def test_write_pyramid_streams_bands_and_matches_whole_slices(tmp_path, kind, monkeypatch):
    data = np.random.default_rng(3).integers(0, 255, (3, 75, 41), dtype=np.uint8)
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=data.shape, chunks=(2, 8, 16), dtype=data.dtype, fill_value=0)[:] = data
    requested = []
    real = downsample2

    def spy(slab, kind):
        requested.append(slab.shape)
        return real(slab, kind)

    monkeypatch.setattr("unet_pipe.io.downsample2", spy)
    monkeypatch.setattr("unet_pipe.io.SLAB_VOXELS", 1)  # one z-chunk per band
    assert write_pyramid(group, 3, kind=kind) == 3
    assert max(shape[1] for shape in requested) <= 16 and max(shape[0] for shape in requested) <= 2
    expected = data
    for level in (1, 2, 3):
        y, x = expected.shape[1] // 2 * 2, expected.shape[2] // 2 * 2
        expected = real(expected[:, :y, :x], kind)
        np.testing.assert_array_equal(group[str(level)][:], expected)


def test_multiscales_metadata_units():
    meta = multiscales_metadata("x", (1.0, 2.0, 3.0), levels=1, kind="labels")
    assert meta["datasets"][1]["coordinateTransformations"][0]["scale"] == [1.0, 4.0, 6.0]
    assert all(ax["unit"] == "micrometer" for ax in meta["axes"])


def test_labels_ingest_keeps_integer_dtype_and_checks_shape(tmp_path):
    raw = np.zeros((2, 6, 6), np.uint8)
    labels = np.arange(72, dtype=np.uint32).reshape(2, 6, 6)
    imwrite(tmp_path / "raw.tif", raw)
    imwrite(tmp_path / "lab.tif", labels)
    imwrite(tmp_path / "bad.tif", labels[:, :5])
    r = ingest_tiff(tmp_path / "raw.tif", tmp_path / "raw.ome.zarr")
    lab = ingest_tiff(tmp_path / "lab.tif", tmp_path / "lab.ome.zarr", kind="labels", like=r)
    arr = open_image(lab)
    assert arr.dtype == np.uint32
    np.testing.assert_array_equal(arr[:], labels)
    assert image_metadata(lab).attrs["image-label"]["version"] == "0.4"
    with pytest.raises(InputError, match=r"bad\.tif: shape \(2, 5, 6\) differs from \(2, 6, 6\)"):
        ingest_tiff(tmp_path / "bad.tif", tmp_path / "bad.ome.zarr", kind="labels", like=r)
    assert not (tmp_path / "bad.ome.zarr").exists()


# ------------------------------------------------------------------ staging


def test_staged_image_is_invisible_until_commit(tmp_path):
    dest = tmp_path / "out.ome.zarr"
    staged = StagedImage(dest, shape=(2, 4, 4), dtype="float32", chunks=(1, 4, 4))
    staged.array[0] = 1.5
    staged.mark_done("z0")
    assert not dest.exists() and staged.staging.exists()
    staged.commit(pyramid_levels=1, provenance={"params": {"a": 1}})
    assert dest.exists() and not staged.staging.exists()
    assert open_image(dest)[0, 0, 0] == 1.5
    assert image_metadata(dest).attrs["unet_pipe"]["provenance"] == {"params": {"a": 1}}


def test_staged_image_resume_keeps_done_blocks_only_with_same_fingerprint(tmp_path):
    dest = tmp_path / "out.ome.zarr"
    first = StagedImage(dest, shape=(2, 4, 4), dtype="uint8", chunks=(1, 4, 4), fingerprint="A")
    first.array[0] = 7
    first.mark_done("block-0")
    again = StagedImage(dest, shape=(2, 4, 4), dtype="uint8", chunks=(1, 4, 4), fingerprint="A", resume=True)
    assert again.is_done("block-0") and not again.is_done("block-1")
    assert again.array[0, 0, 0] == 7
    other = StagedImage(dest, shape=(2, 4, 4), dtype="uint8", chunks=(1, 4, 4), fingerprint="B", resume=True)
    assert not other.is_done("block-0")
    assert other.array[0, 0, 0] == 0


def test_existing_output_is_not_overwritten(tmp_path, tiny_stack):
    imwrite(tmp_path / "s.tif", tiny_stack)
    dest = ingest_tiff(tmp_path / "s.tif", tmp_path / "s.ome.zarr")
    before = (dest / ".zattrs").read_text()
    with pytest.raises(OutputError, match="already exists"):
        ingest_tiff(tmp_path / "s.tif", dest)
    assert (dest / ".zattrs").read_text() == before
    ingest_tiff(tmp_path / "s.tif", dest, overwrite=True, chunks=(1, 5, 7))
    assert open_image(dest).chunks == (1, 5, 7)


def test_interrupted_ingest_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    data = np.arange(4 * 6 * 6, dtype=np.uint8).reshape(4, 6, 6)
    imwrite(tmp_path / "s.tif", data)
    from unet_pipe.tiff import TiffSource

    original = TiffSource.iter_slices

    def dying(self, **kwargs):
        for z, page in original(self, **kwargs):
            if z == 2:
                raise KeyboardInterrupt
            yield z, page

    monkeypatch.setattr(TiffSource, "iter_slices", dying)
    with pytest.raises(KeyboardInterrupt):
        ingest_tiff(tmp_path / "s.tif", tmp_path / "s.ome.zarr", chunks=(1, 6, 6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]


# ------------------------------------------------------------------ bad input


def test_truncated_tiff_names_file_and_leaves_no_output(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (4, 64, 64), dtype=np.uint8)
    imwrite(tmp_path / "full.tif", data)
    blob = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match=r"cut\.tif: .*(corrupt|truncated|readable)"):
        ingest_tiff(tmp_path / "cut.tif", tmp_path / "cut.ome.zarr")
    assert not any(p.name.startswith("cut.ome.zarr") for p in tmp_path.iterdir())


def test_garbage_and_non_image_files(tmp_path):
    (tmp_path / "junk.tif").write_bytes(b"II*\x00" + b"\xff" * 64)
    (tmp_path / "notes.txt").write_text("hello")
    for name in ("junk.tif", "notes.txt"):
        with pytest.raises(InputError, match=rf"{name}: not a readable TIFF"):
            open_tiff_stack(tmp_path / name)


def test_folder_mismatches_and_empty(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="empty: folder holds no .tif/.tiff slices"):
        open_tiff_stack(empty)
    for name, second, problem in (("shapes", np.zeros((4, 5), np.uint8), r"slice shape \(4, 5\) differs"),
                                  ("dtypes", np.zeros((4, 4), np.uint16), r"slice dtype uint16 differs")):
        folder = tmp_path / name
        folder.mkdir()
        imwrite(folder / "a1.tif", np.zeros((4, 4), np.uint8))
        imwrite(folder / "a2.tif", second)
        with pytest.raises(InputError, match=rf"a2\.tif: {problem}"):
            open_tiff_stack(folder)


def test_rgb_tiff_is_rejected(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(InputError, match=r"rgb\.tif: colour/sample axis"):
        open_tiff_stack(tmp_path / "rgb.tif")


def test_nan_in_float_raw_is_rejected(tmp_path):
    data = np.ones((3, 4, 4), np.float32)
    data[2, 1, 1] = np.nan
    imwrite(tmp_path / "f.tif", data)
    with pytest.raises(InputError, match=r"f\.tif: page 2 contains NaN"):
        ingest_tiff(tmp_path / "f.tif", tmp_path / "f.ome.zarr")
    assert not any(p.name.startswith("f.ome.zarr") for p in tmp_path.iterdir())


def test_float_labels_are_rejected(tmp_path):
    imwrite(tmp_path / "l.tif", np.ones((2, 4, 4), np.float32))
    with pytest.raises(InputError, match="labels must be integers"):
        ingest_tiff(tmp_path / "l.tif", tmp_path / "l.ome.zarr", kind="labels")


def test_open_image_rejects_plain_folder(tmp_path):
    with pytest.raises(InputError, match="not found"):
        open_image(tmp_path / "missing.ome.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=2)
    with pytest.raises(InputError, match="no valid 'multiscales'"):
        open_image(tmp_path / "plain.zarr")


# ------------------------------------------------------------------ streaming


def test_ingest_reads_one_slice_at_a_time(tmp_path, monkeypatch):
    """The stack is never read whole: tifffile is asked for single pages only."""
    data = np.arange(5 * 8 * 8, dtype=np.uint8).reshape(5, 8, 8)
    imwrite(tmp_path / "s.tif", data)
    sizes = []
    original = tifffile.TiffPage.asarray

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        sizes.append(out.size)
        return out

    monkeypatch.setattr(tifffile.TiffPage, "asarray", spy)
    monkeypatch.setattr(tifffile.TiffFile, "asarray", lambda *a, **k: pytest.fail("whole-stack read"))
    ingest_tiff(tmp_path / "s.tif", tmp_path / "s.ome.zarr", chunks=(1, 8, 8))
    assert sizes and max(sizes) == 64


# ------------------------------------------------------------------ real data


def test_isbi_roundtrip_exact(isbi_dir, tmp_path):
    src = isbi_dir / "train-volume.tif"
    dest = ingest_tiff(src, tmp_path / "isbi.ome.zarr", chunks=(1, 256, 256), voxel_size=(0.05, 0.004, 0.004))
    meta = image_metadata(dest)
    assert meta.shape == (30, 512, 512) and meta.dtype == np.uint8 and meta.chunks == (1, 256, 256)
    zarray = json.loads((dest / "0" / ".zarray").read_text())
    assert {k: zarray["compressor"][k] for k in ("id", "cname", "clevel", "blocksize")} == {
        "id": "blosc", "cname": "zstd", "clevel": 1, "blocksize": 262144}
    # SOURCE.txt: sha256 of the raw array bytes starts with 200da3d452d726e6
    assert meta.attrs["unet_pipe"]["array_sha256"].startswith("200da3d452d726e6")
    np.testing.assert_array_equal(open_image(dest)[:], tifffile.imread(src))
    labels = ingest_tiff(isbi_dir / "train-labels.tif", tmp_path / "labels.ome.zarr", kind="labels", like=dest)
    lab_meta = image_metadata(labels)
    assert lab_meta.attrs["unet_pipe"]["array_sha256"].startswith("a7cb64000a1a7e54")
    assert lab_meta.voxel_size == (0.05, 0.004, 0.004)  # taken from the raw image
    assert set(np.unique(open_image(labels, level=2)[:])) <= {0, 255}


@pytest.mark.parametrize("compression", [None, INGEST_COMPRESSION, {"cname": "zstd", "clevel": 1, "blocksize": 256}])
def test_streamed_chunks_are_byte_identical_to_zarr_writes(tmp_path, compression):
    """The threaded chunk writer stores exactly what zarr itself would store."""
    data = np.random.default_rng(1).integers(0, 60000, (5, 37, 53), dtype=np.uint16)
    staged = StagedImage(tmp_path / "a.ome.zarr", shape=data.shape, dtype=data.dtype, chunks=(2, 16, 16), compression=compression)
    staged.write_slab(0, data[:2], pyramid_levels=1)
    staged.write_slab(2, data[2:4], pyramid_levels=1)
    staged.write_slab(4, data[4:], pyramid_levels=1)
    reference = zarr.open_group(str(tmp_path / "ref.zarr"), mode="w", zarr_format=2)
    ref = reference.create_array("0", shape=data.shape, chunks=(2, 16, 16), dtype=data.dtype,
                                 compressors=staged.array.compressors, fill_value=0,
                                 chunk_key_encoding={"name": "v2", "separator": "/"})
    ref[:] = data
    ours = sorted(p.relative_to(staged.staging / "0") for p in (staged.staging / "0").rglob("*") if p.is_file() and not p.name.startswith("."))
    theirs = sorted(p.relative_to(tmp_path / "ref.zarr" / "0") for p in (tmp_path / "ref.zarr" / "0").rglob("*") if p.is_file() and not p.name.startswith("."))
    assert ours == theirs and len(ours) == 3 * 3 * 4
    for rel in ours:
        assert (staged.staging / "0" / rel).read_bytes() == (tmp_path / "ref.zarr" / "0" / rel).read_bytes()
    dest = staged.commit(pyramid_levels=1)
    np.testing.assert_array_equal(open_image(dest)[:], data)
    np.testing.assert_array_equal(open_image(dest, level=1)[:], downsample2(data[:, :36, :52], "image"))


def test_pyramid_bands_span_z_chunks_up_to_the_slab_budget(tmp_path, monkeypatch):
    """Bands of several z-chunks per zarr call (chunks decoded concurrently), never above SLAB_VOXELS
    input voxels, with the same levels as one chunk per band."""
    data = np.random.default_rng(4).integers(0, 255, (7, 40, 24), dtype=np.uint8)
    levels = {}
    for budget in (1, 4 * 8 * 24 * 2, 1 << 24):
        group = zarr.open_group(str(tmp_path / f"{budget}.zarr"), mode="w", zarr_format=2)
        group.create_array("0", shape=data.shape, chunks=(2, 8, 16), dtype=data.dtype, fill_value=0)[:] = data
        requested = []
        monkeypatch.setattr("unet_pipe.io.downsample2", lambda slab, kind: (requested.append(slab.shape),
                                                                            downsample2(slab, kind))[1])
        monkeypatch.setattr("unet_pipe.io.SLAB_VOXELS", budget)
        write_pyramid(group, 2)
        levels[budget] = [group[str(k)][:] for k in (1, 2)]
        assert max(z * y * x for z, y, x in requested) <= max(budget, 2 * 16 * 24)
        level1 = [z for z, _, x in requested if x == 24]  # bands of level 0 -> 1
        assert max(level1) == (2 if budget == 1 else 4 if budget < 1 << 20 else 7)
    for budget in levels:
        for got, want in zip(levels[budget], levels[1]):
            np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------ zarr inputs
# OME-Zarr (NGFF 0.4 / 0.5) and plain zarr arrays as inputs: exact ingest, voxel size and
# translation, labelled crops placed by their translation, one-line errors.


NM = [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
RAW_SCALE = [50.0, 4.0, 4.0]  # nm
RAW_AT = [100.0, 20.0, 40.0]  # nm: the raw itself does not start at 0
OFFSET = (1, 10, 20)  # voxels of the crop in the raw


def _ome(path, data, scale, translation=None, fmt=FormatV04(), axes=NM):
    """An OME-Zarr image written by ome-zarr-py (its writer, as users' tools do)."""
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    transforms = [{"type": "scale", "scale": list(scale)}]
    if translation is not None:
        transforms.append({"type": "translation", "translation": list(translation)})
    with warnings.catch_warnings():  # coordinate_transformations: deprecated, still the way to give a translation
        warnings.simplefilter("ignore", DeprecationWarning)
        write_multiscale([data], group, axes=axes, fmt=fmt, coordinate_transformations=[transforms])
    return path


def _crop_case():
    raw = (np.arange(3 * 60 * 70) % 251).astype(np.uint8).reshape(3, 60, 70)
    labels = np.where(raw[1:3, 10:40, 20:55] % 3 == 0, 0, 255).astype(np.uint8)  # (2, 30, 35) at OFFSET
    return raw, labels


def _labels_at(offset):
    return [t + o * s for t, o, s in zip(RAW_AT, offset, RAW_SCALE)]


def _snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------- zarr inputs: reading and ingest


@pytest.mark.parametrize("fmt", [FormatV04(), FormatV05()], ids=["ngff0.4-zarr2", "ngff0.5-zarr3"])
def test_ome_zarr_raw_is_ingested_bit_identically_with_its_scale(tmp_path, fmt) -> None:
    data = (np.arange(3 * 6 * 8, dtype=np.uint16) * 613).reshape(3, 6, 8)
    src = _ome(tmp_path / "raw.ome.zarr", data, RAW_SCALE, RAW_AT, fmt)
    before = _snapshot(src)
    source = open_input_stack(src)
    assert (source.shape, source.level, source.ngff) == ((3, 6, 8), "s0", fmt.version)
    assert source.voxel_size == pytest.approx((0.05, 0.004, 0.004))
    assert source.translation == pytest.approx((0.1, 0.02, 0.04))
    dest = ingest_tiff(src, tmp_path / "out.ome.zarr", chunks=(1, 4, 4), pyramid_levels=1)
    np.testing.assert_array_equal(open_image(dest)[:], data)
    meta = image_metadata(dest)
    assert meta.dtype == np.uint16 and meta.voxel_size == pytest.approx((0.05, 0.004, 0.004))
    record = meta.attrs["unet_pipe"]
    assert record["array_sha256"] == hashlib.sha256(data.tobytes()).hexdigest()
    assert record["source"]["translation_um"] == pytest.approx([0.1, 0.02, 0.04])
    assert record["source"]["voxel_size_um"] == pytest.approx([0.05, 0.004, 0.004])
    assert meta.offset == (0, 0, 0)  # our stores keep the raw's frame
    np.testing.assert_array_equal(open_image(dest, 1)[:], (data[:, ::2, ::2].astype(float) + data[:, 1::2, ::2]
                                                           + data[:, ::2, 1::2] + data[:, 1::2, 1::2] + 2) // 4)
    assert _snapshot(src) == before  # the input is only read


def test_a_given_voxel_size_that_differs_from_the_scale_is_used_and_named(tmp_path, caplog) -> None:
    data = np.zeros((2, 4, 4), np.uint8)
    src = _ome(tmp_path / "raw.ome.zarr", data, RAW_SCALE, RAW_AT)
    same = ingest_tiff(src, tmp_path / "same.ome.zarr", chunks=(1, 4, 4), pyramid_levels=0, voxel_size=(0.05, 0.004, 0.004))
    assert "differs from the voxel size" not in caplog.text
    dest = ingest_tiff(src, tmp_path / "out.ome.zarr", chunks=(1, 4, 4), pyramid_levels=0, voxel_size=(0.04, 0.004, 0.004))
    assert image_metadata(dest).voxel_size == pytest.approx((0.04, 0.004, 0.004))
    assert image_metadata(same).voxel_size == pytest.approx((0.05, 0.004, 0.004))
    assert "scale [0.05, 0.004, 0.004] µm differs from the voxel size [0.04, 0.004, 0.004] µm given" in caplog.text


def test_plain_zarr_array_with_thick_chunks_big_endian_and_a_small_slab_budget(tmp_path, monkeypatch) -> None:
    import unet_pipe.zarr_input as zarr_input

    data = (np.arange(5 * 7 * 9, dtype=np.uint16) * 37).reshape(5, 7, 9)
    array = zarr.create_array(str(tmp_path / "plain.zarr"), shape=data.shape, chunks=(4, 3, 5), dtype=">u2",
                              zarr_format=2)
    array[:] = data
    # Two slices per read although a chunk holds four: memory bounded, values unchanged.
    monkeypatch.setattr(zarr_input, "SLAB_BYTES", 2 * 7 * 9 * 2)
    source = open_input_stack(tmp_path / "plain.zarr")
    assert (source.shape, source.voxel_size, source.translation, source.dtype) == ((5, 7, 9), None, None, "<u2")
    dest = ingest_tiff(tmp_path / "plain.zarr", tmp_path / "out.ome.zarr", chunks=(2, 4, 4), pyramid_levels=0,
                       voxel_size=(1.0, 0.5, 0.5))
    out = open_image(dest)[:]
    assert out.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(out, data)
    # Bands of rows (slices too large for the buffer) give the same store.
    dest2 = ingest_tiff(tmp_path / "plain.zarr", tmp_path / "bands.ome.zarr", chunks=(1, 2, 4), pyramid_levels=0,
                        max_buffer_bytes=10)
    np.testing.assert_array_equal(open_image(dest2)[:], data)


def test_2d_image_with_singleton_channel_and_composed_transforms(tmp_path) -> None:
    data = np.arange(6 * 8, dtype=np.uint8).reshape(1, 6, 8)
    group = zarr.open_group(str(tmp_path / "img.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=data.shape, dtype=data.dtype, chunks=(1, 6, 8))[:] = data
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1, 0.5, 0.25]}, {"type": "translation", "translation": [0, 1, 2]}]}],
        # Applied after the level's: scale 2 doubles the voxel size and the translation, then +10.
        "coordinateTransformations": [{"type": "scale", "scale": [1, 2, 2]},
                                      {"type": "translation", "translation": [0, 10, 10]}],
    }]
    source = open_zarr_source(tmp_path / "img.zarr")
    assert source.shape == (1, 6, 8) and source.is_2d
    assert source.voxel_size == pytest.approx((1.0, 1.0, 0.5))
    assert source.translation[0] is None and source.translation[1:] == pytest.approx((12.0, 14.0))
    dest = ingest_tiff(tmp_path / "img.zarr", tmp_path / "out.ome.zarr", pyramid_levels=0)
    np.testing.assert_array_equal(open_image(dest)[:], data)


def test_labels_group_of_one_image_inside_the_raw(tmp_path) -> None:
    from ome_zarr.writer import write_multiscale_labels

    raw, labels = _crop_case()
    src = _ome(tmp_path / "raw.ome.zarr", raw, RAW_SCALE, RAW_AT)
    full = np.zeros_like(raw)
    full[1:3, 10:40, 20:55] = labels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_multiscale_labels([full], zarr.open_group(str(src), mode="r+"), name="cells", axes=NM,
                                coordinate_transformations=[[{"type": "scale", "scale": RAW_SCALE},
                                                             {"type": "translation", "translation": RAW_AT}]])
    for given in (src / "labels" / "cells", src / "labels"):  # the image, or the labels group listing it
        source = open_input_stack(given)
        assert source.path == src / "labels" / "cells" and source.shape == raw.shape
    ingest_tiff(src, tmp_path / "r.ome.zarr", pyramid_levels=0)
    dest = ingest_tiff(src / "labels", tmp_path / "l.ome.zarr", kind="labels", like=tmp_path / "r.ome.zarr",
                       pyramid_levels=0)
    assert image_metadata(dest).offset == (0, 0, 0)
    np.testing.assert_array_equal(open_image(dest)[:], full)


# -------------------------------------------------- zarr inputs: labelled crops


@pytest.fixture
def crop_pair(tmp_path):
    """The same crop twice: OME-Zarr labels placed by their translation, and TIFF labels + labels_offset."""
    raw, labels = _crop_case()
    _ome(tmp_path / "raw.ome.zarr", raw, RAW_SCALE, RAW_AT)
    _ome(tmp_path / "labels.ome.zarr", labels, RAW_SCALE, _labels_at(OFFSET))
    tifffile.imwrite(tmp_path / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    stores = {}
    for kind, suffix, offset in (("zarr", ".ome.zarr", None), ("tiff", ".tif", OFFSET)):
        raw_store = ingest_tiff(tmp_path / f"raw{suffix}", tmp_path / kind / "raw.ome.zarr", pyramid_levels=0,
                                voxel_size=(0.05, 0.004, 0.004))
        label_store = ingest_tiff(tmp_path / f"labels{suffix}", tmp_path / kind / "labels.ome.zarr", kind="labels",
                                  like=raw_store, offset=offset, pyramid_levels=0)
        stores[kind] = {"raw": raw_store, "labels": label_store}
    return tmp_path, raw, labels, stores


def test_translation_places_the_crop_like_labels_offset(crop_pair) -> None:
    from unet_pipe.weights import compute_weight_store

    tmp_path, raw, labels, stores = crop_pair
    zarr_meta = image_metadata(stores["zarr"]["labels"])
    assert zarr_meta.offset == OFFSET and zarr_meta.shape == (2, 30, 35)
    np.testing.assert_array_equal(open_image(stores["zarr"]["labels"])[:], labels)
    # Our label store states the same translation (in the raw store's frame) as the TIFF route's.
    for kind in ("zarr", "tiff"):
        ms = zarr.open_group(str(stores[kind]["labels"]), mode="r").attrs["multiscales"][0]
        assert ms["datasets"][0]["coordinateTransformations"][1]["translation"] == pytest.approx([0.05, 0.04, 0.08])
    weights = {}
    for kind in ("zarr", "tiff"):
        stores[kind]["weights"] = tmp_path / kind / "weights.ome.zarr"
        compute_weight_store(stores[kind]["labels"], stores[kind]["weights"])
        weights[kind] = open_image(stores[kind]["weights"])[:]
        assert image_metadata(stores[kind]["weights"]).offset == OFFSET
    np.testing.assert_array_equal(weights["zarr"], weights["tiff"])
    # Training: the offset comes from the store (no labels_offset in the config), tiles equal the TIFF route's.
    tiles = {}
    for kind, offset in (("zarr", None), ("tiff", list(OFFSET))):
        config = validate_config({
            "datasets": {"c": {"raw": "raw", "labels": "labels", "labels_offset": offset}},
            "train": {"datasets": {"c": {"train": [1, 3]}}},
        })
        (vol,) = volumes_from_config(config, open_stores({"c": stores[kind]}))
        assert vol.labels_offset == OFFSET
        sampler, rng = TileSampler([vol], tile=44, depth=2), np.random.default_rng(3)
        tiles[kind] = [sampler.sample(rng) for _ in range(6)]
    for a, b in zip(tiles["zarr"], tiles["tiff"]):
        z, y, x = a.origin
        assert a.origin == b.origin and 1 <= z < 3 and 10 <= y + 8 <= 12 and 20 <= x + 8 <= 27
        for part in ("image", "classes", "weights"):
            np.testing.assert_array_equal(getattr(a, part), getattr(b, part))


def test_crop_errors_name_the_label_image(tmp_path) -> None:
    raw, labels = _crop_case()
    _ome(tmp_path / "raw.ome.zarr", raw, RAW_SCALE, RAW_AT)
    like = ingest_tiff(tmp_path / "raw.ome.zarr", tmp_path / "r.ome.zarr", pyramid_levels=0)
    cases = {
        "scale.ome.zarr": (dict(scale=[50.0, 8.0, 8.0], translation=_labels_at(OFFSET)), None,
                           r"voxel size \(0.05, 0.008, 0.008\) µm differs from the raw's \(0.05, 0.004, 0.004\)"),
        "half.ome.zarr": (dict(scale=RAW_SCALE, translation=_labels_at((1, 10.5, 20))), None,
                          r"10.5 voxels from the raw along y: not a whole number of voxels"),
        "before.ome.zarr": (dict(scale=RAW_SCALE, translation=_labels_at((0, -2, 0))), None,
                            r"at voxel \[0, -2, 0\] of the raw: it starts outside the raw"),
        "disagree.ome.zarr": (dict(scale=RAW_SCALE, translation=_labels_at(OFFSET)), (0, 10, 20),
                              r"puts it at voxel \[1, 10, 20\] of the raw, but labels_offset is \[0, 10, 20\]"),
    }
    for name, (transform, offset, message) in cases.items():
        _ome(tmp_path / name, labels, **transform)
        with pytest.raises(InputError, match=message) as info:
            ingest_tiff(tmp_path / name, tmp_path / f"out-{name}", kind="labels", like=like, offset=offset)
        assert info.value.path == str(tmp_path / name)
        assert not (tmp_path / f"out-{name}").exists() and not (tmp_path / f"out-{name}.partial").exists()
    # Within 1e-6 of a voxel is on the grid (float round-off of nm -> µm and back).
    _ome(tmp_path / "close.ome.zarr", labels, RAW_SCALE, [t + 1e-9 for t in _labels_at(OFFSET)])
    dest = ingest_tiff(tmp_path / "close.ome.zarr", tmp_path / "close-out", kind="labels", like=like)
    assert image_metadata(dest).offset == OFFSET
    # A 2D label image of a 3-slice raw: its slice must be given.
    axes2d = NM[1:]
    _ome(tmp_path / "flat.ome.zarr", labels[0], RAW_SCALE[1:], _labels_at(OFFSET)[1:], axes=axes2d)
    with pytest.raises(InputError, match="2D label image of a 3-slice raw stack: give its slice"):
        ingest_tiff(tmp_path / "flat.ome.zarr", tmp_path / "flat-out", kind="labels", like=like)
    dest = ingest_tiff(tmp_path / "flat.ome.zarr", tmp_path / "flat-out", kind="labels", like=like,
                       offset=(2, 10, 20))
    assert image_metadata(dest).offset == (2, 10, 20)


def test_config_check_knows_the_crop_of_an_ome_zarr_label_image(tmp_path) -> None:
    raw, labels = _crop_case()
    _ome(tmp_path / "raw.ome.zarr", raw, RAW_SCALE, RAW_AT)
    _ome(tmp_path / "labels.ome.zarr", labels, RAW_SCALE, _labels_at(OFFSET))
    _ome(tmp_path / "far.ome.zarr", labels, RAW_SCALE, _labels_at((1, 31, 20)))
    tifffile.imwrite(tmp_path / "raw.tif", raw, photometric="minisblack")

    def config(raw_path="raw.ome.zarr", labels_path="labels.ome.zarr", train=(1, 3), offset=None):
        return validate_config({
            "datasets": {"c": {"raw": raw_path, "labels": labels_path, "labels_offset": offset}},
            "train": {"datasets": {"c": {"train": list(train)}}},
            "results": str(tmp_path / "results"),
        })

    check_input_stacks(config(), tmp_path)
    with pytest.raises(ConfigError, match=r"range \[0, 2\] is not inside the labelled slices \[1, 3\)"):
        check_input_stacks(config(train=(0, 2)), tmp_path)
    with pytest.raises(ConfigError, match=r"its translation places: labels of shape \(2, 30, 35\) at \[1, 31, 20\]"):
        check_input_stacks(config(labels_path="far.ome.zarr"), tmp_path)
    with pytest.raises(InputError, match=r"but labels_offset is \[1, 0, 0\]"):
        check_input_stacks(config(offset=[1, 0, 0]), tmp_path)
    # A TIFF raw starts at 0 with the config's voxel size: the labels' translation alone places them.
    tiff_config = config(raw_path="raw.tif")
    tiff_config["datasets"]["c"]["voxel_size"] = [0.05, 0.004, 0.004]
    _ome(tmp_path / "at0.ome.zarr", labels, RAW_SCALE, [o * s for o, s in zip(OFFSET, RAW_SCALE)])
    tiff_config["datasets"]["c"]["labels"] = "at0.ome.zarr"
    check_input_stacks(tiff_config, tmp_path)
    tiff_config["datasets"]["c"]["labels"] = "labels.ome.zarr"  # 100 nm down in z: slices [3, 5) of 3
    with pytest.raises(ConfigError, match=r"at \[3, 15, 30\] do not lie inside the raw stack of shape \(3, 60, 70\)"):
        check_input_stacks(tiff_config, tmp_path)


# ------------------------------------------------------- zarr inputs: bad input


def test_bad_zarr_inputs_are_one_line_errors(tmp_path, run_cli) -> None:
    data = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    (tmp_path / "empty.zarr").mkdir()
    zarr.open_group(str(tmp_path / "bare.zarr"), mode="w", zarr_format=2).attrs["note"] = "no multiscales"
    missing = _ome(tmp_path / "missing.ome.zarr", data, RAW_SCALE)
    attrs = json.loads((missing / ".zattrs").read_text())
    attrs["multiscales"][0]["datasets"][0]["path"] = "9"
    (missing / ".zattrs").write_text(json.dumps(attrs))
    _ome(tmp_path / "float.ome.zarr", data.astype(np.float32), RAW_SCALE)
    _ome(tmp_path / "channels.ome.zarr", np.stack([data, data]), [1.0, *RAW_SCALE],
         axes=[{"name": "c", "type": "channel"}, *NM])
    _ome(tmp_path / "feet.ome.zarr", data, RAW_SCALE, axes=[{**a, "unit": "foot"} for a in NM])
    _ome(tmp_path / "xyz.ome.zarr", data, RAW_SCALE, axes=[NM[2], NM[1], NM[0]])
    code, _, err = run_cli("ingest", _ome(tmp_path / "raw.ome.zarr", data, RAW_SCALE), tmp_path / "r.ome.zarr")
    assert code == 0, err
    cases = [
        ("empty.zarr", [], "not a zarr store"),
        ("bare.zarr", [], "no 'multiscales' metadata: not an OME-Zarr image"),
        ("missing.ome.zarr", [], "multiscales names level '9', which is missing"),
        ("float.ome.zarr", ["--labels", "--like", tmp_path / "r.ome.zarr"],
         "labels must be integers, found dtype float32"),
        ("channels.ome.zarr", [], "axis 'c' (channel) has 2 entries"),
        ("feet.ome.zarr", [], "axis 'z' has unit 'foot'"),
        ("xyz.ome.zarr", [], r"spatial axes ['x', 'y', 'z'] must be z, y, x"),
    ]
    for name, extra, message in cases:
        dest = tmp_path / f"out-{name}"
        code, out, err = run_cli("ingest", tmp_path / name, dest, *extra)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"unet-pipe: error: {tmp_path / name}: ") and message in err, err
        assert not dest.exists() and not dest.with_name(dest.name + ".partial").exists()


# -------------------------------------------------------- zarr inputs: workflow


def _workflow_config(tmp_path, labels="labels.ome.zarr"):
    from test_workflow import small_config

    raw, crop = _crop_case()
    _ome(tmp_path / "raw.ome.zarr", raw, RAW_SCALE, RAW_AT, FormatV05())
    _ome(tmp_path / "labels.ome.zarr", crop, RAW_SCALE, _labels_at(OFFSET), FormatV05())
    _ome(tmp_path / "half.ome.zarr", crop, RAW_SCALE, _labels_at((1, 10, 20.5)))
    cfg = small_config()
    cfg["datasets"] = {"em": {"raw": "raw.ome.zarr", "labels": labels}}
    cfg["train"]["datasets"] = {"em": {"train": [1, 2], "val": [2, 3]}}
    cfg["predict"]["datasets"] = ["em"]
    return cfg, raw, crop


def test_workflow_precheck_refuses_an_off_grid_label_image(tmp_path) -> None:
    from test_workflow import run_snakemake

    cfg, _, _ = _workflow_config(tmp_path, labels="half.ome.zarr")
    proc = run_snakemake(tmp_path, "-n", config=cfg, check=False)
    assert proc.returncode != 0
    assert (f"unet-pipe: error: half.ome.zarr: translation puts it 20.5 voxels from the raw along x: not a whole "
            "number of voxels") in proc.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_workflow_ingests_ome_zarr_inputs_and_weighs_the_crop(tmp_path) -> None:
    from test_workflow import run_snakemake

    cfg, raw, crop = _workflow_config(tmp_path)
    results = tmp_path / cfg["results"]
    run_snakemake(tmp_path, "--cores", "2", f"{cfg['results']}/em/weights.ome.zarr", config=cfg)
    np.testing.assert_array_equal(open_image(results / "em" / "raw.ome.zarr")[:], raw)
    np.testing.assert_array_equal(open_image(results / "em" / "labels.ome.zarr")[:], crop)
    assert image_metadata(results / "em" / "weights.ome.zarr").offset == OFFSET
    assert image_metadata(results / "em" / "raw.ome.zarr").voxel_size == pytest.approx((0.05, 0.004, 0.004))


def test_ingest_takes_the_intensity_sample_of_what_it_writes(tmp_path):
    """Whole slices stream past the sample (segment hands it to predict); slices read in bands do not,
    so the sample stays incomplete and predict reads the store."""
    data = np.random.default_rng(1).integers(0, 4000, (9, 48, 64)).astype(np.uint16)
    imwrite(tmp_path / "s.tif", data)
    sample = IntensitySample()
    store = ingest_tiff(tmp_path / "s.tif", tmp_path / "s.ome.zarr", chunks=(4, 16, 32), intensity_sample=sample)
    assert sample.covers(data.shape, data.dtype)
    assert sample.range() == intensity_range(open_image(store)) == intensity_range(data)
    banded = IntensitySample()
    ingest_tiff(tmp_path / "s.tif", tmp_path / "b.ome.zarr", chunks=(1, 16, 32), max_buffer_bytes=1, pyramid_levels=1,
                intensity_sample=banded)
    assert not banded.covers(data.shape, data.dtype)
