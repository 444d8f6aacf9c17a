# The paper's loss-weight maps (eq. 2), precomputed block by block from the labels.


rule weights:
    input:
        labels=f"{R}/{{dataset}}/labels.ome.zarr",
        raw=f"{R}/{{dataset}}/raw.ome.zarr",
    output:
        weights=directory(f"{R}/{{dataset}}/weights.ome.zarr"),
        preview=f"{R}/{{dataset}}/weights_preview.png",
    params:
        # Settings as params, not config.yaml as an input: editing them reruns only this rule.
        w0=config["weights"]["w0"],
        sigma=config["weights"]["sigma"],
        tolerance=config["weights"]["tolerance"],
        label_mode=config["weights"]["label_mode"],
        foreground_value=config["weights"]["foreground_value"],
        mode=config["weights"]["mode"],
        unlabelled=unlabelled_flag(),
        balance="" if config["weights"]["class_balance"] else " --no-class-balance",
        ngff=config["ngff_version"],
    log:
        f"{R}/logs/weights/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/weights/{{dataset}}.tsv"
    threads: 2
    conda:
        CONDA_ENV
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        # Same chunks and pyramid depth as the labels; an interrupted job leaves
        # weights.ome.zarr.partial and the rerun resumes it.
        "unet-pipe weights {input.labels:q} {output.weights:q} --w0 {params.w0} --sigma {params.sigma}"
        " --tolerance {params.tolerance} --label-mode {params.label_mode}"
        " --foreground-value {params.foreground_value} --mode {params.mode}{params.unlabelled}{params.balance} --threads {threads}"
        " --preview {output.preview:q} --raw {input.raw:q} --ngff {params.ngff} > {log:q} 2>&1"
