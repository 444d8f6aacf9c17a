# One store per predicted dataset that a viewer opens as raw + label layers (labels, instances).
# A leaf of the DAG: it links to the published stores and changes none of them.
# Functions view_truth_input, view_args: common.smk.


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
