"""Labels of a crop of the raw stack: ingest with an offset, training inside the box, config checks."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from unet_pipe.config import check_input_stacks, validate_config
from unet_pipe.errors import ConfigError, InputError
from unet_pipe.ingest import ingest_tiff
from unet_pipe.io import image_metadata, open_image
from unet_pipe.sampling import TileSampler, Volume, volumes_from_config
from unet_pipe.tiling import read_mirrored
from unet_pipe.train import open_stores

OFFSET = (1, 10, 20)


def _crop_case():
    raw = (np.arange(3 * 60 * 70) % 251).astype(np.uint8).reshape(3, 60, 70)
    labels = np.where(raw[1:3, 10:40, 20:55] % 3 == 0, 0, 255).astype(np.uint8)  # (2, 30, 35) at OFFSET
    weights = labels.astype(np.float32) / 100 + 1
    return raw, labels, weights


def test_tiles_of_a_crop_lie_inside_it_with_real_raw_context() -> None:
    raw, labels, weights = _crop_case()
    vol = Volume("c", raw, labels, weights, train=(1, 3), labels_offset=OFFSET)
    sampler = TileSampler([vol], tile=44, depth=2)  # output 28, margin 8
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(30):
        t = sampler.sample(rng)
        z, y, x = t.origin
        # Output window [y + 8, y + 36) x [x + 8, x + 36) inside the box [10, 40) x [20, 55).
        assert 1 <= z < 3 and 10 <= y + 8 <= 12 and 20 <= x + 8 <= 27
        seen.add((y, x))
        # Raw: the real neighbourhood, mirrored only at the raw's borders (here: none reached above y = 2).
        np.testing.assert_array_equal(t.image, read_mirrored(raw, (z, y, x), (1, 44, 44))[0] / np.float32(255))
        crop = (z - 1, y - 10, x - 20)
        bounds = [(0, 2), (0, 30), (0, 35)]
        np.testing.assert_array_equal(t.classes, read_mirrored(labels, crop, (1, 44, 44), bounds)[0] == 255)
        rows = (np.arange(y, y + 44) >= 10) & (np.arange(y, y + 44) < 40)
        cols = (np.arange(x, x + 44) >= 20) & (np.arange(x, x + 44) < 55)
        expected = np.where(rows[:, None] & cols[None, :], read_mirrored(weights, crop, (1, 44, 44), bounds)[0], 0)
        np.testing.assert_array_equal(t.weights, expected)
    assert len(seen) > 5
    # Raw pixel (1, 2, 12) is the input's top-left corner of origin (1, 2, 12): real data, not a mirror.
    assert read_mirrored(raw, (1, 2, 12), (1, 1, 1))[0, 0, 0] == raw[1, 2, 12]


def test_crop_must_lie_inside_the_raw_and_hold_the_ranges() -> None:
    raw, labels, weights = _crop_case()
    with pytest.raises(ConfigError, match=r"do not lie inside the raw stack of shape \(3, 60, 70\)"):
        Volume("c", raw, labels, None, train=(1, 3), labels_offset=(2, 10, 20)).check()
    with pytest.raises(ConfigError, match=r"range \[0, 2\) does not fit the labelled slices \[1, 3\)"):
        Volume("c", raw, labels, None, train=(0, 2), labels_offset=OFFSET).check()
    with pytest.raises(InputError, match="give labels_offset"):
        Volume("c", raw, labels, None, train=(0, 2)).check()
    with pytest.raises(InputError, match="weights shape"):
        Volume("c", raw, labels, weights[:, :10], train=(1, 3), labels_offset=OFFSET).check()


def test_ingest_records_the_offset_and_refuses_crops_outside(tmp_path) -> None:
    raw, labels, _ = _crop_case()
    tifffile.imwrite(tmp_path / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    ingest_tiff(tmp_path / "raw.tif", tmp_path / "raw.ome.zarr", voxel_size=(0.05, 0.004, 0.004), pyramid_levels=1)
    with pytest.raises(InputError, match="labels of a crop need its offset"):
        ingest_tiff(tmp_path / "labels.tif", tmp_path / "l.ome.zarr", kind="labels", like=tmp_path / "raw.ome.zarr")
    with pytest.raises(InputError, match=r"at offset \[2, 10, 20\] does not lie inside"):
        ingest_tiff(tmp_path / "labels.tif", tmp_path / "l.ome.zarr", kind="labels", like=tmp_path / "raw.ome.zarr",
                    offset=(2, 10, 20))
    dest = ingest_tiff(tmp_path / "labels.tif", tmp_path / "labels.ome.zarr", kind="labels",
                       like=tmp_path / "raw.ome.zarr", offset=OFFSET, pyramid_levels=1)
    meta = image_metadata(dest)
    assert meta.offset == OFFSET and meta.shape == (2, 30, 35)
    datasets = zarr.open_group(str(dest), mode="r").attrs["multiscales"][0]["datasets"]
    for level, ds in enumerate(datasets):
        scale, translation = ds["coordinateTransformations"]
        assert scale["scale"] == pytest.approx([0.05, 0.004 * 2**level, 0.004 * 2**level])
        assert translation == {"type": "translation", "translation": pytest.approx([0.05, 0.04, 0.08])}
    assert image_metadata(tmp_path / "raw.ome.zarr").offset == (0, 0, 0)
    from unet_pipe.weights import compute_weight_store

    compute_weight_store(dest, tmp_path / "weights.ome.zarr")
    assert image_metadata(tmp_path / "weights.ome.zarr").offset == OFFSET
    from unet_pipe.weights import write_preview

    png = write_preview(dest, tmp_path / "preview.png", raw_path=tmp_path / "raw.ome.zarr", z=0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Training picks the offset up from the store; a different configured one is refused.
    config = validate_config({
        "datasets": {"c": {"raw": "raw.tif", "labels": "labels.tif", "labels_offset": list(OFFSET)}},
        "train": {"datasets": {"c": {"train": [1, 3]}}},
    })
    stores = open_stores({"c": {"raw": tmp_path / "raw.ome.zarr", "labels": dest}})
    (vol,) = volumes_from_config(config, stores)
    assert vol.labels_offset == OFFSET and np.array_equal(open_image(dest)[:], labels)
    config["datasets"]["c"]["labels_offset"] = [0, 10, 20]
    with pytest.raises(InputError, match=r"records the offset \[1, 10, 20\]"):
        volumes_from_config(config, stores)


def test_config_checks_the_crop_against_the_raw_tiff(tmp_path) -> None:
    raw, labels, _ = _crop_case()
    tifffile.imwrite(tmp_path / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")

    def config(offset, train=(1, 3)):
        return validate_config({
            "datasets": {"c": {"raw": "raw.tif", "labels": "labels.tif", "labels_offset": offset}},
            "train": {"datasets": {"c": {"train": list(train)}}},
            "results": str(tmp_path / "results"),
        })

    check_input_stacks(config([1, 10, 20]), tmp_path)
    with pytest.raises(ConfigError, match=r"'datasets.c.labels_offset': labels of shape \(2, 30, 35\) at \[1, 31, 20\]"):
        check_input_stacks(config([1, 31, 20]), tmp_path)
    with pytest.raises(ConfigError, match=r"'train.datasets.c.train': range \[1, 3\] is not inside the labelled "
                       r"slices \[0, 2\)"):
        check_input_stacks(config([0, 10, 20], train=(1, 3)), tmp_path)
    with pytest.raises(ConfigError, match=r"range \[0, 2\] starts before the labelled crop"):
        config([1, 10, 20], train=(0, 2))
    with pytest.raises(ConfigError, match=r"'datasets.c.labels_offset': the dataset has no 'labels'"):
        validate_config({"datasets": {"c": {"raw": "raw.tif", "labels_offset": [0, 0, 0]}}})


def _store(path, data, kind="image", offset=None):
    from unet_pipe.io import StagedImage

    staged = StagedImage(path, shape=data.shape, dtype=data.dtype, chunks=(1, 4, 4), kind=kind)
    staged.array[:] = data
    staged.commit(pyramid_levels=0, extra_attrs={"offset": list(offset)} if offset else None)
    return path


@pytest.fixture
def crop_scores(tmp_path):
    """Prediction 2 x 5 x 6; truth: a 1 x 2 x 3 crop at (1, 2, 3) (cells in its two left columns).

    Inside the box the instances match; outside it they are garbage that must not count.
    """
    truth = np.array([[[255, 255, 0], [255, 255, 0]]], np.uint8)
    inst = np.zeros((2, 5, 6), np.uint32)
    inst[0] = 9
    inst[1, 0, 0] = 5
    inst[1, 2:4, 3:5] = 1
    prob = np.where(inst > 0, 230, 10).astype(np.uint8)
    prob[1, 2, 5] = 200  # one false cell pixel on the box's membrane column
    return {
        "truth": _store(tmp_path / "truth.ome.zarr", truth, "labels", offset=(1, 2, 3)),
        "instances": _store(tmp_path / "inst.ome.zarr", inst, "labels"),
        "probabilities": _store(tmp_path / "prob.ome.zarr", prob),
    }


def test_evaluate_scores_the_truth_box_only(tmp_path, crop_scores):
    from unet_pipe.evaluate import evaluate

    result = evaluate(crop_scores["instances"], crop_scores["truth"], tmp_path / "m.json",
                      probabilities=crop_scores["probabilities"], foreground_value=255)
    (row,) = result["per_slice"]
    assert row["z"] == 1 and row["pixel_error"] == pytest.approx(1 / 6)
    assert (row["rand_error"], row["iou"], row["predicted_segments"], row["truth_segments"]) == (0.0, 1.0, 1, 1)
    assert result["params"]["truth_offset"] == [1, 2, 3]
    with pytest.raises(InputError, match=r"evaluated slices \[0, 2\) outside the labelled slices \[1, 2\)"):
        evaluate(crop_scores["instances"], crop_scores["truth"], tmp_path / "n.json", slices=(0, 2))


def test_calibration_reads_the_truth_box_only(crop_scores):
    from unet_pipe.calibrate import load_slices

    prob, cells, inst, known = load_slices(crop_scores["probabilities"], crop_scores["truth"], (1, 2))
    np.testing.assert_allclose(prob[0], np.array([[230, 230, 200], [230, 230, 10]]) / 255)
    np.testing.assert_array_equal(cells[0], [[True, True, False], [True, True, False]])
    with pytest.raises(InputError, match=r"calibration slices \[0, 1\) outside the labelled slices \[1, 2\)"):
        load_slices(crop_scores["probabilities"], crop_scores["truth"], (0, 1))


def test_report_of_a_crop_draws_its_box(tmp_path, crop_scores):
    import matplotlib.image

    from unet_pipe.evaluate import evaluate
    from unet_pipe.report import write_report

    metrics = tmp_path / "metrics.json"
    evaluate(crop_scores["instances"], crop_scores["truth"], metrics, probabilities=crop_scores["probabilities"],
             raw=crop_scores["probabilities"], dataset="crop", foreground_value=255)
    text = write_report(tmp_path / "report.md", [metrics]).read_text()
    assert "![crop: slices](report_figures/crop_slices.png)" in text and "Slice figures skipped" not in text
    assert matplotlib.image.imread(tmp_path / "report_figures" / "crop_slices.png").ndim == 3
