"""The algorithm notes live in the repository: every "§N" cited in the library, its docs, tools and
benches is a section of docs/algorithm.md, and nothing points outside the clone (``../shared``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTES = ROOT / "docs" / "algorithm.md"
TEXT = (".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".html", ".js")
CITE = re.compile(r"§\s?(\d+(?:\.\d+)?[a-z]?)")


def text_files(*names: str) -> list[Path]:
    out = []
    for name in names:
        p = ROOT / name
        files = [p] if p.is_file() else sorted(p.rglob("*"))
        out += [f for f in files if f.is_file() and f.suffix in TEXT]
    return out


def sections() -> set[str]:
    """Section numbers of the notes: headings ``## 5.`` / ``### 5.2 ...`` / ``#### 5.5a ...``."""
    return set(re.findall(r"^#+ (\d+(?:\.\d+)?[a-z]?)[. ]", NOTES.read_text(), re.M))


def test_the_notes_have_the_cited_sections():
    have = sections()
    assert {"0", "1.2", "2.1", "3", "4", "5.2", "5.5a", "5.5b", "6", "7.6"} <= have


@pytest.mark.parametrize("where", ["dmax_jax", "docs", "README.md", "tools", "bench", "configs"])
def test_every_cited_section_exists(where):
    have, missing = sections(), []
    for f in text_files(where):
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for sec in CITE.findall(line):
                if sec.rstrip(".") not in have:
                    missing.append(f"{f.relative_to(ROOT)}:{n}: §{sec}")
    assert not missing, "citations without a section in docs/algorithm.md:\n" + "\n".join(missing)


@pytest.mark.parametrize("where", ["dmax_jax", "docs", "README.md", "tools", "bench"])
def test_nothing_points_outside_the_clone(where):
    bad = [f"{f.relative_to(ROOT)}:{n}" for f in text_files(where)
           for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
           if "shared/" in line or "dmax_spec" in line]
    assert not bad, "references to ../shared (not in a clone): " + ", ".join(bad)
