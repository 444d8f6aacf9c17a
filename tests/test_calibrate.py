"""Calibration: decisions chosen on labelled slices by the documented rule, and the stages using them."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from unet_pipe.calibrate import (
    CELL_THRESHOLDS,
    THRESHOLDS,
    calibrate,
    calibrate_slices,
    calibration_windows,
    choose,
    pixel_errors,
    read_decisions,
    truth_scales,
)
from unet_pipe.errors import InputError
from unet_pipe.io import StagedImage, open_image


def _grid_cells(n: int = 4, size: int = 12, membrane: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """An n x n grid of square cells (size px) separated by membranes: (cells bool, instances)."""
    side = n * (size + membrane) + membrane
    cells = np.zeros((side, side), bool)
    inst = np.zeros((side, side), np.uint32)
    k = 0
    for i in range(n):
        for j in range(n):
            k += 1
            y, x = membrane + i * (size + membrane), membrane + j * (size + membrane)
            cells[y : y + size, x : x + size] = True
            inst[y : y + size, x : x + size] = k
    return cells, inst


def test_truth_scales_by_hand() -> None:
    t = np.zeros((10, 10), np.uint32)
    t[0:2, 0:2] = 1  # area 4
    t[3:6, 3:6] = 2  # area 9
    t[6:10, 6:10] = 3  # area 16
    s = truth_scales([t])
    assert s["median_area_px"] == 9.0 and s["segments"] == 3
    assert s["radius_px"] == pytest.approx(math.sqrt(9 / math.pi))
    with pytest.raises(InputError, match="no truth segments"):
        truth_scales([np.zeros((3, 3), np.uint32)])


def test_biased_probabilities_get_a_threshold_below_one_half() -> None:
    # The loss's membrane emphasis pushes p(cell) down: cells at 0.3, membranes at 0.1.
    # At 0.5 everything is membrane; cell thresholds 0.10 ... 0.29 are all exact, and
    # the rule breaks the tie towards 0.5: 0.29 (instance thresholds: 0.10 ... 0.25 -> 0.25).
    cells, inst = _grid_cells()
    p = np.where(cells, 0.3, 0.1).astype(np.float32)
    out = calibrate_slices([p, p], [cells, cells], [inst, inst])
    assert out["cell_threshold"] == 0.29 and out["cell_pixel_error"] == 0.0
    assert len(out["pixel_candidates"]) == len(CELL_THRESHOLDS) == 99
    assert out["decisions"]["method"] == "threshold"
    assert out["decisions"]["threshold"] == 0.25 and out["decisions"]["min_size"] == 0
    assert out["scores"]["rand_error"] == pytest.approx(0.0, abs=1e-12)
    # Every candidate is recorded with its scores; at 0.5 all pixels are membrane.
    at_half = [c for c in out["candidates"] if c["method"] == "threshold" and c["threshold"] == 0.5 and c["min_size"] == 0]
    assert at_half[0]["pixel_error"] == pytest.approx(cells.mean())
    assert len([c for c in out["candidates"] if c["method"] == "threshold"]) == 2 * len(THRESHOLDS)
    # Size scales from the truth: 144 px cells; min sizes tried 0 and 144 / 20 -> 7.
    assert out["scales"]["median_area_px"] == 144.0
    assert {c["min_size"] for c in out["candidates"]} == {0, 7}


def test_cell_threshold_off_the_instance_grid() -> None:
    # Cells at 0.33, membranes at 0.31: only 0.31 and 0.32 are exact; no multiple of
    # 0.05 is (0.30 and 0.35 call one class wrong everywhere).
    cells, inst = _grid_cells()
    p = np.where(cells, 0.33, 0.31).astype(np.float32)
    out = calibrate_slices([p], [cells], [inst], methods=["threshold"])
    assert out["cell_threshold"] == 0.32 and out["cell_pixel_error"] == 0.0
    at = {c["threshold"]: c["pixel_error"] for c in out["pixel_candidates"]}
    assert at[0.3] == pytest.approx(1 - cells.mean()) and at[0.35] == pytest.approx(cells.mean())


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_pixel_errors_equal_counting_at_each_threshold(dtype) -> None:
    """The sorted-count curve equals ``mean((p > t) != cells)`` over the annotated pixels,
    including probabilities equal to a threshold, in the probabilities' own type."""
    rng = np.random.default_rng(0)
    scale = 255 if dtype == np.uint8 else 1
    prob = [(rng.random((40, 50)) * scale).astype(dtype) for _ in range(3)]
    prob[0][:4] = 29 if dtype == np.uint8 else 0.29  # ties with a threshold
    cells = [rng.random((40, 50)) > 0.4 for _ in range(3)]
    known = [rng.random((40, 50)) > 0.3 for _ in range(3)]
    thresholds = [float(t) for t in range(1, 255, 7)] + [29.0] if dtype == np.uint8 else list(CELL_THRESHOLDS)
    for annotated in (None, known):
        masks = annotated or [np.ones_like(c) for c in cells]
        got = pixel_errors(prob, cells, thresholds, annotated)
        for t, e in zip(thresholds, got):
            wrong = sum(np.count_nonzero(((p > t) != c) & m) for p, c, m in zip(prob, cells, masks))
            assert e == wrong / sum(np.count_nonzero(m) for m in masks)


def test_watershed_wins_where_a_membrane_is_missing() -> None:
    # Two cells whose membrane the net missed over a neck: the threshold merges them
    # at every level, the watershed's seeds (one per cell body) split them.
    cells, inst = np.zeros((40, 80), bool), np.zeros((40, 80), np.uint32)
    yy, xx = np.mgrid[:40, :80]
    left = (yy - 20) ** 2 + (xx - 20) ** 2 < 16**2
    right = (yy - 20) ** 2 + (xx - 58) ** 2 < 16**2
    neck = (abs(yy - 20) < 3) & (xx >= 30) & (xx < 50)
    inst[left | (neck & (xx < 39))] = 1
    inst[right | (neck & (xx > 39))] = 2
    cells = inst > 0
    p = np.where(left | right | neck, 0.95, 0.02).astype(np.float32)
    out = calibrate_slices([p], [cells], [inst])
    assert out["decisions"]["method"] == "watershed"
    merged = [c for c in out["candidates"] if c["method"] == "threshold"]
    assert min(c["rand_error"] for c in merged) > 0.3  # two equal cells merged: V_rand = 1/2
    assert out["scores"]["rand_error"] < 0.05
    # Restricted to the threshold method, calibration has to live with the merge.
    only = calibrate_slices([p], [cells], [inst], methods=["threshold"])
    assert only["decisions"]["method"] == "threshold" and only["scores"]["rand_error"] > 0.3


def test_ties_prefer_lower_pixel_error_then_simpler() -> None:
    a = {"method": "watershed", "threshold": 0.5, "min_size": 0, "rand_score": 0.9000, "pixel_error": 0.10}
    b = {"method": "threshold", "threshold": 0.3, "min_size": 0, "rand_score": 0.8995, "pixel_error": 0.10}
    c = {"method": "threshold", "threshold": 0.4, "min_size": 5, "rand_score": 0.8992, "pixel_error": 0.09}
    d = {"method": "threshold", "threshold": 0.5, "min_size": 0, "rand_score": 0.80, "pixel_error": 0.01}
    assert choose([a, b, d]) is b  # a, b tied (within 1e-3), same pixel error: threshold is simpler
    assert choose([a, b, c, d]) is c  # c tied too, lower pixel error wins; d is not tied
    assert choose([d]) is d


def _store(path, data, kind="image"):
    staged = StagedImage(path, shape=data.shape, dtype=data.dtype, chunks=(1,) + data.shape[1:], kind=kind)
    staged.array[:] = data
    return staged.commit(pyramid_levels=0)


def test_cli_calibrate_then_postprocess_and_evaluate_use_the_decisions(tmp_path, run_cli) -> None:
    cells, inst = _grid_cells()
    labels = np.stack([np.where(cells, 255, 0)] * 4).astype(np.uint8)
    prob = np.stack([np.where(cells, 0.3, 0.1)] * 4).astype(np.float32)
    prob_path = _store(tmp_path / "p.ome.zarr", prob)
    truth_path = _store(tmp_path / "l.ome.zarr", labels, "labels")
    out = tmp_path / "model" / "decisions.json"
    code, _, err = run_cli(
        "calibrate", "--probabilities", f"x={prob_path}", "--truth", f"x={truth_path}", "--slices", "x=2:4",
        "--out", out,
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["slices"] == {"x": [2, 4]} and data["criterion"].startswith("instances: highest mean")
    assert read_decisions(out)["threshold"] == 0.25
    code, _, err = run_cli("postprocess", prob_path, tmp_path / "i.ome.zarr", "--decisions", out)
    assert code == 0, err
    got = np.asarray(open_image(tmp_path / "i.ome.zarr")[:])
    assert got.max() == 4 * 16 and np.array_equal(got[0] > 0, cells)  # 16 cells per slice, exact
    code, _, err = run_cli(
        "evaluate", "--prediction", tmp_path / "i.ome.zarr", "--truth", truth_path, "--probabilities", prob_path,
        "--out", tmp_path / "m.json", "--decisions", out, "--foreground-value", "255",
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())
    # evaluate's pixel error uses the cell threshold (0.29), the instances their own (0.25)
    assert metrics["params"]["threshold"] == 0.29 and metrics["params"]["decisions"]["method"] == "threshold"
    assert metrics["summary"]["all"]["pixel_error"] == 0.0 and metrics["summary"]["all"]["rand_error"] == 0.0


def test_calibration_windows_by_hand(monkeypatch) -> None:
    import unet_pipe.calibrate as cal

    monkeypatch.setattr(cal, "WINDOW", 4)
    whole = [(z, slice(0, 10), slice(0, 8)) for z in (3, 4)]
    assert calibration_windows([3, 4], (10, 8), None) == whole
    assert calibration_windows([3, 4], (10, 8), 160) == whole  # 2 x 80 px fit exactly
    # 10 x 8 slices: window corners y in {0, 3, 6}, x in {0, 4}: a grid of 6 per slice.
    # 64 px = 4 windows of 16: 2 per slice, at grid indices 1 and 4 of [0..5] (row-major).
    got = calibration_windows([3, 4], (10, 8), 64)
    assert [(z, w.start, v.start) for z, w, v in got] == [(3, 0, 4), (3, 6, 0), (4, 0, 4), (4, 6, 0)]
    assert all(w.stop - w.start == 4 and v.stop - v.start == 4 for _, w, v in got)
    # Fewer windows than slices: evenly spaced slices, one central window (grid index 3: y 3, x 4).
    got = calibration_windows([0, 1, 2, 3, 4, 5], (10, 8), 32)
    assert [(z, w.start, v.start) for z, w, v in got] == [(1, 3, 4), (4, 3, 4)]
    # Slices narrower than a window: the window is the slice edge.
    assert calibration_windows([0, 1], (2, 3), 6) == [(1, slice(0, 2), slice(0, 3))]  # the middle one of 2


def test_max_pixels_scores_the_windows_and_records_them(tmp_path) -> None:
    """Calibration on a bounded budget equals calibration on the windows given as slices."""
    import unet_pipe.calibrate as cal

    cells, inst = _grid_cells(n=4, size=12, membrane=2)  # 58 x 58 px
    labels = np.stack([np.where(cells, 255, 0)] * 3).astype(np.uint8)
    rng = np.random.default_rng(0)
    prob = np.clip(np.where(cells, 0.35, 0.15) + rng.normal(0, 0.1, labels.shape), 0, 1).astype(np.float32)
    prob_path = _store(tmp_path / "p.ome.zarr", prob)
    truth_path = _store(tmp_path / "l.ome.zarr", labels, "labels")
    spec = {"x": {"probabilities": prob_path, "truth": truth_path, "slices": [0, 3]}}
    old = cal.WINDOW
    cal.WINDOW = 30
    try:
        out = calibrate(spec, tmp_path / "d.json", max_pixels=2 * 900, methods=["threshold"])
        windows = calibration_windows(range(3), (58, 58), 2 * 900)
    finally:
        cal.WINDOW = old
    assert [[z, [w.start, w.stop], [v.start, v.stop]] for z, w, v in windows] == out["windows"]["x"]
    assert [w[0] for w in out["windows"]["x"]] == [0, 2]  # 2 windows for 3 slices: slices 0 and 2
    crops = [(prob[z, w, v], cells[w, v]) for z, w, v in windows]
    from unet_pipe.metrics import instances_from_binary

    expected = calibrate_slices([p for p, _ in crops], [c for _, c in crops],
                                [instances_from_binary(c) for _, c in crops], methods=["threshold"])  # fmt: skip
    assert out["decisions"] == expected["decisions"] and out["cell_threshold"] == expected["cell_threshold"]
    assert out["scores"] == expected["scores"]
    full = calibrate(spec, tmp_path / "all.json", max_pixels=None, methods=["threshold"])
    assert [w[0] for w in full["windows"]["x"]] == [0, 1, 2] and full["windows"]["x"][0][1:] == [[0, 58], [0, 58]]


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "decisions file not found"),
        ("{not json", "not a unet-pipe decisions file"),
        ('{"decisions": {"method": "threshold"}, "cell_threshold": 0.5}', "out of range or missing"),
        ('{"decisions": {"method": "magic", "threshold": 0.5, "seed_threshold": 0.9, "seed_prominence": 1, '
         '"min_size": 0}, "cell_threshold": 0.5}', "out of range or missing"),
        ('{"decisions": {"method": "threshold", "threshold": 1.5, "seed_threshold": 0.9, "seed_prominence": 1, '
         '"min_size": 0}, "cell_threshold": 0.5}', "out of range or missing"),
    ],
)
def test_bad_decisions_file_is_one_line(tmp_path, run_cli, content, problem) -> None:
    path = tmp_path / "d.json"
    if content is not None:
        path.write_text(content)
    prob_path = _store(tmp_path / "p.ome.zarr", np.zeros((1, 8, 8), np.float32))
    code, _, err = run_cli("postprocess", prob_path, tmp_path / "i.ome.zarr", "--decisions", path)
    assert code == 2 and problem in err and err.count("\n") == 1
    assert not (tmp_path / "i.ome.zarr").exists()


def test_cli_calibrate_bad_arguments(tmp_path, run_cli) -> None:
    p = _store(tmp_path / "p.ome.zarr", np.zeros((2, 8, 8), np.float32))
    t = _store(tmp_path / "l.ome.zarr", np.zeros((2, 8, 8), np.uint8), "labels")
    base = ["calibrate", "--probabilities", f"x={p}", "--truth", f"x={t}", "--out", tmp_path / "d.json"]
    code, _, err = run_cli(*base, "--slices", "x=1:1")
    assert code == 2 and "START < STOP" in err
    code, _, err = run_cli(*base, "--slices", "y=0:1")
    assert code == 2 and "same datasets" in err
    code, _, err = run_cli(*base, "--slices", "x=0:9")
    assert code == 2 and "outside the stack of 2" in err
    code, _, err = run_cli(*base, "--slices", "x=0:2")  # all membrane: nothing to calibrate on
    assert code == 2 and "no truth segments" in err
    assert not (tmp_path / "d.json").exists()


def test_report_says_where_decisions_were_chosen_and_warns_on_overlap() -> None:
    from unet_pipe.report import _decisions_lines

    d = {"method": "watershed", "threshold": 0.3, "seed_threshold": 0.65, "seed_prominence": 2.5, "min_size": 7,
         "cell_threshold": 0.25, "slices": {"isbi": [20, 25]}}
    held_out = {"dataset": "isbi", "params": {"decisions": d, "val_slices": [25, 30]}}
    text = "\n".join(_decisions_lines([held_out]))
    assert "on isbi slices 20-24" in text and "cell threshold p > 0.25" in text
    assert "watershed at p > 0.30, seeds p > 0.65 with prominence 2.5 px, min size 7 px" in text
    assert "optimistic" not in text
    same = {"dataset": "isbi", "params": {"decisions": {**d, "slices": {"isbi": [25, 30]}}, "val_slices": [25, 30]}}
    assert "those val numbers saw the decisions and are optimistic" in "\n".join(_decisions_lines([same]))
    assert _decisions_lines([{"dataset": "x", "params": {"decisions": None}}]) == []


def _stacked_cells() -> tuple[np.ndarray, np.ndarray]:
    """Two 3D cells stacked in z (slices 0-2 and 4-6 of a 7 x 16 x 16 volume) and a membrane slice
    between them whose one voxel (3, 8, 8) leaks at p = 0.6: binary truth (255 = cell) and p."""
    truth = np.zeros((7, 16, 16), np.uint8)
    truth[0:3, 2:14, 2:14] = 255
    truth[4:7, 2:14, 2:14] = 255
    prob = np.where(truth > 0, 0.9, 0.2).astype(np.float32)
    prob[3, 8, 8] = 0.6
    return truth, prob


def test_3d_decisions_keep_objects_apart_across_slices() -> None:
    """Slice by slice every threshold in [0.2, 0.9) splits the cells, and the one nearest 0.5 wins
    (the leak voxel is membrane: no Rand cost, one pixel of error); in 3D, thresholds below 0.6 join
    the two cells through the leak, so the 3D rule must pick 0.6 or above and says instances 3d."""
    from unet_pipe.calibrate import calibrate_volumes, instances_3d
    from unet_pipe.metrics import truth_instances_3d

    truth, prob = _stacked_cells()
    cells = truth > 0
    inst3 = truth_instances_3d(cells)
    assert inst3.max() == 2
    result = calibrate_volumes([prob], [cells], [inst3])
    d = result["decisions"]
    assert d["instances"] == "3d" and d["method"] == "threshold" and d["min_size"] == 0
    assert d["threshold"] == 0.6 and result["scores"]["rand_error"] == 0.0
    by_t = {c["threshold"]: c for c in result["candidates"] if c["method"] == "threshold" and c["min_size"] == 0}
    # merged in 3D: skimage counts voxel pairs, n (n - 1): precision 2*432*431 / (864*863), recall 1
    precision = 2 * 432 * 431 / (864 * 863)
    assert by_t[0.5]["rand_error"] == pytest.approx(1 - 2 * precision / (1 + precision))
    assert result["scales"]["median_volume_voxels"] == 3 * 12 * 12 and result["scales"]["objects"] == 2
    assert {c["method"] for c in result["candidates"]} == {"threshold", "watershed"}
    assert instances_3d(prob, "threshold", 0.6).max() == 2 and instances_3d(prob, "threshold", 0.5).max() == 1
    # min_size in voxels drops small objects, as postprocess --instances 3d does
    assert instances_3d(prob, "threshold", 0.5, min_size=10_000).max() == 0
    # the 2D rule, on the same data slice by slice, is satisfied at 0.5's neighbours too
    flat = calibrate_slices(list(prob), list(cells), [truth_instances_3d(c[None])[0] for c in cells])
    assert flat["scores"]["rand_error"] == 0.0 and "instances" not in flat["decisions"]


def test_cli_calibrate_3d_then_postprocess_follows_the_decisions(tmp_path, run_cli) -> None:
    """`calibrate --instances 3d` writes decisions that say 3d; `postprocess --decisions` then labels
    in 3D by itself (and refuses --instances 2d with them); bundle carries them into a model."""
    from scipy import ndimage as ndi

    truth, prob = _stacked_cells()
    prob_path = _store(tmp_path / "p.ome.zarr", prob)
    truth_path = _store(tmp_path / "l.ome.zarr", truth, "labels")
    out = tmp_path / "decisions.json"
    code, _, err = run_cli("calibrate", "--probabilities", f"x={prob_path}", "--truth", f"x={truth_path}",
                           "--slices", "x=0:7", "--instances", "3d", "--out", out)
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["instances"] == "3d" and data["windows"] == {"x": [[[0, 7], [0, 16], [0, 16]]]}
    decisions = read_decisions(out)
    assert decisions["instances"] == "3d" and decisions["threshold"] == 0.6
    code, _, err = run_cli("postprocess", prob_path, tmp_path / "i.ome.zarr", "--decisions", out)
    assert code == 0, err
    got = np.asarray(open_image(tmp_path / "i.ome.zarr")[:])
    expected, n = ndi.label(prob > 0.6, ndi.generate_binary_structure(3, 1))
    assert n == 2 and np.array_equal(got > 0, expected > 0) and np.unique(got[got > 0]).size == 2
    code, _, err = run_cli("postprocess", prob_path, tmp_path / "j.ome.zarr", "--decisions", out,
                           "--instances", "2d")
    assert code == 2 and "calibrated for instances 3d" in err and err.count("\n") == 1
    # 2D decisions files stay as they were: no instances key
    code, _, err = run_cli("calibrate", "--probabilities", f"x={prob_path}", "--truth", f"x={truth_path}",
                           "--slices", "x=0:7", "--out", tmp_path / "d2.json")
    assert code == 0, err
    assert "instances" not in read_decisions(tmp_path / "d2.json")


def test_volume_window_by_hand() -> None:
    from unet_pipe.calibrate import volume_window

    assert volume_window((5, 100, 80), None) == (slice(0, 100), slice(0, 80))
    assert volume_window((5, 100, 80), 5 * 100 * 80) == (slice(0, 100), slice(0, 80))
    wy, wx = volume_window((4, 100, 80), 4 * 40 * 40)  # a centred 40 x 40 square
    assert (wy, wx) == (slice(30, 70), slice(20, 60))
    wy, wx = volume_window((2, 10, 1000), 2 * 10 * 300)  # the slice is narrower than the square
    assert (wy, wx) == (slice(0, 10), slice(350, 650))
