"""Markdown report of an evaluation: metric tables, slice figures, training curves.

``write_report`` turns one or more ``metrics.json`` files (from
:func:`unet_pipe.evaluate.evaluate`) and optionally the training log CSV into
``report.md`` plus PNG figures in ``<report stem>_figures/`` next to it:

* a summary table per dataset and subset (val / train / all slices),
* for a few slices (best, median and worst Rand error, held-out slices
  preferred): raw, truth instances, predicted instances, and a map of the
  pixels whose cell/membrane class is wrong,
* training curves: every numeric column of the log against ``step`` (losses,
  validation metrics, learning rate), whatever columns the log has; wall-clock
  columns (``seconds``) only as a last value.

Figures use matplotlib's object API with the Agg canvas (no pyplot state, no
display needed).  Missing inputs (a store moved away, no training log) become a
note in the report rather than an error, since the report is the last step.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from unet_pipe.atomic import atomic_output, check_ours, write_markdown_with_figures
from unet_pipe.errors import UnetPipeError
from unet_pipe.evaluate import read_metrics
from unet_pipe.io import ATTRS_KEY, image_metadata, open_image
from unet_pipe.metrics import instances_from_binary

log = logging.getLogger(__name__)

_TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("slices", "slices", "{:d}"),
    ("pixel_error", "pixel error", "{:.4f}"),
    ("rand_error", "Rand error", "{:.4f}"),
    ("v_rand_split", "V_rand split", "{:.4f}"),
    ("v_rand_merge", "V_rand merge", "{:.4f}"),
    ("vi_split", "VI split (bits)", "{:.3f}"),
    ("vi_merge", "VI merge (bits)", "{:.3f}"),
    ("iou", "IoU", "{:.4f}"),
    ("warping_error", "warping error", "{:.6f}"),
    ("v_rand", "V_rand thinned (t)", "{:.4f}"),
    ("v_info", "V_info thinned (t)", "{:.4f}"),
)
# Protocol scores are shown with the threshold at which they were best.
_BEST_THRESHOLD_OF = {"v_rand": "v_rand_threshold", "v_info": "v_info_threshold"}
_X_COLUMNS = ("step", "iteration", "epoch")
_TIME_COLUMNS = ("seconds", "time", "elapsed", "wall_time")
# Slices are shown at most this many pixels wide (about a panel's width on the page): labels
# strided, the raw resized with anti-aliasing. Only the picture shrinks: the numbers are computed
# (by evaluate) on every pixel. 512^2 slices at full size made 2 MB figures.
_MAX_PANEL_PIXELS = 256
_FIGURE_DPI = 80
_UNLABELLED_RGB = (0.8, 0.8, 0.8)  # flat light gray: not scored, so neither right nor wrong
_MAX_TABLE_ROWS = 60  # longer stacks: the per-slice CSV only


def pick_slices(per_slice: Sequence[dict[str, Any]], n: int) -> list[tuple[int, str]]:
    """``n`` slices spread from the best to the worst Rand error, as ``(z, tag)``.

    Held-out (``val``) slices are preferred when there are any; ties break by z,
    so the choice is deterministic.
    """
    scored = [r for r in per_slice if r.get("rand_error") is not None and math.isfinite(r["rand_error"])]
    held_out = [r for r in scored if r.get("subset") == "val"]
    pool = sorted(held_out or scored, key=lambda r: (r["rand_error"], r["z"]))
    if n <= 0 or not pool:
        return []
    idx = sorted(set(int(round(i)) for i in np.linspace(0, len(pool) - 1, min(n, len(pool)))))
    tags = {len(pool) - 1: "worst", 0: "best"}
    out = []
    for i in idx:
        tag = tags.get(i, "median" if i == (len(pool) - 1) // 2 else f"rank {i + 1}/{len(pool)}")
        out.append((int(pool[i]["z"]), tag))
    return out


def label_overlay(gray: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB float image: ``gray`` (any range) with each nonzero label tinted by a fixed colour.

    Colours come from a seeded table indexed by ``label % 256``, so a label has
    the same colour in every figure and neighbours rarely share one.
    """
    g = _normalize(gray)
    lut = np.random.default_rng(0).uniform(0.15, 1.0, size=(256, 3))
    rgb = np.repeat(g[..., None], 3, axis=-1)
    fg = labels != 0
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * lut[labels[fg].astype(np.int64) % 256]  # uint8 ids: 256 overflows
    return rgb


def error_overlay(
    gray: np.ndarray, pred_cells: np.ndarray, truth_cells: np.ndarray, known: np.ndarray | None = None
) -> np.ndarray:
    """RGB: red = predicted cell on true membrane, blue = predicted membrane on a true cell.

    ``known``: the annotated pixels (sparse truth); the others are left out of the
    scores, so they are painted flat light gray instead of as errors.
    """
    rgb = np.repeat(_normalize(gray)[..., None] * 0.6, 3, axis=-1)
    rgb[pred_cells & ~truth_cells] = (1.0, 0.1, 0.1)
    rgb[~pred_cells & truth_cells] = (0.2, 0.4, 1.0)
    if known is not None:
        rgb[~known] = _UNLABELLED_RGB
    return rgb


def _normalize(gray: np.ndarray) -> np.ndarray:
    g = np.asarray(gray, dtype=np.float32)
    lo, hi = np.percentile(g, (1, 99)) if g.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((g - lo) / (hi - lo), 0.0, 1.0)


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_FIGURE_DPI)
    FigureCanvasAgg(fig)
    return fig


def slice_figure(metrics: dict[str, Any], slices: Sequence[tuple[int, str]], dest: Path) -> None:
    """PNG with one row per slice: raw | truth | prediction | class errors."""
    inputs = metrics["inputs"]
    pred = open_image(inputs["instances"])
    truth = open_image(inputs["truth"])
    raw = open_image(inputs["raw"]) if inputs.get("raw") else None
    params = metrics.get("params", {})
    by_z = {r["z"]: r for r in metrics["per_slice"]}
    # Truth of a crop: show its box only (the part that was scored).
    oz, oy, ox = params.get("truth_offset") or (0, 0, 0)
    box = (slice(oy, oy + truth.shape[1]), slice(ox, ox + truth.shape[2]))
    unlabelled = params.get("unlabelled_value")
    step = max(1, math.ceil(max(truth.shape[1:]) / _MAX_PANEL_PIXELS))
    fig = _new_figure(4 * 3.0, len(slices) * 3.2)
    for row, (z, tag) in enumerate(slices):
        p = np.asarray(pred[(z, *box)])[::step, ::step]
        t = np.asarray(truth[z - oz])
        known = None
        if unlabelled is not None:
            known = (t != unlabelled)[::step, ::step]
            t = np.where(t == unlabelled, 0, t)  # unlabelled pixels are shown as no cell
        if params.get("truth_mode", "binary") == "binary":
            fg = params.get("foreground_value")
            cells = t == fg if fg is not None else t != 0
            t = instances_from_binary(cells)
        t = t[::step, ::step]
        gray = _display_raw(np.asarray(raw[(z, *box)]), p.shape) if raw is not None else np.zeros(p.shape, np.float32)
        err = by_z.get(z, {}).get("rand_error")
        panels = (
            (gray, f"z={z} raw ({tag})" if raw is not None else f"z={z} ({tag}, no raw image)"),
            (label_overlay(gray, t), "truth"),
            (label_overlay(gray, p), f"prediction, Rand error {err:.3f}" if err is not None else "prediction"),
            (error_overlay(gray, p != 0, t != 0, known),
             "class errors (gray: unlabelled)" if known is not None else "class errors (red: false cell, blue: missed)"),
        )
        for col, (image, title) in enumerate(panels):
            ax = fig.add_subplot(len(slices), 4, row * 4 + col + 1)
            ax.imshow(image, cmap="gray", interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    fig.tight_layout()
    _save_png(fig, dest)


def is_3d_instances(path: str | Path) -> bool:
    """Whether an instance store holds objects labelled across slices (``postprocess --instances 3d``);
    False when it cannot be read (the slice figure then says why it was skipped)."""
    try:
        return (image_metadata(path).attrs.get(ATTRS_KEY) or {}).get("instances_mode") == "3d"
    except (UnetPipeError, OSError):
        return False


def orthogonal_figure(metrics: dict[str, Any], dest: Path) -> int:
    """PNG of 3D instances seen from the side: the xz and yz sections through the centre of the
    evaluated z range (raw, and the objects over it: one colour per 3D object, so an object keeps its
    colour across slices), drawn at the voxel size's aspect. Returns the number of objects shown."""
    inputs = metrics["inputs"]
    meta = image_metadata(inputs["instances"])
    pred = open_image(inputs["instances"])
    raw = open_image(inputs["raw"]) if inputs.get("raw") else None
    z0, z1 = (int(v) for v in metrics["params"]["slices"])
    vz, vy, vx = meta.voxel_size
    ny, nx = pred.shape[1:]
    sections = (("xz", (slice(z0, z1), ny // 2, slice(None)), vz / vx),
                ("yz", (slice(z0, z1), slice(None), nx // 2), vz / vy))
    fig = _new_figure(2 * 3.6, 2 * 2.4)
    shown: set[int] = set()
    for row, (name, where, aspect) in enumerate(sections):
        labels = np.asarray(pred[where])
        step = max(1, math.ceil(labels.shape[1] / (2 * _MAX_PANEL_PIXELS)))
        labels = labels[:, ::step]
        gray = _normalize(np.asarray(raw[where])[:, ::step]) if raw is not None else np.zeros(labels.shape)
        shown |= set(np.unique(labels[labels > 0]).tolist())
        for col, (image, title) in enumerate(((gray, f"{name} section, raw (z {z0}-{z1 - 1})"),
                                               (label_overlay(gray, labels), f"{name} section, 3D objects"))):
            ax = fig.add_subplot(2, 2, row * 2 + col + 1)
            ax.imshow(image, cmap="gray", interpolation="nearest", aspect=aspect * step if step > 1 else aspect)
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    fig.tight_layout()
    _save_png(fig, dest)
    return len(shown)


def _display_raw(gray: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``gray`` resized to ``shape`` (the strided labels' shape) with anti-aliasing, for display only."""
    if gray.shape == tuple(shape):
        return gray
    from skimage.transform import resize

    return resize(gray.astype(np.float32), shape, order=1, anti_aliasing=True, preserve_range=True)


def _save_png(fig: Any, dest: Path) -> None:
    """``fig`` as a 256-colour (palette) PNG: a third of the RGBA file, the same picture to the eye."""
    from PIL import Image

    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    image.quantize(256, method=Image.Quantize.FASTOCTREE).save(dest, format="PNG", optimize=True)


def weights_figure(
    path: str | Path,
    instances: np.ndarray,
    weights: np.ndarray,
    raw: np.ndarray | None,
    params: Any,
    title: str | None = None,
) -> Path:
    """A PNG like the paper's figure 3 for one slice: raw, instances, cell mask, weight map.

    ``instances`` are the slice's objects with sequential ids (0 = membrane),
    ``params`` a :class:`unet_pipe.weights.WeightParams` (for the title).
    """
    rng = np.random.default_rng(0)  # fixed colours: same input -> same figure
    colours = rng.uniform(0.25, 1.0, size=(int(instances.max()) + 1, 3))
    colours[0] = 0.0
    panels: list[tuple[str, np.ndarray, dict]] = []
    if raw is not None:
        panels.append(("raw", raw, {"cmap": "gray"}))
    panels += [
        ("instances", colours[instances], {}),
        ("labels (cell = white)", instances > 0, {"cmap": "gray"}),
        (f"weights (w0={params.w0:g}, σ={params.sigma:g} px)", weights, {"cmap": "jet"}),
    ]
    fig = _new_figure(4.2 * len(panels), 4.4)
    fig.set_layout_engine("constrained")
    axes = [fig.add_subplot(1, len(panels), i + 1) for i in range(len(panels))]
    for ax, (name, data, kw) in zip(axes, panels):
        shown = ax.imshow(data, interpolation="nearest", **kw)
        ax.set_title(name)
        ax.set_axis_off()
    fig.colorbar(shown, ax=axes[-1], fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def read_training_log(path: str | Path) -> dict[str, np.ndarray]:
    """Numeric columns of a training CSV as float arrays (empty cells -> NaN).

    Columns with any non-numeric value (e.g. timestamps as text) are dropped.
    """
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    columns: dict[str, np.ndarray] = {}
    for name in rows[0].keys() if rows else []:
        if name is None:
            continue
        values = []
        for r in rows:
            text = (r.get(name) or "").strip()
            try:
                values.append(float(text) if text else math.nan)
            except ValueError:
                break
        else:
            columns[name] = np.array(values, dtype=np.float64)
    return columns


def training_figure(columns: dict[str, np.ndarray], dest: Path) -> list[str]:
    """PNG of the training curves; returns the plotted column names.

    Panels: losses (log scale when positive), validation metrics, anything else
    (e.g. learning rate), each against the step column (or the row number).
    """
    x_name = next((c for c in _X_COLUMNS if c in columns), None)
    n = len(next(iter(columns.values()))) if columns else 0
    x = columns[x_name] if x_name else np.arange(n, dtype=np.float64)
    # Wall-clock columns grow linearly and dwarf the rest: reported in the table only.
    rest = [c for c in columns if c != x_name and c.lower() not in _TIME_COLUMNS]
    groups = {
        "loss": [c for c in rest if "loss" in c.lower()],
        "validation": [c for c in rest if "loss" not in c.lower() and c.lower().startswith("val")],
    }
    groups["other"] = [c for c in rest if c not in groups["loss"] and c not in groups["validation"]]
    groups = {k: v for k, v in groups.items() if any(np.isfinite(columns[c]).any() for c in v)}
    if not groups:
        return []
    fig = _new_figure(4.2 * len(groups), 3.4)
    plotted = []
    for i, (title, names) in enumerate(groups.items()):
        ax = fig.add_subplot(1, len(groups), i + 1)
        for name in names:
            y = columns[name]
            ok = np.isfinite(y)
            if not ok.any():
                continue
            # Validation columns are sparse (every val_every steps): show the points.
            ax.plot(x[ok], y[ok], marker="o" if ok.sum() < 50 else None, markersize=3, label=name)
            plotted.append(name)
        if title == "loss" and all((columns[c][np.isfinite(columns[c])] > 0).all() for c in names):
            ax.set_yscale("log")
        ax.set_xlabel(x_name or "row")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest)
    return plotted


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return spec.format(value)


def _summary_cell(summary: dict[str, Any], key: str, spec: str) -> str:
    text = _fmt(summary.get(key), spec)
    t = summary.get(_BEST_THRESHOLD_OF.get(key, ""))
    return f"{text} ({t:.1f})" if text != "–" and isinstance(t, (int, float)) else text


def _summary_table(all_metrics: Sequence[dict[str, Any]]) -> list[str]:
    header = "| dataset | subset | " + " | ".join(label for _, label, _ in _TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(_TABLE_COLUMNS) + 2)]
    for m in all_metrics:
        for subset in ("val", "calibrate", "train", "other", "all"):
            s = m["summary"].get(subset)
            if s is None:
                continue
            cells = " | ".join(_summary_cell(s, key, spec) for key, _, spec in _TABLE_COLUMNS)
            lines.append(f"| {m['dataset']} | {subset} | {cells} |")
    return lines


def _scores_3d_table(all_metrics: Sequence[dict[str, Any]]) -> list[str]:
    """3D objects per dataset and subset (evaluate's ``scores_3d``); empty when no metrics hold them."""
    lines = []
    for m in all_metrics:
        for subset in ("val", "calibrate", "train", "other", "all"):
            s = (m["summary"].get(subset) or {}).get("scores_3d")
            if not s:
                continue
            lines.append(
                f"| {m['dataset']} | {subset} | {s['z'][0]}-{s['z'][1] - 1} | {s['truth_objects']} | "
                f"{s['predicted_objects']} | {_fmt(s['are'], '{:.4f}')} | {_fmt(s['vi_split'], '{:.3f}')} | "
                f"{_fmt(s['vi_merge'], '{:.3f}')} |"
            )
    if not lines:
        return []
    return ["### 3D objects", "",
            "| dataset | subset | z | truth objects | predicted objects | adapted Rand error | VI split | VI merge |",
            "|---|---|---|---|---|---|---|---|", *lines, "",
            "Objects taken whole across z (binary truth: 6-connected components of its cells in the range); "
            "instances labelled per slice (postprocess.instances 2d) split every object at every slice.", ""]


def write_report(
    out_md: str | Path,
    metrics_files: Sequence[str | Path],
    *,
    training_logs: Sequence[str | Path] = (),
    figures: int = 3,
    title: str = "unet-pipe evaluation",
) -> Path:
    """Write the Markdown report and its figures; returns the report path.

    ``figures``: slices shown per dataset (0: none).  The figure folder is
    rebuilt from scratch and swapped in, the Markdown written atomically.
    """
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    figdir = out_md.parent / f"{out_md.stem}_figures"
    check_ours(out_md, figdir)
    all_metrics = [read_metrics(p) for p in metrics_files]  # a refused input leaves no staging folder
    return write_markdown_with_figures(out_md, figdir, lambda staging: _report_lines(
        title, metrics_files, all_metrics, training_logs, figures, figdir, staging))


def _report_lines(
    title: str,
    metrics_files: Sequence[str | Path],
    all_metrics: list[dict[str, Any]],
    training_logs: Sequence[str | Path],
    figures: int,
    figdir: Path,
    staging: Path,
) -> list[str]:
    """The report's Markdown lines; its figures are written to ``staging``."""

    md = [f"# {title}", ""]
    md += ["## Summary", ""]
    if all_metrics:
        md += _summary_table(all_metrics)
        md += ["", "Rand error and VI are the ISBI 2012 foreground-restricted scores of the "
               "instances, computed per 2D slice and averaged; *val* rows are the slices held out "
               "from training (the honest numbers), *calibrate* rows the other slices the decisions "
               "were chosen on.  The challenge's final measures are V_rand and "
               "V_info thinned (predicted boundaries thinned to 1-pixel lines, best threshold t of "
               "the probability map in brackets) and the warping error (topological errors at the "
               "decision threshold); they need the probabilities.", ""]
        md += _scores_3d_table(all_metrics)
    else:
        md += ["No metrics files given.", ""]

    md += _decisions_lines(all_metrics)
    for source, m in zip(metrics_files, all_metrics):
        md += _dataset_lines(source, m, figures, staging, figdir.name)
    md += _training_lines(training_logs, staging, figdir.name)

    if all_metrics:
        md += ["## Definitions", ""]
        md += [f"- **{k}**: {v}" for k, v in all_metrics[0].get("definitions", {}).items()]
        prov = all_metrics[0].get("provenance", {})
        md += ["", "## Provenance", ""]
        md += [f"- git commit: `{prov.get('git_commit')}`"]
        md += [f"- versions: {', '.join(f'{k} {v}' for k, v in prov.get('versions', {}).items())}"]
        md += [f"- metrics: {', '.join(f'`{p}`' for p in metrics_files)}", ""]
    return md


def _dataset_lines(source: str | Path, m: dict[str, Any], figures: int, staging: Path, figdir: str) -> list[str]:
    """One dataset's section: slice figure (written into ``staging``) and per-slice table."""
    name = m["dataset"]
    md = [f"## {name}", ""]
    chosen = pick_slices(m["per_slice"], figures)
    if chosen:
        png = f"{_safe(name)}_slices.png"
        try:
            slice_figure(m, chosen, staging / png)
            md += [f"![{name}: slices]({figdir}/{png})", ""]
            md += ["Columns: raw, truth instances, predicted instances, cell/membrane "
                   "errors (red: predicted cell on true membrane, blue: missed cell pixels; light gray: "
                   "unlabelled, not scored). Slices over 256 pixels are shown downsampled; the scores "
                   "use every pixel.", ""]
        except (UnetPipeError, OSError, KeyError) as exc:
            md += [f"*Slice figures skipped: {exc}*", ""]
    if figures and is_3d_instances(m["inputs"]["instances"]):
        png = f"{_safe(name)}_3d.png"
        try:
            n = orthogonal_figure(m, staging / png)
            md += [f"![{name}: 3D objects]({figdir}/{png})", "",
                   f"3D objects seen from the side ({n} objects cut by the sections): each colour is one object "
                   "labelled across slices, at the voxel size's aspect.", ""]
        except (UnetPipeError, OSError, KeyError) as exc:
            md += [f"*3D figure skipped: {exc}*", ""]
    rows = m["per_slice"]
    md += [f"Per-slice values: `{Path(source).with_suffix('.csv')}`.", ""]
    if len(rows) <= _MAX_TABLE_ROWS:
        md += ["| z | subset | pixel error | Rand error | VI split | VI merge | IoU | warping error |",
               "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            md.append(
                f"| {r['z']} | {r.get('subset', '')} | {_fmt(r.get('pixel_error'), '{:.4f}')} | "
                f"{_fmt(r.get('rand_error'), '{:.4f}')} | {_fmt(r.get('vi_split'), '{:.3f}')} | "
                f"{_fmt(r.get('vi_merge'), '{:.3f}')} | {_fmt(r.get('iou'), '{:.4f}')} | "
                f"{_fmt(r.get('warping_error'), '{:.6f}')} |"
            )
        md.append("")
    return md


def _training_lines(training_logs: Sequence[str | Path], staging: Path, figdir: str) -> list[str]:
    """The training section: curves of each log (written into ``staging``) and their last values."""
    md = ["## Training", ""]
    if not training_logs:
        md += ["No training log given.", ""]
    for i, path in enumerate(training_logs):
        path = Path(path)
        try:
            columns = read_training_log(path)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            md += [f"*Training log {path} not readable: {exc}*", ""]
            continue
        png = f"training_{i}.png" if len(training_logs) > 1 else "training.png"
        plotted = training_figure(columns, staging / png) if columns else []
        if not plotted:
            md += [f"*Training log {path} has no numeric columns to plot.*", ""]
            continue
        md += [f"![training curves]({figdir}/{png})", "", f"From `{path}`. Last values:", ""]
        md += ["| column | last value |", "|---|---|"]
        shown = plotted + [c for c in columns if c.lower() in _TIME_COLUMNS and np.isfinite(columns[c]).any()]
        for name in shown:
            y = columns[name][np.isfinite(columns[name])]
            md.append(f"| {name} | {y[-1]:.5g} |")
        md.append("")
        if any(c.lower().startswith("val") for c in plotted):
            md += ["The `val_*` columns monitor training on the val slices without test-time augmentation, "
                   "at the decision known while training (p > 0.5 and connected components unless "
                   "`postprocess` fixes another): the calibrated decisions come after training, so these "
                   "are not the numbers of the metrics table.", ""]
    return md


def _decisions_lines(all_metrics: Sequence[dict[str, Any]]) -> list[str]:
    """What the decisions were and where they were chosen (a warning when they saw the val slices)."""
    lines: list[str] = []
    for m in all_metrics:
        d = (m.get("params") or {}).get("decisions")
        if not d:
            continue
        lines += ["## Decisions", ""]
        where = ", ".join(f"{n} slices {a}-{b - 1}" for n, (a, b) in sorted(d.get("slices", {}).items()))
        inst = f"{d['method']} at p > {d['threshold']:.2f}"
        if d["method"] == "watershed":
            inst += f", seeds p > {d['seed_threshold']:.2f} with prominence {d['seed_prominence']:g} px"
        inst += f", min size {d['min_size']} px"
        lines += [f"Chosen by `unet-pipe calibrate` on {where or 'the calibration slices'} "
                  f"(`decisions.json` lists every candidate): cell threshold p > {d['cell_threshold']:.2f} "
                  f"(pixel error); instances: {inst}.", ""]
        overlap = []
        for other in all_metrics:
            val = (other.get("params") or {}).get("val_slices")
            cal = d.get("slices", {}).get(other.get("dataset"))
            if val and cal and cal[0] < val[1] and val[0] < cal[1]:
                overlap.append(other["dataset"])
        if overlap:
            lines += [f"**The calibration slices overlap the val slices of {', '.join(overlap)}: those val "
                      "numbers saw the decisions and are optimistic.** Set `calibrate.datasets` to "
                      "other labelled slices for unbiased ones.", ""]
        break  # one decisions file per run
    return lines


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
