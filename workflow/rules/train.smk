# Training of the U-Net on the ingested stores of every dataset in train.datasets.
# Input/param functions: common.smk.


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
