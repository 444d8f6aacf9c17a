#!/usr/bin/env bash
# Install the Slurm and munge packages that tests/test_slurm.py runs a
# one-node cluster with (Debian 12: Slurm 22.05).  Idempotent: does nothing
# when the binaries are already there.  The daemons are NOT started here; the
# test fixture starts them in a temporary folder and stops them by PID.
# Exits non-zero when the install fails, so CI stops with the reason.
set -euo pipefail

slurm_version() { dpkg-query -W -f='${Version}' slurm-client 2>/dev/null || echo unknown; }

missing=0
for bin in slurmctld slurmd sbatch squeue munged; do
    command -v "$bin" >/dev/null 2>&1 || missing=1
done
if [[ $missing -eq 0 ]]; then
    echo "slurm-setup: slurm and munge already installed (slurm-client $(slurm_version))"
    exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# The packages' postinst scripts try to start the daemons; without systemd
# that only prints warnings, and the test starts its own anyway.
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
echo "slurm-setup: installed slurm-client $(slurm_version)"
