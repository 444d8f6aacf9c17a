# Config validation, paths, input functions and target lists shared by the rules.
import os
import sys
from pathlib import Path

from snakemake.utils import validate

from unet_pipe.config import (
    applies_model,
    calibration_slices,
    is_labelled,
    precheck,
)
from unet_pipe.errors import UnetPipeError, error_lines

# Every problem of the config and its inputs, one line each, before any job starts: the same
# function as `unet-pipe check-config` (unet_pipe.config.precheck), so both find the same.
# Snakemake deep-merges several --configfile files, so a preset's dataset would leak into a
# user's run: precheck composes them again by unet-pipe's rule (dataset maps replaced, other
# sections merged key by key), with --config key=value as the last layer.
# workflow.configfiles: the --configfile files, else the Snakefile's demo default.
# Input headers (and train.init_from) are read once, by the main Snakemake process (not in every
# job); the automatic split (train.datasets empty) reads the label headers in every process.
# Snakemake gives the config files as absolute paths: named relative to the working directory
# (as the user typed them, and as check-config names them) where they lie inside it.
_configfiles = [os.path.relpath(p) if not os.path.relpath(p).startswith("..") else p for p in workflow.configfiles]
try:
    _validated, _said = precheck(
        _configfiles, dict(workflow.config_settings.config), read_inputs=workflow.is_main_process
    )
    if workflow.is_main_process:
        for _line in _said:
            print(f"unet-pipe: {_line}", file=sys.stderr)
except UnetPipeError as _err:
    sys.exit("\n".join(error_lines(_err)))
config.clear()
config.update(_validated)
# The Snakemake-native check against the same schema (fills nothing new).
validate(config, schema="../schemas/config.schema.yaml")

R = config["results"]
DATASETS = sorted(config["datasets"])
LABELLED = [name for name in DATASETS if is_labelled(config["datasets"][name])]
SYNTHETIC = [name for name in DATASETS if "synthetic" in config["datasets"][name]]
# With --use-conda every job runs in the environment of environment.yml; its
# post-deploy script (environment.post-deploy.sh) installs this package into it.
# The path is relative to the rule files (workflow/rules/).
CONDA_ENV = "../../environment.yml"


wildcard_constraints:
    dataset="|".join(DATASETS),


def dataset(wildcards):
    return config["datasets"][wildcards.dataset]


# ---------------------------------------------------------------- sources


def raw_source(wildcards):
    """The TIFF or OME-Zarr a dataset's raw stack comes from (a TIFF generated for synthetic datasets)."""
    ds = dataset(wildcards)
    if "synthetic" in ds:
        return f"{R}/synth/{wildcards.dataset}/raw.tif"
    return ds["raw"]


def labels_source(wildcards):
    ds = dataset(wildcards)
    if "synthetic" in ds:
        return f"{R}/synth/{wildcards.dataset}/labels.tif"
    return ds["labels"]


def synth_dir(wildcards, output):
    return str(Path(output.raw).parent)


def synth_shape(wildcards):
    return " ".join(str(s) for s in dataset(wildcards)["synthetic"]["shape"])


def synth_seed(wildcards):
    return dataset(wildcards)["synthetic"]["seed"]


def synth_mode(wildcards):
    """``--mode 3d --anisotropy A`` for a synthetic 3D volume (synthetic.mode: 3d), else empty."""
    synthetic = dataset(wildcards)["synthetic"]
    if synthetic.get("mode", "2d") != "3d":
        return ""
    return f" --mode 3d --anisotropy {float(synthetic.get('anisotropy', 1.0))}"


def voxel_size_arg(wildcards):
    """``--voxel-size Z Y X`` when the config gives one; else the TIFF metadata is used."""
    size = dataset(wildcards).get("voxel_size")
    return "" if size is None else f"--voxel-size {' '.join(str(v) for v in size)}"


def ingest_args(wildcards):
    """Chunking, compression and pyramid flags of ``unet-pipe ingest`` (params: a change reruns ingest)."""
    section = config["ingest"]
    chunks = ",".join(str(c) for c in section["chunks"])
    codec = ":".join(str(section["compression"][key]) for key in ("cname", "clevel", "blocksize"))
    return (f"--chunks {chunks} --compression {codec} --pyramid-levels {section['pyramid_levels']}"
            f" --ngff {config['ngff_version']}")


# ---------------------------------------------------------------- options as @FILE
# A job's options reach its command as @FILE (argparse's fromfile_prefix_chars: one argument per
# line), not inline: a page of JSON and flags on the command line, echoed three times when a job
# failed, buried its one-line error. The file is named by its content (sha256), so the param (its
# path) changes exactly when the options do: editing a section still reruns only the rules that
# read it. Robust on SLURM: nothing rides in the sbatch command or the environment; a job parses
# the workflow again and finds the same file on the shared file system (or writes the same bytes);
# no shell quoting, no length limit. Written on a dry run too: after `snakemake -n -p`, `cat` the
# file to see what a job would get.
ARGS_DIR = f"{R}/logs/args"


def args_file(build):
    """A params function: the options ``build(wildcards)`` returns (a shell string or a list), as a file path."""
    import hashlib
    import os
    import shlex
    import tempfile

    def params(wildcards):
        args = build(wildcards)
        args = shlex.split(args) if isinstance(args, str) else [str(a) for a in args]
        text = "".join(f"{arg}\n" for arg in args)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        path = Path(ARGS_DIR) / f"{build.__name__.removesuffix('_args')}.{digest}.args"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, path)  # atomic: a job never reads half a file
        return str(path)

    params.__name__ = build.__name__
    return params


def section_json(*keys):
    """The named config sections as one JSON string, for ``params:``.

    Rules pass settings as params rather than taking config.yaml as an input,
    so that editing one section reruns only the rules that read it.
    """
    import json

    return json.dumps({key: config[key] for key in keys}, sort_keys=True)


# ---------------------------------------------------------------- train, or a trained model
TRAIN_DATASETS = sorted(config["train"]["datasets"])
# segment.model: a trained model is applied (no train, weights, calibrate or evaluate jobs).
APPLY = applies_model(config)
# The model that travels (unet_pipe.model_bundle): weights + decisions + voxel size (bundle.smk).
MODEL = f"{R}/model/model.pt"
# The checkpoint predict runs: the training output, or the applied model as bundled.
PREDICT_CHECKPOINT = MODEL if APPLY else f"{R}/model/checkpoint.pt"


def init_from_input(wildcards):
    """``train.init_from`` as an input of train (an empty list when training from scratch)."""
    path = config["train"]["init_from"]
    return [] if path is None else [path]


def train_args(wildcards):
    """``--config-json`` and the stores of every training dataset, as arguments (for :func:`args_file`).

    Store paths are built here, not taken from ``input``: Snakemake records only input-independent params.
    """
    args = ["--config-json", train_config_json(wildcards)]
    for key in ("raw", "labels", "weights"):
        for name in TRAIN_DATASETS:
            args += [f"--{key}", f"{name}={R}/{name}/{key}.ome.zarr"]
    return args


def train_config_json(wildcards):
    """What training reads from the config, as one JSON string (a change reruns training).

    Only the training datasets are included, so adding a dataset to predict
    does not retrain the model, and the postprocess section is left out (its
    defaults score the validation Rand error), so tuning postprocessing reruns
    postprocess and evaluate only.
    """
    import json

    keys = ("seed", "model", "train", "weights")
    section = {key: config[key] for key in keys}
    section["datasets"] = {name: config["datasets"][name] for name in TRAIN_DATASETS}
    return json.dumps(section, sort_keys=True)


# ---------------------------------------------------------------- predict / calibrate
# postprocess.method auto: decisions chosen on labelled calibration slices (unet_pipe.calibrate),
# whose datasets are therefore predicted too.
AUTO_DECISIONS = config["postprocess"]["method"] == "auto"
CALIBRATION = calibration_slices(config) if AUTO_DECISIONS and not APPLY else {}
CALIBRATION_DATASETS = sorted(CALIBRATION)
PREDICTED = sorted(set(config["predict"]["datasets"] or DATASETS) | set(CALIBRATION_DATASETS))
DECISIONS = f"{R}/model/decisions.json"
# postprocess.instances 3d: the per-block passes run as sharded jobs (postprocess.smk).
INSTANCES_3D = config["postprocess"]["instances"] == "3d"
# What postprocess takes its decisions from (method auto): calibrate's, or with segment.model the
# decisions the bundled model carries (a default with a warning in the log when it carries none).
POSTPROCESS_DECISIONS = MODEL if APPLY else DECISIONS


def predict_args(wildcards):
    """Options that identify a prediction; identical for prepare, shards and gather."""
    import json
    import shlex

    section = config["predict"]
    args = [
        f"--dtype {section['dtype']}",
        f"--precision {section['precision']}",
        {True: "--tta", "flips": "--tta-flips"}.get(section["tta"], "--no-tta"),
        f"--pyramid-levels {config['ingest']['pyramid_levels']}",
        f"--ngff {config['ngff_version']}",
        # Snakemake owns the output: a rerun replaces the old store (only once the new one is complete).
        "--overwrite",
    ]
    if not APPLY:  # A checkpoint of another architecture is refused, not silently used.
        args.append(f"--expect-arch {shlex.quote(json.dumps(config['model'], sort_keys=True))}")
    if section["tile"] is not None:
        args.append(f"--tile {section['tile']}")
    return " ".join(args)


def predict_shard(wildcards):
    """``I N`` (0-based) of Snakemake's scatter item ``{i}-of-{n}`` (1-based)."""
    index, _, count = wildcards.scatteritem.partition("-of-")
    return f"{int(index) - 1} {count}"


# ---------------------------------------------------------------- postprocess / evaluate



def postprocess_args(wildcards):
    """Flags of ``unet-pipe postprocess`` from the postprocess section (params: a change reruns it).

    With method auto the method and its parameters come from the decisions file (an input).
    """
    import shlex

    section = config["postprocess"]
    levels = f"--pyramid-levels {config['ingest']['pyramid_levels']} --ngff {config['ngff_version']}"
    if INSTANCES_3D:
        # Identical for every step of the sharded 3D run; Snakemake owns the output (rerun replaces it).
        levels += f" --instances 3d --halo {section['halo']} --overwrite"
        if section["block"] is not None:
            levels += " --block " + " ".join(str(int(b)) for b in section["block"])
    if AUTO_DECISIONS:
        return f"--decisions {shlex.quote(POSTPROCESS_DECISIONS)} {levels}"
    return f"{instance_options()} {levels}"


def instance_options():
    """``--method ... --min-size ...`` of the postprocess section (method threshold or watershed)."""
    section = config["postprocess"]
    return (
        f"--method {section['method']} --threshold {section['threshold']}"
        f" --seed-threshold {section['seed_threshold']} --seed-prominence {section['seed_prominence']}"
        f" --min-size {section['min_size']}"
    )


def postprocess_shard(wildcards):
    """``I N`` (0-based) of a 3D postprocess scatter item ``{i}-of-{n}`` (1-based)."""
    index, _, count = wildcards.scatteritem.partition("-of-")
    return f"{int(index) - 1} {count}"


def bundle_source(wildcards):
    """The source of the bundled model: the applied model (segment.model), else the trained checkpoint."""
    return config["segment"]["model"] if APPLY else f"{R}/model/checkpoint.pt"


def bundle_decisions_input(wildcards):
    """The calibrated decisions of a training run with method auto (else nothing)."""
    return [DECISIONS] if AUTO_DECISIONS and not APPLY else []


def bundle_args(wildcards):
    """The decisions bundled into model.pt: decisions.json (training, auto), the postprocess values
    (method threshold/watershed), or none (a trained model with auto keeps its own)."""
    import shlex

    if not AUTO_DECISIONS:
        return instance_options()
    return "" if APPLY else f"--decisions {shlex.quote(DECISIONS)}"


def decisions_input(wildcards):
    """The calibrated decisions when postprocess.method is auto (else nothing)."""
    return [POSTPROCESS_DECISIONS] if AUTO_DECISIONS else []


def calibrate_args(wildcards):
    """``--probabilities/--truth/--slices NAME=...`` per calibration dataset, and the truth convention.

    Paths are built here, not taken from ``input``: Snakemake records (and so compares on a
    rerun) only params that do not depend on the input.
    """
    import shlex

    args = []
    for name in CALIBRATION_DATASETS:
        start, stop = CALIBRATION[name]
        prob, truth = f"{R}/{name}/probabilities.ome.zarr", f"{R}/{name}/labels.ome.zarr"
        args += [
            f"--probabilities {shlex.quote(f'{name}={prob}')}",
            f"--truth {shlex.quote(f'{name}={truth}')}",
            f"--slices {shlex.quote(f'{name}={start}:{stop}')}",
        ]
    weights = config["weights"]
    if weights["label_mode"] == "binary":
        args.append(f"--truth-mode binary --foreground-value {weights['foreground_value']}")
    else:
        args.append("--truth-mode instances")
    if weights.get("unlabelled_value") is not None:
        args.append(unlabelled_flag().strip())
    args.append(f"--methods {','.join(config['calibrate']['methods'])}")
    args.append(f"--max-pixels {int(config['calibrate']['max_pixels'])}")
    if config["postprocess"]["instances"] == "3d":
        args.append("--instances 3d")
    return " ".join(args)


def labels_offset_arg(wildcards):
    """`` --offset Z Y X`` for labels of a crop (``datasets.NAME.labels_offset``), else empty."""
    offset = config["datasets"][wildcards.dataset].get("labels_offset")
    return "" if offset is None else " --offset " + " ".join(str(int(o)) for o in offset)


def unlabelled_flag():
    """`` --unlabelled-value V`` when the labels are sparse (``weights.unlabelled_value``), else empty."""
    value = config["weights"].get("unlabelled_value")
    return "" if value is None else f" --unlabelled-value {int(value)}"


def evaluated_datasets():
    """Datasets that are both predicted and labelled (the ones with metrics); none with a trained model."""
    return [] if APPLY else [name for name in LABELLED if name in PREDICTED]


def summarized_datasets():
    """Predicted datasets without metrics: each gets a summary and a place in the segmentation report."""
    return [name for name in PREDICTED if name not in evaluated_datasets()]


def evaluate_args(wildcards):
    """Flags of ``unet-pipe evaluate``: threshold, truth convention and the train/val slice tags."""
    import shlex

    if AUTO_DECISIONS:
        args = [f"--decisions {shlex.quote(DECISIONS)}"]
    else:
        args = [f"--threshold {config['postprocess']['threshold']}"]
    weights = config["weights"]
    if weights["label_mode"] == "binary":
        args.append(f"--truth-mode binary --foreground-value {weights['foreground_value']}")
    else:
        args.append("--truth-mode instances")
    if weights.get("unlabelled_value") is not None:
        args.append(unlabelled_flag().strip())
    ranges = config["train"]["datasets"].get(wildcards.dataset, {})
    for subset in ("train", "val"):
        if subset in ranges:
            args.append(f"--{subset} {ranges[subset][0]} {ranges[subset][1]}")
    return " ".join(args)


# ---------------------------------------------------------------- view


def view_truth_input(wildcards):
    """The ingested labels of a labelled dataset, shown as a layer of its view (else nothing)."""
    return [f"{R}/{wildcards.dataset}/labels.ome.zarr"] if wildcards.dataset in LABELLED and not APPLY else []


def view_args(wildcards):
    """``--labels NAME=PATH`` for each label layer of the view: ground truth first, then instances.

    Built from the wildcards, not ``input``: Snakemake records only input-independent params.
    """
    import shlex

    instances = f"{R}/{wildcards.dataset}/instances.ome.zarr"
    truth = view_truth_input(wildcards)
    layers = [("labels", path) for path in truth] + [("instances", instances)]
    args = [f"--labels {shlex.quote(f'{name}={path}')}" for name, path in layers]
    unlabelled = config["weights"].get("unlabelled_value")
    if truth and unlabelled is not None:  # sparse truth: unannotated pixels transparent
        args.append(f"--unlabelled labels={unlabelled}")
    return " ".join(args)


# ---------------------------------------------------------------- export

EXPORT_PACKAGE = f"{R}/model/bioimageio.zip"
# The test tile and the normalisation range of the package come from this dataset's raw store.
EXPORT_SAMPLE = config["export"]["sample"] or (TRAIN_DATASETS or DATASETS)[0]
if EXPORT_SAMPLE not in DATASETS:
    sys.exit(f"unet-pipe: error: config: export.sample {EXPORT_SAMPLE!r} is not a dataset ({', '.join(DATASETS)})")


def export_config_json(wildcards):
    import json

    return json.dumps(config["export"], sort_keys=True)


# ---------------------------------------------------------------- targets


def all_targets():
    targets = expand(f"{R}/{{dataset}}/raw.ome.zarr", dataset=DATASETS)
    targets += expand(f"{R}/{{dataset}}/labels.ome.zarr", dataset=[] if APPLY else LABELLED)
    targets += expand(f"{R}/{{dataset}}/instances.ome.zarr", dataset=PREDICTED)
    targets += expand(f"{R}/{{dataset}}/view.ome.zarr", dataset=PREDICTED)
    targets += expand(f"{R}/{{dataset}}/metrics.json", dataset=evaluated_datasets())
    if evaluated_datasets():
        targets.append(f"{R}/report/report.md")
    targets += expand(f"{R}/{{dataset}}/summary.json", dataset=summarized_datasets())
    if summarized_datasets():
        targets.append(f"{R}/report/segmentation.md")
    if config["segment"]["tiff"]:
        targets += expand(f"{R}/{{dataset}}/instances.tif", dataset=PREDICTED)
    targets.append(MODEL)
    if config["export"]["enabled"]:
        targets.append(EXPORT_PACKAGE)
    return targets
