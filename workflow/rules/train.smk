# Training of the U-Net on the ingested stores of every dataset in train.datasets.
# Input/param functions: below (args_file: common.smk).


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


rule train:
    input:
        raw=expand(f"{R}/{{dataset}}/raw.ome.zarr", dataset=TRAIN_DATASETS),
        labels=expand(f"{R}/{{dataset}}/labels.ome.zarr", dataset=TRAIN_DATASETS),
        weights=expand(f"{R}/{{dataset}}/weights.ome.zarr", dataset=TRAIN_DATASETS),
        # Fine-tuning: the checkpoint in train.init_from (none when null); an input, so
        # replacing that file reruns training (its path is in params.config too).
        init_from=init_from_input,
    output:
        checkpoint=f"{R}/model/checkpoint.pt",
        log_csv=f"{R}/model/training.csv",
    params:
        # The config sections training reads and the stores, as @FILE (args_file, common.smk).
        args=args_file(train_args),
    log:
        f"{R}/logs/train/train.log",
    benchmark:
        f"{R}/benchmarks/train/train.tsv"
    # CPU threads when no GPU is present (a GPU job needs few).
    threads: 8
    conda:
        CONDA_ENV
    resources:
        mem_mb=16000,
        runtime=720,
        # One GPU, the resource name snakemake-executor-plugin-slurm turns into
        # `sbatch --gpus=1`; runs on the CPU where there is none.
        gpu=1,
    shell:
        # --resume: a retried or restarted job continues from checkpoint.pt.partial.
        "unet-pipe train @{params.args:q} --out {output.checkpoint:q}"
        " --log {output.log_csv:q} --resume --threads {threads} 2>&1 | tee {log:q} >&2"
