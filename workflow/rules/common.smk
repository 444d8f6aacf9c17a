# Config validation, paths, input functions and target lists shared by the rules.
import sys
from pathlib import Path

from snakemake.utils import validate

from unet_pipe.config import check_inputs_exist, validate_config
from unet_pipe.errors import ConfigError

# One clear line for a bad config, before any job starts.
try:
    _validated = validate_config(config, source="config")
    check_inputs_exist(_validated, source="config")
except ConfigError as _err:
    sys.exit(f"unet-pipe: error: {_err}")
config.update(_validated)
# The Snakemake-native check against the same schema (fills nothing new).
validate(config, schema="../schemas/config.schema.yaml")

R = config["results"]
DATASETS = sorted(config["datasets"])
LABELLED = [name for name in DATASETS if "labels" in config["datasets"][name] or "synthetic" in config["datasets"][name]]
SYNTHETIC = [name for name in DATASETS if "synthetic" in config["datasets"][name]]


wildcard_constraints:
    dataset="|".join(DATASETS),


def dataset(wildcards):
    return config["datasets"][wildcards.dataset]


# ---------------------------------------------------------------- sources


def raw_source(wildcards):
    """The TIFF a dataset's raw stack comes from (generated for synthetic datasets)."""
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


def voxel_size_arg(wildcards):
    """``--voxel-size Z Y X`` when the config gives one; else the TIFF metadata is used."""
    size = dataset(wildcards).get("voxel_size")
    return "" if size is None else "--voxel-size " + " ".join(str(v) for v in size)


def ingest_args(wildcards):
    """Chunking, compression and pyramid flags of ``unet-pipe ingest`` (params: a change reruns ingest)."""
    section = config["ingest"]
    chunks = ",".join(str(c) for c in section["chunks"])
    codec = f"{section['compression']['cname']}:{section['compression']['clevel']}"
    return f"--chunks {chunks} --compression {codec} --pyramid-levels {section['pyramid_levels']}"


def section_json(*keys):
    """The named config sections as one JSON string, for ``params:``.

    Rules pass settings as params rather than taking config.yaml as an input,
    so that editing one section reruns only the rules that read it.
    """
    import json

    return json.dumps({key: config[key] for key in keys}, sort_keys=True)


# ---------------------------------------------------------------- targets


def all_targets():
    targets = expand(f"{R}/{{dataset}}/raw.ome.zarr", dataset=DATASETS)
    targets += expand(f"{R}/{{dataset}}/labels.ome.zarr", dataset=LABELLED)
    return targets
