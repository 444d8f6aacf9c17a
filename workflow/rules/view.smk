# One store per predicted dataset that a viewer opens as raw + label layers (labels, instances).
# A leaf of the DAG: it links to the published stores and changes none of them.
# Functions view_truth_input, view_args: below.


def view_truth_input(wildcards):
    """The ingested labels of a labelled dataset, shown as a layer of its view (else nothing)."""
    return [f"{R}/{wildcards.dataset}/labels.ome.zarr"] if wildcards.dataset in LABELLED and not APPLY else []


def view_args(wildcards):
    """``--labels NAME=PATH`` for each label layer of the view: ground truth first, then instances.

    Built from the wildcards, not ``input``: Snakemake records only input-independent params.
    """
    import shlex

    instances = f"{R}/{wildcards.dataset}/instances.ome.zarr"
    truth = view_truth_input(wildcards)
    layers = [("labels", path) for path in truth] + [("instances", instances)]
    args = [f"--labels {shlex.quote(f'{name}={path}')}" for name, path in layers]
    unlabelled = config["weights"].get("unlabelled_value")
    if truth and unlabelled is not None:  # sparse truth: unannotated pixels transparent
        args.append(f"--unlabelled labels={unlabelled}")
    return " ".join(args)


rule view:
    input:
        raw=f"{R}/{{dataset}}/raw.ome.zarr",
        instances=f"{R}/{{dataset}}/instances.ome.zarr",
        truth=view_truth_input,
    output:
        view=directory(f"{R}/{{dataset}}/view.ome.zarr"),
    params:
        args=view_args,
    log:
        f"{R}/logs/view/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/view/{{dataset}}.tsv"
    threads: 1
    conda:
        CONDA_ENV
    resources:
        mem_mb=500,
        runtime=10,
    shell:
        "unet-pipe view {input.raw:q} {output.view:q} {params.args} --overwrite 2>&1 | tee {log:q} >&2"
