#!/usr/bin/env bash
# The GPU path in one prepared run (issue 12): the CUDA tests, the paper's network trained on ISBI
# 2012 for ~4 min and evaluated, and a 1.07-gigavoxel zarr -> zarr prediction against the device's
# bf16 conv rate.  Prints ONE JSON object as the last line of stdout (and writes $OUT/gpu_check.json,
# with the log, the training CSV and the metrics, when $OUT is set).  At most ~8 minutes.
#
# On the lent GPU machine (the `device` tool; its Python has torch but not zarr, numcodecs, dask,
# jsonschema, natsort, and ../shared does not travel):
#   1. here, once, in the checkout that travels (the session's own repository root):
#        bash benchmarks/gpu_check.sh --fetch
#      downloads the missing packages as cp312 manylinux wheels into .whl/ (the versions of
#      constraints/ci.txt, ~12 MiB) and copies the two ISBI training TIFFs into .isbi/ (~16 MiB);
#      both folders are git-ignored.
#   2. device run: command  "bash benchmarks/gpu_check.sh"  carry [".whl", ".isbi"]  timeout_s 540
#      The figures come back in files_at/gpu_check.json.  A rerun of one part (the lease is 15 min):
#        bash benchmarks/gpu_check.sh --steps isbi --train-seconds 120
#
# Here, without a GPU:  bash benchmarks/gpu_check.sh --dry   (tiny sizes on the CPU, ~1 min on 2 cores;
# tests/test_gpu_check.py runs it).  Python: $PYTHON, else .venv/bin/python, else python3.
# The ISBI folder: --isbi DIR, else $UNET_PIPE_ISBI_DIR, else .isbi/, else ../shared/data/isbi2012.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

# Missing packages, by the versions CI tests (constraints/ci.txt); torch, numpy, scipy,
# scikit-image, tifffile, pyyaml, tqdm, psutil and pytest are on the GPU machine already.
WHEELS="zarr numcodecs donfig google-crc32c dask partd locket jsonschema jsonschema-specifications referencing rpds-py natsort"

if [ "${1:-}" = "--fetch" ]; then
    set -e
    specs=()
    for name in $WHEELS; do
        pin=$(grep -i "^${name}==" constraints/ci.txt || true)
        if [ -z "$pin" ]; then echo "gpu_check: $name is not pinned in constraints/ci.txt" >&2; exit 2; fi
        specs+=("$pin")
    done
    rm -rf .whl && mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${specs[@]}"
    src=${UNET_PIPE_ISBI_DIR:-../shared/data/isbi2012}
    rm -rf .isbi && mkdir -p .isbi
    cp "$src/train-volume.tif" "$src/train-labels.tif" .isbi/
    du -sh .whl .isbi
    exit 0
fi

export PYTHONUNBUFFERED=1
export GPU_CHECK_WHEELS=0
case " $* " in *" --dry "*) dry=1 ;; *) dry=0 ;; esac
# Install the carried wheels where the packages are missing (the GPU machine), never over a working env.
if [ "$dry" = 0 ] && ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import zarr, dask, jsonschema, natsort" 2>/dev/null; then
    site=${TMPDIR:-/tmp}/unet-pipe-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "gpu_check: installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    export GPU_CHECK_WHEELS=1
fi
if [ -z "${UNET_PIPE_ISBI_DIR:-}" ] && [ -f .isbi/train-volume.tif ]; then export UNET_PIPE_ISBI_DIR=$PWD/.isbi; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# The driver keeps its own budget (465 s by default); this is only the last resort.
exec timeout -k 5 478 "$PY" benchmarks/gpu_check.py "$@"
