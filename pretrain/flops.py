"""Model FLOPs and device peaks: the numbers behind MFU, for the trainer's metrics and the benchmark.

FLOPs (:func:`step_flops`): model FLOPs of the matrix products the step actually does (PaLM-style MFU accounting,
Chowdhery et al. 2022, appendix B): teacher forward, student forward and backward (2x forward), the attention quadratic
term included, the LM heads on the positions they run on (gathered: the masked tokens; naive: every position); in task
distillation the classification heads (pooler / dense + classifier) once per sequence, and no teacher forward when the
teacher's logits were precomputed and no hidden term reads its internals. The terms are read from the model's
current ``loss_cfg`` at each call (stages switch it). Embedding lookups, norms, softmax and element-wise work are not
counted. Peaks: on GPU the datasheet dense peak of
the precision used (:data:`DATASHEET_PEAK_TFLOPS`); on CPU the best fp32 matrix product measured in the process
(:func:`measure_cpu_peak`).
"""

from __future__ import annotations

import contextlib
import os
import platform
import time

import torch

# Dense (no structured sparsity) peak TFLOP/s by device-name substring, first match wins; fp32 = without TF32
# (PyTorch's default for matmuls). Sources: NVIDIA H100 datasheet (SXM5: 989.4 fp16/bf16, 66.9 fp32; PCIe: 756.5 /
# 51.2; NVL: 835.5 / 60), H200 datasheet (same compute as H100 SXM), A100 datasheet (312 / 19.5).
DATASHEET_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"fp16": 756.5, "bf16": 756.5, "fp32": 51.2}),
    ("H100 NVL", {"fp16": 835.5, "bf16": 835.5, "fp32": 60.0}),
    ("H100", {"fp16": 989.4, "bf16": 989.4, "fp32": 66.9}),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", {"fp16": 989.4, "bf16": 989.4, "fp32": 66.9}),
    ("A100", {"fp16": 312.0, "bf16": 312.0, "fp32": 19.5}),
]


def _dims(config) -> tuple[int, int, int, int]:
    """(hidden, layers, intermediate, vocab) of a BERT-like config (DistilBERT's names too)."""
    hidden = getattr(config, "hidden_size", None) or config.dim
    layers = getattr(config, "num_hidden_layers", None) or config.n_layers
    inter = getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None) or 4 * hidden
    return int(hidden), int(layers), int(inter), int(config.vocab_size)


def encoder_flops(config, sequences: int, seq_len: int) -> int:
    """Forward FLOPs of the transformer layers over ``sequences`` x ``seq_len`` positions (padding included).

    Per layer and position: Q, K, V and output projections ``8 H^2``, feed-forward ``4 H I``, and the attention
    products Q K^T and A V ``4 L H`` (the quadratic term). Embedding lookups and norms are not counted.
    """
    h, n, i, _ = _dims(config)
    positions = sequences * seq_len
    return n * positions * (8 * h * h + 4 * h * i + 4 * seq_len * h)


def head_flops(config, positions: int) -> int:
    """Forward FLOPs of a BERT-style MLM head (transform ``H x H`` then decoder ``H x V``) on ``positions`` rows."""
    h, _, _, v = _dims(config)
    return positions * (2 * h * h + 2 * h * v)


def classifier_head_flops(model) -> int:
    """Forward FLOPs per sequence of a ``*ForSequenceClassification`` head: ``2 in out`` for every ``nn.Linear``
    outside the encoder layers (BERT's pooler + classifier, RoBERTa's dense + out_proj, DistilBERT's pre_classifier
    + classifier)."""
    return sum(
        2 * mod.in_features * mod.out_features
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and not any(p in name for p in ("encoder.", "transformer.", "embeddings"))
    )


def teacher_runs(model) -> bool:
    """Whether a training step runs the teacher: always, except in task distillation with precomputed teacher logits
    (``model.precomputed_teacher_logits``, set by the task recipe) and a loss on the logits only."""
    from pretrain.config import LOGIT_TERMS

    precomputed = bool(getattr(model, "precomputed_teacher_logits", False))
    return not precomputed or not set(model.loss_cfg.active()) <= LOGIT_TERMS


def step_flops(model, *, sequences: int, seq_len: int, head_positions: int) -> dict[str, int]:
    """Model FLOPs of one micro-batch through a :class:`pretrain.distill.DistillationModel`, forward and backward.

    Args:
        model: the DistillationModel (its student / teacher configs, heads, projections and relation pairs).
        sequences, seq_len: the micro-batch shape [B, L] (L padded).
        head_positions: rows the LM heads run on (gathered: the positions the losses read; naive: B x L; task
            distillation: the sequences, B).

    Returns ``{"teacher_forward", "student_forward", "student_backward", "total"}`` (FLOPs); the backward is 2x the
    student's forward (gradients of inputs and of weights), except for a classification head no loss reads (forward
    only). MLM heads count only when the loss reads logits; TinyBERT
    projections and MiniLM relation products (Q K^T, V V^T per relation pair) are counted too.
    """
    from pretrain.config import LOGIT_TERMS
    from pretrain.student import mlm_head

    cfg = model.loss_cfg
    active = cfg.active()
    s_cfg, t_cfg = model.student.config, model.teacher.config
    t_fwd = encoder_flops(t_cfg, sequences, seq_len)
    s_fwd = encoder_flops(s_cfg, sequences, seq_len)
    s_unused = 0  # forward-only FLOPs: the student's classification head when no loss reads its logits (no backward)
    if isinstance(getattr(model.teacher, "classifier", None), torch.nn.Module):  # task distillation: per sequence
        t_fwd += head_positions * classifier_head_flops(model.teacher)
        s_head = head_positions * classifier_head_flops(model.student)
        if set(active) & LOGIT_TERMS:
            s_fwd += s_head
        else:
            s_unused = s_head
    elif ("ce" in active or "mlm" in active) and mlm_head(model.teacher) is not None:
        t_fwd += head_flops(t_cfg, head_positions)
        s_fwd += head_flops(s_cfg, head_positions)
    positions = sequences * seq_len
    if model.projections is not None:
        for proj in model.projections.values():
            s_fwd += 2 * positions * proj.in_features * proj.out_features
    n_rel = ("att" in active) + ("val" in active)
    for _ in model.relation_pairs:  # [B, R, L, d] x [B, R, d, L] per relation: 2 L^2 D per sequence
        t_fwd += n_rel * 2 * sequences * seq_len * seq_len * _dims(t_cfg)[0]
        s_fwd += n_rel * 2 * sequences * seq_len * seq_len * _dims(s_cfg)[0]
    if not teacher_runs(model):
        t_fwd = 0
    return {
        "teacher_forward": t_fwd,
        "student_forward": s_fwd + s_unused,
        "student_backward": 2 * s_fwd,
        "total": t_fwd + 3 * s_fwd + s_unused,
    }


def measure_cpu_peak(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of ``size x size`` matrix products on this process's torch threads (the CPU's practical peak).

    Counted as ``2 size^3`` FLOPs per product; the fastest of ``repeats`` after one warm-up.
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def datasheet_peak(device_name: str, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s, source) from :data:`DATASHEET_PEAK_TFLOPS` for a CUDA device name; (None, why) if unknown."""
    for key, peaks in DATASHEET_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks[precision] * 1e12, f"datasheet {key} dense {precision}"
    return None, f"no datasheet peak for {device_name!r}: give --peak-tflops"


def split_flops(model) -> tuple:
    """``(per_batch, per_head_row)`` of a :class:`pretrain.distill.DistillationModel`: ``per_batch(sequences,
    seq_len)`` = the step FLOPs of one micro-batch without the heads, ``per_head_row()`` = the heads' FLOPs per
    row (gathered MLM rows, or sequences in task distillation; 0 when no head runs); their sum is
    :func:`step_flops`'s ``total``. Both read the model's current loss terms when called (stages switch them)."""

    def per_batch(sequences: int, seq_len: int) -> int:
        return step_flops(model, sequences=sequences, seq_len=seq_len, head_positions=0)["total"]

    def per_row() -> int:
        return step_flops(model, sequences=0, seq_len=0, head_positions=1)["total"]

    return per_batch, per_row


def device_name(device: torch.device) -> str:
    """The CUDA device name, or the CPU model name (``/proc/cpuinfo``) and its usable cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({cores} cores)"


def peak_flops(
    device: torch.device, precision: str, cpu_sizes: tuple[int, ...] = (256, 512, 1024)
) -> tuple[float | None, str]:
    """(peak FLOP/s, source) of ``device`` for MFU: the datasheet peak of ``precision`` on CUDA (None when the
    device is not in :data:`DATASHEET_PEAK_TFLOPS`); on CPU the best fp32 matmul FLOP/s measured now over
    ``cpu_sizes`` (:func:`measure_cpu_peak`, about 0.1 s) on the process's torch threads, the ones training uses."""
    if device.type == "cuda":
        return datasheet_peak(device_name(device), precision)
    peak = max(measure_cpu_peak(n) for n in cpu_sizes)
    sizes = "/".join(str(n) for n in cpu_sizes)
    return peak, f"measured: best fp32 {sizes} square matmul on {torch.get_num_threads()} thread(s)"
