"""Every command block of README.md, docs/*.md and config/README.md is run by a test, or says why it cannot be.

A fenced ``bash``/``sh`` block is preceded (directly, one comment per line) by exactly one of
  ``<!-- run: NAME -->``           run here by RUNNERS[NAME], verbatim but for what the runner says;
  ``<!-- run-by: tests/F.py::T -->``  run by test T of another module (which reads that document);
  ``<!-- not-run: REASON -->``     cannot run in the test suite (SLURM, a display, ...).
The blocks run in a temporary folder laid out as the repository root (links to the Snakefile,
workflow, profiles and config), with the data placed where each block expects it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from unet_pipe.io import open_image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "config" / "README.md"]
SHELLS = {"bash", "sh", "shell"}
MARKER = re.compile(r"<!--\s*(run|run-by|not-run):\s*(.*?)\s*-->")
OWN_STACK_SHAPE = (6, 128, 128)  # 6 labelled slices: the automatic split is 0-4 / 4-5 / 5-6


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    text: str
    markers: tuple[tuple[str, str], ...]  # (kind, argument) of the comments right above the fence

    def __str__(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def command_blocks(doc: Path) -> list[Block]:
    """The fenced shell blocks of a Markdown file, with the marker comments directly above each."""
    lines = doc.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = re.match(r"^```(\S*)", lines[i])
        if not match:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if match.group(1) in SHELLS:
            markers, k = [], i - 1
            while k >= 0 and lines[k].startswith("<!--"):
                markers.extend(MARKER.findall(lines[k]))
                k -= 1
            blocks.append(Block(doc, i + 1, "\n".join(lines[i + 1 : end]) + "\n", tuple(markers)))
        i = end + 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for doc in DOCUMENTS for block in command_blocks(doc)]


def block_named(name: str) -> Block:
    (block,) = [b for b in all_blocks() if ("run", name) in [(k, a.split()[0]) for k, a in b.markers]]
    return block


def run_block(text: str, cwd: Path, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(cwd)}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return proc


def repo_root_like(path: Path) -> Path:
    """A folder where the blocks' relative paths work as in the repository root."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "workflow", "profiles", "config", "Makefile", "pyproject.toml", "constraints"):
        (path / name).symlink_to(REPO / name)
    return path


# ------------------------------------------------------------------ the runners


def run_quickstart_and_demo_tiff(tmp_path: Path) -> None:
    """`make demo` as typed, with this test's environment as .venv (so nothing is installed);
    `make test` as a dry run (`make -n test`): it is this very suite. Then the Fiji block."""
    root = repo_root_like(tmp_path / "repo")
    (root / ".venv").mkdir()
    (root / ".venv" / "bin").symlink_to(BIN)
    (root / ".venv" / ".installed").touch()  # newer than pyproject.toml and constraints/ci.txt
    quickstart = block_named("quickstart").text
    assert "\nmake test " in quickstart
    proc = run_block(quickstart.replace("\nmake test ", "\nmake -n test "), root)
    assert "python -m pytest" in proc.stdout  # what `make test` would run
    metrics = json.loads((root / "results" / "demo" / "metrics.json").read_text())
    val = [s for s in metrics["per_slice"] if s["subset"] == "val"]
    assert val and all(0 <= s["pixel_error"] < 0.1 for s in val)  # the README quotes 0.019
    assert (root / "results" / "report" / "report.md").is_file()
    assert (root / "results" / "demo" / "view.ome.zarr").is_dir()
    again = run_block("make demo", root)
    assert "Nothing to be done" in again.stdout + again.stderr  # "A second `make demo` does nothing"

    run_block(block_named("demo-tiff").text, root)
    instances = np.asarray(open_image(root / "results" / "demo" / "instances.ome.zarr")[:])
    np.testing.assert_array_equal(tifffile.imread(root / "results" / "demo" / "instances.tif"), instances)
    assert len(np.unique(instances)) > 10


def own_stack(tmp_path: Path) -> tuple[Path, str]:
    """The README's "own stack" block with /data/em/ pointed at a small synthetic TIFF stack + labels."""
    from unet_pipe.synth import synthesize

    root = repo_root_like(tmp_path / "repo")
    stack = synthesize(OWN_STACK_SHAPE, seed=5)
    (tmp_path / "em").mkdir()
    tifffile.imwrite(tmp_path / "em" / "stack.tif", stack.raw, photometric="minisblack")
    tifffile.imwrite(tmp_path / "em" / "labels.tif", stack.labels, photometric="minisblack")
    text = block_named("own-stack").text
    assert text.count("/data/em/") == 2
    return root, text.replace("/data/em/", f"{tmp_path}/em/")


def run_own_stack(tmp_path: Path) -> None:
    """The whole block, with one more overlay that cuts the preset's 6000 training steps to 4."""
    root, text = own_stack(tmp_path)
    (root / "short.yaml").write_text(yaml.safe_dump({"train": {"steps": 4, "val_every": 2, "checkpoint_every": 2}}))
    assert text.count("mine.yaml --profile") == 1
    proc = run_block(text.replace("mine.yaml --profile", "mine.yaml short.yaml --profile"), root)
    assert "dataset 'mystack' split automatically: train [0, 4], calibrate [4, 5], val [5, 6]" in proc.stderr
    results = root / "results" / "mine"
    assert json.loads((results / "model" / "decisions.json").read_text())["slices"] == {"mystack": [4, 5]}
    metrics = json.loads((results / "mystack" / "metrics.json").read_text())
    assert metrics["params"]["train_slices"] == [0, 4] and metrics["params"]["val_slices"] == [5, 6]
    assert open_image(results / "mystack" / "instances.ome.zarr").shape == OWN_STACK_SHAPE
    assert (results / "report" / "report.md").is_file() and (results / "model" / "model.pt").is_file()
    assert (results / "mystack" / "view.ome.zarr").is_dir()


RUNNERS = {"quickstart": run_quickstart_and_demo_tiff, "demo-tiff": run_quickstart_and_demo_tiff,
           "own-stack": run_own_stack}  # fmt: skip


# ------------------------------------------------------------------ the tests


def test_every_command_block_is_run_or_marked() -> None:
    blocks = all_blocks()
    assert len(blocks) >= 7, [str(b) for b in blocks]  # the parser found the blocks
    used = set()
    for block in blocks:
        assert len(block.markers) == 1, f"{block}: needs exactly one <!-- run: / run-by: / not-run: --> marker"
        kind, argument = block.markers[0]
        if kind == "run":
            name = argument.split()[0]
            assert name in RUNNERS, f"{block}: no runner {name!r} in tests/test_docs_commands.py"
            assert name not in used, f"{block}: runner {name!r} used twice"
            used.add(name)
        elif kind == "run-by":
            path, _, test = argument.split()[0].partition("::")
            source = (REPO / path).read_text()
            assert re.search(rf"^def {re.escape(test)}\(", source, re.M), f"{block}: {path} has no test {test}"
            assert block.doc.name in source, f"{block}: {path} does not read {block.doc.name}"
        else:
            assert len(argument) >= 10, f"{block}: say why it cannot run"
    assert used == set(RUNNERS), f"runners without a block: {set(RUNNERS) - used}"


def test_every_command_block_is_valid_bash() -> None:
    for block in all_blocks():
        proc = subprocess.run(["bash", "-n", "-c", block.text], capture_output=True, text=True)
        assert proc.returncode == 0, f"{block}: {proc.stderr}"


def test_a_marker_counts_only_directly_above_its_block(tmp_path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("<!-- not-run: a reason long enough -->\n\n```bash\necho a\n```\n"
                   "<!-- run: a -->\n```sh\necho b\n```\n")
    first, second = command_blocks(doc)  # a blank line separates the first marker from its block
    assert (first.markers, first.text) == ((), "echo a\n")
    assert (second.markers, second.line, second.text) == ((("run", "a"),), 7, "echo b\n")


def test_front_page_is_short_and_links_resolve() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for doc in sorted((REPO / "docs").glob("*.md")):
        assert f"](docs/{doc.name})" in readme, f"README does not link docs/{doc.name}"
    for doc in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)}: broken link {target}"


def test_own_stack_block_config_is_checked(tmp_path) -> None:
    """Fast part of the "own stack" block: everything but the workflow run (`snakemake` made a no-op)."""
    root, text = own_stack(tmp_path)
    assert text.count("\nsnakemake ") == 1
    proc = run_block(text.replace("\nsnakemake ", "\n: snakemake "), root)
    assert "dataset 'mystack' split automatically: train [0, 4], calibrate [4, 5], val [5, 6]" in proc.stderr
    mine = yaml.safe_load((root / "mine.yaml").read_text())
    assert mine["datasets"]["mystack"]["raw"] == f"{tmp_path}/em/stack.tif"


@pytest.mark.slow  # the demo (about 80 s on 2 cores) and the Fiji conversion of its instances
def test_quickstart_and_demo_tiff_blocks_run(tmp_path) -> None:
    run_quickstart_and_demo_tiff(tmp_path)


@pytest.mark.slow  # the ISBI CPU preset end to end on 6 × 128² slices, 4 training steps
def test_own_stack_block_runs(tmp_path) -> None:
    run_own_stack(tmp_path)
