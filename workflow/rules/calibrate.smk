# Decisions for postprocess and evaluate (postprocess.method: auto), chosen on the
# predicted probabilities of labelled calibration slices (unet_pipe.calibrate).
# Param function calibrate_args: below (args_file, unlabelled_flag: common.smk).


def calibrate_args(wildcards):
    """``--probabilities/--truth/--slices NAME=...`` per calibration dataset, and the truth convention.

    Paths are built here, not taken from ``input``: Snakemake records (and so compares on a
    rerun) only params that do not depend on the input.
    """
    import shlex

    args = []
    for name in CALIBRATION_DATASETS:
        start, stop = CALIBRATION[name]
        prob, truth = f"{R}/{name}/probabilities.ome.zarr", f"{R}/{name}/labels.ome.zarr"
        args += [
            f"--probabilities {shlex.quote(f'{name}={prob}')}",
            f"--truth {shlex.quote(f'{name}={truth}')}",
            f"--slices {shlex.quote(f'{name}={start}:{stop}')}",
        ]
    weights = config["weights"]
    if weights["label_mode"] == "binary":
        args.append(f"--truth-mode binary --foreground-value {weights['foreground_value']}")
    else:
        args.append("--truth-mode instances")
    if weights.get("unlabelled_value") is not None:
        args.append(unlabelled_flag().strip())
    args.append(f"--methods {','.join(config['calibrate']['methods'])}")
    args.append(f"--max-pixels {int(config['calibrate']['max_pixels'])}")
    if config["postprocess"]["instances"] == "3d":
        args.append("--instances 3d")
    return " ".join(args)


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
