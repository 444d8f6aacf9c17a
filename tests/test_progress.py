"""Progress a user sees: a line with an ETA per 30 s in logs, short job commands, options as @FILE."""
from __future__ import annotations

import json
import logging
import re

import pytest

from unet_pipe.progress import INTERVAL_S, ProgressLines, format_seconds, progress_bar


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def progress_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "unet_pipe.progress"]


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (0, 7.4, 65, 3600 + 2 * 60 + 3)] == ["0s", "7s", "1m05s", "1h02m03s"]


def test_a_long_stage_logs_a_line_with_eta_every_30_s_and_none_more_often(caplog) -> None:
    """A fake stage of 100 steps of 4 s each (400 s): one line per >= 30 s, each with its ETA."""
    caplog.set_level(logging.INFO, logger="unet_pipe.progress")
    clock = FakeClock()
    bar = ProgressLines(total=100, desc="train", unit="step", clock=clock)
    assert bar.interval == INTERVAL_S == 30.0
    emitted_at = []
    for step in range(100):
        clock.now += 4.0
        before = len(progress_messages(caplog))
        bar.update(1)
        if len(progress_messages(caplog)) > before:
            emitted_at.append(step + 1)
        bar.set_postfix(loss="0.5000")
    bar.close()
    lines = progress_messages(caplog)
    # 4 s per step: a line after steps 8, 16, ... (32 s since the previous line), never sooner.
    assert emitted_at == list(range(8, 100, 8))
    # The mean rate is 0.25 step/s: after step 8 (32 s) 92 steps remain -> 368 s.
    assert lines[0] == "train: 8/100 steps (8%), 32s elapsed, ETA 6m08s, loss=0.5000"
    assert lines[5] == "train: 48/100 steps (48%), 3m12s elapsed, ETA 3m28s, loss=0.5000"
    # And the final count once at the end.
    assert lines[-1] == "train: 100/100 steps (100%), 6m40s elapsed, done, loss=0.5000"
    assert len(lines) == len(emitted_at) + 1


def test_a_short_stage_logs_nothing_and_a_resumed_one_counts_from_its_start(caplog) -> None:
    caplog.set_level(logging.INFO, logger="unet_pipe.progress")
    clock = FakeClock()
    bar = ProgressLines(total=10, desc="predict", unit="block", clock=clock)
    for _ in range(10):
        clock.now += 2.9  # 29 s in all: under the interval
        bar.update(1)
    bar.close()
    assert progress_messages(caplog) == []
    # 40 of 100 blocks were done before: the ETA uses the rate of this run only (10 blocks in 40 s).
    bar = ProgressLines(total=100, initial=40, desc="predict", unit="block", clock=clock)
    clock.now += 40.0
    bar.update(10)
    assert progress_messages(caplog) == ["predict: 50/100 blocks (50%), 40s elapsed, ETA 3m20s"]


def test_iterating_and_the_interval_from_the_environment(caplog, monkeypatch) -> None:
    caplog.set_level(logging.INFO, logger="unet_pipe.progress")
    monkeypatch.setenv("UNET_PIPE_PROGRESS_SECONDS", "0")
    # Not a terminal (pytest captures stderr): plain lines, not a carriage-return bar.
    bar = progress_bar(range(3), desc="ingest raw.tif", unit="slice")
    assert isinstance(bar, ProgressLines) and list(bar) == [0, 1, 2]
    assert [m.split(",")[0] for m in progress_messages(caplog)] == [
        "ingest raw.tif: 1/3 slices (33%)", "ingest raw.tif: 2/3 slices (67%)", "ingest raw.tif: 3/3 slices (100%)"]
    assert not isinstance(progress_bar(range(3), enabled=False), ProgressLines)
    # A loop that logged a line ends with its final count, without a close() by the caller.
    caplog.clear()
    clock = FakeClock()
    loop = ProgressLines(range(5), desc="weights", unit="slab", interval=30.0, clock=clock)
    for z in loop:
        clock.now += 20.0
    assert progress_messages(caplog) == ["weights: 2/5 slabs (40%), 40s elapsed, ETA 1m00s",
                                         "weights: 4/5 slabs (80%), 1m20s elapsed, ETA 20s",
                                         "weights: 5/5 slabs (100%), 1m40s elapsed, done"]


def test_cli_reads_options_from_an_args_file_and_training_reports_progress(tmp_path, run_cli, caplog, capsys,
                                                                           monkeypatch) -> None:
    """What the train rule runs: ``unet-pipe train @FILE ...``; its log gets progress lines."""
    from test_train import _config

    from unet_pipe.io import StagedImage
    from unet_pipe.synth import synthesize

    monkeypatch.setenv("UNET_PIPE_PROGRESS_SECONDS", "0")
    caplog.set_level(logging.INFO, logger="unet_pipe.progress")
    stack = synthesize((3, 40, 40), seed=1)
    raw, labels = stack.raw, stack.labels
    lines = ["--config-json", json.dumps(_config(steps=2, val_every=2))]
    for key, array in (("raw", raw), ("labels", labels)):
        staged = StagedImage(tmp_path / f"{key} store.ome.zarr", shape=array.shape, dtype=array.dtype,
                             chunks=(1, 40, 40))
        staged.array[:] = array
        staged.commit(pyramid_levels=0)
        lines += [f"--{key}", f"s={tmp_path / f'{key} store.ome.zarr'}"]  # a space: no quoting in the file
    args = tmp_path / "train.args"
    args.write_text("".join(f"{line}\n" for line in lines))
    code, _, err = run_cli("train", f"@{args}", "--out", tmp_path / "m.pt", "--threads", "1")
    assert code == 0, err
    messages = progress_messages(caplog)
    assert re.fullmatch(r"train: 1/2 steps \(50%\), \d+s elapsed, ETA \d+s, loss=\d\.\d{4}", messages[0]), messages
    assert re.fullmatch(r"train: 2/2 steps \(100%\), \d+s elapsed, done, loss=\d\.\d{4}", messages[-1]), messages
    with pytest.raises(SystemExit) as exc:  # a usage error, as argparse reports it: one line, exit 2
        run_cli("train", f"@{tmp_path / 'missing.args'}", "--out", tmp_path / "x.pt")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert err.startswith("unet-pipe: error: [Errno 2] No such file or directory: ") and "missing.args" in err


def test_calibrate_reports_candidates_with_an_eta(caplog, monkeypatch) -> None:
    import numpy as np

    from unet_pipe.calibrate import calibrate_slices

    monkeypatch.setenv("UNET_PIPE_PROGRESS_SECONDS", "0")
    caplog.set_level(logging.INFO, logger="unet_pipe.progress")
    cells = np.zeros((24, 24), bool)
    cells[2:10, 2:10] = cells[12:22, 12:22] = True
    prob = np.where(cells, 0.9, 0.1).astype(np.float32)
    from unet_pipe.metrics import instances_from_binary

    result = calibrate_slices([prob], [cells], [instances_from_binary(cells)], progress=True)
    messages = progress_messages(caplog)
    n = int(re.match(r"calibrate: 1/(\d+) candidates", messages[0])[1])
    assert n == len(result["candidates"]) and messages[-1].startswith(f"calibrate: {n}/{n} candidates (100%)")
    assert "ETA" in messages[0] and messages[-1].endswith("done")


def shell_commands(text: str) -> list[str]:
    """The jobs' shell commands as ``snakemake -n -p`` prints them (one line each)."""
    prefix = "Shell command: unet-pipe "  # rule all has "Shell command: None"
    return [line.removeprefix("Shell command: ") for line in text.splitlines() if line.startswith(prefix)]


def test_every_job_command_of_the_demo_is_short(tmp_path) -> None:
    """The demo config (config/config.yaml): no job command reaches 300 characters; options are @FILE."""
    import yaml
    from test_workflow import REPO, expand_args_files, run_snakemake

    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    proc = run_snakemake(tmp_path, "-n", "-p", config=demo)
    commands = shell_commands(proc.stdout + proc.stderr)
    assert len(commands) == 14, commands
    stages = {c.split()[1] for c in commands}
    assert {"ingest", "weights", "train", "predict", "calibrate", "postprocess", "evaluate", "view"} <= stages
    assert max(len(c) for c in commands) < 300, max(commands, key=len)
    # Every job's output goes to its log and to the console (stderr), which Snakemake shows.
    assert all(c.endswith(">&2") and " 2>&1 | tee results/logs/" in c for c in commands), commands
    # The options a job gets are in its file: the whole train section, as training reads it.
    train = expand_args_files(next(c for c in commands if c.startswith("unet-pipe train ")), tmp_path)
    config_json = json.loads(re.search(r"--config-json '([^']*)'", train)[1])
    assert config_json["train"]["steps"] == demo["train"]["steps"] and "--raw demo=results/demo/raw.ome.zarr" in train
    # The file is named by its content: a changed setting is a changed param (rerun), an unchanged one is not.
    again = shell_commands(run_snakemake(tmp_path, "-n", "-p", config=demo).stdout)
    assert again == commands
    demo["train"]["steps"] += 1
    changed = shell_commands(run_snakemake(tmp_path, "-n", "-p", config=demo).stdout)
    assert [c for c in changed if c.startswith("unet-pipe train ")] != [c for c in commands
                                                                       if c.startswith("unet-pipe train ")]
    assert [c for c in changed if c.startswith("unet-pipe predict ")] == [c for c in commands
                                                                         if c.startswith("unet-pipe predict ")]


@pytest.mark.slow
def test_a_small_run_shows_progress_in_the_console_and_the_logs(tmp_path, monkeypatch) -> None:
    """synth -> ingest -> weights for real, a line per update (interval 0): in each rule's log and on stderr."""
    from test_workflow import run_snakemake, small_config

    monkeypatch.setenv("UNET_PIPE_PROGRESS_SECONDS", "0")  # run_snakemake passes os.environ on
    proc = run_snakemake(tmp_path, "--cores", "1", "results/demo/weights.ome.zarr", config=small_config())
    logs = tmp_path / "results" / "logs"
    ingest = (logs / "ingest" / "demo.raw.log").read_text()
    weights = (logs / "weights" / "demo.log").read_text()
    assert re.search(r"INFO unet_pipe\.progress: ingest raw\.tif: 1/(\d+) (slice|band)s \(\d+%\), \d+s elapsed, ETA \d+s",
                     ingest), ingest
    assert re.search(r"INFO unet_pipe\.progress: weights labels\.ome\.zarr: 4/4 slabs \(100%\), .*done", weights), weights
    assert "\r" not in ingest + weights  # no carriage-return bars in files
    # The console got the same lines (Snakemake shows a local job's stderr).
    assert "unet_pipe.progress: ingest raw.tif: 1/" in proc.stderr


@pytest.mark.slow
def test_a_failed_job_ends_with_its_one_line_error(tmp_path) -> None:
    """With the local profile: the job's error line closes both its live output and the log Snakemake prints."""
    from test_workflow import REPO, run_snakemake, small_config

    run_snakemake(tmp_path, "--cores", "1", "results/synth/demo/raw.tif", config=small_config())
    (tmp_path / "results" / "synth" / "demo" / "raw.tif").write_bytes(b"II*\x00garbage")
    proc = run_snakemake(tmp_path, "--profile", str(REPO / "profiles" / "local"), "--cores", "1",
                         "results/demo/raw.ome.zarr", config=small_config(), check=False)
    error = "unet-pipe: error: results/synth/demo/raw.tif: not a readable TIFF (no image series found)"
    assert proc.returncode != 0
    log = (tmp_path / "results" / "logs" / "ingest" / "demo.raw.log").read_text()
    assert log.splitlines()[-1] == error
    # Snakemake's report (command echoes included) comes first, then the log, whose last line is the error.
    printed = proc.stderr[proc.stderr.index("Logfile results/logs/ingest/demo.raw.log:"):]
    job_part = printed[:printed.index("Shutting down")].strip().splitlines()
    assert job_part[-2] == error and set(job_part[-1]) == {"="}
    assert "Shell command" not in printed and "shell:" not in printed
