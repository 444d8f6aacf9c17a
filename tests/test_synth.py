"""Synthetic data: the EM-like default (determinism, touching cells, ISBI conventions) and the isotropic
3D volume (synth3d: 3D truth that holds, deterministic, leaky membranes)."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from scipy import ndimage as ndi

from unet_pipe.synth import synthesize, write_synthetic
from unet_pipe.synth3d import Synth3DParams, synthesize_3d


def test_deterministic_and_seed_dependent():
    a = synthesize((3, 64, 64), seed=3)
    b = synthesize((3, 64, 64), seed=3)
    c = synthesize((3, 64, 64), seed=4)
    for name in ("raw", "labels", "instances"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.raw, c.raw)


def test_isbi_conventions_and_consistency():
    s = synthesize((4, 96, 96), seed=0)
    assert s.raw.dtype == np.uint8 and s.labels.dtype == np.uint8
    assert set(np.unique(s.labels)) == {0, 255}
    np.testing.assert_array_equal(s.labels == 0, s.instances == 0)
    membrane_fraction = (s.labels == 0).mean()
    assert 0.1 < membrane_fraction < 0.35  # ISBI 2012 train labels: 0.22
    # membranes are dark, cells bright
    assert s.raw[s.labels == 0].mean() + 40 < s.raw[s.labels == 255].mean()


def test_cells_touch_across_thin_membranes():
    """Touching cells: neighbouring instances are separated by a membrane only a few px wide."""
    s = synthesize((1, 128, 128), seed=1)
    inst = s.instances[0]
    ids = np.unique(inst[inst > 0])
    assert len(ids) > 15
    # every membrane pixel lies within 3 px of at least two different cells (membranes 3-4 px wide)
    grown = ndimage.grey_dilation(inst, size=7)
    shrunk = np.where(inst == 0, np.iinfo(inst.dtype).max, inst)
    shrunk = ndimage.grey_erosion(shrunk, size=7)
    membrane = inst == 0
    interior_membrane = membrane.copy()
    interior_membrane[:3] = interior_membrane[-3:] = False
    interior_membrane[:, :3] = interior_membrane[:, -3:] = False
    two_cells = grown[interior_membrane] != shrunk[interior_membrane]
    assert two_cells.mean() > 0.99


def test_slices_are_correlated_but_drift():
    s = synthesize((6, 96, 96), seed=2)
    same = (s.instances[0] == s.instances[1]).mean()
    assert same > 0.5  # neurites continue through the stack
    assert not np.array_equal(s.instances[0], s.instances[5])


def test_write_synthetic_files(tmp_path):
    paths = write_synthetic(tmp_path, (2, 32, 40), seed=0)
    assert sorted(p.name for p in paths.values()) == ["instances.tif", "labels.tif", "raw.tif"]
    raw = tifffile.imread(paths["raw"])
    assert raw.shape == (2, 32, 40)
    np.testing.assert_array_equal(raw, synthesize((2, 32, 40), 0).raw)
    with tifffile.TiffFile(paths["raw"]) as tif:
        assert tif.imagej_metadata["spacing"] == 0.05
    assert not list(tmp_path.glob(".*.tmp"))


# --------------------------------------------- synth3d: the isotropic 3D volume
# 3D truth that holds, deterministic, leaky membranes.


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
