"""The stores as the field's viewers read them: ome-zarr-py's Reader (napari-ome-zarr is built on it)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from unet_pipe.errors import InputError, OutputError
from unet_pipe.io import StagedImage, image_metadata, open_image
from unet_pipe.ngff import ngff_keys
from unet_pipe.view import build_view

ome_reader = pytest.importorskip("ome_zarr.reader")
ome_io = pytest.importorskip("ome_zarr.io")

VOXEL = (0.05, 0.004, 0.004)
AXES = [{"name": ax, "type": "space", "unit": "micrometer"} for ax in "zyx"]


def read_nodes(path: Path) -> dict[str, object]:
    """Every node ome-zarr-py finds from ``path``, by its path relative to ``path``."""
    nodes = ome_reader.Reader(ome_io.parse_url(str(path)))()
    # A labels store leads the reader to its source image too (image-label.source: ../raw.ome.zarr).
    return {os.path.relpath(os.path.normpath(node.zarr.path), os.path.normpath(path)): node for node in nodes}


def write_store(path: Path, data: np.ndarray, kind: str, levels: int = 2, ngff: str = "0.4") -> Path:
    staged = StagedImage(path, shape=data.shape, dtype=data.dtype, chunks=(1, 4, 4), voxel_size=VOXEL, kind=kind,
                         ngff=ngff)
    staged.array[:] = data
    return staged.commit(pyramid_levels=levels)


@pytest.fixture(params=["0.4", "0.5"])
def stores(tmp_path, request):
    """Raw, instances, truth labels and probabilities, all NGFF 0.4 or all 0.5."""
    ngff = request.param
    raw = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)
    instances = (np.arange(2 * 8 * 8, dtype=np.uint32).reshape(2, 8, 8) // 16) % 3
    truth = np.where(np.arange(2 * 8 * 8).reshape(2, 8, 8) % 2, 255, 0).astype(np.uint8)
    return {
        "raw": write_store(tmp_path / "raw.ome.zarr", raw, "image", ngff=ngff),
        "instances": write_store(tmp_path / "instances.ome.zarr", instances, "labels", ngff=ngff),
        "labels": write_store(tmp_path / "labels.ome.zarr", truth, "labels", ngff=ngff),
        "probabilities": write_store(tmp_path / "probabilities.ome.zarr", raw.astype(np.float32) / 127, "image",
                                     ngff=ngff),
        "ngff": ngff,
    }


def test_reader_sees_a_store_with_its_pyramid_values_and_scales(stores):
    node = read_nodes(stores["raw"])["."]
    assert node.metadata["axes"] == AXES
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    assert scales == [[0.05, 0.004, 0.004], [0.05, 0.008, 0.008], [0.05, 0.016, 0.016]]
    level0, level1, level2 = (np.asarray(a) for a in node.data)
    np.testing.assert_array_equal(level0, np.arange(128, dtype=np.uint8).reshape(2, 8, 8))
    # 2x2 means rounded half up: the top-left block of slice 0 is (0 + 1 + 8 + 9) / 4 = 4.5 -> 5.
    assert level1.shape == (2, 4, 4) and level1[0, 0, 0] == 5 and level1[1, 3, 3] == (118 + 119 + 126 + 127 + 2) // 4
    assert level2.shape == (2, 2, 2) and level2[0, 0, 0] == (5 + 7 + 21 + 23 + 2) // 4


def test_view_shows_raw_with_label_layers_in_one_open(stores, tmp_path):
    view = build_view(stores["raw"], tmp_path / "view.ome.zarr",
                      {"labels": stores["labels"], "instances": stores["instances"]})
    nodes = read_nodes(view)
    assert list(nodes) == [".", "labels", "labels/labels", "labels/instances"]
    image = nodes["."]
    np.testing.assert_array_equal(np.asarray(image.data[0]), open_image(stores["raw"])[:])
    assert image.visible
    for name in ("labels", "instances"):
        label = nodes[f"labels/{name}"]
        assert label.metadata["name"] == name
        assert [np.asarray(a).shape for a in label.data] == [(2, 8, 8), (2, 4, 4), (2, 2, 2)]
        for level, array in enumerate(label.data):
            np.testing.assert_array_equal(np.asarray(array), open_image(stores[name], level)[:])
        scales = [t[0]["scale"] for t in label.metadata["coordinateTransformations"]]
        assert scales == [[0.05, 0.004 * 2**k, 0.004 * 2**k] for k in range(3)]
    # The view is links and metadata; the stores it shows are untouched.
    assert (view / "0").is_symlink() and (view / "0").readlink() == Path("../raw.ome.zarr/0")
    assert (view / "labels" / "instances" / "1").readlink() == Path("../../../instances.ome.zarr/1")
    assert not (stores["raw"] / "labels").exists()
    # The view has its stores' NGFF version: 0.5 keeps the NGFF keys under "ome" in zarr.json.
    if stores["ngff"] == "0.5":
        attrs = json.loads((view / "labels" / "instances" / "zarr.json").read_text())["attributes"]
        assert attrs["ome"]["version"] == "0.5" and attrs["ome"]["image-label"] == {"source": {"image": "../../"}}
        assert json.loads((view / "labels" / "zarr.json").read_text())["attributes"] == \
            {"ome": {"version": "0.5", "labels": ["labels", "instances"]}}
        assert not (view / ".zattrs").exists()
    else:
        assert json.loads((view / "labels" / ".zattrs").read_text()) == {"labels": ["labels", "instances"]}


def test_view_refuses_stores_of_two_ngff_versions(tmp_path):
    raw = write_store(tmp_path / "raw.ome.zarr", np.zeros((2, 8, 8), np.uint8), "image", ngff="0.4")
    other = write_store(tmp_path / "i.ome.zarr", np.zeros((2, 8, 8), np.uint32), "labels", ngff="0.5")
    with pytest.raises(InputError, match=r"is NGFF 0.5 but .*raw.ome.zarr is NGFF 0.4; a view needs one version"):
        build_view(raw, tmp_path / "v.ome.zarr", {"i": other})


def test_view_written_through_symlinked_folders_shows_its_stores(stores, tmp_path):
    # The view goes into a folder reached through a link to a deeper folder, and the raw
    # is named through another link: a link computed from the unresolved paths would
    # point at ``deep/raw.ome.zarr`` (nothing) or elsewhere.
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "out").symlink_to(tmp_path / "deep" / "er", target_is_directory=True)
    (tmp_path / "in").symlink_to(tmp_path, target_is_directory=True)
    view = build_view(tmp_path / "in" / "raw.ome.zarr", tmp_path / "out" / "view.ome.zarr",
                      {"instances": tmp_path / "in" / "instances.ome.zarr"})
    assert (tmp_path / "deep" / "er" / "view.ome.zarr" / "0").readlink() == Path("../../../raw.ome.zarr/0")
    for where in (view, tmp_path / "deep" / "er" / "view.ome.zarr"):
        # ome-zarr-py names the label nodes by their resolved path: take them in order.
        image, labels, instances = read_nodes(where).values()
        assert instances.zarr.path.rstrip("/").endswith("view.ome.zarr/labels/instances")
        np.testing.assert_array_equal(np.asarray(image.data[0]), np.arange(128, dtype=np.uint8).reshape(2, 8, 8))
        np.testing.assert_array_equal(np.asarray(instances.data[1]), open_image(stores["instances"], 1)[:])
        assert np.asarray(instances.data[0]).max() == 2


def test_view_copy_survives_removing_the_sources(stores, tmp_path):
    view = build_view(stores["raw"], tmp_path / "view.ome.zarr", {"instances": stores["instances"]}, copy=True)
    expected = open_image(stores["instances"], 1)[:]
    import shutil

    shutil.rmtree(stores["instances"])
    nodes = read_nodes(view)
    assert not (view / "labels" / "instances" / "1").is_symlink()
    np.testing.assert_array_equal(np.asarray(nodes["labels/instances"].data[1]), expected)


def test_view_refuses_float_layers_other_shapes_and_foreign_folders(stores, tmp_path):
    with pytest.raises(InputError, match="needs integers, found dtype float32"):
        build_view(stores["raw"], tmp_path / "v.ome.zarr", {"p": stores["probabilities"]})
    small = write_store(tmp_path / "small.ome.zarr", np.zeros((2, 4, 8), np.uint8), "labels")
    with pytest.raises(InputError, match=r"shape \(2, 4, 8\) differs from \(2, 8, 8\)"):
        build_view(stores["raw"], tmp_path / "v.ome.zarr", {"s": small})
    with pytest.raises(InputError, match="label name '../x'"):
        build_view(stores["raw"], tmp_path / "v.ome.zarr", {"../x": stores["instances"]})
    assert not (tmp_path / "v.ome.zarr").exists() and not (tmp_path / "v.ome.zarr.partial").exists()
    foreign = tmp_path / "mine.ome.zarr"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(OutputError, match="not written by unet-pipe"):
        build_view(stores["raw"], foreign, {"i": stores["instances"]}, overwrite=True)
    assert (foreign / "keep.txt").read_text() == "user data"


def test_view_overwrite_replaces_only_the_links(stores, tmp_path):
    dest = tmp_path / "view.ome.zarr"
    build_view(stores["raw"], dest, {"instances": stores["instances"]})
    with pytest.raises(OutputError, match="already exists"):
        build_view(stores["raw"], dest, {"instances": stores["instances"]})
    build_view(stores["raw"], dest, {"labels": stores["labels"]}, overwrite=True)
    assert [Path(n.zarr.path).name for n in list(read_nodes(dest).values())[2:]] == ["labels"]
    # Replacing the view removed its links, never the arrays they point at.
    np.testing.assert_array_equal(open_image(stores["instances"])[:].max(), 2)


def test_cli_view_and_bad_labels_argument(stores, tmp_path, run_cli):
    dest = tmp_path / "v.ome.zarr"
    code, _, err = run_cli("view", stores["raw"], dest, "--labels", f"instances={stores['instances']}")
    assert code == 0, err
    assert list(read_nodes(dest)) == [".", "labels", "labels/instances"]
    code, _, err = run_cli("view", stores["raw"], tmp_path / "w.ome.zarr", "--labels", "instances")
    assert code == 2 and err.strip() == "unet-pipe: error: --labels 'instances': expected NAME=PATH"


def test_ingested_labels_name_their_image_for_the_reader(tmp_path):
    """``ingest --labels --like RAW``: the label store opens with its raw image underneath."""
    import tifffile

    from unet_pipe.ingest import ingest_tiff

    raw_tif, labels_tif = tmp_path / "raw.tif", tmp_path / "labels.tif"
    tifffile.imwrite(raw_tif, np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8))
    tifffile.imwrite(labels_tif, np.eye(8, dtype=np.uint8)[None].repeat(2, axis=0) * 255)
    raw = ingest_tiff(raw_tif, tmp_path / "raw.ome.zarr", chunks=(1, 4, 4), voxel_size=VOXEL, pyramid_levels=1)
    labels = ingest_tiff(labels_tif, tmp_path / "labels.ome.zarr", chunks=(1, 4, 4), kind="labels", like=raw,
                         pyramid_levels=1)
    attrs = json.loads((labels / ".zattrs").read_text())
    assert attrs["image-label"] == {"version": "0.4", "source": {"image": "../raw.ome.zarr"}}
    nodes = list(ome_reader.Reader(ome_io.parse_url(str(labels)))())
    assert [Path(n.zarr.path).name for n in nodes] == ["raw.ome.zarr", "labels.ome.zarr"]
    assert [n.visible for n in nodes] == [False, True]  # the reader's choice: the image is loaded, hidden
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), np.arange(128, dtype=np.uint8).reshape(2, 8, 8))
    np.testing.assert_array_equal(np.asarray(nodes[1].data[1]), np.eye(4, dtype=np.uint8)[None].repeat(2, axis=0) * 255)


@pytest.mark.slow
@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_every_store_of_a_workflow_run_reads_in_ome_zarr_py(tmp_path, ngff):
    """The tiny demo DAG (4 x 96 x 96, one pyramid level): each published store, as a viewer sees it."""
    from test_workflow import run_snakemake, small_config

    run_snakemake(tmp_path, "--cores", "2", config=small_config(ngff_version=ngff))
    results = tmp_path / "results" / "demo"
    for store in ("raw", "labels", "weights", "probabilities", "instances", "view"):
        # Every writer honoured the config key (the view follows its stores).
        path = results / f"{store}.ome.zarr"
        version = ngff_keys(zarr.open_group(str(path), mode="r").attrs.asdict())[0]
        assert ((path / "zarr.json").is_file(), version) == (ngff == "0.5", ngff), store
    # The view's levels are links to other stores: a stage given the view refuses it (it reads
    # only inside the store it is given) and says which stores to give instead.
    with pytest.raises(InputError, match="view.ome.zarr: multiscales dataset path '0' leads outside the store .*"
                       "a view links to the stores it shows"):
        image_metadata(results / "view.ome.zarr")
    expected_scales = [[0.05, 0.004, 0.004], [0.05, 0.008, 0.008]]
    for store in ("raw", "labels", "weights", "probabilities", "instances"):
        node = read_nodes(results / f"{store}.ome.zarr")["."]
        assert node.metadata["axes"] == AXES, store
        assert [t[0]["scale"] for t in node.metadata["coordinateTransformations"]] == expected_scales, store
        level0, level1 = (np.asarray(a) for a in node.data)
        assert level0.shape == (4, 96, 96) and level1.shape == (4, 48, 48), store
        np.testing.assert_array_equal(level0, open_image(results / f"{store}.ome.zarr")[:])
        if store in ("labels", "instances"):  # nearest: the top-left pixel of each 2 x 2 block
            np.testing.assert_array_equal(level1, level0[:, ::2, ::2])
        else:  # 2 x 2 mean (integers rounded half up)
            mean = level0.reshape(4, 48, 2, 48, 2).mean(axis=(2, 4), dtype=np.float64)
            np.testing.assert_allclose(level1, np.floor(mean + 0.5) if level0.dtype.kind in "ui" else mean,
                                       rtol=1e-6)
    nodes = read_nodes(results / "view.ome.zarr")
    assert list(nodes) == [".", "labels", "labels/labels", "labels/instances"]
    np.testing.assert_array_equal(np.asarray(nodes["."].data[0]), open_image(results / "raw.ome.zarr")[:])
    np.testing.assert_array_equal(np.asarray(nodes["labels/instances"].data[1]),
                                  open_image(results / "instances.ome.zarr", 1)[:])


def test_view_places_a_cropped_sparse_label_store_at_its_offset(stores, tmp_path, run_cli):
    """Labels of a crop (labels_offset) with an unlabelled value: placed by their translation, U transparent."""
    ngff, unlabelled = stores["ngff"], 7
    crop = np.full((1, 4, 6), unlabelled, np.uint8)
    crop[0, 1:3, 2:5] = [[0, 255, 0], [255, 255, 0]]
    staged = StagedImage(tmp_path / "crop.ome.zarr", shape=crop.shape, dtype=crop.dtype, chunks=(1, 4, 4),
                         voxel_size=VOXEL, kind="labels", ngff=ngff)
    staged.array[:] = crop
    cropped = staged.commit(pyramid_levels=1, extra_attrs={"offset": [1, 3, 2]})
    dest = tmp_path / "v.ome.zarr"
    code, _, err = run_cli("view", stores["raw"], dest, "--labels", f"truth={cropped}",
                           "--labels", f"instances={stores['instances']}", "--unlabelled", f"truth={unlabelled}")
    assert code == 0, err
    nodes = read_nodes(dest)
    truth = nodes["labels/truth"]
    # The reader gets the crop's own values and the translation that puts voxel (0, 0, 0) at raw (1, 3, 2).
    np.testing.assert_array_equal(np.asarray(truth.data[0]), crop)
    np.testing.assert_array_equal(np.asarray(truth.data[1]), crop[:, ::2, ::2])
    transforms = truth.metadata["coordinateTransformations"]
    assert [t[1] for t in transforms] == [{"type": "translation", "translation": [0.05, 0.012, 0.008]}] * 2
    # Unannotated pixels are fully transparent; the full-size layer is unchanged.
    assert truth.metadata["color"][unlabelled] == [0, 0, 0, 0]
    assert nodes["labels/instances"].metadata["color"] == {}
    np.testing.assert_array_equal(np.asarray(nodes["labels/instances"].data[0]), open_image(stores["instances"])[:])
    # A crop that does not fit the raw is refused with its place.
    staged = StagedImage(tmp_path / "out.ome.zarr", shape=crop.shape, dtype=crop.dtype, chunks=(1, 4, 4),
                         voxel_size=VOXEL, kind="labels", ngff=ngff)
    staged.array[:] = crop
    outside = staged.commit(pyramid_levels=1, extra_attrs={"offset": [1, 5, 2]})
    code, _, err = run_cli("view", stores["raw"], tmp_path / "w.ome.zarr", "--labels", f"s={outside}")
    assert code == 2 and "shape (1, 4, 6) at offset [1, 5, 2] does not lie inside (2, 8, 8)" in err
    assert not (tmp_path / "w.ome.zarr").exists()


def test_view_rule_shows_the_unlabelled_value_transparent(tmp_path):
    """weights.unlabelled_value reaches the view job as --unlabelled labels=V (the truth layer only)."""
    from test_workflow import run_snakemake, small_config

    cfg = small_config()
    cfg["weights"]["unlabelled_value"] = 128
    proc = run_snakemake(tmp_path, "-n", "-p", "results/demo/view.ome.zarr", config=cfg)
    view = [line for line in proc.stdout.splitlines() if line.startswith("Shell command: unet-pipe view ")]
    assert len(view) == 1 and " --unlabelled labels=128 " in view[0], view
    proc = run_snakemake(tmp_path, "-n", "-p", "results/demo/view.ome.zarr", config=small_config())
    assert "--unlabelled" not in proc.stdout
