#!/usr/bin/env bash
# Run by Snakemake (--use-conda) once, right after it created the environment of
# environment.yml: install unet-pipe itself into it. Snakemake runs this from its
# working directory; run Snakemake from the repository root or set UNET_PIPE_ROOT.
set -euo pipefail
root="${UNET_PIPE_ROOT:-$PWD}"
if [[ ! -f "$root/pyproject.toml" ]]; then
    echo "environment.post-deploy.sh: $root is not the unet-pipe repository; set UNET_PIPE_ROOT" >&2
    exit 1
fi
python -m pip install --no-deps -e "$root"
