"""The README stays true to the code: every `OffloadConfig` field is in its configuration table, and every
`MIXTRAL_OFFLOAD_*` environment variable the code reads is in its table of variables."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from mixtral_offload_plugin import OffloadConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(title)
    end = README.index("\n## ", start + len(title))
    return README[start:end]


def test_every_config_field_is_documented() -> None:
    table = _section("## Configuration (`OffloadConfig`)")
    missing = [f.name for f in dataclasses.fields(OffloadConfig) if f"`{f.name}`" not in table]
    assert missing == []


def test_every_environment_variable_is_documented() -> None:
    used = set()
    for path in [*ROOT.glob("mixtral_offload_plugin/**/*.py"), *ROOT.glob("scripts/*"), *ROOT.glob("tests/**/*.py")]:
        if path.is_file():
            used |= set(re.findall(r"MIXTRAL_OFFLOAD_[A-Z0-9_]*[A-Z0-9]", path.read_text(errors="replace")))
    table = _section("### Environment variables")
    assert sorted(v for v in used if f"`{v}`" not in table) == []
