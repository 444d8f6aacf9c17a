"""environment.yml (conda, HPC users) and pyproject.toml (pip) list the same packages."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# conda names that differ from PyPI names
CONDA_TO_PYPI = {"pytorch": "torch", "matplotlib-base": "matplotlib", "dask": "dask[array]"}


def _split(requirement: str) -> tuple[str, str]:
    match = re.match(r"^([A-Za-z0-9_.\-\[\]]+)\s*(.*)$", requirement.strip())
    assert match, requirement
    return match.group(1).lower(), match.group(2).replace(" ", "")


def test_environment_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pip = dict(_split(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    conda = {}
    for dep in env["dependencies"]:
        if not isinstance(dep, str):
            continue
        name, spec = _split(dep)
        if name in ("python", "pip"):
            continue
        conda[CONDA_TO_PYPI.get(name, name)] = spec
    assert conda == pip


def test_constraints_pin_cpu_torch():
    pins = dict(
        line.split("==", 1) for line in (REPO / "constraints" / "ci.txt").read_text().splitlines() if "==" in line
    )
    assert pins["torch"] == "2.13.0"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name = _split(requirement)[0].split("[")[0]
        assert name in {k.lower() for k in pins}, f"{name} is not pinned for CI"
