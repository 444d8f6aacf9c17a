"""Sparse annotations in training: class 0 with weight 0, tiles only where something is annotated."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unet_pipe.errors import InputError
import unet_pipe.sampling as data_module
from unet_pipe.sampling import TileSampler, Volume, annotated_mask, label_classes
from unet_pipe.tiling import read_mirrored
from unet_pipe.train import weighted_cross_entropy

U = 7  # the unlabelled value


def _sparse_volume(ny: int = 60, nx: int = 60) -> Volume:
    """Slices 0-2 annotated only in the bottom-right 20 x 20 corner (cells on odd columns)."""
    raw = (np.arange(3 * ny * nx) % 251).astype(np.uint8).reshape(3, ny, nx)
    labels = np.full(raw.shape, U, np.uint8)
    corner = np.zeros((20, 20), np.uint8)
    corner[:, 1::2] = 255
    labels[:, 40:, 40:] = corner
    weights = raw.astype(np.float32) / 10 + 1
    return Volume("s", raw, labels, weights, train=(0, 3))


def test_label_classes_and_annotated_mask_of_unlabelled_pixels() -> None:
    labels = np.array([0, 255, U, 3], np.uint8)
    np.testing.assert_array_equal(label_classes(labels, "binary", 255, U), [0, 1, 0, 0])
    np.testing.assert_array_equal(label_classes(labels, "instances", 255, U), [0, 1, 0, 1])
    np.testing.assert_array_equal(annotated_mask(labels, U), [True, True, False, True])
    np.testing.assert_array_equal(annotated_mask(labels, None), [True, True, True, True])


def test_weight_zero_removes_a_pixel_from_the_loss_exactly() -> None:
    logits = torch.tensor([[[[2.0, -1.0, 0.5]], [[0.0, 3.0, -2.0]]]])  # (1, 2, 1, 3)
    target = torch.tensor([[[0, 1, 0]]])
    weights = torch.tensor([[[1.0, 2.0, 0.0]]])
    # Pixel 3 (weight 0) may hold any class: the loss is the same, sum over 3 pixels / 3.
    other = weighted_cross_entropy(logits, torch.tensor([[[0, 1, 1]]]), weights)
    ce0 = -torch.log_softmax(logits[0, :, 0, 0], 0)[0]
    ce1 = -torch.log_softmax(logits[0, :, 0, 1], 0)[1]
    expected = (ce0 + 2 * ce1) / 3
    assert weighted_cross_entropy(logits, target, weights).item() == pytest.approx(expected.item(), abs=1e-7)
    assert other.item() == weighted_cross_entropy(logits, target, weights).item()


def test_tiles_hold_annotated_pixels_and_zero_weight_elsewhere() -> None:
    vol = _sparse_volume()
    sparse = TileSampler([vol], tile=44, depth=2, unlabelled_value=U)  # output 28, margin 8
    dense = TileSampler([vol], tile=44, depth=2)
    rng, replay = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(15):
        t = sparse.sample(rng)
        # The accepted draw is the first draw of the plain sampler (same generator) whose
        # output window [y + 8, y + 36) x [x + 8, x + 36) reaches the annotated corner (>= 40).
        while True:
            d = dense.sample(replay)
            if d.origin[1] + 36 > 40 and d.origin[2] + 36 > 40:
                break
        assert t.origin == d.origin
        z, y, x = t.origin
        labels = read_mirrored(vol.labels, (z, y, x), (1, 44, 44))[0]
        known = labels != U
        np.testing.assert_array_equal(t.weights, np.where(known, d.weights, 0.0))
        np.testing.assert_array_equal(t.classes, labels == 255)
        np.testing.assert_array_equal(t.image, d.image)


def test_sampler_refuses_volumes_without_annotations_and_gives_up_after_max_draws(monkeypatch) -> None:
    vol = _sparse_volume()
    empty = Volume("e", vol.raw, np.full_like(vol.labels, U), None, train=(0, 2))
    with pytest.raises(InputError, match=r"no annotated pixel in its train slices \[0, 2\)"):
        TileSampler([empty], tile=44, depth=2, unlabelled_value=U)
    # One annotated pixel in the corner: reached by 1 in 33 x 33 draws; three draws miss it for this seed.
    labels = np.full_like(vol.labels, U)
    labels[0, 59, 59] = 0
    monkeypatch.setattr(data_module, "MAX_DRAWS", 3)
    sampler = TileSampler([Volume("p", vol.raw, labels, None, train=(0, 1))], tile=44, depth=2, unlabelled_value=U)
    with pytest.raises(InputError, match="in 3 draws"):
        sampler.sample(np.random.default_rng(0))
