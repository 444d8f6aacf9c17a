# Included first by the Snakefile; holds only what several rule files share or need before
# any of them runs. The config pre-check and validation, the module-level constants (results dir,
# dataset lists, model and decisions paths, export sample), wildcard constraints, the params
# helpers (args_file, section_json), the functions used by several rule files (decisions_input,
# instance_options, unlabelled_flag, evaluated_datasets, summarized_datasets) and the targets
# of rule all. Each rule file holds its own rules' input and params functions, above its rules.
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


# ---------------------------------------------------------------- shared by several rule files
# decisions_input: postprocess.smk, evaluate.smk. instance_options: postprocess_args (postprocess.smk)
# and bundle_args (bundle.smk). unlabelled_flag: weights.smk, calibrate.smk, evaluate.smk.
# evaluated_datasets, summarized_datasets: evaluate.smk, summary.smk and all_targets.


def instance_options():
    """``--method ... --min-size ...`` of the postprocess section (method threshold or watershed)."""
    section = config["postprocess"]
    return (
        f"--method {section['method']} --threshold {section['threshold']}"
        f" --seed-threshold {section['seed_threshold']} --seed-prominence {section['seed_prominence']}"
        f" --min-size {section['min_size']}"
    )


def decisions_input(wildcards):
    """The calibrated decisions when postprocess.method is auto (else nothing)."""
    return [POSTPROCESS_DECISIONS] if AUTO_DECISIONS else []


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


# ---------------------------------------------------------------- export

EXPORT_PACKAGE = f"{R}/model/bioimageio.zip"
# The test tile and the normalisation range of the package come from this dataset's raw store.
EXPORT_SAMPLE = config["export"]["sample"] or (TRAIN_DATASETS or DATASETS)[0]
if EXPORT_SAMPLE not in DATASETS:
    sys.exit(f"unet-pipe: error: config: export.sample {EXPORT_SAMPLE!r} is not a dataset ({', '.join(DATASETS)})")


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
