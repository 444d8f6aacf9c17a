"""Issue 20, classes 1, 6 and 8: plain files of the user's are never replaced, a kill at any
moment of publishing is completed by the rerun, and error lines name the user's store."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unet_pipe.atomic import atomic_output, check_ours, is_ours, open_append, record_path, write_json_atomic
from unet_pipe.errors import InputError, OutputError

USER_BYTES = b"the user's own file\n"


def _one_line_refusal(code: int, err: str, path: Path) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("unet-pipe: error: ") and str(path) in lines[0]
    assert "not written by unet-pipe" in lines[0]


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file's bytes but our ownership records (they hold mtimes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".unet-pipe" not in p.relative_to(folder).parts}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A synthetic stack (4 x 64 x 64), its raw and label stores and a metrics file."""
    from unet_pipe.cli import main

    root = tmp_path_factory.mktemp("small")
    assert main(["synth", f"{root}/syn", "--shape", "4", "64", "64"]) == 0
    assert main(["ingest", f"{root}/syn/raw.tif", f"{root}/raw.ome.zarr"]) == 0
    assert main(["ingest", f"{root}/syn/labels.tif", f"{root}/labels.ome.zarr", "--labels",
                 "--like", f"{root}/raw.ome.zarr"]) == 0
    # Absolute paths: the metrics file records them, and the report's figures read them.
    assert main(["evaluate", "--prediction", f"{root}/labels.ome.zarr", "--truth", f"{root}/labels.ome.zarr",
                 "--raw", f"{root}/raw.ome.zarr", "--out", f"{root}/eval/m.json"]) == 0
    return root


# ---------------------------------------------------------------- class 1: the one writer


def test_atomic_output_refuses_a_users_file_and_replaces_its_own(tmp_path):
    target = tmp_path / "out.json"
    target.write_bytes(USER_BYTES)
    with pytest.raises(OutputError, match="was not written by unet-pipe"):
        write_json_atomic(target, {"a": 1})
    assert target.read_bytes() == USER_BYTES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary file, no record

    target.unlink()
    write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    write_json_atomic(target, {"a": 2})  # ours: replaced
    assert json.loads(target.read_text()) == {"a": 2}
    assert json.loads(record_path(target).read_text())["accept"][0]["size"] == target.stat().st_size

    target.write_text('{"a": 3}\n')  # edited by the user since: theirs now
    with pytest.raises(OutputError, match="was not written by unet-pipe"):
        write_json_atomic(target, {"a": 4})
    assert target.read_text() == '{"a": 3}\n'


def test_a_kill_between_record_and_rename_leaves_files_we_recognise(tmp_path, monkeypatch):
    target = tmp_path / "t.txt"
    with atomic_output(target) as tmp:
        tmp.write_text("old")
    real_replace = os.replace

    def killed_at_rename(src, dst, *a, **k):
        if Path(dst) == target:
            raise KeyboardInterrupt  # stands for a kill right before the rename
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", killed_at_rename)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target) as tmp:
            tmp.write_text("new!")
    monkeypatch.undo()
    assert target.read_text() == "old" and is_ours(target)
    # The record accepts the old and the new file while the rename is pending.
    assert len(json.loads(record_path(target).read_text())["accept"]) == 2
    with atomic_output(target) as tmp:
        tmp.write_text("new!")
    assert target.read_text() == "new!" and len(json.loads(record_path(target).read_text())["accept"]) == 1


def test_an_appended_log_stays_ours_and_a_changed_prefix_does_not(tmp_path):
    log = tmp_path / "train.csv"
    with atomic_output(log) as tmp:
        tmp.write_text("step,loss\n")
    with open_append(log) as fh:
        fh.write("1,0.5\n")
    assert is_ours(log)
    check_ours(log)
    log.write_text("STEP,loss\n1,0.5\n")  # the part we wrote was changed
    assert not is_ours(log)


@pytest.mark.parametrize("name", ["raw.tif", "labels.tif", "instances.tif"])
def test_synth_refuses_a_users_file_of_each_name(tmp_path, run_cli, name):
    out = tmp_path / "syn"
    out.mkdir()
    (out / name).write_bytes(USER_BYTES)
    code, _, err = run_cli("synth", out, "--shape", 2, 32, 32)
    _one_line_refusal(code, err, out / name)
    assert (out / name).read_bytes() == USER_BYTES
    assert sorted(p.name for p in out.iterdir()) == [name]  # refused before anything was written


def test_synth_rerun_over_its_own_outputs_is_bit_identical(tmp_path, run_cli):
    out = tmp_path / "syn"
    assert run_cli("synth", out, "--shape", 2, 32, 32)[0] == 0
    first = _tree(out)
    assert run_cli("synth", out, "--shape", 2, 32, 32)[0] == 0
    assert _tree(out) == first
    assert {"raw.tif", "labels.tif", "instances.tif"} <= set(first)


@pytest.mark.parametrize("user_file", ["m.json", "m.csv"])
def test_evaluate_refuses_a_users_json_or_companion_csv(small, tmp_path, run_cli, user_file):
    (tmp_path / user_file).write_bytes(USER_BYTES)
    code, _, err = run_cli("evaluate", "--prediction", small / "labels.ome.zarr", "--truth",
                           small / "labels.ome.zarr", "--out", tmp_path / "m.json")
    _one_line_refusal(code, err, tmp_path / user_file)
    assert (tmp_path / user_file).read_bytes() == USER_BYTES
    assert sorted(p.name for p in tmp_path.iterdir()) == [user_file]


def test_evaluate_rerun_over_its_own_outputs(small, tmp_path, run_cli):
    args = ("evaluate", "--prediction", small / "labels.ome.zarr", "--truth", small / "labels.ome.zarr",
            "--out", tmp_path / "m.json")
    assert run_cli(*args)[0] == 0
    csv_first = (tmp_path / "m.csv").read_bytes()
    first = json.loads((tmp_path / "m.json").read_text())
    assert run_cli(*args)[0] == 0
    assert (tmp_path / "m.csv").read_bytes() == csv_first
    again = json.loads((tmp_path / "m.json").read_text())
    first["provenance"].pop("created", None), again["provenance"].pop("created", None)
    assert again == first and first["summary"]["all"]["iou"] == 1.0  # the truth's cells scored against themselves


def test_tiff_export_refuses_a_users_tif(small, tmp_path, run_cli):
    dest = tmp_path / "t.tif"
    dest.write_bytes(USER_BYTES)
    code, _, err = run_cli("tiff", "--overwrite", small / "labels.ome.zarr", dest)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(dest) in err
    assert dest.read_bytes() == USER_BYTES


def test_tiff_export_rerun_over_its_own_output_is_bit_identical(small, tmp_path, run_cli):
    dest = tmp_path / "t.tif"
    assert run_cli("tiff", small / "labels.ome.zarr", dest)[0] == 0
    first = dest.read_bytes()
    assert run_cli("tiff", "--overwrite", small / "labels.ome.zarr", dest)[0] == 0
    assert dest.read_bytes() == first


def test_calibrate_refuses_a_users_decisions_file_before_the_work(tmp_path):
    from unet_pipe.calibrate import calibrate

    out = tmp_path / "decisions.json"
    out.write_bytes(USER_BYTES)
    with pytest.raises(OutputError, match="not written by unet-pipe") as info:
        calibrate({"d": {"probabilities": tmp_path / "missing.ome.zarr"}}, out)  # the inputs are never read
    assert info.value.path == str(out) and out.read_bytes() == USER_BYTES


@pytest.mark.parametrize("user_file", ["r.md", "r_figures"])
def test_report_refuses_a_users_markdown_or_figure_folder_and_leaves_no_partial(small, tmp_path, run_cli,
                                                                                   user_file):
    user = tmp_path / user_file
    if user_file.endswith(".md"):
        user.write_bytes(USER_BYTES)
    else:
        user.mkdir()
        (user / "mine.png").write_bytes(USER_BYTES)
    before = _tree(tmp_path)
    code, _, err = run_cli("report", "--metrics", small / "eval" / "m.json", "--out", tmp_path / "r.md",
                           "--figures", 1)
    _one_line_refusal(code, err, user)
    assert _tree(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [user_file]


def test_refused_report_input_leaves_no_partial(small, tmp_path, run_cli):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    code, _, err = run_cli("report", "--metrics", small / "eval" / "m.json", bad, "--out", tmp_path / "out" / "r.md")
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(bad) in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_refused_summary_report_leaves_no_partial(tmp_path, run_cli):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    code, _, err = run_cli("report", "--summaries", bad, "--out", tmp_path / "out" / "s.md")
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(bad) in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_report_rerun_is_bit_identical_and_leaves_nothing_of_ours_in_the_figures(small, tmp_path, run_cli):
    args = ("report", "--metrics", small / "eval" / "m.json", "--out", tmp_path / "r.md", "--figures", 1)
    assert run_cli(*args)[0] == 0
    first = _tree(tmp_path)
    assert run_cli(*args)[0] == 0
    assert _tree(tmp_path) == first
    figures = sorted(p.name for p in (tmp_path / "r_figures").iterdir())
    assert figures and all(name.endswith(".png") for name in figures)  # no staging marker, no record
    assert sorted(p.name for p in tmp_path.iterdir()) == [".unet-pipe", "r.md", "r_figures"]


def test_train_refuses_a_users_log_before_any_step(tmp_path):
    from unet_pipe.train import _check_outputs

    log = tmp_path / "train.csv"
    log.write_bytes(USER_BYTES)
    with pytest.raises(OutputError, match="not written by unet-pipe") as info:
        _check_outputs(tmp_path / "model.pt", tmp_path / "model.pt.partial", log)
    assert info.value.path == str(log) and log.read_bytes() == USER_BYTES


def test_checkpoint_never_replaces_a_users_file(tmp_path):
    from unet_pipe.model import UNet, load_checkpoint, save_checkpoint

    model = UNet(depth=2, base_channels=2)
    path = tmp_path / "model.pt"
    path.write_bytes(USER_BYTES)
    with pytest.raises(OutputError, match="not written by unet-pipe"):
        save_checkpoint(path, model)
    assert path.read_bytes() == USER_BYTES
    path.unlink()
    save_checkpoint(path, model, step=1)
    save_checkpoint(path, model, step=2)  # ours: replaced
    assert load_checkpoint(path)["step"] == 2


# ---------------------------------------------------------------- class 6: kills mid-publish

_HARNESS = r'''
import json, os, shutil, sys
from pathlib import Path

spec = json.loads(Path(sys.argv[1]).read_text())
os.chdir(spec["cwd"])
import unet_pipe.atomic as atomic
from unet_pipe.cli import main

if spec["no_exchange"]:
    atomic._RENAMEAT2 = None  # as on a system without renameat2: the two-rename fallback

def reset():
    for name in os.listdir("."):
        if name not in spec["keep"]:
            p = Path(name)
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for src, dst in spec["copy"]:
        shutil.copytree(src, dst, symlinks=True)

def normalised(path):
    data = path.read_bytes()
    if path.name in (".zattrs", "zarr.json", ".json") or path.suffix == ".json":
        try:
            obj = json.loads(data)
        except ValueError:
            return data.decode("latin-1")
        def drop(o):
            if isinstance(o, dict):
                return {k: drop(v) for k, v in o.items() if k not in ("created", "command", "mtime_ns")}
            if isinstance(o, list):
                return [drop(v) for v in o]
            return o
        return json.dumps(drop(obj), sort_keys=True)
    if path.suffix == ".md":
        return data.decode()
    return data.hex()

def snapshot():
    files = {}
    for p in sorted(Path(".").rglob("*")):
        top = p.parts[0]
        if top in spec["keep"] or p.is_dir():
            continue
        files[str(p)] = normalised(p)
    return files

def run(kill_at, args=None):
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        if kill_at:
            count = [0]
            def hit():
                count[0] += 1
                if count[0] == kill_at:
                    os._exit(77)  # 'killed'
            def wrap(f):
                def g(*a, **k):
                    hit()
                    return f(*a, **k)
                return g
            for name in ("replace", "rename", "unlink", "rmdir"):
                setattr(os, name, wrap(getattr(os, name)))
            if atomic._RENAMEAT2 is not None:
                atomic._RENAMEAT2 = wrap(atomic._RENAMEAT2)
        try:
            code = main(args or spec["args"])
        except BaseException:
            os._exit(3)
        os._exit(100 + code if kill_at else code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

def prepared():
    reset()
    if spec["prepare"]:
        assert run(0, spec["prepare"]) == 0

prepared()
assert run(0) == 0
reference = snapshot()
failures, points = [], 0
for n in range(1, spec["max_points"] + 1):
    prepared()
    code = run(n)
    if code != 77:  # the run ended before its n-th change: every moment was tried
        break
    points += 1
    rerun = run(0)
    got = snapshot()
    if rerun not in (0, 2) or got != reference:
        diff = sorted(set(got) ^ set(reference)) or [k for k in got if got[k] != reference[k]]
        failures.append({"kill_at": n, "killed": code, "rerun": rerun, "differ": diff[:5]})
print(json.dumps({"points": points, "failures": failures}))
'''


def _kill_everywhere(tmp_path: Path, cwd: Path, args: list, copy: list, keep: list, prepare: list | None = None,
                     max_points: int = 400, no_exchange: bool = False) -> dict:
    """Run ``args`` in ``cwd`` killed (``os._exit``) at its 1st, 2nd, ... file-system change (rename,
    exchange, unlink, rmdir), rerun it each time and compare with an uninterrupted run.  Before
    each run, everything in ``cwd`` but ``keep`` is removed, ``copy`` pairs copied in and
    ``prepare`` (a command) run.  Forked children: the imports are paid once."""
    spec = {"cwd": str(cwd), "args": [str(a) for a in args], "copy": copy, "keep": keep, "max_points": max_points,
            "prepare": [str(a) for a in prepare] if prepare else None, "no_exchange": no_exchange}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "harness.py").write_text(_HARNESS)
    done = subprocess.run([sys.executable, tmp_path / "harness.py", tmp_path / "spec.json"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _work(tmp_path: Path, small: Path) -> Path:
    cwd = tmp_path / "work"
    cwd.mkdir()
    for name in ("syn", "raw.ome.zarr", "labels.ome.zarr", "eval"):
        os.symlink(small / name, cwd / name)
    return cwd


@pytest.mark.slow
def test_kill_at_every_step_of_a_store_publish_is_completed_by_the_rerun(small, tmp_path):
    cwd = _work(tmp_path, small)
    result = _kill_everywhere(tmp_path, cwd, ["ingest", "syn/raw.tif", "new.ome.zarr"], [],
                              ["syn", "raw.ome.zarr", "labels.ome.zarr", "eval"])
    assert result["points"] > 10 and result["failures"] == [], json.dumps(result["failures"], indent=1)


@pytest.mark.slow
@pytest.mark.parametrize("no_exchange", [False, True], ids=["renameat2", "two-renames"])
def test_kill_at_every_step_of_an_overwrite_swap_is_completed_by_the_rerun(small, tmp_path, no_exchange):
    cwd = _work(tmp_path, small)
    # The old store differs from the new one (labels, not raw): a mix of both would show.
    result = _kill_everywhere(tmp_path, cwd, ["ingest", "syn/raw.tif", "dest.ome.zarr", "--overwrite"],
                              [[str(small / "labels.ome.zarr"), "dest.ome.zarr"]],
                              ["syn", "raw.ome.zarr", "labels.ome.zarr", "eval"], no_exchange=no_exchange)
    assert result["points"] > 10 and result["failures"] == [], json.dumps(result["failures"], indent=1)


@pytest.mark.slow
@pytest.mark.parametrize("no_exchange", [False, True], ids=["renameat2", "two-renames"])
def test_kill_at_every_step_of_a_report_publish_is_completed_by_the_rerun(small, tmp_path, no_exchange):
    cwd = _work(tmp_path, small)
    # An earlier report of ours (other figures: none) is there first: its figure folder is swapped.
    result = _kill_everywhere(tmp_path, cwd, ["report", "--metrics", "eval/m.json", "--out", "r.md", "--figures", "1"],
                              [],
                              ["syn", "raw.ome.zarr", "labels.ome.zarr", "eval"],
                              prepare=["report", "--metrics", "eval/m.json", "--out", "r.md", "--figures", "0",
                                       "--title", "old"], no_exchange=no_exchange)
    assert result["points"] > 3 and result["failures"] == [], json.dumps(result["failures"], indent=1)


def test_staging_store_without_marker_is_still_ours(small, tmp_path, run_cli):
    """The moment between removing the marker and the rename (or an old store exchanged to
    DEST.partial): the rerun removes it, never calls it foreign."""
    import shutil

    staging = tmp_path / "a.ome.zarr.partial"
    shutil.copytree(small / "raw.ome.zarr", staging)  # a complete store of ours, no marker
    assert run_cli("ingest", small / "syn" / "raw.tif", tmp_path / "a.ome.zarr")[0] == 0
    assert not staging.exists()
    assert not (tmp_path / "a.ome.zarr" / ".unet-pipe-staging").exists()


def test_old_store_of_an_interrupted_two_rename_swap_is_recovered(small, tmp_path, run_cli, monkeypatch):
    """Where renameat2 is missing: a kill between the renames leaves DEST.unet-pipe-old; the rerun
    puts it back (DEST is never lost) and then replaces it as asked."""
    import shutil

    import unet_pipe.safety as safety

    dest = tmp_path / "d.ome.zarr"
    shutil.copytree(small / "labels.ome.zarr", tmp_path / "d.ome.zarr.unet-pipe-old")  # dest itself is gone
    monkeypatch.setattr(safety, "exchange", lambda a, b: False)
    code, _, err = run_cli("ingest", small / "syn" / "raw.tif", dest)
    assert code == 2 and "already exists" in err  # the old store is back in place: not overwritten unasked
    assert _tree(dest) == _tree(small / "labels.ome.zarr")
    assert run_cli("ingest", small / "syn" / "raw.tif", dest, "--overwrite")[0] == 0
    assert not (tmp_path / "d.ome.zarr.unet-pipe-old").exists()
    from unet_pipe.io import open_image

    assert np.array_equal(np.asarray(open_image(dest)), np.asarray(open_image(small / "raw.ome.zarr")))


# ---------------------------------------------------------------- class 8: the user's path on the line


def test_error_on_a_store_names_the_store_not_its_array(small, tmp_path):
    """Training data with no contrast: the line named zarr's array path ``0``, not the store."""
    import shutil

    import zarr

    from unet_pipe.sampling import volumes_from_config
    from unet_pipe.io import open_image

    flat = tmp_path / "flat.ome.zarr"
    shutil.copytree(small / "raw.ome.zarr", flat)
    zarr.open_array(str(flat / "0"), mode="r+")[:] = 7
    assert open_image(flat).path == flat
    config = {"train": {"datasets": {"d": {"train": [0, 4]}}}, "datasets": {}}
    stores = {"d": {"raw": open_image(flat), "labels": open_image(small / "labels.ome.zarr")}}
    with pytest.raises(InputError, match="no contrast") as info:
        volumes_from_config(config, stores)
    assert info.value.path == str(flat)


def test_a_level_that_is_a_group_is_one_line(small, tmp_path, run_cli):
    import shutil

    bad = tmp_path / "b.ome.zarr"
    shutil.copytree(small / "raw.ome.zarr", bad)
    (bad / "0" / ".zarray").unlink()
    (bad / "0" / ".zgroup").write_text('{"zarr_format": 2}')
    code, _, err = run_cli("info", bad)
    assert code == 2 and err.strip() == f"unet-pipe: error: {bad}: multiscales dataset '0' is a group, not an array"
