"""OME-Zarr (NGFF 0.4 / 0.5) and plain zarr arrays as inputs: exact ingest, voxel size and
translation, labelled crops placed by their translation, one-line errors."""
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
from unet_pipe.errors import ConfigError, InputError
from unet_pipe.ingest import ingest_tiff
from unet_pipe.io import image_metadata, open_image
from unet_pipe.sampling import TileSampler, volumes_from_config
from unet_pipe.train import open_stores
from unet_pipe.zarr_input import open_input_stack, open_zarr_source

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


# ------------------------------------------------------------------ reading and ingest


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


# ------------------------------------------------------------------ labelled crops


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


# ------------------------------------------------------------------ bad input


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


# ------------------------------------------------------------------ workflow


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
