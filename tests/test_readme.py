"""README stays true: its configuration reference is the one generated from the config dataclasses."""

from pathlib import Path

from scripts import update_readme_reference

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current():
    text = (ROOT / "README.md").read_text()
    assert update_readme_reference.render(text) == text, (
        "README configuration reference is out of date: run `make reference`"
    )


def test_reference_names_every_section_and_standard_terms():
    text = (ROOT / "README.md").read_text()
    for key in (
        "### `teacher`",
        "### `student`",
        "### `data`",
        "### `masking`",
        "### `loss`",
        "### `train`",
        "`alpha_ce`",
        "`temperature`",
        "`mlm_mask_prop`",
        "`mlm_smoothing`",
        "`keep_last`",
    ):
        assert key in text, key


def test_docs_prepare_the_folders_the_configs_read():
    """Every `--output data/...` a document prepares for a shipped GPU config is that config's data.dir (issue 24
    item 11: docs/data.md prepared data/wiki-books-roberta, configs/distilroberta.json read
    data/wikibooks-roberta-512)."""
    import json
    import re

    dirs = {json.loads(p.read_text())["data"].get("dir") for p in (ROOT / "configs").glob("distil*.json")}
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for out in re.findall(r"--output (data/[\w.-]+)", doc.read_text()):
            if "roberta" in out or "bert" in out:
                assert out in dirs, f"{doc.name}: prepares {out}, which no configs/distil*.json reads ({sorted(dirs)})"


def test_family_table_cells_name_existing_tests():
    """Every cell of README's encoder-family table names a test letter; each letter's test exists (issue 21)."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text.split("## Encoder families", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    legend = {}
    for line in rows:
        m = re.match(r"\| `([A-Z])` \| `(tests/\w+\.py)::(test_\w+)` \|", line)
        if m:
            legend[m[1]] = (m[2], m[3])
    for letter, (path, name) in legend.items():
        assert f"def {name}(" in (ROOT / path).read_text(), f"README family table: {letter} names {path}::{name}"
    table = [line for line in rows if not line.startswith(("| `", "| family", "| letter"))]
    assert len(table) >= 10
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        assert len(cells) == 8, line
        for cell in cells:
            letters = re.findall(r"`([A-Z])`", cell)
            assert letters or cell in ("untested",) or "docs/families.md" in cell, f"no test for {cell!r}: {line}"
            assert set(letters) <= legend.keys(), (cell, sorted(legend))
