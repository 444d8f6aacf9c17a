# Training of the U-Net on the ingested stores of every dataset in train.datasets.
# The helper functions below belong with the other input functions (common.smk).


TRAIN_DATASETS = sorted(config["train"]["datasets"])


def train_stores_args(wildcards, input):
    """``--raw NAME=PATH --labels NAME=PATH --weights NAME=PATH`` for every training dataset."""
    import shlex

    args = []
    for key in ("raw", "labels", "weights"):
        for name, path in zip(TRAIN_DATASETS, input[key]):
            args.append(f"--{key} {shlex.quote(f'{name}={path}')}")
    return " ".join(args)


def train_config_json(wildcards):
    """What training reads from the config, as one JSON string (a change reruns training).

    Only the training datasets are included, so adding a dataset to predict
    does not retrain the model.
    """
    import json

    keys = ("seed", "model", "train", "weights", "postprocess")
    section = {key: config[key] for key in keys}
    section["datasets"] = {name: config["datasets"][name] for name in TRAIN_DATASETS}
    return json.dumps(section, sort_keys=True)


rule train:
    input:
        raw=expand(f"{R}/{{dataset}}/raw.ome.zarr", dataset=TRAIN_DATASETS),
        labels=expand(f"{R}/{{dataset}}/labels.ome.zarr", dataset=TRAIN_DATASETS),
        weights=expand(f"{R}/{{dataset}}/weights.ome.zarr", dataset=TRAIN_DATASETS),
    output:
        checkpoint=f"{R}/model/checkpoint.pt",
        log_csv=f"{R}/model/training.csv",
    params:
        config=train_config_json,
        stores=train_stores_args,
    log:
        f"{R}/logs/train/train.log",
    benchmark:
        f"{R}/benchmarks/train/train.tsv"
    # CPU threads when no GPU is present (a GPU job needs few).
    threads: 8
    resources:
        mem_mb=16000,
        runtime=720,
        # One GPU, the resource name snakemake-executor-plugin-slurm turns into
        # `sbatch --gpus=1`; runs on the CPU where there is none.
        gpu=1,
    shell:
        # --resume: a retried or restarted job continues from checkpoint.pt.partial.
        "unet-pipe train --config-json {params.config:q} {params.stores} --out {output.checkpoint:q}"
        " --log {output.log_csv:q} --resume --threads {threads} > {log:q} 2>&1"
