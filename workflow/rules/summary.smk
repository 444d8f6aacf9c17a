# Predicted datasets without ground truth (all of them with segment.model): a summary per dataset
# (objects, their sizes, voxel size) and one report over all; optionally the instances as an
# ImageJ TIFF for Fiji (segment.tiff). Functions summarized_datasets: common.smk.


rule summarize:
    input:
        raw=f"{R}/{{dataset}}/raw.ome.zarr",
        probabilities=f"{R}/{{dataset}}/probabilities.ome.zarr",
        instances=f"{R}/{{dataset}}/instances.ome.zarr",
    output:
        summary=f"{R}/{{dataset}}/summary.json",
    log:
        f"{R}/logs/summarize/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/summarize/{{dataset}}.tsv"
    threads: 1
    conda:
        CONDA_ENV
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "unet-pipe summarize --raw {input.raw:q} --probabilities {input.probabilities:q}"
        " --instances {input.instances:q} --dataset {wildcards.dataset} --out {output.summary:q} 2>&1 | tee {log:q} >&2"


rule segmentation_report:
    input:
        summaries=expand(f"{R}/{{dataset}}/summary.json", dataset=summarized_datasets()),
    output:
        report=f"{R}/report/segmentation.md",
        figures=directory(f"{R}/report/segmentation_figures"),
    params:
        figures=config["evaluate"]["figures"],
    log:
        f"{R}/logs/report/segmentation.log",
    benchmark:
        f"{R}/benchmarks/report/segmentation.tsv"
    threads: 1
    conda:
        CONDA_ENV
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "unet-pipe report --summaries {input.summaries:q} --figures {params.figures}"
        " --out {output.report:q} 2>&1 | tee {log:q} >&2"


rule instances_tiff:
    input:
        instances=f"{R}/{{dataset}}/instances.ome.zarr",
    output:
        tiff=f"{R}/{{dataset}}/instances.tif",
    log:
        f"{R}/logs/instances_tiff/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/instances_tiff/{{dataset}}.tsv"
    threads: 1
    conda:
        CONDA_ENV
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "unet-pipe tiff {input.instances:q} {output.tiff:q} --overwrite 2>&1 | tee {log:q} >&2"
