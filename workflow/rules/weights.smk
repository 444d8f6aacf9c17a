# The paper's loss-weight maps (eq. 2), precomputed block by block from the labels.


def weights_args(wildcards):
    """The weights section (and the NGFF version) as ``unet-pipe weights`` options."""
    section = config["weights"]
    return (f"--w0 {section['w0']} --sigma {section['sigma']} --tolerance {section['tolerance']}"
            f" --label-mode {section['label_mode']} --foreground-value {section['foreground_value']}"
            f" --mode {section['mode']}{unlabelled_flag()}{'' if section['class_balance'] else ' --no-class-balance'}"
            f" --ngff {config['ngff_version']}")


rule weights:
    input:
        labels=f"{R}/{{dataset}}/labels.ome.zarr",
        raw=f"{R}/{{dataset}}/raw.ome.zarr",
    output:
        weights=directory(f"{R}/{{dataset}}/weights.ome.zarr"),
        preview=f"{R}/{{dataset}}/weights_preview.png",
    params:
        # Settings as params, not config.yaml as an input: editing them reruns only this rule.
        args=args_file(weights_args),
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
        "unet-pipe weights {input.labels:q} {output.weights:q} @{params.args:q} --threads {threads}"
        " --preview {output.preview:q} --raw {input.raw:q} 2>&1 | tee {log:q} >&2"
