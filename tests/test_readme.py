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
