# Decisions for postprocess and evaluate (postprocess.method: auto), chosen on the
# predicted probabilities of labelled calibration slices (unet_pipe.calibrate).
# Input/param functions: common.smk.


rule calibrate:
    input:
        probabilities=expand(f"{R}/{{dataset}}/probabilities.ome.zarr", dataset=CALIBRATION_DATASETS),
        truth=expand(f"{R}/{{dataset}}/labels.ome.zarr", dataset=CALIBRATION_DATASETS),
    output:
        decisions=DECISIONS,
    params:
        args=args_file(calibrate_args),
    log:
        f"{R}/logs/calibrate/calibrate.log",
    benchmark:
        f"{R}/benchmarks/calibrate/calibrate.tsv"
    threads: 1
    conda:
        CONDA_ENV
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "unet-pipe calibrate @{params.args:q} --out {output.decisions:q} 2>&1 | tee {log:q} >&2"
