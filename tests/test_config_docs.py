"""config/README.md documents every key of the schema (generated table kept in sync)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from unet_pipe.config import load_schema, schema_markdown
from unet_pipe.model import valid_output_size

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- keys:begin -->", "<!-- keys:end -->"


def test_config_readme_lists_every_key():
    text = (REPO / "config" / "README.md").read_text()
    table = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == schema_markdown().strip(), (
        "config/README.md is out of date: regenerate with\n"
        "  python -c 'from unet_pipe.config import schema_markdown; print(schema_markdown())'"
    )


def test_tile_sizes_in_the_schema_are_valid_for_their_depth():
    """The `train.tile` text's examples "572 (-> 388) for depth 5" are what the network computes,
    and its smallest sizes per depth are the smallest the network accepts."""
    text = " ".join(load_schema()["properties"]["train"]["properties"]["tile"]["description"].split())
    examples = re.findall(r"((?:\d+ \(-> \d+\)(?: or )?)+) for depth (\d)", text)
    assert len(examples) == 3, text
    for pairs, depth in examples:
        for tile, out in re.findall(r"(\d+) \(-> (\d+)\)", pairs):
            assert valid_output_size(int(tile), int(depth)) == int(out), (tile, depth)
    smallest = re.search(r"at least (\d+), (\d+) or (\d+) for depth 3, 4 or 5", text)
    assert smallest, text
    for depth, size in zip((3, 4, 5), smallest.groups()):
        assert valid_output_size(int(size), depth) > 0
        with pytest.raises(ValueError):
            valid_output_size(int(size) - 2 ** (depth - 1), depth)
