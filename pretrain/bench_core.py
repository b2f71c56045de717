"""Benchmark of the distillation step's core: gathered LM head versus full logits then select.

``python -m pretrain.bench_core [--steps 5] [--warmup 1] [--batch 16] [--seq 128] ...`` builds a random BERT teacher
(hidden 256, 8 layers, vocabulary 30,522 by default), a 4-layer student (every other layer), masks synthetic batches
with :class:`pretrain.masking.Masker`, and times one step (teacher forward, student forward and backward, DistilBERT
losses) through :class:`pretrain.distill.DistillationModel` with ``naive=False`` and ``naive=True``, interleaved so that
both see the same machine load. Prints one JSON line: tokens/s of each path (non-pad tokens per second) and the ratio.
The full training step (optimizer, DeepSpeed) is measured by ``pretrain.bench``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def build(args):
    """Teacher, student, masker and DistillationModel pair for the benchmark's sizes."""
    from transformers import BertConfig, BertForMaskedLM

    from pretrain.distill import DistillationModel
    from pretrain.losses import LossConfig
    from pretrain.masking import Masker, MaskingConfig
    from pretrain.student import StudentConfig, build_student

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=max(512, args.seq),
        attn_implementation="sdpa",
    )
    teacher = BertForMaskedLM(cfg).eval()
    student, record = build_student(
        teacher, StudentConfig(layers=list(range(0, args.layers, 2))[: args.student_layers])
    )
    loss_cfg = LossConfig()  # DistilBERT: alpha_ce 5, alpha_mlm 2, alpha_cos 1, T = 2
    fast = DistillationModel(student, teacher, loss_cfg, record["layer_map"])
    naive = DistillationModel(student, teacher, loss_cfg, record["layer_map"], naive=True)
    masker = Masker(
        MaskingConfig(), vocab_size=args.vocab, special_ids=[0, 100, 101, 102, 103], mask_token_id=103, pad_token_id=0
    )
    return fast, naive, masker


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per path (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per path first (default 1)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8, help="teacher layers")
    p.add_argument("--student-layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=30522)
    args = p.parse_args(argv)

    fast, naive, masker = build(args)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, args.vocab, (args.batch, args.seq), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    student = fast.student.train()

    def step(model, i):
        x, labels = masker(ids, mask, step=i, rank=0, micro_step=0)
        loss, _ = model(x, mask, labels)
        loss.backward()
        student.zero_grad(set_to_none=True)

    times = {"fast": [], "naive": []}
    for i in range(args.warmup + args.steps):
        for name, model in (("fast", fast), ("naive", naive)):
            t0 = time.perf_counter()
            step(model, i)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    tokens = int(mask.sum())
    out = {
        "benchmark": "distill_core_step",
        "device": "cpu",
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "batch": args.batch,
        "seq": args.seq,
        "teacher": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
        "student_layers": args.student_layers,
        "steps": args.steps,
    }
    for name, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        out[f"{name}_step_s"] = round(med, 4)
        out[f"{name}_tokens_per_s"] = round(tokens / med, 1)
    out["speedup"] = round(out["fast_tokens_per_s"] / out["naive_tokens_per_s"], 3)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
