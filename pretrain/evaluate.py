"""Held-out evaluation of a distilled student against its teacher and its initialisation, and the run report.

    python -m pretrain.evaluate --student RUN/student --teacher TEACHER --data SHARDS --output DIR
        [--student-init RUN/student_init] [--split valid] [--metrics RUN/metrics.jsonl]

For the teacher, the student at initialisation (before distillation) and the distilled student it measures:

- size and speed: encoder parameters; inference throughput (tokens/s, median and min-max of the timed repeats) of the
  encoder on one fixed batch shape, and the speed-up over the teacher;
- sentence embeddings, sentence-transformers convention (Reimers & Gurevych, 2019): the last hidden state pooled over
  non-pad tokens (mean pooling, unless the teacher's ``modules.json`` / ``1_Pooling`` config says CLS or max); the
  cosine to the teacher's embedding of the same text; and recall@1 of a retrieval task made from the held-out
  documents: each document is cut into two halves by tokens and the first half must find its own second half among
  all second halves by cosine;
- where the teacher has an MLM head: MLM loss / perplexity / accuracy on masked held-out tokens, KL(teacher || model)
  at temperature 1 and top-1 agreement with the teacher on the same positions (the DistilBERT recipe's objectives,
  Sanh et al., 2019, measured on held-out data). The same masked batches go through every model.

It writes ``report.json``, ``report.md`` and ``loss_curves.png`` (from the run's ``metrics.jsonl``) into ``--output``,
each atomically; an existing ``report.json`` is kept as ``report.prev.json`` (and said so) before the new one lands.
Library use: ``evaluate(...)`` returns the report dict (the demo calls it or the command line).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data_prep.cli import HelpFormatter, prog, progress_bar
from data_prep.embedded import resolve_model
from data_prep.errors import DataPrepError, DistillError
from data_prep.files import atomic_write_bytes, atomic_write_text
from pretrain.card import refresh_from_report
from pretrain.data import open_split
from pretrain.families import attn_implementation, model_class
from pretrain.losses import mean_pool
from pretrain.masking import Masker, MaskingConfig
from pretrain.report import plot_loss_curves, render_markdown, training_provenance
from pretrain.schema import ConfigError
from pretrain.student import mlm_head
from pretrain.tasks.examples import Examples, collate, sorted_batches
from pretrain.tasks.predict import run_batches
from pretrain.teacher import describe_differences, has_mlm_head, tokenizer_differences
from pretrain.validate import IGNORE, mlm_summary, mlm_sums

log = logging.getLogger("pretrain.evaluate")

# The MLM evaluation's default masking: BERT's 15% and 80/10/10 (token_counts=None below: uniform selection). Not the
# run's masking section: the demo configs train with 0/100/0 mask/keep/random (DistilBERT-style "keep"), under which
# every selected token stays visible and the MLM metrics would measure copying; ``evaluate(masking=...)`` overrides.
MASKING = MaskingConfig()


class EvalError(DistillError, RuntimeError):
    """A user-facing evaluation error: names the flag, path or value that is wrong and what to do."""

    exit_code = 2


# ----------------------------------------------------------------------------------------------------------- models
@dataclasses.dataclass
class Model:
    """One model under evaluation.

    ``encoder`` maps ``input_ids`` / ``attention_mask`` ([batch, seq] int64) to ``last_hidden_state`` ([batch, seq,
    hidden]); ``head`` maps gathered hidden states [n, hidden] to MLM logits [n, vocab] (None: no MLM head).
    """

    name: str
    path: str
    config: Any
    model: torch.nn.Module
    encoder: torch.nn.Module
    head: Callable[[torch.Tensor], torch.Tensor] | None

    @property
    def params(self) -> int:
        """Parameters of the encoder (embeddings + transformer layers; pooler and LM head excluded), as counted for
        DistilBERT's 66M vs BERT-base's 110M."""
        return sum(p.numel() for n, p in self.encoder.named_parameters() if not n.startswith("pooler."))


def _resolve(flag: str, name_or_path: str) -> str:
    """Resolve ``embedded:NAME`` and check a local model directory; hub names pass through unchanged."""
    try:
        resolved = resolve_model(str(name_or_path))
    except DataPrepError as e:
        raise EvalError(f"{flag} {name_or_path}: {e}") from e
    path = Path(resolved).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise EvalError(
                f"{flag} {name_or_path}: {path} has no config.json; give a Hugging Face model directory "
                "(the trainer exports RUN/student and RUN/student_init)"
            )
        return str(path)
    if resolved.startswith(("/", ".", "~")) or resolved.count("/") > 1:
        raise EvalError(
            f"{flag} {name_or_path}: no such directory; give a Hugging Face model directory "
            "(the trainer exports RUN/student and RUN/student_init) or a hub model name"
        )
    return resolved  # a hub name such as roberta-base


def _load_config(flag: str, path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise EvalError(
            f"{flag} {path}: cannot read the model config ({e}); give a Hugging Face model directory "
            "or a hub model name"
        ) from e


def load_model(name: str, path: str, config, device: torch.device) -> Model:
    """Load ``path`` with AutoModelForMaskedLM when it has an MLM head, else AutoModel; SDPA attention where the
    architecture supports it, else eager (logged once, :func:`pretrain.families.attn_implementation`); eval mode,
    fp32, on ``device``."""
    from transformers import AutoModel, AutoModelForMaskedLM

    auto = AutoModelForMaskedLM if has_mlm_head(config) else AutoModel
    impl = attn_implementation(model_class(auto, config), "sdpa", who=name)  # eager, said once, without SDPA
    model = auto.from_pretrained(path, attn_implementation=impl)
    model = model.to(device=device, dtype=torch.float32).eval()
    return Model(name, path, config, model, model.base_model, mlm_head(model) if has_mlm_head(config) else None)


# ------------------------------------------------------------------------------------------------------- embeddings
def pad_batch(seqs: list[np.ndarray], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D token arrays to the longest: (input_ids [b, L] int64, attention_mask [b, L] int64) on ``device``
    (the labeled tasks' one collation, :func:`pretrain.tasks.examples.collate`)."""
    batch = collate(Examples(list(seqs)), range(len(seqs)), pad_id)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Sentence embedding [b, hidden] from ``hidden`` [b, L, hidden] and ``attention_mask`` [b, L] (1 = token):
    ``mean`` over non-pad tokens (special tokens included, as sentence-transformers), ``cls`` (first token) or
    ``max`` over non-pad tokens."""
    if mode == "mean":
        return mean_pool(hidden, attention_mask)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(attention_mask.unsqueeze(-1) == 0, float("-inf")).max(1).values
    raise ValueError(f"pooling mode {mode!r}: expected mean, cls or max")


def pooling_mode(model_dir: str) -> tuple[str, bool]:
    """(pooling mode, normalised) of a sentence-transformers model, read from its ``modules.json`` and the Pooling
    module's ``config.json``: a local directory, or a hub name through the Hugging Face cache
    (:func:`pretrain.export.sentence_transformers_files`, which the export uses too); ("mean", False) for a model
    without ``modules.json``."""
    from pretrain.export import sentence_transformers_files

    files = sentence_transformers_files(model_dir)
    if "modules.json" not in files:
        return "mean", False
    modules = json.loads(files["modules.json"].read_text())
    mode, normalize = "mean", any(m.get("type", "").endswith(".Normalize") for m in modules)
    known = (".Transformer", ".Pooling", ".Normalize")
    other = [m.get("type") for m in modules if not m.get("type", "").endswith(known)]
    if other:
        log.warning(
            "%s lists modules after pooling that are not applied here: %s; the embeddings are the pooled "
            "(normalised) output without them",
            files["modules.json"],
            other,
        )
    for m in modules:
        cfg_file = files.get(f"{m.get('path', '')}/config.json")
        if m.get("type", "").endswith(".Pooling") and cfg_file is not None:
            cfg = json.loads(cfg_file.read_text())
            if cfg.get("pooling_mode_cls_token"):
                mode = "cls"
            elif cfg.get("pooling_mode_max_tokens"):
                mode = "max"
    return mode, normalize


@torch.inference_mode()
def embed(
    model: Model, seqs: list[np.ndarray], *, pad_id: int, batch_size: int, pooling: str, device: torch.device
) -> torch.Tensor:
    """L2-normalised sentence embeddings [len(seqs), hidden] float32 of token sequences (special tokens included).

    Sequences are batched by length (longest first) to limit padding; the output keeps the input order (the labeled
    tasks' prediction loop, :func:`pretrain.tasks.predict.run_batches`, on the encoder).
    """
    data = Examples(list(seqs))

    def pooled(output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return pool(output.last_hidden_state.float(), batch["attention_mask"], pooling)

    batches = sorted_batches(data.lengths, batch_size)
    with progress_bar(len(batches), f"evaluate: embed {model.name}", "batches") as bar:
        out = run_batches(model.encoder, data, bar_iter(batches, bar), pad_id=pad_id, device=device, head=pooled)
    return F.normalize(torch.from_numpy(out), dim=-1)


def bar_iter(items: list, bar: Any) -> Any:
    """Yield ``items``, advancing the progress bar ``bar`` after each."""
    for item in items:
        yield item
        bar.update(1)


def recall_at_1(queries: torch.Tensor, keys: torch.Tensor) -> float:
    """Fraction of rows i of ``queries`` [n, d] whose most cosine-similar row of ``keys`` [n, d] is row i."""
    sims = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T
    return int((sims.argmax(1) == torch.arange(len(queries))).sum()) / len(queries)


def retrieval_metrics(
    models: list[Model],
    halves: list[tuple[np.ndarray, np.ndarray]],
    *,
    pad_id: int,
    batch_size: int,
    pooling: str,
    device: torch.device,
) -> dict[str, dict]:
    """recall@1 and embedding cosine of every model on document ``halves`` (first, second; CLS ... SEP token ids);
    ``models[0]`` is the teacher. Returns {name: {"recall_at_1", "embedding_cosine"}}: recall@1 of first halves
    finding their own second half among all second halves by cosine; the mean cosine between the model's and the
    teacher's embedding over all halves (None when the widths differ). Both None with fewer than 2 documents."""
    if len(halves) < 2:
        log.warning("%d held-out documents: no retrieval evaluation (needs at least 2)", len(halves))
        return {m.name: {"recall_at_1": None, "embedding_cosine": None} for m in models}
    texts = [h[0] for h in halves] + [h[1] for h in halves]
    out, ref = {}, None
    for m in models:
        t0 = time.perf_counter()
        e = embed(m, texts, pad_id=pad_id, batch_size=batch_size, pooling=pooling, device=device)
        ref = e if ref is None else ref
        out[m.name] = {
            "recall_at_1": recall_at_1(e[: len(halves)], e[len(halves) :]),
            "embedding_cosine": (e * ref).sum(-1).mean().item() if e.shape == ref.shape else None,
        }
        log.info(
            "%s: recall@1 %.4f, embedding cosine to teacher %s (%d halves, %.1f s)",
            m.name,
            out[m.name]["recall_at_1"],
            out[m.name]["embedding_cosine"],
            len(texts),
            time.perf_counter() - t0,
        )
    return out


def sample_documents(documents: Iterable[np.ndarray], *, k: int, min_tokens: int, seed: int) -> tuple[list, int]:
    """A uniform sample (reservoir sampling, fixed seed) of ``k`` documents with at least ``min_tokens`` tokens.

    Returns (sampled documents in their original order, number of eligible documents seen).
    """
    rng = np.random.default_rng(seed)
    reservoir: list[tuple[int, np.ndarray]] = []
    seen = 0
    for doc in documents:
        if len(doc) < min_tokens:
            continue
        if len(reservoir) < k:
            reservoir.append((seen, doc))
        else:
            j = int(rng.integers(0, seen + 1))
            if j < k:
                reservoir[j] = (seen, doc)
        seen += 1
    return [d for _, d in sorted(reservoir, key=lambda t: t[0])], seen


def split_halves(doc: np.ndarray, *, max_content: int, cls_id: int, sep_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a document (token ids, no special tokens) into its two halves by tokens, each wrapped as CLS ... SEP.

    The document is first capped to ``2 * max_content`` tokens, so each half fits the model and the halves are
    adjacent text. Returns (first half, second half), 1-D int64.
    """
    doc = np.asarray(doc, dtype=np.int64)[: 2 * max_content]
    h = len(doc) // 2
    wrap = lambda x: np.concatenate([[cls_id], x, [sep_id]]).astype(np.int64)  # noqa: E731
    return wrap(doc[:h]), wrap(doc[h:])


# -------------------------------------------------------------------------------------------------------------- MLM
def mlm_batches(
    sequences: list[np.ndarray], masker: Masker, *, pad_id: int, batch_size: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Masked batches (masked input_ids [b, L], attention_mask [b, L], labels [b, L]) of ``sequences``; batch i is
    masked as step i of rank 0, so the result is a function of the masker's seed and the sequences only."""
    out = []
    for bi, start in enumerate(range(0, len(sequences), batch_size)):
        ids, attn = pad_batch(sequences[start : start + batch_size], pad_id, device)
        masked, labels = masker(ids, attn, step=bi, rank=0, micro_step=0)
        out.append((masked, attn, labels))
    return out


def masked_logits(model: Model, ids: torch.Tensor, attn: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """MLM logits [n, vocab] float32 at the positions ``sel`` ([b, L] bool, n = sel.sum()); the LM head runs on those
    positions only (it is the costly part: vocab x hidden per position)."""
    if model.head is None:
        return model.model(input_ids=ids, attention_mask=attn).logits[sel].float()
    hidden = model.encoder(input_ids=ids, attention_mask=attn).last_hidden_state
    return model.head(hidden[sel]).float()


@torch.inference_mode()
def mlm_metrics(models: list[Model], batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict:
    """MLM metrics of every model on the same masked batches; ``models[0]`` is the teacher (the KL/agreement
    reference). Returns {name: {mlm_loss, perplexity, mlm_accuracy, kl_to_teacher, agreement}} (None values for a
    model without MLM head). Means are over all masked positions of all batches; loss and KL in nats."""
    sums = {m.name: torch.zeros(5, dtype=torch.float64) for m in models}  # see pretrain.validate.mlm_sums
    for ids, attn, labels in batches:
        sel = labels != IGNORE
        target = labels[sel]
        ref = None
        for m in models:
            if m.head is None and not has_mlm_head(m.config):
                continue
            logits = masked_logits(m, ids, attn, sel)
            sums[m.name] += mlm_sums(logits, target, ref).cpu()
            ref = logits if ref is None else ref
    none = dict.fromkeys(("mlm_loss", "perplexity", "mlm_accuracy", "kl_to_teacher", "agreement"))
    out = {}
    for m in models:
        summary = mlm_summary(sums[m.name]) if has_mlm_head(m.config) else None
        out[m.name] = none if summary is None else {k: summary[k] for k in none}
    return out


# ------------------------------------------------------------------------------------------------------- throughput
@torch.inference_mode()
def throughputs(
    models: list[Model],
    *,
    token_ids: np.ndarray,
    batch_size: int,
    seq_length: int,
    warmup: int,
    iters: int,
    device: torch.device,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Encoder inference throughput of each model in tokens/s on one random batch [batch_size, seq_length] (no
    padding; ids drawn from ``token_ids``, with ``seed``): ``warmup`` untimed forwards per model, then ``iters`` rounds
    that time one forward of every model in turn; one tokens/s = batch_size * seq_length / forward time per round.

    Interleaving the models keeps other work on a shared machine from favouring one of them; the repeats give the
    spread (:func:`speed_stats`). Returns {model name: [tokens/s per timed forward]} (``iters`` values each).
    """
    rng = np.random.default_rng(seed)
    ids = torch.from_numpy(rng.choice(token_ids, size=(batch_size, seq_length)).astype(np.int64)).to(device)
    attn = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for m in models:
        for _ in range(warmup):
            m.encoder(input_ids=ids, attention_mask=attn)
    times: dict[str, list[float]] = {m.name: [] for m in models}
    for _ in range(iters):
        for m in models:
            sync()
            t0 = time.perf_counter()
            m.encoder(input_ids=ids, attention_mask=attn)
            sync()
            times[m.name].append(time.perf_counter() - t0)
    return {n: [batch_size * seq_length / x for x in t] for n, t in times.items()}


def speed_stats(samples: list[float]) -> dict[str, float | int]:
    """``median``, ``min`` and ``max`` tokens/s of the timed repeats, and their number ``repeats``."""
    return {
        "median": float(np.median(samples)),
        "min": float(min(samples)),
        "max": float(max(samples)),
        "repeats": len(samples),
    }


def environment() -> dict[str, Any]:
    """The evaluating machine (:func:`pretrain.runtime.environment`)."""
    from pretrain.runtime import environment as machine

    return machine()


# ------------------------------------------------------------------------------------------------------------- data
def check_vocab(manifest: dict, data: Path, tokenizer, configs: dict[str, tuple[str, Any]]) -> None:
    """Raise :class:`EvalError` when the teacher's tokenizer or any model's vocabulary differs from the tokenizer the
    shards were made with (``manifest.json`` ``tokenizer``). ``configs``: {flag: (path, config)}."""
    tok = manifest.get("tokenizer", {})
    vocab, made_with = tok.get("vocab_size"), tok.get("name_or_path")
    teacher_path = configs["--teacher"][0]
    diff = tokenizer_differences(manifest, tokenizer)
    if diff:
        details = describe_differences(diff)
        raise EvalError(
            f"--teacher {teacher_path}: its tokenizer is not the one the shards in {data} were made with "
            f"({made_with!r}; {details}: shards vs teacher, manifest.json 'tokenizer'); evaluate with "
            f"that teacher, or prepare shards with `python -m data_prep prepare --tokenizer "
            f"{teacher_path} ...`"
        )
    for flag, (path, config) in configs.items():
        if config.vocab_size < vocab or config.vocab_size != configs["--teacher"][1].vocab_size:
            raise EvalError(
                f"{flag} {path}: vocabulary of {config.vocab_size} tokens (config.json vocab_size), but "
                f"the shards in {data} use {made_with!r} with {vocab} tokens (manifest.json tokenizer."
                f"vocab_size) and the teacher has {configs['--teacher'][1].vocab_size}; evaluate a student "
                "of this teacher, on shards made with its tokenizer"
            )


def _load_tokenizer(teacher: str, manifest: dict):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(teacher)
    except (OSError, ValueError) as first:
        name = manifest.get("tokenizer", {}).get("name_or_path")
        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError, TypeError):
            raise EvalError(
                f"--teacher {teacher}: cannot load its tokenizer ({first}), nor the shards' tokenizer "
                f"{name!r}; save the tokenizer files into the teacher directory"
            ) from first


# ----------------------------------------------------------------------------------------------------------- report
@dataclasses.dataclass
class EvalSettings:
    """The knobs of :func:`evaluate` (the command line's flags of the same names).

    ``max_sequences`` caps the MLM evaluation (sequences), ``max_documents`` the retrieval (documents of at least
    ``min_doc_tokens`` tokens, sampled with ``seed``); ``batch_size`` sequences per forward (MLM, embeddings);
    ``bench_*`` the throughput batch (sequences x tokens, capped to the shards' length), untimed warm-up and timed
    forwards; ``downstream``: labeled tasks (pretrain.tasks specs) on which the run's teacher, student_init, top-layer
    truncation and student are fine-tuned (``downstream_mode``: or probed) with ``downstream_seeds`` seeds
    (``downstream_head``: the classification head, ``downstream_max_train``: a cap on the train examples; default:
    the task family's) by :func:`pretrain.tasks.downstream.run_downstream`.
    """

    split: str = "valid"
    max_sequences: int = 512
    max_documents: int = 1000
    min_doc_tokens: int = 16
    batch_size: int = 32
    bench_batch: int = 32
    bench_length: int = 128
    bench_warmup: int = 2
    bench_iters: int = 5
    seed: int = 0
    device: str = "auto"
    downstream: list[str] | None = None
    downstream_seeds: int = 2
    downstream_mode: str = "finetune"
    downstream_head: str | None = None
    downstream_max_train: int | None = None


@dataclasses.dataclass
class _Inputs:
    """What :func:`evaluate` reads: model paths (table order), the run directory, metrics file and held-out split."""

    paths: dict[str, str]
    run_dir: Path | None
    metrics_path: Path | None
    data: Path
    ds: Any

    @property
    def order(self) -> list[str]:
        return [n for n in ("teacher", "student_init", "student") if n in self.paths]


def evaluate(
    student: str,
    teacher: str,
    data: str | Path,
    output: str | Path,
    *,
    student_init: str | None = None,
    metrics: str | Path | None = None,
    masking: MaskingConfig | None = None,
    settings: EvalSettings | None = None,
    **overrides: Any,
) -> dict:
    """Evaluate teacher, student at initialisation and distilled student on the held-out ``settings.split`` of the
    shards in ``data``; write report.json, report.md and loss_curves.png into ``output``; return the report dict.

    ``student_init`` defaults to ``STUDENT/../student_init`` when that exists (else that column is null); ``metrics``
    to ``STUDENT/../metrics.jsonl``. ``masking``: the MLM evaluation's masking (default :data:`MASKING`, BERT's 15%
    and 80/10/10 with uniform selection). ``settings`` (:class:`EvalSettings`), or its fields as keywords
    (``max_sequences=256``, ...). The report then carries the downstream table when ``settings.downstream`` is set.

    Raises:
        EvalError: missing inputs, a data directory without that split, or a vocabulary that differs from the
            shards'. TypeError: an unknown keyword.
    """
    t_start = time.perf_counter()
    s = dataclasses.replace(settings or EvalSettings(), **overrides)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device)
    inp = _inputs(student, teacher, student_init, metrics, data, s.split)
    manifest, order = inp.ds.manifest, inp.order
    flags = {n: "--" + n.replace("_", "-") for n in order}
    configs = {n: _load_config(flags[n], inp.paths[n]) for n in order}
    tokenizer = _load_tokenizer(inp.paths["teacher"], manifest)
    check_vocab(manifest, inp.data, tokenizer, {flags[n]: (inp.paths[n], configs[n]) for n in order})
    max_len = min(int(manifest["max_seq_length"]), int(getattr(tokenizer, "model_max_length", 10**9)))
    models = [load_model(n, inp.paths[n], configs[n], dev) for n in order]
    results: dict[str, dict] = {n: {"params": m.params} for n, m in zip(order, models, strict=False)}
    meta = _meta(s, dev, inp)
    meta["throughput"], meta["speed_spread"] = _throughput_step(models, tokenizer, results, s, max_len, dev)
    meta["retrieval"] = _retrieval_step(models, inp, results, s, max_len, dev)
    if has_mlm_head(configs["teacher"]):
        meta["mlm"] = _mlm_step(models, inp.ds, tokenizer, results, s, masking or MASKING, dev)
    else:
        log.info("the teacher has no MLM head (%s): no MLM metrics", configs["teacher"].architectures)
    downstream_result = None
    if s.downstream:
        downstream_result = _downstream(inp.run_dir, output, s.downstream, s.device, settings=s)
    meta["metrics_file"] = (
        str(inp.metrics_path) if inp.metrics_path is not None and inp.metrics_path.is_file() else None
    )
    meta["training"] = training_provenance(inp.metrics_path)
    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    report = {
        "teacher": results["teacher"],
        "student_init": results.get("student_init"),
        "student": results["student"],
        "meta": meta,
    }
    if downstream_result is not None:
        report["downstream"] = downstream_result
    write_report(report, output)
    return report


def _meta(s: EvalSettings, dev: torch.device, inp: _Inputs) -> dict[str, Any]:
    """The report's ``meta`` before the measurements: split, date, device, threads, paths, split sizes."""
    return {
        "split": s.split,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "environment": environment(),
        "paths": {**{n: str(inp.paths[n]) for n in inp.order}, "data": str(inp.data)},
        "split_sequences": len(inp.ds),
        "split_documents": inp.ds.manifest["splits"][s.split].get("num_documents"),
    }


def _inputs(
    student: str, teacher: str, student_init: str | None, metrics: str | Path | None, data: str | Path, split: str
) -> _Inputs:
    """Open the held-out split and resolve every model path (``student_init`` guessed as ``RUN/student_init``,
    ``metrics`` as ``RUN/metrics.jsonl``). Raises :class:`EvalError`."""
    try:
        ds = open_split(data, split, key="--data")
    except ConfigError as e:
        raise EvalError(str(e)) from None
    paths = {"teacher": _resolve("--teacher", teacher), "student": _resolve("--student", student)}
    run_dir = Path(paths["student"]).parent if Path(paths["student"]).is_dir() else None  # RUN of RUN/student
    if student_init is None:
        guess = run_dir / "student_init" if run_dir else None
        if guess and (guess / "config.json").is_file():
            student_init = str(guess)
        else:
            log.info(
                "no --student-init and no RUN/student_init next to the student: the report has no "
                "student-at-initialisation column"
            )
    if student_init is not None:
        paths["student_init"] = _resolve("--student-init", student_init)
    if metrics is not None and not Path(metrics).is_file():
        raise EvalError(f"--metrics {metrics}: no such file; give the run's metrics.jsonl or leave --metrics out")
    metrics_path = Path(metrics) if metrics is not None else run_dir / "metrics.jsonl" if run_dir else None
    return _Inputs(paths, run_dir, metrics_path, Path(data), ds)


def _throughput_step(
    models: list[Model], tokenizer: Any, results: dict[str, dict], s: EvalSettings, max_len: int, dev: torch.device
) -> tuple[dict[str, Any], dict[str, dict[str, float | int]]]:
    """Encoder throughput of every model on the same batch shape into ``results`` (``tokens_per_s``: the median of
    the repeats); returns the meta entries ``throughput`` (the settings) and ``speed_spread`` ({model:
    :func:`speed_stats`})."""
    seq_length = min(s.bench_length, max_len)
    normal = np.setdiff1d(np.arange(len(tokenizer)), tokenizer.all_special_ids)
    speeds = throughputs(
        models,
        token_ids=normal,
        batch_size=s.bench_batch,
        seq_length=seq_length,
        warmup=s.bench_warmup,
        iters=s.bench_iters,
        device=dev,
        seed=s.seed,
    )
    spread = {m.name: speed_stats(speeds[m.name]) for m in models}
    for m in models:
        results[m.name]["tokens_per_s"] = spread[m.name]["median"]
        results[m.name]["speedup"] = results[m.name]["tokens_per_s"] / results["teacher"]["tokens_per_s"]
    log.info(
        "throughput (tokens/s, median [min-max]): %s",
        {n: [round(v) for v in (x["median"], x["min"], x["max"])] for n, x in spread.items()},
    )
    settings = {"batch_size": s.bench_batch, "seq_length": seq_length, "warmup": s.bench_warmup, "iters": s.bench_iters}
    return settings, spread


def _retrieval_step(
    models: list[Model], inp: _Inputs, results: dict[str, dict], s: EvalSettings, max_len: int, dev: torch.device
) -> dict[str, Any]:
    """recall@1 and embedding cosine on sampled held-out documents into ``results``; returns the meta entry."""
    tok = inp.ds.manifest["tokenizer"]
    pooling, normalized = pooling_mode(inp.paths["teacher"])
    docs, eligible = sample_documents(inp.ds.documents(), k=s.max_documents, min_tokens=s.min_doc_tokens, seed=s.seed)
    meta = {
        "num_documents": len(docs),
        "eligible_documents": eligible,
        "min_tokens": s.min_doc_tokens,
        "max_content_tokens": max_len - 2,
        "pooling": pooling,
        "normalized": normalized,
    }
    cls_id, sep_id = tok["cls_token_id"], tok["sep_token_id"]
    halves = [split_halves(d, max_content=max_len - 2, cls_id=cls_id, sep_id=sep_id) for d in docs]
    for n, vals in retrieval_metrics(
        models, halves, pad_id=tok["pad_token_id"], batch_size=s.batch_size, pooling=pooling, device=dev
    ).items():
        results[n].update(vals)
    return meta


def _mlm_step(
    models: list[Model],
    ds: Any,
    tokenizer: Any,
    results: dict[str, dict],
    s: EvalSettings,
    masking: MaskingConfig,
    dev: torch.device,
) -> dict[str, Any]:
    """MLM metrics of every model on the same masked held-out sequences into ``results``; returns the meta entry."""
    t0 = time.perf_counter()
    n_seq = min(s.max_sequences, len(ds))
    idx = np.sort(np.random.default_rng(s.seed).choice(len(ds), size=n_seq, replace=False))
    seqs = [np.asarray(ds[int(i)], dtype=np.int64) for i in idx]
    # Uniform selection (no token-frequency smoothing): every held-out token counts alike.
    masker = Masker.from_tokenizer(masking, tokenizer, token_counts=None, seed=s.seed)
    pad_id = ds.manifest["tokenizer"]["pad_token_id"]
    batches = mlm_batches(seqs, masker, pad_id=pad_id, batch_size=s.batch_size, device=dev)
    for n, vals in mlm_metrics(models, batches).items():
        results[n].update(vals)
    keys = ("mlm_loss", "kl_to_teacher", "agreement")
    shown = {m.name: {k: round(results[m.name][k], 4) for k in keys if results[m.name][k] is not None} for m in models}
    log.info("MLM on %d sequences (%.1f s): %s", n_seq, time.perf_counter() - t0, shown)
    return {
        "num_sequences": n_seq,
        "num_masked": int(sum((b[2] != IGNORE).sum() for b in batches)),
        "masking": f"{masking.mlm_mask_prop:.0%} of the non-special tokens, uniform, "
        f"{masking.word_mask:.0%}/{masking.word_rand:.0%}/{masking.word_keep:.0%} mask/random/keep, "
        f"seed {s.seed}",
    }


def _downstream(
    run_dir: Path | None, output: str | Path, tasks: list[str], device: str, *, settings: EvalSettings
) -> dict:
    """Fine-tune (probe) the run's models on ``tasks`` (:func:`pretrain.tasks.downstream.run_downstream` with
    :func:`pretrain.tasks.models.run_models`) into ``output/downstream``; returns its result with ``png`` (the
    chart's path relative to ``output``, or None). Raises :class:`EvalError` without a run directory or for a bad
    task."""
    from pretrain.tasks.base import DownstreamError, SplitConfig
    from pretrain.tasks.downstream import run_downstream
    from pretrain.tasks.models import run_models

    if run_dir is None:
        raise EvalError("--downstream needs the student of a run directory (RUN/student) to find the run's models")
    out = Path(output) / "downstream"
    head, max_train = settings.downstream_head, settings.downstream_max_train
    try:
        result = run_downstream(
            tasks,
            run_models(run_dir, out),
            out,
            mode=settings.downstream_mode,
            seeds=settings.downstream_seeds,
            device=device,
            overrides={"head": head} if head else None,
            split=SplitConfig(max_train=max_train) if max_train else None,
        )
    except DownstreamError as e:
        raise EvalError(f"--downstream: {e}") from e
    result["png"] = "downstream/downstream.png" if (out / "downstream.png").is_file() else None
    return result


def write_report(report: dict, output: str | Path) -> None:
    """Write loss_curves.png (when ``report["meta"]["metrics_file"]`` has losses), report.md and, last, report.json
    into ``output``, each atomically. An existing report.json is kept as report.prev.json, with a log line. Then the
    model cards of the exported student folders it names are rewritten with its numbers (pretrain.card)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    png = None
    metrics_file = report["meta"].get("metrics_file")
    if metrics_file and plot_loss_curves(metrics_file, output / "loss_curves.png"):
        png = "loss_curves.png"
    elif metrics_file:
        log.info("%s has no loss values: no loss curves", metrics_file)
    atomic_write_text(output / "report.md", render_markdown(report, png), what="evaluation report")
    target = output / "report.json"
    if target.exists():
        log.warning("%s exists already: keeping the previous report as %s", target, output / "report.prev.json")
        atomic_write_bytes(output / "report.prev.json", target.read_bytes())
    atomic_write_text(target, json.dumps(report, indent=2) + "\n", what="evaluation report")
    log.info("wrote %s and %s", target, output / "report.md")
    for card in refresh_from_report(report, target):  # the exported folders' model cards get these numbers
        log.info("rewrote the model card %s", card)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; exits 2 (argparse) on a malformed one or a count below 1."""
    p = argparse.ArgumentParser(
        prog=prog("python -m pretrain.evaluate"), description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    _add_input_args(p)
    _add_size_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of masking, sampling, benchmark batch (default: 0)")
    p.add_argument(
        "--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1 ... (default: auto)"
    )
    _add_downstream_args(p)
    args = p.parse_args(argv)
    for name in (
        "max_sequences",
        "max_documents",
        "batch_size",
        "bench_batch",
        "bench_length",
        "bench_iters",
        "downstream_seeds",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", required=True, metavar="DIR", help="the distilled student (RUN/student)")
    p.add_argument(
        "--teacher", required=True, metavar="DIR", help="teacher: model directory, hub name or embedded:NAME"
    )
    p.add_argument("--data", required=True, metavar="DIR", help="prepared shards (python -m data_prep prepare)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for report.json, report.md, loss_curves.png")
    p.add_argument(
        "--student-init",
        metavar="DIR",
        help="the student before distillation (default: RUN/student_init next to the student, if any)",
    )
    p.add_argument("--split", default="valid", help="held-out split of the shards (default: %(default)s)")
    p.add_argument("--metrics", metavar="FILE", help="the run's metrics.jsonl (default: RUN/metrics.jsonl, if any)")


def _add_size_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-sequences",
        type=int,
        default=512,
        metavar="N",
        help="held-out sequences for the MLM metrics (default: %(default)s)",
    )
    p.add_argument(
        "--max-documents",
        type=int,
        default=1000,
        metavar="N",
        help="held-out documents for retrieval, sampled (default: %(default)s)",
    )
    p.add_argument(
        "--min-doc-tokens",
        type=int,
        default=16,
        metavar="N",
        help="shortest document used for retrieval, in tokens (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        metavar="N",
        help="sequences per forward for MLM and embeddings (default: %(default)s)",
    )
    p.add_argument(
        "--bench-batch", type=int, default=32, metavar="N", help="throughput batch in sequences (default: %(default)s)"
    )
    p.add_argument(
        "--bench-length",
        type=int,
        default=128,
        metavar="N",
        help="throughput sequence length in tokens, at most the shards' (default: %(default)s)",
    )
    p.add_argument(
        "--bench-warmup",
        type=int,
        default=2,
        metavar="N",
        help="untimed warm-up forwards per model (default: %(default)s)",
    )
    p.add_argument(
        "--bench-iters",
        type=int,
        default=5,
        metavar="N",
        help="timed forwards per model: median and min-max reported (default: %(default)s)",
    )


def _add_downstream_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--downstream",
        action="append",
        metavar="TASK",
        help="also fine-tune teacher, student_init, the top-layer truncation and the student on this "
        "labeled task (repeatable; e.g. embedded:rotten-tomatoes, glue:sst2; docs/downstream.md) and "
        "put the table in the report",
    )
    p.add_argument(
        "--downstream-seeds",
        type=int,
        default=2,
        metavar="N",
        help="fine-tuning seeds per model and task (default: %(default)s; the downstream command's --seeds "
        "defaults to 3)",
    )
    p.add_argument(
        "--downstream-mode",
        choices=("finetune", "probe"),
        default="finetune",
        help="finetune the whole model, or probe (train only the head on frozen states) (default: %(default)s)",
    )
    p.add_argument(
        "--downstream-head",
        choices=("cls", "mean"),
        default=None,
        help="classification head for --downstream fine-tuning (default: the downstream command's)",
    )
    p.add_argument(
        "--downstream-max-train",
        type=int,
        default=None,
        metavar="N",
        help="cap on --downstream train examples (stratified; default: the task family's)",
    )


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status (0 ok, the error's ``exit_code`` on a user error: 2)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="evaluate: %(message)s")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        kwargs = {k: v for k, v in vars(args).items() if k not in ("student", "teacher", "data", "output")}
        report = evaluate(args.student, args.teacher, args.data, args.output, **kwargs)
    except DistillError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps({n: report[n] for n in ("teacher", "student_init", "student")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
