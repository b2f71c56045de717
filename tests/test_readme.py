"""README stays true: its configuration reference is the one generated from the config dataclasses."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _updater():
    spec = importlib.util.spec_from_file_location("update_readme_reference",
                                                  ROOT / "scripts" / "update_readme_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_reference_is_current():
    text = (ROOT / "README.md").read_text()
    assert _updater().render(text) == text, "README configuration reference is out of date: run `make reference`"


def test_reference_names_every_section_and_standard_terms():
    text = (ROOT / "README.md").read_text()
    for key in ("### `teacher`", "### `student`", "### `data`", "### `masking`", "### `loss`", "### `train`",
                "`alpha_ce`", "`temperature`", "`mlm_mask_prop`", "`mlm_smoothing`", "`keep_last`"):
        assert key in text, key
