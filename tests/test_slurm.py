"""End-to-end: the demo DAG through a REAL one-node SLURM cluster equals a local run.

The fixture ``slurm_cluster`` installs Debian's Slurm and munge packages when
missing (``.ci/slurm-setup.sh``), then starts munged, slurmctld and slurmd on
localhost in a temporary folder with their own ``slurm.conf``, state, spool,
sockets and logs, and stops them by PID afterwards.  The node declares one GPU
gres (``File=/dev/null``) so the ``gpu`` partition of ``profiles/slurm``
schedules GPU rules.  Nothing is mocked: real sbatch, squeue, slurmd and
srun (behind a shim that only sets SLURM_CONF, see ``_write_srun_shim``).

The test runs the workflow once locally and once with ``--profile slurm``
exactly as a user types it after ``unet-pipe install-profile slurm``
(partitions as in the profile: the test cluster is built with the profile's
partition names), checks that every job went through
sbatch (SLURM job ids in the Snakemake log and in ``.snakemake/slurm_logs``)
and that the array data of every output (and the metrics) equal the local
run's.

The cheap tests at the top check the profiles without a cluster (every entry
commented, rule names that exist, GPU jobs routed to the GPU partition).

The cluster tests are skipped (with the reason) only when Slurm cannot be
installed (no root, no apt-get, the install fails) outside CI; with
``CI=true`` that is a failure, and so is a daemon that does not start.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, _in_ci

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "munged")
PROFILE = REPO / "profiles" / "slurm"
VENV_BIN = Path(sys.executable).parent


def _profile_partitions() -> tuple[str, dict[str, str], set[str]]:
    """profiles/slurm's default partition, per-rule partitions and GPU rules.

    The test cluster offers exactly these partitions, so the profile runs as a
    user gets it, without partition overrides.
    """
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    per_rule = profile.get("set-resources", {})
    partitions = {rule: res["slurm_partition"] for rule, res in per_rule.items() if "slurm_partition" in res}
    gpu_rules = {rule for rule, res in per_rule.items() if res.get("gpu", 0) >= 1}
    return profile["default-resources"]["slurm_partition"], partitions, gpu_rules


def _snakemake_command(workdir: Path, config: Path, *args: str) -> list[str]:
    """``snakemake`` on the repository's Snakefile in ``workdir``; profiles only those in ``args``."""
    return [
        sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--configfile", str(config), "--workflow-profile", "none", *args,
    ]


def _hermetic_env() -> dict[str, str]:
    """This environment without a user's default profile (SNAKEMAKE_PROFILE)."""
    return {key: value for key, value in os.environ.items() if key != "SNAKEMAKE_PROFILE"}


# ------------------------------------------------------------------ profiles

PROFILES = ("local", "slurm")
KEY_LINE = re.compile(r"^\s*(?:- )?[\w-]+:")


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_entry_is_commented(name):
    """Each key has a comment on its line or right above it (DESIGN.md: every entry commented)."""
    lines = (REPO / "profiles" / name / "config.yaml").read_text().splitlines()
    bare = []
    for i, line in enumerate(lines):
        if KEY_LINE.match(line) and "#" not in line:
            above = lines[i - 1].strip() if i else ""
            if not above.startswith("#"):
                bare.append(f"line {i + 1}: {line.strip()}")
    assert not bare, f"profiles/{name}/config.yaml: entries without a comment: {bare}"


def _dry_run(profile: str, workdir: Path, env: dict[str, str] | None = None) -> dict[str, list[dict[str, str]]]:
    """Jobs of the demo DAG under a profile (``snakemake -n``): rule -> resources of each job.

    ``profile``: a folder of profiles/, or, with ``env``, a name Snakemake looks up itself
    (run from the repository root, as users type it).
    """
    given = profile if env is not None else str(REPO / "profiles" / profile)
    result = subprocess.run(
        _snakemake_command(workdir, REPO / "config" / "config.yaml", "--profile", given, "-n"),
        env=env or _hermetic_env(), capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    jobs: dict[str, list[dict[str, str]]] = {}
    rule = None
    for line in (result.stdout + result.stderr).splitlines():
        if m := re.match(r"(?:local)?rule (\w+):$", line):
            rule = m.group(1)
        elif rule and (m := re.match(r"\s+resources: (.*)$", line)):
            jobs.setdefault(rule, []).append(dict(item.split("=", 1) for item in m.group(1).split(", ")))
            rule = None
    return jobs


@pytest.fixture(scope="module")
def workflow_rules(tmp_path_factory) -> set[str]:
    """Rule names of the workflow (``snakemake --list-rules``)."""
    workdir = tmp_path_factory.mktemp("rules")
    result = subprocess.run(
        _snakemake_command(workdir, REPO / "config" / "config.yaml", "--list-rules"),
        env=_hermetic_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return set(result.stdout.split())


@pytest.mark.parametrize("name", PROFILES)
def test_profile_names_only_existing_rules(name, workflow_rules):
    """Snakemake ignores set-resources of an unknown rule silently: a renamed rule would lose its partition."""
    profile = yaml.safe_load((REPO / "profiles" / name / "config.yaml").read_text())
    named = set(profile.get("set-resources", {}))
    assert named <= workflow_rules, f"profiles/{name} names rules the workflow lacks: {sorted(named - workflow_rules)}"


def test_slurm_profile_sends_gpu_jobs_to_the_gpu_partition(tmp_path):
    """Every job asking for a GPU lands in a GPU partition; every other job in the CPU partition."""
    default_partition, partitions, gpu_rules = _profile_partitions()
    gpu_partitions = {partitions[rule] for rule in gpu_rules}
    assert gpu_partitions and default_partition not in gpu_partitions
    jobs = _dry_run("slurm", tmp_path)
    assert jobs, "the dry run listed no job"
    for rule, resources in jobs.items():
        for res in resources:
            if int(res.get("gpu", 0)) >= 1:
                assert res.get("slurm_partition") in gpu_partitions, f"{rule}: GPU job in {res.get('slurm_partition')}"
            else:
                assert res.get("slurm_partition") == default_partition, f"{rule}: CPU job in {res.get('slurm_partition')}"
            assert "runtime" in res and "mem_mb" in res, f"{rule}: {res}"


def test_local_profile_limits_gpu_jobs(tmp_path):
    """The local profile runs the demo DAG (dry) and lets no two GPU jobs share the GPU."""
    profile = yaml.safe_load((REPO / "profiles" / "local" / "config.yaml").read_text())
    assert profile["resources"]["gpu"] == 1
    assert _dry_run("local", tmp_path)


# ------------------------------------------------------------------ `--profile slurm` by name


def _install_profile(config_home: Path, *args: str) -> subprocess.CompletedProcess:
    """``unet-pipe install-profile ARGS`` with Snakemake's user config folder in ``config_home``."""
    env = {**_hermetic_env(), "XDG_CONFIG_HOME": str(config_home)}
    for name in ("UNET_PIPE_PARTITION_CPU", "UNET_PIPE_PARTITION_GPU", "UNET_PIPE_SLURM_ACCOUNT"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "unet_pipe", "install-profile", *args],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


def test_installed_profile_is_found_by_name_with_the_sites_partitions(tmp_path):
    """`unet-pipe install-profile slurm` then, from the repository root, `snakemake --profile slurm`."""
    home = tmp_path / "config"
    done = _install_profile(home, "slurm", "--partition-cpu", "short", "--partition-gpu", "gpu_a100")
    assert done.returncode == 0, done.stderr
    installed = yaml.safe_load((home / "snakemake" / "slurm" / "config.yaml").read_text())
    original = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert installed["default-resources"]["slurm_partition"] == "short"
    assert {rule: res["slurm_partition"] for rule, res in installed["set-resources"].items()} == {
        "train": "gpu_a100", "predict": "gpu_a100"
    }
    for section in ("default-resources", "set-resources"):  # nothing else changed
        installed.pop(section), original.pop(section)
    assert installed == original

    jobs = _dry_run("slurm", tmp_path / "run", env={**_hermetic_env(), "XDG_CONFIG_HOME": str(home)})
    partitions = {rule: {res["slurm_partition"] for res in resources} for rule, resources in jobs.items()}
    assert partitions.pop("train") == {"gpu_a100"} and partitions.pop("predict") == {"gpu_a100"}
    assert partitions and set().union(*partitions.values()) == {"short"}
    # Without the install step Snakemake does not find it (the failure).
    missing = subprocess.run(
        _snakemake_command(tmp_path / "bare", REPO / "config" / "config.yaml", "--profile", "slurm", "-n"),
        env={**_hermetic_env(), "XDG_CONFIG_HOME": str(tmp_path / "empty"), "XDG_CONFIG_DIRS": str(tmp_path / "empty")},
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert missing.returncode != 0 and "no profile.yaml (or config.yaml) found" in missing.stderr


def test_install_profile_never_replaces_a_users_profile(tmp_path, monkeypatch):
    from unet_pipe.errors import ConfigError, OutputError
    from unet_pipe.profiles import install_profile

    home = tmp_path / "config"
    mine = home / "snakemake" / "slurm"
    mine.mkdir(parents=True)
    (mine / "config.yaml").write_text("executor: slurm\njobs: 7\n")
    refused = _install_profile(home, "slurm", "--partition-cpu", "a", "--partition-gpu", "b")
    assert refused.returncode == 2 and "unet-pipe did not install (no marker)" in refused.stderr
    assert (mine / "config.yaml").read_text() == "executor: slurm\njobs: 7\n" and sorted(p.name for p in mine.iterdir()) == ["config.yaml"]

    # Ours (marked) is replaced by a reinstall, with partitions from the environment this time.
    root = tmp_path / "other"
    install_profile("slurm", root, {"cpu": "a", "gpu": "b"})
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "unused"))
    env_install = subprocess.run(
        [sys.executable, "-m", "unet_pipe", "install-profile", "slurm", "--config-dir", str(root)],
        env={**_hermetic_env(), "UNET_PIPE_PARTITION_CPU": "c2", "UNET_PIPE_PARTITION_GPU": "g2"},
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert env_install.returncode == 0, env_install.stderr
    assert yaml.safe_load((root / "slurm" / "config.yaml").read_text())["default-resources"]["slurm_partition"] == "c2"
    assert sorted(p.name for p in root.iterdir()) == ["slurm"]  # no staging or backup folder left
    # Edited since: refused, the edit kept.
    edited = (root / "slurm" / "config.yaml").read_text() + "jobs: 3\n"
    (root / "slurm" / "config.yaml").write_text(edited)
    with pytest.raises(OutputError, match="edited since unet-pipe installed it"):
        install_profile("slurm", root, {"cpu": "a", "gpu": "b"})
    assert (root / "slurm" / "config.yaml").read_text() == edited
    # Neither partitions given, nor in the environment, nor a terminal to ask: one line, exit 2.
    none = _install_profile(tmp_path / "x", "slurm")
    assert none.returncode == 2 and none.stderr.strip().endswith(
        "unet-pipe: error: no CPU partition: pass --partition-cpu or set UNET_PIPE_PARTITION_CPU "
        "(`sinfo -s` lists your cluster's partitions)"
    )
    with pytest.raises(ConfigError, match="not a SLURM partition name"):
        install_profile("slurm", tmp_path / "y", {"cpu": "a b", "gpu": "g"})
    assert not (tmp_path / "y").exists()


def test_installed_profile_points_its_files_into_the_repository(tmp_path):
    """A profile value naming a file next to it (Snakemake resolves those in the profile folder)
    still names that file of the repository once installed elsewhere."""
    from unet_pipe.profiles import install_profile

    source = tmp_path / "repo" / "profiles" / "site"
    source.mkdir(parents=True)
    (source / "jobscript.sh").write_text("#!/bin/sh\n")
    (source / "config.yaml").write_text("# a comment\njobscript: jobscript.sh  # the job wrapper\njobs: 4\n")
    dest = install_profile("site", tmp_path / "home", source=source)
    assert yaml.safe_load((dest / "config.yaml").read_text()) == {"jobscript": str(source / "jobscript.sh"), "jobs": 4}


# ------------------------------------------------------------------ install


def _missing_binaries() -> list[str]:
    return [name for name in SLURM_BINARIES if shutil.which(name) is None]


def _unavailable(reason: str) -> None:
    """Skip outside CI; fail in CI, where the SLURM test must never vanish."""
    if _in_ci():
        pytest.fail(f"SLURM test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _ensure_slurm_installed() -> None:
    if not _missing_binaries():
        return
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        _unavailable(f"slurm not installed ({', '.join(_missing_binaries())} missing) and no root to install it")
    if shutil.which("apt-get") is None:
        _unavailable(f"slurm not installed ({', '.join(_missing_binaries())} missing) and no apt-get to install it")
    setup = subprocess.run(
        ["bash", str(REPO / ".ci" / "slurm-setup.sh")], capture_output=True, text=True, timeout=600
    )
    if setup.returncode != 0:
        tail = (setup.stdout + setup.stderr).strip().splitlines()[-5:]
        _unavailable("installing slurm with .ci/slurm-setup.sh failed: " + " | ".join(tail))
    if _missing_binaries():
        _unavailable(f"after .ci/slurm-setup.sh, still not on PATH: {', '.join(_missing_binaries())}")


# ------------------------------------------------------------------ cluster


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SlurmCluster:
    """A running one-node cluster: ``env`` points clients (sbatch, squeue) at it."""

    root: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=30, check=check)

    def logs(self) -> str:
        """The daemons' log tails, for failure messages."""
        parts = []
        for name in ("munge/munged.log", "log/slurmctld.log", "log/slurmctld.out", "log/slurmd.log", "log/slurmd.out"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)


def _write_munge_key(path: Path) -> None:
    path.write_bytes(os.urandom(1024))
    path.chmod(0o400)


def _write_srun_shim(bin_dir: Path, slurm_conf: str) -> None:
    """An ``srun`` that finds this cluster's slurm.conf, in front of the real one on PATH.

    Inside a job, snakemake-executor-plugin-slurm-jobstep (0.6) starts the rule
    with ``srun`` in an environment stripped of every ``SLURM_*`` variable,
    SLURM_CONF included; a cluster whose slurm.conf is not at the default
    /etc/slurm/slurm.conf then fails with "Could not establish a configuration
    source". Real clusters keep it there; the test cluster must not touch /etc.
    """
    real = shutil.which("srun")
    assert real is not None
    shim = bin_dir / "srun"
    shim.write_text(f'#!/bin/sh\nSLURM_CONF="{slurm_conf}" exec "{real}" "$@"\n')
    shim.chmod(0o755)


def _slurm_conf(root: Path, node: str, cpus: int, memory_mb: int, partitions: list[str]) -> str:
    # Only what a one-node test cluster needs: no cgroups (proctrack/linuxproc,
    # task/none) and no accounting database, so jobs are looked up with squeue.
    # config_overrides: the node declares what the conf says, not what slurmd
    # measures, so jobs asking for more threads or memory than this machine
    # has still run (memory is not a consumable with CR_Core).
    return f"""\
ClusterName=unetpipetest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
SchedulerType=sched/builtin
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} Gres=gpu:1 State=UNKNOWN
""" + "".join(
        f"PartitionName={name} Nodes={node} Default={'YES' if i == 0 else 'NO'} MaxTime=INFINITE State=UP\n"
        for i, name in enumerate(partitions)
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _wait_for(predicate, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with status {proc.returncode} while waiting for {what}\n{cluster.logs()}")
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.logs()}")


@pytest.fixture(scope="module")
def slurm_cluster():
    """Start munged, slurmctld and slurmd on localhost; stop them by PID afterwards."""
    _ensure_slurm_installed()
    if os.geteuid() != 0:
        _unavailable("starting slurmd and munged (as user munge) needs root")
    # Not under pytest's tmp_path: that is private to root, and munged runs
    # as user munge and must reach its socket folder.
    root = Path(tempfile.mkdtemp(prefix="unet-pipe-slurm-"))
    root.chmod(0o755)
    for sub in ("munge", "state", "spool", "run", "log", "bin"):
        (root / sub).mkdir()
    env = _hermetic_env()
    env["SLURM_CONF"] = str(root / "slurm.conf")
    # The jobs run `unet-pipe` from PATH; bin/ holds the srun shim below.
    env["PATH"] = os.pathsep.join([str(root / "bin"), str(VENV_BIN), env.get("PATH", "")])
    _write_srun_shim(root / "bin", env["SLURM_CONF"])
    cluster = SlurmCluster(root=root, env=env)
    node = socket.gethostname().split(".")[0]
    try:
        munge_dir = root / "munge"
        _write_munge_key(munge_dir / "munge.key")
        shutil.chown(munge_dir / "munge.key", "munge", "munge")
        shutil.chown(munge_dir, "munge", "munge")
        munge_dir.chmod(0o755)
        default_partition, per_rule, _ = _profile_partitions()
        partitions = list(dict.fromkeys([default_partition, *per_rule.values()]))
        (root / "slurm.conf").write_text(
            _slurm_conf(root, node, cpus=max(8, os.cpu_count() or 1), memory_mb=256_000, partitions=partitions)
        )
        (root / "gres.conf").write_text(f"NodeName={node} Name=gpu File=/dev/null\n")

        cluster.procs["munged"] = subprocess.Popen(
            ["munged", "--foreground", f"--socket={munge_dir}/munge.socket", f"--key-file={munge_dir}/munge.key",
             f"--pid-file={munge_dir}/munged.pid", f"--seed-file={munge_dir}/munged.seed",
             f"--log-file={munge_dir}/munged.log"],
            user="munge", group="munge", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        _wait_for(lambda: (munge_dir / "munge.socket").exists(), 15, "munged's socket", cluster)
        for name, args in (
            ("slurmctld", ["slurmctld", "-D", "-c", "-f", env["SLURM_CONF"]]),
            ("slurmd", ["slurmd", "-D", "-N", node, "-f", env["SLURM_CONF"]]),
        ):
            out = open(root / "log" / f"{name}.out", "wb")
            cluster.procs[name] = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
            out.close()
        _wait_for(
            lambda: cluster.run("sinfo", "--noheader", "--format=%T", check=False).stdout.split()[:1] == ["idle"],
            60, "the node to be idle", cluster,
        )
        yield cluster
    finally:
        if "slurmctld" in cluster.procs and cluster.procs["slurmctld"].poll() is None:
            cluster.run("scancel", "--full", "--user", str(os.getuid()), check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            if name in cluster.procs:
                _stop(cluster.procs[name])
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_gpu_partition_hands_out_the_declared_gpu(slurm_cluster, tmp_path):
    """A job asking for one GPU on the gpu partition runs there and sees device 0."""
    _, partitions, gpu_rules = _profile_partitions()
    gpu_partition = partitions[sorted(gpu_rules)[0]]
    out = tmp_path / "job.out"
    submit = slurm_cluster.run(
        "sbatch", "--parsable", "--wait", f"--partition={gpu_partition}", "--gpus=1", f"--output={out}",
        "--wrap", 'echo "partition=$SLURM_JOB_PARTITION gpus=$CUDA_VISIBLE_DEVICES"',
    )
    job_id = submit.stdout.strip()
    assert re.fullmatch(r"\d+", job_id), submit.stdout
    assert out.read_text().strip() == f"partition={gpu_partition} gpus=0"
    details = slurm_cluster.run("scontrol", "show", "job", job_id).stdout
    assert "gpu:1" in details, details


# ------------------------------------------------------------------ end to end

# On top of profiles/slurm, only what this test cluster needs or what makes
# the run quick and observable (partitions are the profile's own).
SLURM_TEST_ARGS = (
    # No accounting database here, so sacct cannot answer; squeue can
    # (finished jobs stay listed for MinJobAge = 3600 s: on a loaded 2-core machine the run
    # took 543 s, and with 300 s squeue had forgotten the first job).
    "--slurm-status-command", "squeue",
    # No account exists (plugin 2.8 ignores the flag; its guess fails and it
    # submits without -A, as wanted).
    "--slurm-no-account",
    # First status check after 1 s instead of 40 s: the jobs take seconds.
    "--slurm-init-seconds-before-status-checks", "1",
    # Keep .snakemake/slurm_logs/** of successful jobs: the test reads them.
    "--slurm-keep-successful-logs",
    # Fail at once rather than retrying a broken job.
    "--retries", "0",
    # The machine has 2 cores.
    "--jobs", "2",
    # Same threads per job as the local run with --cores 2: float results of
    # multi-threaded steps (torch) may depend on the thread count.
    "--max-threads", "2",
    # A local disk shows outputs at once.
    "--latency-wait", "5",
)
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


def _small_config(dest: Path) -> Path:
    """config/config.yaml with a smaller synthetic stack, 2 training steps and 2 predict shards, as YAML in ``dest``.

    Each SLURM job costs seconds of start-up and status polling whatever it
    does, so the data only need to be big enough for every stage to run.
    """
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["results"] = "results"
    config["datasets"]["demo"]["synthetic"]["shape"] = [4, 192, 192]
    train = config["train"]
    train["datasets"]["demo"] = {"train": [0, 3], "val": [3, 4]}
    # One validation and one checkpoint, at the last step.
    train.update(steps=2, val_every=2, checkpoint_every=2)
    # Two z shards: prepare, one SLURM job per shard, gather (the multi-node layout).
    config["predict"]["shards"] = 2
    path = dest / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _start_snakemake(workdir: Path, config: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    """``snakemake`` with the repository's Snakefile in ``workdir``; output in ``workdir``.out."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = _snakemake_command(workdir, config, *args)
    with open(f"{workdir}.out", "w") as out:
        # From the repository root, where users run it (profiles given by name are looked up there first).
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def _finish(proc: subprocess.Popen, workdir: Path, timeout: float = 600) -> str:
    """Wait for a run started by _start_snakemake; its output, asserting it succeeded."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    output = Path(f"{workdir}.out").read_text()
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed ({proc.returncode}):\n{output[-8000:]}"
    return output


def _snakemake_log(workdir: Path) -> str:
    logs = sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))
    assert logs, f"no Snakemake log in {workdir}/.snakemake/log"
    return logs[-1].read_text()


def _outputs(results: Path) -> dict[str, Path]:
    """Data outputs by path relative to ``results``: OME-Zarr images and TIFFs (not logs/benchmarks).

    A ``view.ome.zarr`` links to the stores it shows (compared themselves) and no stage reads it
    (unet-pipe refuses metadata paths leading out of a store): its link targets are listed instead."""
    found = {}
    for pattern in ("**/*.ome.zarr", "**/*.tif", "**/*.tiff"):
        for path in results.glob(pattern):
            if path.name == "view.ome.zarr":
                found[str(path.relative_to(results))] = _view_links(path)
            else:
                found[str(path.relative_to(results))] = path
    return found


def _view_links(view: Path) -> list[str]:
    """The relative targets of a view's links (what it shows), in order."""
    return sorted(os.readlink(p) for p in view.rglob("*") if p.is_symlink())


def _read_array(path: Path | list[str]) -> np.ndarray:
    if isinstance(path, list):  # a view: its link targets
        return np.array(path)
    if path.name.endswith(".ome.zarr"):
        from unet_pipe.io import open_image

        return open_image(path)[...]
    import tifffile

    return tifffile.imread(path)


def _job_rules(workdir: Path, log: str) -> dict[str, str]:
    """SLURM job id -> rule name, from the executor's log lines and SLURM log paths."""
    rules = {}
    for _, slurm_id, logfile in SUBMITTED.findall(log):
        # .snakemake/slurm_logs/rule_<name>/<wildcards>/<jobid>.log
        parts = Path(logfile).relative_to(workdir / ".snakemake" / "slurm_logs").parts
        rules[slurm_id] = parts[0].removeprefix("rule_")
    return rules


@pytest.mark.slow
def test_demo_dag_through_slurm_equals_local_run(slurm_cluster, tmp_path):
    config = _small_config(tmp_path)
    local_dir, slurm_dir = tmp_path / "local", tmp_path / "slurm"

    # Both runs at once: the SLURM run mostly waits for status checks.
    started = time.monotonic()
    local = _start_snakemake(
        local_dir, config, slurm_cluster.env, "--profile", str(REPO / "profiles" / "local"), "--cores", "2"
    )
    # The literal `snakemake --profile slurm` of the README, from the repository root: the profile
    # installed by name (`unet-pipe install-profile`) with this cluster's partitions (the profile's own
    # names) into a private XDG_CONFIG_HOME, where Snakemake looks profiles up by name.
    default_partition, per_rule, gpu_rules = _profile_partitions()
    home = tmp_path / "config-home"
    installed = _install_profile(
        home, "slurm", "--partition-cpu", default_partition, "--partition-gpu", per_rule[sorted(gpu_rules)[0]]
    )
    assert installed.returncode == 0, installed.stderr
    slurm_env = {**slurm_cluster.env, "XDG_CONFIG_HOME": str(home)}
    slurm = _start_snakemake(slurm_dir, config, slurm_env, "--profile", "slurm", *SLURM_TEST_ARGS)
    _finish(local, local_dir)
    local_s = time.monotonic() - started
    _finish(slurm, slurm_dir)
    print(f"local run {local_s:.1f} s, SLURM run {time.monotonic() - started:.1f} s (started together)")

    # Every job the local run ran (but the target rule `all`) went through sbatch.
    log = _snakemake_log(slurm_dir)
    job_rules = _job_rules(slurm_dir, log)
    local_jobs = sorted(re.findall(r"^localrule (\w+):", _snakemake_log(local_dir), flags=re.M))
    local_jobs.remove("all")
    assert local_jobs, "the local run ran no job"
    assert sorted(job_rules.values()) == local_jobs, f"submitted to SLURM: {job_rules}\n{log[-3000:]}"
    assert sorted(job_rules.values()).count("predict") == 2 and "predict_gather" in job_rules.values()
    for slurm_id, rule in job_rules.items():
        assert list((slurm_dir / ".snakemake" / "slurm_logs" / f"rule_{rule}").rglob(f"{slurm_id}.log")), (
            f"no SLURM log of job {slurm_id} ({rule})"
        )

    # SLURM itself knows the jobs: finished, in the partition the profile asked for.
    default_partition, partitions, gpu_rules = _profile_partitions()
    queue = slurm_cluster.run("squeue", "--states=all", "--noheader", "--format=%i|%P|%T").stdout
    seen = {job: (partition, state) for job, partition, state in (line.split("|") for line in queue.split())}
    for slurm_id, rule in job_rules.items():
        partition = partitions.get(rule, default_partition)
        assert seen.get(slurm_id) == (partition, "COMPLETED"), f"job {slurm_id} ({rule}): {seen.get(slurm_id)}"
        if rule in gpu_rules:
            details = slurm_cluster.run("scontrol", "show", "job", slurm_id).stdout
            assert "gpu:1" in details, f"GPU job {slurm_id} ({rule}) got no GPU:\n{details}"

    # Nothing left to do: every rule's output exists and is up to date.
    dry = _finish(_start_snakemake(slurm_dir, config, slurm_cluster.env, "--cores", "1", "-n"), slurm_dir)
    assert "Nothing to be done" in dry, dry[-3000:]

    # The same outputs with the same array data.
    local_outputs, slurm_outputs = _outputs(local_dir / "results"), _outputs(slurm_dir / "results")
    assert sorted(slurm_outputs) == sorted(local_outputs)
    assert any(name.endswith(".ome.zarr") for name in local_outputs)
    for name, local_path in local_outputs.items():
        expected, got = _read_array(local_path), _read_array(slurm_outputs[name])
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)

    # The same metrics (all but the provenance, which holds times and hosts).
    metrics = sorted(path.relative_to(local_dir) for path in (local_dir / "results").glob("*/metrics.json"))
    assert metrics, "no metrics.json"
    for name in metrics:
        expected, got = (json.loads((root / name).read_text()) for root in (local_dir, slurm_dir))
        expected.pop("provenance", None)
        got.pop("provenance", None)
        assert got == expected, name


@pytest.mark.slow
def test_segment_batch_through_slurm_equals_local_run(slurm_cluster, tmp_path):
    """The batch workflow (segment.model, unlabelled datasets, no training) with `--profile slurm`:
    every job goes through sbatch (predict on the GPU partition), and the instances, summaries and
    report table equal those of a local run."""
    from test_segment import DECISIONS, tiny_checkpoint, write_stack
    from test_segment_workflow import batch_config

    from unet_pipe.model_bundle import bundle_model

    n = 2  # each SLURM job costs seconds of submission and polling; 2 datasets show the fan-out
    runs = {}
    for name in ("local", "slurm"):
        work = tmp_path / name
        ckpt = tiny_checkpoint(work / "models" / "checkpoint.pt")
        bundle_model(ckpt, work / "models" / "model.pt", decisions={**DECISIONS, "source": "calibrate"})
        for i in range(n):
            write_stack(work / "new" / f"stack{i:02d}.tif", shape=(2, 64, 64 + 8 * i), seed=i)
        (work / "batch.yaml").write_text(yaml.safe_dump(batch_config(work, n)))
        runs[name] = work
    local = _start_snakemake(runs["local"], runs["local"] / "batch.yaml", slurm_cluster.env,
                             "--profile", str(REPO / "profiles" / "local"), "--cores", "2")
    default_partition, per_rule, gpu_rules = _profile_partitions()
    home = tmp_path / "config-home"
    installed = _install_profile(
        home, "slurm", "--partition-cpu", default_partition, "--partition-gpu", per_rule[sorted(gpu_rules)[0]]
    )
    assert installed.returncode == 0, installed.stderr
    slurm = _start_snakemake(runs["slurm"], runs["slurm"] / "batch.yaml",
                             {**slurm_cluster.env, "XDG_CONFIG_HOME": str(home)}, "--profile", "slurm",
                             *SLURM_TEST_ARGS)
    _finish(local, runs["local"])
    _finish(slurm, runs["slurm"])

    log = _snakemake_log(runs["slurm"])
    job_rules = _job_rules(runs["slurm"], log)
    local_jobs = sorted(re.findall(r"^localrule (\w+):", _snakemake_log(runs["local"]), flags=re.M))
    local_jobs.remove("all")
    assert "train" not in local_jobs and local_jobs.count("summarize") == n, local_jobs
    assert sorted(job_rules.values()) == local_jobs, f"submitted to SLURM: {job_rules}\n{log[-3000:]}"
    queue = slurm_cluster.run("squeue", "--states=all", "--noheader", "--format=%i|%P|%T").stdout
    seen = {job: (partition, state) for job, partition, state in (line.split("|") for line in queue.split())}
    for slurm_id, rule in job_rules.items():
        assert seen.get(slurm_id) == (per_rule.get(rule, default_partition), "COMPLETED"), (slurm_id, rule)
    assert any(rule in gpu_rules for rule in job_rules.values()), "no job went to the GPU partition"

    local_outputs, slurm_outputs = _outputs(runs["local"] / "results"), _outputs(runs["slurm"] / "results")
    assert sorted(slurm_outputs) == sorted(local_outputs)
    assert sum(name.endswith("instances.ome.zarr") for name in local_outputs) == n
    for name, local_path in local_outputs.items():
        np.testing.assert_array_equal(_read_array(slurm_outputs[name]), _read_array(local_path), err_msg=name)
    for summary in sorted((runs["local"] / "results").rglob("summary.json")):
        expected = json.loads(summary.read_text())
        got = json.loads((runs["slurm"] / summary.relative_to(runs["local"])).read_text())
        for key in ("objects", "sizes", "cell_fraction", "decisions", "shape", "voxel_size_um"):
            assert got[key] == expected[key], (summary, key)
