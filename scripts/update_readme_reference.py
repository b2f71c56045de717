#!/usr/bin/env python
"""Regenerate the configuration reference in README.md from the config dataclasses (``make reference``).

The block between ``<!-- config-reference:start -->`` and ``<!-- config-reference:end -->`` is replaced by
``pretrain.config.reference_markdown()``; ``--check`` exits 1 when the README is out of date instead of writing.

Run it as ``python scripts/update_readme_reference.py`` or ``python -m scripts.update_readme_reference`` (from the
repository root); it needs the package installed (``make setup``). Tests import it: ``from scripts import
update_readme_reference``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from data_prep.files import atomic_write_text

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def render(text: str) -> str:
    """README text with the reference block regenerated. Raises ValueError when the markers are missing."""
    from pretrain.config import reference_markdown

    if START not in text or END not in text:
        raise ValueError(f"{README}: markers {START} / {END} not found")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{reference_markdown().strip()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    text = README.read_text()
    new = render(text)
    if "--check" in argv:
        if new != text:
            print(f"{README} configuration reference is out of date: run `make reference`", file=sys.stderr)
            return 1
        return 0
    if new != text:
        atomic_write_text(README, new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
