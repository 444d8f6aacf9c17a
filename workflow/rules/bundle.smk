# The model that travels (unet_pipe.model_bundle): the trained checkpoint with its calibrated
# decisions and training voxel size, or with segment.model the given model (a checkpoint or a
# bioimage.io zip) as a checkpoint. Export and, with segment.model, predict and postprocess read it.
# Input/param functions: below (instance_options, shared with postprocess.smk: common.smk).


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
