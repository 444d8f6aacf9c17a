# Synthetic demo data and TIFF / OME-Zarr input -> OME-Zarr store ingestion.
# Input/param functions: below (dataset: common.smk).


def raw_source(wildcards):
    """The TIFF or OME-Zarr a dataset's raw stack comes from (a TIFF generated for synthetic datasets)."""
    ds = dataset(wildcards)
    if "synthetic" in ds:
        return f"{R}/synth/{wildcards.dataset}/raw.tif"
    return ds["raw"]


def labels_source(wildcards):
    ds = dataset(wildcards)
    if "synthetic" in ds:
        return f"{R}/synth/{wildcards.dataset}/labels.tif"
    return ds["labels"]


def synth_dir(wildcards, output):
    return str(Path(output.raw).parent)


def synth_shape(wildcards):
    return " ".join(str(s) for s in dataset(wildcards)["synthetic"]["shape"])


def synth_seed(wildcards):
    return dataset(wildcards)["synthetic"]["seed"]


def synth_mode(wildcards):
    """``--mode 3d --anisotropy A`` for a synthetic 3D volume (synthetic.mode: 3d), else empty."""
    synthetic = dataset(wildcards)["synthetic"]
    if synthetic.get("mode", "2d") != "3d":
        return ""
    return f" --mode 3d --anisotropy {float(synthetic.get('anisotropy', 1.0))}"


def voxel_size_arg(wildcards):
    """``--voxel-size Z Y X`` when the config gives one; else the TIFF metadata is used."""
    size = dataset(wildcards).get("voxel_size")
    return "" if size is None else f"--voxel-size {' '.join(str(v) for v in size)}"


def ingest_args(wildcards):
    """Chunking, compression and pyramid flags of ``unet-pipe ingest`` (params: a change reruns ingest)."""
    section = config["ingest"]
    chunks = ",".join(str(c) for c in section["chunks"])
    codec = ":".join(str(section["compression"][key]) for key in ("cname", "clevel", "blocksize"))
    return (f"--chunks {chunks} --compression {codec} --pyramid-levels {section['pyramid_levels']}"
            f" --ngff {config['ngff_version']}")


def labels_offset_arg(wildcards):
    """`` --offset Z Y X`` for labels of a crop (``datasets.NAME.labels_offset``), else empty."""
    offset = config["datasets"][wildcards.dataset].get("labels_offset")
    return "" if offset is None else " --offset " + " ".join(str(int(o)) for o in offset)


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
