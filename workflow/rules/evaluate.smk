# Metrics against ground truth per labelled dataset, and the Markdown report.
# Functions evaluate_args, evaluate_job_args: below; evaluated_datasets, decisions_input and
# unlabelled_flag: common.smk. Include after train.smk (report reads rules.train).


def evaluate_args(wildcards):
    """Flags of ``unet-pipe evaluate``: threshold, truth convention and the train/val slice tags."""
    import shlex

    if AUTO_DECISIONS:
        args = [f"--decisions {shlex.quote(DECISIONS)}"]
    else:
        args = [f"--threshold {config['postprocess']['threshold']}"]
    weights = config["weights"]
    if weights["label_mode"] == "binary":
        args.append(f"--truth-mode binary --foreground-value {weights['foreground_value']}")
    else:
        args.append("--truth-mode instances")
    if weights.get("unlabelled_value") is not None:
        args.append(unlabelled_flag().strip())
    ranges = config["train"]["datasets"].get(wildcards.dataset, {})
    for subset in ("train", "val"):
        if subset in ranges:
            args.append(f"--{subset} {ranges[subset][0]} {ranges[subset][1]}")
    return " ".join(args)


def evaluate_job_args(wildcards):
    """The input stores (built from the wildcards, as in ``input``), the dataset and evaluate_args."""
    import shlex

    stores = {"prediction": "instances", "probabilities": "probabilities", "truth": "labels", "raw": "raw"}
    args = [arg for option, store in stores.items()
            for arg in (f"--{option}", f"{R}/{wildcards.dataset}/{store}.ome.zarr")]  # fmt: skip
    return args + ["--dataset", wildcards.dataset, *shlex.split(evaluate_args(wildcards))]


rule evaluate:
    input:
        instances=f"{R}/{{dataset}}/instances.ome.zarr",
        probabilities=f"{R}/{{dataset}}/probabilities.ome.zarr",
        truth=f"{R}/{{dataset}}/labels.ome.zarr",
        raw=f"{R}/{{dataset}}/raw.ome.zarr",
        decisions=decisions_input,
    output:
        metrics=f"{R}/{{dataset}}/metrics.json",
        per_slice=f"{R}/{{dataset}}/metrics.csv",
    params:
        args=args_file(evaluate_job_args),
    log:
        f"{R}/logs/evaluate/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{dataset}}.tsv"
    threads: 1
    conda:
        CONDA_ENV
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        # The stores of the input and the evaluate section in @FILE (evaluate_job_args).
        "unet-pipe evaluate @{params.args:q} --out {output.metrics:q} 2>&1 | tee {log:q} >&2"


rule report:
    input:
        metrics=expand(f"{R}/{{dataset}}/metrics.json", dataset=evaluated_datasets()),
        training_log=rules.train.output.log_csv,
    output:
        report=f"{R}/report/report.md",
        figures=directory(f"{R}/report/report_figures"),
    params:
        figures=config["evaluate"]["figures"],
    log:
        f"{R}/logs/report/report.log",
    benchmark:
        f"{R}/benchmarks/report/report.tsv"
    threads: 1
    conda:
        CONDA_ENV
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "unet-pipe report --metrics {input.metrics:q} --training-log {input.training_log:q}"
        " --figures {params.figures} --out {output.report:q} 2>&1 | tee {log:q} >&2"
