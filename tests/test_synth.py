"""The synthetic EM-like default: determinism, touching cells, ISBI conventions."""
from __future__ import annotations

import numpy as np
import tifffile
from scipy import ndimage

from unet_pipe.synth import synthesize, write_synthetic


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
