"""Accuracy checks after each conversion, each a :class:`CheckResult` with a verdict.

- fp32 ONNX vs PyTorch (:func:`check_outputs`): the largest absolute difference of the output, at batch 1 (each of
  the first texts alone) and at batch 32 (mixed lengths, padded); token outputs (last_hidden_state, MLM logits) are
  compared on non-pad positions only. Default tolerance 1e-4.
- int8 vs fp32 (:func:`check_int8`), on what a model of each kind can be scored on without a task:
  encoder: retrieval recall@1 between the two halves of each text (:func:`recall_at_1_halves`; the verdict is its
  relative drop, tolerance 0.5%), with the mean cosine of the two models' mean-pooled embeddings reported beside it;
  mlm: top-1 agreement of the two models on masked positions (tolerance: 5 points of disagreement);
  classifier: accuracy on labeled texts (or agreement with the fp32 predictions when no labels are given); the
  verdict is the drop in points, tolerance 1.0.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.deploy.common import OUTPUT_NAME, DeployError

TOLERANCES = {"fp32": 1e-4, "encoder": 0.005, "mlm": 5.0, "classifier": 1.0}
DEFAULT_TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank in the early morning.",
    "Knowledge distillation trains a small student network to match the outputs of a large teacher.",
    "Paris is the capital of France and one of the most visited cities in the world.",
    "Water boils at one hundred degrees Celsius at sea level, and ice melts at zero degrees.",
    "The stock market fell sharply on Monday after the central bank raised interest rates again.",
    "She planted tomatoes, beans and sunflowers in the small garden behind her house.",
    "A transformer encoder reads every token of the sentence at once with self-attention.",
    "The football team won the championship after a dramatic penalty shootout in the final.",
    "Photosynthesis converts light energy into chemical energy stored in sugar molecules.",
    "The museum opened a new exhibition of impressionist paintings from private collections.",
    "Heavy rain caused flooding in several villages and closed the main road for two days.",
    "He learned to play the violin as a child and later joined the city orchestra.",
    "The recipe calls for two cups of flour, three eggs, a pinch of salt and some milk.",
    "Astronomers discovered a planet orbiting a distant star in the habitable zone.",
    "The new library offers free courses on programming, languages and creative writing.",
    "Shakespeare wrote comedies, histories and tragedies that are still performed today.",
    "The train to Berlin was delayed by forty minutes because of a signal failure.",
    "Vaccines train the immune system to recognise and fight specific viruses.",
    "The old castle on the hill was restored and turned into a hotel with a restaurant.",
    "Electric cars are becoming cheaper as battery prices keep falling every year.",
    "The children built a snowman in the park and threw snowballs at each other.",
    "A good night's sleep improves memory, mood and concentration during the day.",
    "The company announced record profits and plans to hire a thousand new engineers.",
    "Mount Everest is the highest mountain on Earth, at almost nine thousand metres.",
]


@dataclasses.dataclass
class CheckResult:
    """One check's verdict: ``value`` (in ``unit``) against ``tolerance``; ``passed`` is ``value <= tolerance``
    (every check is phrased as an error or a drop, lower is better). ``detail`` holds the numbers behind it."""

    name: str
    value: float
    tolerance: float
    unit: str
    passed: bool
    file: str = ""
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        """One line: ``PASS|FAIL name: value unit (tolerance T) FILE``."""
        verdict = "PASS" if self.passed else "FAIL"
        return f"{verdict} {self.name}: {self.value:.6g} {self.unit} (tolerance {self.tolerance:g}) {self.file}".strip()


def _verdict(name: str, value: float, tolerance: float, unit: str, file: Path | str, **detail: Any) -> CheckResult:
    return CheckResult(name, float(value), float(tolerance), unit, bool(value <= tolerance), str(file), detail)


class OnnxRunner:
    """An ONNX Runtime CPU session that takes the tokenizer's numpy batch (``{name: int array [batch, seq]}``) and
    returns the first output (float32 numpy); inputs the graph lacks are dropped, a missing token_type_ids is zeros."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        ids = np.asarray(batch["input_ids"], dtype=np.int64)
        feed = {n: np.asarray(batch[n], dtype=np.int64) if n in batch else np.zeros_like(ids) for n in self.inputs}
        return self.session.run(None, feed)[0]


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 128) -> dict[str, np.ndarray]:
    """``texts`` as a padded int64 numpy batch ``{input_ids, attention_mask[, token_type_ids]}`` of ``[n, longest]``,
    truncated to ``max_length`` tokens."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {
        k: np.asarray(v, dtype=np.int64)
        for k, v in enc.items()
        if k in ("input_ids", "attention_mask", "token_type_ids")
    }


def torch_output(model: torch.nn.Module, kind: str, batch: dict[str, np.ndarray]) -> np.ndarray:
    """The PyTorch ``model``'s output for ``kind`` (last_hidden_state or logits) on ``batch``, float32 numpy."""
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in batch.items()}, return_dict=True)
    return out[OUTPUT_NAME[kind]].float().numpy()


def _max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray, kind: str) -> float:
    if kind == "classifier":
        return float(np.abs(a - b).max())
    return float(np.abs(a - b)[mask.astype(bool)].max())


def check_outputs(
    model: torch.nn.Module,
    kind: str,
    onnx_path: str | Path,
    tokenizer,
    texts: Sequence[str],
    tolerance: float = TOLERANCES["fp32"],
    singles: int = 4,
) -> CheckResult:
    """fp32 ONNX vs the PyTorch ``model`` (eval mode): the largest absolute output difference over ``singles`` texts
    run one at a time (batch 1) and the first 32 texts as one padded batch (repeated to 32 when fewer), non-pad
    positions only for token outputs. ``passed`` when it is at most ``tolerance``."""
    model.eval()
    runner = OnnxRunner(onnx_path)
    texts = list(texts)
    batch32 = (texts * (32 // max(len(texts), 1) + 1))[:32]
    diffs = {}
    for label, batches in (("batch1", [[t] for t in texts[:singles]]), ("batch32", [batch32])):
        worst = 0.0
        for chunk in batches:
            enc = tokenize(tokenizer, chunk)
            worst = max(worst, _max_diff(runner(enc), torch_output(model, kind, enc), enc["attention_mask"], kind))
        diffs[label] = worst
    value = max(diffs.values())
    return _verdict("fp32 ONNX vs PyTorch max |diff|", value, tolerance, "abs", onnx_path, **diffs)


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``hidden`` ``[n, seq, h]`` over non-pad positions (``mask`` ``[n, seq]``), L2-normalised ``[n, h]``."""
    m = mask[..., None].astype(np.float32)
    pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1.0)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def embed(runner: Callable[[dict[str, np.ndarray]], np.ndarray], tokenizer, texts: Sequence[str], batch_size: int = 32):
    """Mean-pooled, normalised embeddings ``[n, hidden]`` of ``texts`` from an encoder ``runner`` (an
    :class:`OnnxRunner`, or any callable from a numpy batch to last_hidden_state)."""
    parts = []
    for i in range(0, len(texts), batch_size):
        enc = tokenize(tokenizer, texts[i : i + batch_size])
        parts.append(mean_pool(runner(enc), enc["attention_mask"]))
    return np.concatenate(parts)


def split_halves(texts: Sequence[str], min_words: int = 4) -> tuple[list[str], list[str]]:
    """Each text of at least ``min_words`` words cut at its middle word: (first halves, second halves)."""
    pairs = [(w[: len(w) // 2], w[len(w) // 2 :]) for t in texts if len(w := t.split()) >= min_words]
    return [" ".join(a) for a, _ in pairs], [" ".join(b) for _, b in pairs]


def recall_at_1_halves(embed_texts: Callable[[list[str]], np.ndarray], texts: Sequence[str]) -> float:
    """Retrieval recall@1 in [0, 1]: each text's first half is a query, the second halves of all texts are the
    corpus; a hit when the query's own second half has the highest cosine. ``embed_texts`` maps a list of str to
    L2-normalised embeddings ``[n, d]``. Raises :class:`DeployError` with fewer than 2 texts of 4+ words."""
    first, second = split_halves(texts)
    if len(first) < 2:
        raise DeployError(f"retrieval check needs at least 2 texts of 4 or more words, got {len(first)}")
    sims = embed_texts(first) @ embed_texts(second).T
    return float((sims.argmax(1) == np.arange(len(first))).mean())


def check_embeddings(
    fp32: OnnxRunner, int8: OnnxRunner, tokenizer, texts: Sequence[str], tolerance: float = TOLERANCES["encoder"]
) -> CheckResult:
    """int8 vs fp32 encoder: the relative drop of :func:`recall_at_1_halves` (``(r_fp32 - r_int8) / r_fp32``, a
    fraction; tolerance 0.005 = 0.5%), with both recalls and the mean / min cosine of the two models' embeddings of
    ``texts`` in ``detail``."""
    texts = list(texts)
    r32 = recall_at_1_halves(lambda t: embed(fp32, tokenizer, t), texts)
    r8 = recall_at_1_halves(lambda t: embed(int8, tokenizer, t), texts)
    cos = (embed(fp32, tokenizer, texts) * embed(int8, tokenizer, texts)).sum(1)
    drop = (r32 - r8) / r32 if r32 > 0 else 0.0
    return _verdict(
        "int8 retrieval recall@1 relative drop",
        drop,
        tolerance,
        "fraction",
        int8.path,
        recall_fp32=r32,
        recall_int8=r8,
        cosine_mean=float(cos.mean()),
        cosine_min=float(cos.min()),
        texts=len(texts),
    )


def mask_batch(tokenizer, texts: Sequence[str], rate: float = 0.15, seed: int = 0):
    """``texts`` tokenized with ``rate`` of the non-special tokens (at least one per text) replaced by the mask token.
    Returns (batch, masked positions bool ``[n, seq]``, original ids ``[n, seq]``). Raises :class:`DeployError` when
    the tokenizer has no mask token."""
    if tokenizer.mask_token_id is None:
        raise DeployError("the MLM check needs a tokenizer with a mask token; this one has none")
    enc = tokenize(tokenizer, texts)
    ids = enc["input_ids"]
    special = np.isin(ids, list(tokenizer.all_special_ids)) | (enc["attention_mask"] == 0)
    rng = np.random.default_rng(seed)
    masked = (rng.random(ids.shape) < rate) & ~special
    for row in np.flatnonzero(~masked.any(1) & (~special).any(1)):
        masked[row, rng.choice(np.flatnonzero(~special[row]))] = True
    enc = {**enc, "input_ids": np.where(masked, tokenizer.mask_token_id, ids)}
    return enc, masked, ids


def check_mlm(
    fp32: OnnxRunner, int8: OnnxRunner, tokenizer, texts: Sequence[str], tolerance: float = TOLERANCES["mlm"]
) -> CheckResult:
    """int8 vs fp32 MLM: disagreement in points (``100 * (1 - top-1 agreement)``) on masked positions of ``texts``
    (:func:`mask_batch`, 15%, batches of 32), with both models' top-1 accuracy at recovering the masked token."""
    agree, hit32, hit8, total = 0, 0, 0, 0
    for i in range(0, len(texts), 32):
        enc, masked, ids = mask_batch(tokenizer, texts[i : i + 32], seed=i)
        p32, p8 = fp32(enc).argmax(-1)[masked], int8(enc).argmax(-1)[masked]
        agree += int((p32 == p8).sum())
        hit32 += int((p32 == ids[masked]).sum())
        hit8 += int((p8 == ids[masked]).sum())
        total += int(masked.sum())
    total = max(total, 1)
    return _verdict(
        "int8 MLM top-1 disagreement with fp32",
        100.0 * (1 - agree / total),
        tolerance,
        "points",
        int8.path,
        agreement=agree / total,
        accuracy_fp32=hit32 / total,
        accuracy_int8=hit8 / total,
        masked=total,
    )


def check_classifier(
    fp32: OnnxRunner,
    int8: OnnxRunner,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int] | None = None,
    tolerance: float = TOLERANCES["classifier"],
) -> CheckResult:
    """int8 vs fp32 classifier: the accuracy drop in points on ``texts`` with ``labels`` (ids); without labels the
    fp32 predictions are the labels, so the drop is the disagreement in points."""
    texts = list(texts)
    p32 = np.concatenate([fp32(tokenize(tokenizer, texts[i : i + 32])).argmax(-1) for i in range(0, len(texts), 32)])
    p8 = np.concatenate([int8(tokenize(tokenizer, texts[i : i + 32])).argmax(-1) for i in range(0, len(texts), 32)])
    gold = p32 if labels is None else np.asarray(labels)
    acc32, acc8 = 100.0 * float((p32 == gold).mean()), 100.0 * float((p8 == gold).mean())
    return _verdict(
        "int8 classifier accuracy drop",
        acc32 - acc8,
        tolerance,
        "points",
        int8.path,
        accuracy_fp32=acc32,
        accuracy_int8=acc8,
        agreement=float((p32 == p8).mean()),
        labeled=labels is not None,
        texts=len(texts),
    )


def check_int8(
    kind: str,
    fp32_path: str | Path,
    int8_path: str | Path,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int] | None = None,
    tolerance: float | None = None,
) -> CheckResult:
    """The int8-vs-fp32 check for ``kind`` (:func:`check_embeddings`, :func:`check_mlm`, :func:`check_classifier`)
    with its default tolerance (:data:`TOLERANCES`) unless ``tolerance`` is given."""
    fp32, int8 = OnnxRunner(fp32_path), OnnxRunner(int8_path)
    tol = TOLERANCES[kind] if tolerance is None else tolerance
    if kind == "classifier":
        return check_classifier(fp32, int8, tokenizer, texts, labels, tol)
    return (check_mlm if kind == "mlm" else check_embeddings)(fp32, int8, tokenizer, texts, tol)


def read_texts(path: str | Path, label2id: dict[str, int] | None = None) -> tuple[list[str], list[int] | None]:
    """Texts for the checks from ``path``: a ``.jsonl`` file of ``{"text": ..., "label": ...}`` objects (label an
    int id or a name in ``label2id``; optional, all or none) or any other file as one text per non-empty line.
    Returns (texts, labels or None). Raises :class:`DeployError` naming the file and line for bad content."""
    path = Path(path)
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DeployError(f"{path}: cannot read the texts file ({e})") from e
    if not lines:
        raise DeployError(f"{path}: no texts; give one text per line (or JSONL with a 'text' key)")
    if path.suffix != ".jsonl":
        return lines, None
    texts, labels = [], []
    for n, ln in enumerate(lines, 1):
        try:
            row = json.loads(ln)
            texts.append(str(row["text"]))
        except (ValueError, KeyError, TypeError) as e:
            raise DeployError(f"{path}:{n}: expected a JSON object with a 'text' key ({e})") from e
        label = row.get("label")
        if isinstance(label, str) and label2id and label in label2id:
            label = label2id[label]
        if label is not None and not isinstance(label, int):
            raise DeployError(f"{path}:{n}: label {label!r} is neither an id nor a name in the model's label2id")
        labels.append(label)
    if all(lb is None for lb in labels):
        return texts, None
    if any(lb is None for lb in labels):
        raise DeployError(f"{path}: some rows have a 'label' and some do not; label all rows or none")
    return texts, [int(lb) for lb in labels if lb is not None]
