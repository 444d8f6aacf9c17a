# Synthetic demo data and TIFF / OME-Zarr input -> OME-Zarr store ingestion.


rule synth:
    output:
        raw=f"{R}/synth/{{dataset}}/raw.tif",
        labels=f"{R}/synth/{{dataset}}/labels.tif",
        instances=f"{R}/synth/{{dataset}}/instances.tif",
    params:
        out_dir=synth_dir,
        shape=synth_shape,
        seed=synth_seed,
        mode=synth_mode,
    log:
        f"{R}/logs/synth/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/synth/{{dataset}}.tsv"
    threads: 1
    conda:
        CONDA_ENV
    resources:
        mem_mb=2000,
        runtime=20,
    shell:
        "unet-pipe synth {params.out_dir:q} --shape {params.shape} --seed {params.seed}{params.mode} 2>&1 | tee {log:q} >&2"


rule ingest_raw:
    input:
        src=raw_source,
    output:
        zarr=directory(f"{R}/{{dataset}}/raw.ome.zarr"),
    params:
        voxel_size=voxel_size_arg,
        ingest=ingest_args,
    log:
        f"{R}/logs/ingest/{{dataset}}.raw.log",
    benchmark:
        f"{R}/benchmarks/ingest/{{dataset}}.raw.tsv"
    threads: 4  # chunk encoding (Blosc releases the GIL); reading and hashing run beside it
    conda:
        CONDA_ENV
    resources:
        mem_mb=2000,
        runtime=120,
    shell:
        "unet-pipe ingest {input.src:q} {output.zarr:q} {params.ingest} {params.voxel_size} --threads {threads}"
        " 2>&1 | tee {log:q} >&2"


rule ingest_labels:
    input:
        src=labels_source,
        raw=f"{R}/{{dataset}}/raw.ome.zarr",
    output:
        zarr=directory(f"{R}/{{dataset}}/labels.ome.zarr"),
    params:
        ingest=ingest_args,
        offset=labels_offset_arg,
    log:
        f"{R}/logs/ingest/{{dataset}}.labels.log",
    benchmark:
        f"{R}/benchmarks/ingest/{{dataset}}.labels.tsv"
    threads: 4
    conda:
        CONDA_ENV
    resources:
        mem_mb=2000,
        runtime=120,
    shell:
        "unet-pipe ingest {input.src:q} {output.zarr:q} --labels --like {input.raw:q}{params.offset} {params.ingest} --threads {threads}"
        " 2>&1 | tee {log:q} >&2"
