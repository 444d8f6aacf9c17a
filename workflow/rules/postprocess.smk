# Instances from the U-Net's cell probabilities, slice by slice.
# Param function postprocess_args: common.smk.


rule postprocess:
    input:
        probabilities=f"{R}/{{dataset}}/probabilities.ome.zarr",
        decisions=decisions_input,
    output:
        instances=directory(f"{R}/{{dataset}}/instances.ome.zarr"),
    params:
        args=postprocess_args,
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
        "unet-pipe postprocess {input.probabilities:q} {output.instances:q} {params.args} > {log:q} 2>&1"
