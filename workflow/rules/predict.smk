# Overlap-tile prediction, sharded over z (scatter/gather) so that SLURM runs
# the shards on several GPU nodes at once:
#   predict_prepare  creates probabilities.ome.zarr.partial (checks checkpoint and input)
#   predict          one job per shard (predict.shards): the blocks of its z range
#   predict_gather   checks that every block is done and publishes the store
# Shards of an interrupted run resume from their finished blocks. The checkpoint is the trained
# one, or with segment.model the bundled model.pt (PREDICT_CHECKPOINT, common.smk).
# Input/param functions: below (args_file: common.smk).


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


scattergather:
    predict=config["predict"]["shards"],


rule predict_prepare:
    input:
        checkpoint=PREDICT_CHECKPOINT,
        raw=f"{R}/{{dataset}}/raw.ome.zarr",
    output:
        prepared=touch(f"{R}/{{dataset}}/probabilities.shards/prepared"),
    params:
        dest=f"{R}/{{dataset}}/probabilities.ome.zarr",
        args=args_file(predict_args),
    log:
        f"{R}/logs/predict/{{dataset}}.prepare.log",
    benchmark:
        f"{R}/benchmarks/predict/{{dataset}}.prepare.tsv"
    threads: 1
    conda:
        CONDA_ENV
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "unet-pipe predict {input.checkpoint:q} {input.raw:q} {params.dest:q} --prepare @{params.args:q}"
        " 2>&1 | tee {log:q} >&2"


rule predict:
    input:
        checkpoint=PREDICT_CHECKPOINT,
        raw=f"{R}/{{dataset}}/raw.ome.zarr",
        prepared=f"{R}/{{dataset}}/probabilities.shards/prepared",
    output:
        done=touch(f"{R}/{{dataset}}/probabilities.shards/{{scatteritem}}.done"),
    params:
        dest=f"{R}/{{dataset}}/probabilities.ome.zarr",
        shard=predict_shard,
        args=args_file(predict_args),
    log:
        f"{R}/logs/predict/{{dataset}}.{{scatteritem}}.log",
    benchmark:
        f"{R}/benchmarks/predict/{{dataset}}.{{scatteritem}}.tsv"
    # CPU threads when no GPU is present (then torch uses all of them); a GPU job needs few.
    threads: 4
    conda:
        CONDA_ENV
    resources:
        mem_mb=16000,
        runtime=240,
        # One GPU (`sbatch --gpus=1` with snakemake-executor-plugin-slurm); CPU where there is none.
        gpu=1,
    shell:
        "unet-pipe predict {input.checkpoint:q} {input.raw:q} {params.dest:q} --shard {params.shard}"
        " --threads {threads} @{params.args:q} 2>&1 | tee {log:q} >&2"


rule predict_gather:
    input:
        checkpoint=PREDICT_CHECKPOINT,
        raw=f"{R}/{{dataset}}/raw.ome.zarr",
        shards=gather.predict(f"{R}/{{{{dataset}}}}/probabilities.shards/{{scatteritem}}.done"),
    output:
        probabilities=directory(f"{R}/{{dataset}}/probabilities.ome.zarr"),
    params:
        args=args_file(predict_args),
    log:
        f"{R}/logs/predict/{{dataset}}.gather.log",
    benchmark:
        f"{R}/benchmarks/predict/{{dataset}}.gather.tsv"
    threads: 1
    conda:
        CONDA_ENV
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        # Builds the 2x pyramid and publishes probabilities.ome.zarr atomically.
        "unet-pipe predict {input.checkpoint:q} {input.raw:q} {output.probabilities:q} --finalize @{params.args:q}"
        " 2>&1 | tee {log:q} >&2"
