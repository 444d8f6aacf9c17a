# Instances from the U-Net's cell probabilities.
# postprocess.instances 2d: one job per dataset, slice by slice.
# postprocess.instances 3d: objects across slices and blocks (unet_pipe.instances3d), as jobs
# sharded like predict, so that SLURM spreads the per-block passes over nodes:
#   postprocess_prepare   creates instances.ome.zarr.partial
#   postprocess_faces     one job per shard (postprocess.shards): labels its blocks, keeps their faces
#   postprocess_merge     one small job: merges the objects across block faces (memory: face objects)
#   postprocess_write     one job per shard: writes its blocks with the final ids
#   postprocess_flood     one job per shard: the watershed's halo flood (a no-op for threshold)
#   postprocess_finalize  checks that every block is done and publishes the store
# Every step records its blocks done: an interrupted job resumes where it stopped.
# Param functions postprocess_args, postprocess_shard: below; decisions_input (shared with
# evaluate.smk) and instance_options (shared with bundle.smk): common.smk.


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


def postprocess_shard(wildcards):
    """``I N`` (0-based) of a 3D postprocess scatter item ``{i}-of-{n}`` (1-based)."""
    index, _, count = wildcards.scatteritem.partition("-of-")
    return f"{int(index) - 1} {count}"


if not INSTANCES_3D:

    rule postprocess:
        input:
            probabilities=f"{R}/{{dataset}}/probabilities.ome.zarr",
            decisions=decisions_input,
        output:
            instances=directory(f"{R}/{{dataset}}/instances.ome.zarr"),
        params:
            args=args_file(postprocess_args),
        log:
            f"{R}/logs/postprocess/{{dataset}}.log",
        benchmark:
            f"{R}/benchmarks/postprocess/{{dataset}}.tsv"
        threads: 1
        conda:
            CONDA_ENV
        resources:
            mem_mb=4000,
            runtime=120,
        shell:
            # An interrupted job leaves instances.ome.zarr.partial; the rerun resumes it.
            "unet-pipe postprocess {input.probabilities:q} {output.instances:q} @{params.args:q} 2>&1 | tee {log:q} >&2"

else:

    scattergather:
        postprocess=config["postprocess"]["shards"],

    rule postprocess_prepare:
        input:
            probabilities=f"{R}/{{dataset}}/probabilities.ome.zarr",
            decisions=decisions_input,
        output:
            prepared=touch(f"{R}/{{dataset}}/instances.shards/prepared"),
        params:
            dest=f"{R}/{{dataset}}/instances.ome.zarr",
            args=args_file(postprocess_args),
        log:
            f"{R}/logs/postprocess/{{dataset}}.prepare.log",
        benchmark:
            f"{R}/benchmarks/postprocess/{{dataset}}.prepare.tsv"
        threads: 1
        conda:
            CONDA_ENV
        resources:
            mem_mb=1000,
            runtime=10,
        shell:
            "unet-pipe postprocess {input.probabilities:q} {params.dest:q} --step prepare @{params.args:q} 2>&1 | tee {log:q} >&2"

    rule postprocess_faces:
        input:
            probabilities=f"{R}/{{dataset}}/probabilities.ome.zarr",
            decisions=decisions_input,
            prepared=f"{R}/{{dataset}}/instances.shards/prepared",
        output:
            done=touch(f"{R}/{{dataset}}/instances.shards/faces.{{scatteritem}}.done"),
        params:
            dest=f"{R}/{{dataset}}/instances.ome.zarr",
            shard=postprocess_shard,
            args=args_file(postprocess_args),
        log:
            f"{R}/logs/postprocess/{{dataset}}.faces.{{scatteritem}}.log",
        benchmark:
            f"{R}/benchmarks/postprocess/{{dataset}}.faces.{{scatteritem}}.tsv"
        threads: 2
        conda:
            CONDA_ENV
        resources:
            mem_mb=2000,
            runtime=120,
        shell:
            "unet-pipe postprocess {input.probabilities:q} {params.dest:q} --step faces --shard {params.shard}"
            " --threads {threads} @{params.args:q} 2>&1 | tee {log:q} >&2"

    rule postprocess_merge:
        input:
            probabilities=f"{R}/{{dataset}}/probabilities.ome.zarr",
            decisions=decisions_input,
            faces=gather.postprocess(f"{R}/{{{{dataset}}}}/instances.shards/faces.{{scatteritem}}.done"),
        output:
            merged=touch(f"{R}/{{dataset}}/instances.shards/merged"),
        params:
            dest=f"{R}/{{dataset}}/instances.ome.zarr",
            args=args_file(postprocess_args),
        log:
            f"{R}/logs/postprocess/{{dataset}}.merge.log",
        benchmark:
            f"{R}/benchmarks/postprocess/{{dataset}}.merge.tsv"
        threads: 1
        conda:
            CONDA_ENV
        resources:
            # Grows with the objects on block faces, not with the volume.
            mem_mb=4000,
            runtime=60,
        shell:
            "unet-pipe postprocess {input.probabilities:q} {params.dest:q} --step merge @{params.args:q} 2>&1 | tee {log:q} >&2"

    rule postprocess_write:
        input:
            probabilities=f"{R}/{{dataset}}/probabilities.ome.zarr",
            decisions=decisions_input,
            merged=f"{R}/{{dataset}}/instances.shards/merged",
        output:
            done=touch(f"{R}/{{dataset}}/instances.shards/write.{{scatteritem}}.done"),
        params:
            dest=f"{R}/{{dataset}}/instances.ome.zarr",
            shard=postprocess_shard,
            args=args_file(postprocess_args),
        log:
            f"{R}/logs/postprocess/{{dataset}}.write.{{scatteritem}}.log",
        benchmark:
            f"{R}/benchmarks/postprocess/{{dataset}}.write.{{scatteritem}}.tsv"
        threads: 2
        conda:
            CONDA_ENV
        resources:
            mem_mb=2000,
            runtime=120,
        shell:
            "unet-pipe postprocess {input.probabilities:q} {params.dest:q} --step write --shard {params.shard}"
            " --threads {threads} @{params.args:q} 2>&1 | tee {log:q} >&2"

    rule postprocess_flood:
        input:
            probabilities=f"{R}/{{dataset}}/probabilities.ome.zarr",
            decisions=decisions_input,
            written=gather.postprocess(f"{R}/{{{{dataset}}}}/instances.shards/write.{{scatteritem}}.done"),
        output:
            done=touch(f"{R}/{{dataset}}/instances.shards/flood.{{scatteritem}}.done"),
        params:
            dest=f"{R}/{{dataset}}/instances.ome.zarr",
            shard=postprocess_shard,
            args=args_file(postprocess_args),
        log:
            f"{R}/logs/postprocess/{{dataset}}.flood.{{scatteritem}}.log",
        benchmark:
            f"{R}/benchmarks/postprocess/{{dataset}}.flood.{{scatteritem}}.tsv"
        threads: 2
        conda:
            CONDA_ENV
        resources:
            mem_mb=4000,
            runtime=120,
        shell:
            "unet-pipe postprocess {input.probabilities:q} {params.dest:q} --step flood --shard {params.shard}"
            " --threads {threads} @{params.args:q} 2>&1 | tee {log:q} >&2"

    rule postprocess_finalize:
        input:
            probabilities=f"{R}/{{dataset}}/probabilities.ome.zarr",
            decisions=decisions_input,
            flooded=gather.postprocess(f"{R}/{{{{dataset}}}}/instances.shards/flood.{{scatteritem}}.done"),
        output:
            instances=directory(f"{R}/{{dataset}}/instances.ome.zarr"),
        params:
            args=args_file(postprocess_args),
        log:
            f"{R}/logs/postprocess/{{dataset}}.finalize.log",
        benchmark:
            f"{R}/benchmarks/postprocess/{{dataset}}.finalize.tsv"
        threads: 1
        conda:
            CONDA_ENV
        resources:
            mem_mb=2000,
            runtime=60,
        shell:
            # Builds the pyramid and publishes instances.ome.zarr atomically.
            "unet-pipe postprocess {input.probabilities:q} {output.instances:q} --step finalize @{params.args:q}"
            " 2>&1 | tee {log:q} >&2"
