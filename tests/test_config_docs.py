"""config/README.md documents every key of the schema (generated table kept in sync)."""
from __future__ import annotations

from pathlib import Path

from unet_pipe.config import schema_markdown

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- keys:begin -->", "<!-- keys:end -->"


def test_config_readme_lists_every_key():
    text = (REPO / "config" / "README.md").read_text()
    table = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == schema_markdown().strip(), (
        "config/README.md is out of date: regenerate with\n"
        "  python -c 'from unet_pipe.config import schema_markdown; print(schema_markdown())'"
    )
