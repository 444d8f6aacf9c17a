# bioimage.io model package of the trained model (unet_pipe.bioimageio_export): state dict +
# TorchScript, preprocessing, valid-size constraints, test tensors from a tile of the export
# sample's raw store. A target of rule all only with export.enabled: true; otherwise ask for it
# (`snakemake export` or the file). Needs unet-pipe[bioimageio]. Param function: below;
# EXPORT_PACKAGE and EXPORT_SAMPLE (checked before any job): common.smk.


def export_config_json(wildcards):
    import json

    return json.dumps(config["export"], sort_keys=True)


rule export:
    input:
        # The bundled model: the package carries its decisions and voxel size (config.unet_pipe.application).
        checkpoint=MODEL,
        sample=f"{R}/{EXPORT_SAMPLE}/raw.ome.zarr",
    output:
        package=EXPORT_PACKAGE,
    params:
        config=export_config_json,
    log:
        f"{R}/logs/export/export.log",
    benchmark:
        f"{R}/benchmarks/export/export.tsv"
    threads: 1
    conda:
        CONDA_ENV
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "unet-pipe export {input.checkpoint:q} {output.package:q} --sample {input.sample:q}"
        " --export-json {params.config:q} 2>&1 | tee {log:q} >&2"
