"""What a segmentation of an unlabelled stack holds, and its report.

:func:`summarize` reads an instance store (and the raw and probability stores
beside it) slab by slab and writes ``summary.json``: the object count, the
object sizes (pixels and µm² per 2D object when postprocess labelled each slice
on its own; quantiles and a histogram on log-spaced bins), the cell fraction,
the voxel size, the decisions and precision used and, when given, the seconds
of each stage.  Instances labelled in 3D (``postprocess --instances 3d``: one id
per object across slices) are measured as volumes (voxels and µm³) instead of
areas; ``sizes.measure`` says which.  :func:`write_summary_report` turns any number of them into a
Markdown report: one table over all datasets, then per dataset raw,
probability and instance panels of a few slices with a scale bar, and the size
histogram.  Unlike :mod:`unet_pipe.report`, nothing here needs ground truth.
"""
from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from unet_pipe.atomic import check_ours, read_json, write_json_atomic, write_markdown_with_figures
from unet_pipe.errors import InputError, UnetPipeError
from unet_pipe.io import ATTRS_KEY, image_metadata, open_image, slab_depth
from unet_pipe.probabilities import open_probabilities, read_probabilities
from unet_pipe.report import _MAX_PANEL_PIXELS, _normalize, _safe, label_overlay

log = logging.getLogger(__name__)

SUMMARY_FORMAT = "unet-pipe-segmentation-summary"
HISTOGRAM_BINS = 24
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def object_sizes(instances: Any) -> np.ndarray:
    """Voxels of every object (id > 0) of a (z, y, x) instance array, in id order, read in slabs of
    whole z-chunks (:func:`unet_pipe.io.slab_depth`).  Ids are unique across the stack, so an id's count is its 2D area when each slice
    was labelled on its own and its 3D volume when objects were labelled across slices."""
    counts = np.zeros(1, np.int64)
    chunk = int(getattr(instances, "chunks", (1,))[0]) or 1
    step = slab_depth(chunk, instances.shape[1] * instances.shape[2])
    # Each slab is counted in parts on threads, at most one part per thread at a time (memory: one
    # count array per thread): np.bincount releases the GIL, and parts fit the cache better
    # (measured, 30 ISBI slices on 2 cores: 0.013 s in 4 parts against 0.034 s in one call).
    workers = max(1, min(8, len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for z0 in range(0, instances.shape[0], step):
            parts = np.array_split(np.asarray(instances[z0 : z0 + step]).ravel(), 2 * workers)
            for first in range(0, len(parts), workers):
                for c in pool.map(np.bincount, parts[first : first + workers]):
                    if c.size > counts.size:
                        c[: counts.size] += counts
                        counts = c
                    else:
                        counts[: c.size] += c
    sizes = counts[1:]
    return sizes[sizes > 0]


MEASURES = {"area": ("px", "µm²"), "volume": ("voxels", "µm³")}


def size_statistics(sizes_px: np.ndarray, unit_um: float, measure: str = "area") -> dict[str, Any]:
    """Quantiles (:data:`QUANTILES`) and mean of object sizes in pixels (voxels) and physical units
    (``unit_um``: µm² per pixel for areas, µm³ per voxel for volumes), and a histogram of the physical
    sizes on :data:`HISTOGRAM_BINS` log-spaced bins from the smallest to the largest."""
    count_unit, unit = MEASURES[measure]
    out: dict[str, Any] = {"measure": measure, "count_unit": count_unit, "unit": unit, "quantiles": list(QUANTILES)}
    if sizes_px.size == 0:
        return {**out, "px": None, "um": None, "mean_px": None, "histogram": {"edges_um": [], "counts": []}}
    q_px = np.quantile(sizes_px, QUANTILES)
    physical = sizes_px * unit_um
    low, high = float(physical.min()), float(physical.max())
    edges = np.geomspace(low, high if high > low else low * 1.0001, HISTOGRAM_BINS + 1)
    counts, _ = np.histogram(physical, bins=edges)
    return {
        **out,
        "px": [float(v) for v in q_px],
        "um": [float(v) * unit_um for v in q_px],
        "mean_px": float(sizes_px.mean()),
        "histogram": {"edges_um": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }


def size_line(summary: dict[str, Any]) -> str:
    """'median area 1.23 µm²' (or volume), '-' for no objects: the one-line form the CLI prints."""
    sizes = summary["sizes"]
    median = "-" if not sizes["um"] else f"{sizes['um'][3]:.4g} {sizes['unit']}"
    return f"median {sizes['measure']} {median}"


def summarize(
    raw: str | Path,
    probabilities: str | Path,
    instances: str | Path,
    out_json: str | Path | None = None,
    *,
    dataset: str | None = None,
    seconds: dict[str, float | None] | None = None,
    extra: dict[str, Any] | None = None,
    sizes: np.ndarray | None = None,
) -> dict[str, Any]:
    """The summary of one segmented stack (see the module docstring); written to ``out_json``
    (atomically) when given.  ``seconds``: time per stage; ``extra``: more entries (model, input);
    ``sizes``: the pixels of ids 1, 2, ... of ``instances`` as the labelling counted them
    (``postprocess(object_sizes=...)``), instead of reading the store back."""
    inst_meta = image_metadata(instances)
    raw_meta = image_metadata(raw)
    prob_meta = image_metadata(probabilities)
    if not (inst_meta.shape == raw_meta.shape == prob_meta.shape):
        raise InputError(instances, f"shape {inst_meta.shape} differs from raw {raw_meta.shape} or probabilities "
                         f"{prob_meta.shape}")
    vz, vy, vx = inst_meta.voxel_size
    if sizes is None:
        sizes = object_sizes(open_image(instances))
    else:
        sizes = np.asarray(sizes, dtype=np.int64)
        sizes = sizes[sizes > 0]
    own = inst_meta.attrs.get(ATTRS_KEY, {})
    params = (own.get("provenance") or {}).get("params", {})
    three_d = own.get("instances_mode") == "3d" or params.get("instances") == "3d"
    compute = (prob_meta.attrs.get(ATTRS_KEY, {}) or {}).get("compute") or {}
    voxels = math.prod(inst_meta.shape)
    summary = {
        "format": SUMMARY_FORMAT,
        "dataset": dataset or Path(instances).parent.name,
        "shape": list(inst_meta.shape),
        "voxel_size_um": [vz, vy, vx],
        "instances": "3d" if three_d else "2d",
        "objects": int(sizes.size),
        "objects_per_slice": None if three_d else float(sizes.size / inst_meta.shape[0]),
        "cell_fraction": float(sizes.sum() / voxels) if voxels else 0.0,
        "sizes": size_statistics(sizes, vz * vy * vx, "volume") if three_d else size_statistics(sizes, vy * vx),
        "decisions": {k: params[k] for k in ("method", "threshold", "seed_threshold", "seed_prominence", "min_size")
                      if k in params},
        "precision": compute.get("precision"),
        "cpu_model": compute.get("cpu_model"),
        "seconds": dict(seconds or {}),
        "inputs": {"raw": str(raw), "probabilities": str(probabilities), "instances": str(instances)},
        **(extra or {}),
    }
    if out_json is not None:
        write_json_atomic(out_json, summary)
    return summary


def read_summary(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    data = read_json(path, "summary file")
    if not isinstance(data, dict) or data.get("format") != SUMMARY_FORMAT:
        raise InputError(path, "not a unet-pipe segmentation summary (no format entry)")
    if "measure" not in (data.get("sizes") or {}):
        raise InputError(path, "a summary of an older unet-pipe (sizes without a measure); run summarize again")
    return data


# ------------------------------------------------------------------------ report


def scale_bar_um(width_um: float) -> float:
    """A round length (1, 2 or 5 times a power of ten, µm) of about a fifth of ``width_um``."""
    target = width_um / 5
    power = 10 ** math.floor(math.log10(target))
    return max(m * power for m in (1, 2, 5) if m * power <= target)


# Figures are drawn with Pillow, not matplotlib: importing matplotlib and laying out its axes took
# about 1 s per report (measured), as long as predicting 10 ISBI slices; these take ~30 ms.
_GAP, _TITLE = 6, 14  # px between panels, px of a title row
# The probability colour map: black -> purple -> orange -> pale yellow, linear between these stops.
_PROB_STOPS = np.array([[0, 0, 4], [120, 28, 109], [237, 105, 37], [252, 255, 164]], np.float32)


def probability_colours(p: np.ndarray) -> np.ndarray:
    """uint8 RGB of probabilities in [0, 1] (:data:`_PROB_STOPS`, linearly interpolated)."""
    x = np.clip(np.asarray(p, np.float32), 0.0, 1.0) * (len(_PROB_STOPS) - 1)
    i = np.minimum(x.astype(np.int64), len(_PROB_STOPS) - 2)
    f = (x - i)[..., None]
    return np.round(_PROB_STOPS[i] * (1 - f) + _PROB_STOPS[i + 1] * f).astype(np.uint8)


def _rgb(image: np.ndarray) -> np.ndarray:
    """uint8 RGB of a float gray (y, x) or RGB (y, x, 3) image in [0, 1]."""
    image = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.round(image * 255).astype(np.uint8)


def _draw_scale_bar(draw: Any, x0: int, y0: int, width_px: int, height_px: int, um_per_px: float) -> float:
    """A white bar of a round length (:func:`scale_bar_um`) at the bottom left of a panel; its length in µm."""
    length_um = scale_bar_um(width_px * um_per_px)
    length = max(1, int(round(length_um / um_per_px)))
    left, top = x0 + max(4, width_px // 20), y0 + height_px - max(8, height_px // 12)
    thick = max(2, height_px // 80)
    draw.rectangle([left, top, left + length - 1, top + thick - 1], fill=(255, 255, 255))
    label = f"{length_um:g} µm" if length_um >= 1 else f"{length_um * 1000:g} nm"
    draw.text((left, top - 12), label, fill=(255, 255, 255))
    return length_um


def panel_slices(depth: int, n: int) -> list[int]:
    """``n`` slices spread over the stack (the middle one for ``n = 1``)."""
    if n <= 0 or depth <= 0:
        return []
    if n == 1:
        return [depth // 2]
    return sorted({int(round(v)) for v in np.linspace(0, depth - 1, min(n, depth))})


def segmentation_figure(summary: dict[str, Any], slices: Sequence[int], dest: Path) -> float:
    """An image with one row per slice: raw (scale bar) | probability | instances; returns the bar in µm.

    Saved as JPEG (quality 90) when ``dest`` ends in .jpg: three 512-px panels of EM and random label
    colours took 0.38 s and 1.35 MB as PNG, 0.016 s and 0.46 MB as JPEG (measured), which is most of what
    the report added to a segment run."""
    from PIL import Image, ImageDraw

    inputs = summary["inputs"]
    raw, inst = (open_image(inputs[k]) for k in ("raw", "instances"))
    prob, scale = open_probabilities(inputs["probabilities"])
    step = max(1, math.ceil(max(raw.shape[1:]) / _MAX_PANEL_PIXELS))
    um_per_px = summary["voxel_size_um"][2] * step
    rows = []
    for z in slices:
        gray = np.asarray(raw[z])[::step, ::step]
        p = read_probabilities(prob, scale, inputs["probabilities"], z, f"in slice {z}")[::step, ::step]
        labels = np.asarray(inst[z])[::step, ::step]
        n = len(np.unique(labels[labels > 0]))
        rows.append(((_rgb(_normalize(gray)), f"z={z} raw"), (probability_colours(p), "cell probability"),
                     (_rgb(label_overlay(gray, labels)), f"instances ({n} objects)")))
    h, w = rows[0][0][0].shape[:2]
    canvas = Image.new("RGB", (3 * w + 2 * _GAP, len(rows) * (h + _TITLE + _GAP)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    bar = 0.0
    for r, row in enumerate(rows):
        y0 = r * (h + _TITLE + _GAP) + _TITLE
        for c, (image, title) in enumerate(row):
            x0 = c * (w + _GAP)
            canvas.paste(Image.fromarray(image), (x0, y0))
            draw.text((x0 + 2, y0 - _TITLE + 1), title, fill=(0, 0, 0))
            if c == 0:
                bar = _draw_scale_bar(draw, x0, y0, w, h, um_per_px)
    jpeg = Path(dest).suffix.lower() in (".jpg", ".jpeg")
    canvas.save(dest, **({"quality": 90} if jpeg else {}))
    return bar


def histogram_figure(summary: dict[str, Any], dest: Path) -> None:
    """PNG: histogram of object areas (µm²) or volumes (µm³), log-spaced bins (bars of equal width), axes labelled."""
    from PIL import Image, ImageDraw

    hist = summary["sizes"]["histogram"]
    counts, edges = np.asarray(hist["counts"]), np.asarray(hist["edges_um"])
    width, height, left, bottom, top = 480, 300, 56, 40, 24
    plot_w, plot_h = width - left - 12, height - bottom - top
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    peak = max(int(counts.max()), 1) if counts.size else 1
    bar_w = plot_w / max(len(counts), 1)
    for i, n in enumerate(counts):
        bar_h = int(round(plot_h * n / peak))
        x = left + i * bar_w
        if bar_h:
            draw.rectangle([x + 1, top + plot_h - bar_h, x + bar_w - 1, top + plot_h], fill=(68, 119, 170))
    draw.line([left, top, left, top + plot_h, left + plot_w, top + plot_h], fill=(0, 0, 0))
    draw.text((4, top - 6), f"{peak}", fill=(0, 0, 0))
    draw.text((4, top + plot_h - 6), "0", fill=(0, 0, 0))
    if edges.size:
        draw.text((left, top + plot_h + 4), f"{edges[0]:.3g}", fill=(0, 0, 0))
        draw.text((left + plot_w - 40, top + plot_h + 4), f"{edges[-1]:.3g}", fill=(0, 0, 0))
    draw.text((left + plot_w // 2 - 70, height - 18), f"object {summary['sizes']['measure']} ({summary['sizes']['unit']}, log scale)", fill=(0, 0, 0))
    draw.text((left, 4), f"{summary['dataset']}: {summary['objects']} objects (count per bin)", fill=(0, 0, 0))
    canvas.save(dest)


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else spec.format(value)


def summary_table(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown rows: one per dataset (shape, voxel size, objects, sizes, cell fraction, time)."""
    lines = ["| dataset | shape (z, y, x) | voxel size (µm) | instances | objects | per slice | median size | "
             "5–95 % size | cell fraction | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        a, unit = s["sizes"]["um"], s["sizes"]["unit"]
        total = sum(v for v in (s.get("seconds") or {}).values() if isinstance(v, (int, float)))
        lines.append(
            f"| {s['dataset']} | {' × '.join(map(str, s['shape']))} | "
            f"{' × '.join(f'{v:g}' for v in s['voxel_size_um'])} | {s.get('instances', '2d')} | {s['objects']} | "
            f"{_fmt(s['objects_per_slice'], '{:.1f}')} | {_fmt(a and a[3], '{:.4g}')} {unit} | "
            f"{_fmt(a and a[1], '{:.3g}')}–{_fmt(a and a[5], '{:.3g}')} {unit} | "
            f"{s['cell_fraction']:.3f} | {_fmt(total or None, '{:.1f}')} |"
        )
    return lines


def write_summary_report(
    out_md: str | Path, summaries: Sequence[str | Path | dict[str, Any]], *, figures: int = 1,
    title: str = "unet-pipe segmentation",
) -> Path:
    """Write the Markdown report of segmented (unlabelled) stacks and its figures in
    ``<stem>_figures/`` (rebuilt and swapped in; the Markdown written atomically)."""
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    figdir = out_md.parent / f"{out_md.stem}_figures"
    check_ours(out_md, figdir)
    data = [s if isinstance(s, dict) else read_summary(s) for s in summaries]  # a refused input leaves no staging
    return write_markdown_with_figures(
        out_md, figdir, lambda staging: _summary_report_lines(title, data, figures, figdir, staging))


def _summary_report_lines(
    title: str, data: list[dict[str, Any]], figures: int, figdir: Path, staging: Path
) -> list[str]:
    """The summary report's Markdown lines; its figures are written to ``staging``."""
    md = [f"# {title}", "", "## Summary", ""]
    md += summary_table(data)
    md += ["", "Objects are the instances (0 = membrane/background): with *instances* 2d those of each slice, "
           "measured as areas; with 3d those labelled across slices, measured as volumes. *seconds*: the stages' "
           "wall time where recorded.", ""]
    for s in data:
        name = s["dataset"]
        md += [f"## {name}", ""]
        d = s.get("decisions") or {}
        md += [f"- shape (z, y, x): {s['shape']}; voxel size {s['voxel_size_um']} µm (z, y, x)",
               f"- objects: {s['objects']} "
               + (f"({s['objects_per_slice']:.1f} per slice)" if s["objects_per_slice"] is not None
                  else "(labelled in 3D)") + f"; cell fraction {s['cell_fraction']:.3f}"]
        if d:
            md.append(f"- decisions: {d.get('method')} at p > {d.get('threshold')}, min size {d.get('min_size')} px"
                      + (f" ({s['decisions_source']})" if s.get("decisions_source") else ""))
        if s.get("precision"):
            md.append(f"- precision: {s['precision']} on {s.get('cpu_model') or 'an unrecorded device'}")
        if s.get("seconds"):
            md.append("- seconds per stage: " + ", ".join(
                f"{k} {v:.1f}" if isinstance(v, (int, float)) else f"{k} (resumed)" for k, v in s["seconds"].items()))
        a = s["sizes"]["um"]
        if a:
            md.append(f"- object {s['sizes']['measure']} ({s['sizes']['unit']}): " + ", ".join(
                f"{int(q * 100)} % {v:.4g}" for q, v in zip(s["sizes"]["quantiles"], a)))
        md.append("")
        try:
            chosen = panel_slices(s["shape"][0], figures)
            if chosen:
                jpg = f"{_safe(name)}_slices.jpg"
                bar = segmentation_figure(s, chosen, staging / jpg)
                md += [f"![{name}: slices]({figdir.name}/{jpg})", "",
                       f"Columns: raw (scale bar {bar:g} µm), cell probability, instances.", ""]
            if s["objects"]:
                png = f"{_safe(name)}_sizes.png"
                histogram_figure(s, staging / png)
                md += [f"![{name}: object sizes]({figdir.name}/{png})", ""]
        except (UnetPipeError, OSError, KeyError) as exc:
            md += [f"*Figures skipped: {exc}*", ""]
    return md
