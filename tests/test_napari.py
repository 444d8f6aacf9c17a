"""The stores as napari opens them (napari-ome-zarr plugin, offscreen Qt).

napari is not a dependency of unet-pipe, not even of the ``dev`` extra: with
napari-ome-zarr and PyQt5 it costs about 110 s and 900 MB to install (measured
on 2 cores, pip with constraints/ci.txt), for one test.  CI (``.ci/run``) installs the ``napari`` extra, so these tests
run there; elsewhere they skip unless napari and napari-ome-zarr are importable
(``pip install -c constraints/ci.txt -e .[dev,napari]``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from unet_pipe.io import StagedImage
from unet_pipe.view import build_view

pytest.importorskip("napari", reason="napari is not installed (optional: pip install -e .[napari])")
pytest.importorskip("napari_ome_zarr", reason="napari-ome-zarr is not installed (optional: pip install -e .[napari])")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # no display in CI

VOXEL = (0.05, 0.004, 0.004)


def write_store(path: Path, data: np.ndarray, kind: str, ngff: str) -> Path:
    """A two-level pyramid store in chunks of (1, 4, 4)."""
    staged = StagedImage(path, shape=data.shape, dtype=data.dtype, chunks=(1, 4, 4), voxel_size=VOXEL, kind=kind,
                         ngff=ngff)
    staged.array[:] = data
    return staged.commit(pyramid_levels=2)


def napari_open(path: Path) -> list:
    """The layers napari makes of ``path`` with the napari-ome-zarr reader (as File > Open does).

    Not through ``napari.Viewer``: adding an image layer to a canvas needs OpenGL,
    which an offscreen Qt platform without a GPU does not have (vispy fails on
    ``glGetString``); the reader and the layers are what this test checks.
    """
    import napari
    from napari_ome_zarr._reader import napari_get_reader  # the plugin's reader contribution

    reader = napari_get_reader(str(path))
    assert reader is not None, f"napari-ome-zarr does not claim {path}"
    return [napari.layers.Layer.create(*data) for data in reader(str(path))]


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_napari_opens_the_view_as_raw_with_label_layers_and_the_probabilities(tmp_path, ngff):
    raw = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)
    instances = ((np.arange(2 * 8 * 8, dtype=np.uint32).reshape(2, 8, 8) // 16) % 3).astype(np.uint32)
    raw_store = write_store(tmp_path / "raw.ome.zarr", raw, "image", ngff=ngff)
    inst_store = write_store(tmp_path / "instances.ome.zarr", instances, "labels", ngff=ngff)
    prob_store = write_store(tmp_path / "probabilities.ome.zarr", raw.astype(np.float32) / 127, "image", ngff=ngff)
    view = build_view(raw_store, tmp_path / "view.ome.zarr", {"instances": inst_store})

    layers = napari_open(view)
    assert [type(layer).__name__ for layer in layers] == ["Image", "Labels"]
    image, labels = layers
    assert [tuple(level.shape) for level in image.data] == [(2, 8, 8), (2, 4, 4), (2, 2, 2)]
    assert [tuple(level.shape) for level in labels.data] == [(2, 8, 8), (2, 4, 4), (2, 2, 2)]
    np.testing.assert_allclose(image.scale, VOXEL)
    np.testing.assert_allclose(labels.scale, VOXEL)
    np.testing.assert_array_equal(np.asarray(image.data[0]), raw)
    np.testing.assert_array_equal(np.asarray(labels.data[0]), instances)
    np.testing.assert_array_equal(np.asarray(labels.data[1]), instances[:, ::2, ::2])

    (probabilities,) = napari_open(prob_store)
    assert type(probabilities).__name__ == "Image" and probabilities.multiscale
    np.testing.assert_allclose(probabilities.scale, VOXEL)
    np.testing.assert_allclose(np.asarray(probabilities.data[0]), raw.astype(np.float32) / 127)
