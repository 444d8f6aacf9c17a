"""The synthetic isotropic volume (unet_pipe.synth3d): 3D truth that holds, deterministic, leaky membranes."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from unet_pipe.synth3d import Synth3DParams, synthesize_3d

SIX = ndi.generate_binary_structure(3, 1)


@pytest.fixture(scope="module")
def cube():
    return synthesize_3d((32, 64, 64), seed=0)


def test_deterministic_and_seeded(cube):
    again = synthesize_3d((32, 64, 64), seed=0)
    other = synthesize_3d((32, 64, 64), seed=1)
    for name in ("raw", "labels", "instances"):
        np.testing.assert_array_equal(getattr(again, name), getattr(cube, name))
    assert not np.array_equal(other.instances, cube.instances)


def test_every_id_is_one_6_connected_object_and_membranes_separate_them(cube):
    inst = cube.instances
    assert inst.dtype == np.uint16 and inst.max() >= 10
    ids = np.unique(inst[inst > 0])
    np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))  # 1..k
    _, n = ndi.label(inst > 0, structure=SIX)
    assert n == ids.size  # no id in two pieces, no two ids touching
    for axis in range(3):  # no two different ids are 6-neighbours
        a = np.moveaxis(inst, axis, 0)
        lo, hi = a[:-1], a[1:]
        assert not np.any((lo > 0) & (hi > 0) & (lo != hi))
    np.testing.assert_array_equal(cube.labels, np.where(inst > 0, 255, 0))
    # Objects are 3D: most span many slices (unlike the serial-section synth, ids run through z)
    spans = [s[0].stop - s[0].start for s in ndi.find_objects(inst) if s is not None]
    assert np.median(spans) >= 10


def test_membranes_are_dark_with_faint_gaps(cube):
    membrane = cube.labels == 0
    assert 0.05 < membrane.mean() < 0.4
    raw = cube.raw.astype(float)
    assert raw[membrane].mean() < raw[~membrane].mean() - 30
    # gaps: spots of membrane nearly as bright as cytoplasm (leaks that 3D components must not follow);
    # the truth is the same, and only voxels near membranes change
    no_gaps = synthesize_3d((32, 64, 64), seed=0, params=Synth3DParams(gaps_per_cell=0.0))
    np.testing.assert_array_equal(no_gaps.instances, cube.instances)
    lighter = cube.raw.astype(int) - no_gaps.raw.astype(int)
    near = ndi.binary_dilation(membrane, SIX, iterations=3)
    assert np.abs(lighter[~near]).max() <= 1 and lighter[membrane].max() > 30  # 1: rounding of blur tails
    assert 0 < np.mean(lighter[membrane] > 20) < 0.2


def test_anisotropy_makes_cells_span_fewer_slices():
    iso = synthesize_3d((40, 48, 48), seed=2)
    aniso = synthesize_3d((40, 48, 48), seed=2, anisotropy=4.0)

    def median_span(inst):
        return np.median([s[0].stop - s[0].start for s in ndi.find_objects(inst) if s is not None])

    assert median_span(aniso.instances) < median_span(iso.instances) / 2


def test_bad_shape_or_anisotropy():
    with pytest.raises(ValueError, match="at least"):
        synthesize_3d((2, 64, 64))
    with pytest.raises(ValueError, match="anisotropy"):
        synthesize_3d((8, 16, 16), anisotropy=0)
