# The model that travels (unet_pipe.model_bundle): the trained checkpoint with its calibrated
# decisions and training voxel size, or with segment.model the given model (a checkpoint or a
# bioimage.io zip) as a checkpoint. Export and, with segment.model, predict and postprocess read it.
# Input/param functions: common.smk.


rule bundle:
    input:
        source=bundle_source,
        decisions=bundle_decisions_input,
    output:
        model=MODEL,
    params:
        args=bundle_args,
    log:
        f"{R}/logs/bundle/bundle.log",
    benchmark:
        f"{R}/benchmarks/bundle/bundle.tsv"
    threads: 1
    conda:
        CONDA_ENV
    resources:
        mem_mb=4000,
        runtime=10,
    shell:
        # Snakemake owns the output: a rerun replaces the old model.pt (a unet-pipe checkpoint).
        "unet-pipe bundle {input.source:q} {output.model:q} {params.args} --overwrite 2>&1 | tee {log:q} >&2"
