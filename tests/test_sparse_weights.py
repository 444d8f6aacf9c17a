"""Sparse annotations in the weight map: unlabelled pixels weigh 0 and are neither class."""
from __future__ import annotations

import math

import numpy as np
import pytest

from unet_pipe.errors import ConfigError, InputError
from unet_pipe.io import StagedImage, open_image
from unet_pipe.synth import synthesize
from unet_pipe.weights import (
    WeightParams,
    annotated,
    class_counts,
    class_weights,
    compute_weight_store,
    instances_from_labels,
    weight_map,
)


def test_unlabelled_pixels_leave_the_class_balance_and_weigh_zero():
    labels = np.array([[255, 255, 255, 0, 7, 7]], np.uint8)
    params = WeightParams(w0=0.0, unlabelled_value=7)
    np.testing.assert_array_equal(class_counts(labels, params), [1, 3])
    # N = 4 annotated pixels: w_bg = 4 / (2 * 1) = 2, w_cell = 4 / (2 * 3) = 2/3.
    expected = np.array([[2 / 3, 2 / 3, 2 / 3, 2.0, 0.0, 0.0]], np.float32)
    np.testing.assert_array_equal(weight_map(labels, params), expected)
    # Without the unlabelled value, 7 is not a valid binary label.
    with pytest.raises(InputError, match="found values 0, 7, 255"):
        weight_map(labels, WeightParams(w0=0.0))


@pytest.mark.parametrize(
    "labels, params",
    [
        (np.array([[255, 0, 7, 0, 255]], np.uint8), WeightParams(unlabelled_value=7)),
        (np.array([[3, 0, 9, 0, 4]], np.uint16), WeightParams(label_mode="instances", unlabelled_value=9)),
    ],
)
def test_border_distances_use_annotated_objects_and_pass_through_unlabelled(labels, params):
    # Objects at x = 0 and x = 4; the unlabelled pixel x = 2 is no object and weighs 0.
    # Membrane pixels x = 1 and x = 3: d1 = 1, d2 = 3 -> 10 exp(-16 / 50); w_c = [1, 1].
    border = 10.0 * math.exp(-16.0 / 50.0)
    expected = np.array([[1.0, 1.0 + border, 0.0, 1.0 + border, 1.0]], np.float32)
    np.testing.assert_array_equal(weight_map(labels, params), expected)
    np.testing.assert_array_equal(instances_from_labels(labels, params) > 0, [[True, False, False, False, True]])
    np.testing.assert_array_equal(annotated(labels, params), [[True, True, False, True, True]])


def test_unlabelled_value_must_be_neither_class():
    with pytest.raises(ConfigError, match="differ from the cell value 255"):
        WeightParams(unlabelled_value=255)
    with pytest.raises(ConfigError, match="differ from 0"):
        WeightParams(unlabelled_value=0)
    with pytest.raises(ConfigError, match="integer or null"):
        WeightParams(unlabelled_value=1.5)


def test_sparse_store_equals_whole_slice_and_excludes_unlabelled_from_counts(tmp_path):
    labels = synthesize((2, 80, 96), seed=3).labels.astype(np.uint8)
    labels[:, :, 50:] = 128  # the right part of every slice is unlabelled
    labels[1, 10:30, 5:20] = 128  # and a hole
    src = tmp_path / "labels.ome.zarr"
    staged = StagedImage(src, shape=labels.shape, dtype=labels.dtype, chunks=(1, 32, 32),
                         voxel_size=(1.0, 1.0, 1.0), kind="labels")
    staged.array[:] = labels
    staged.commit(pyramid_levels=1)
    params = WeightParams(sigma=4.0, unlabelled_value=128)
    summary = compute_weight_store(src, tmp_path / "w.ome.zarr", params)
    out = open_image(tmp_path / "w.ome.zarr")[:]
    known = labels != 128
    counts = [int(np.count_nonzero(labels == 0)), int(np.count_nonzero(labels == 255))]
    assert summary["class_counts"] == counts and sum(counts) == int(known.sum())
    expected = np.stack([weight_map(s, params, class_weight=class_weights(counts)) for s in labels])
    np.testing.assert_array_equal(out, expected)
    assert np.all(out[~known] == 0) and np.all(out[known] > 0)
    # The class weights average 1 over the annotated pixels only.
    cw = np.asarray(summary["class_weights"])
    assert cw[(labels[known] == 255).astype(int)].mean() == pytest.approx(1.0)


def test_config_refuses_an_unlabelled_value_that_is_a_class():
    from unet_pipe.config import validate_config

    base = {"datasets": {"s": {"synthetic": {"shape": [3, 40, 40]}}}}
    assert validate_config({**base, "weights": {"unlabelled_value": 128}})["weights"]["unlabelled_value"] == 128
    assert validate_config(dict(base))["weights"]["unlabelled_value"] is None
    for value in (0, 255):
        with pytest.raises(ConfigError, match=f"'weights.unlabelled_value': {value} is a class value"):
            validate_config({**base, "weights": {"unlabelled_value": value}})
