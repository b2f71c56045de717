"""Benchmark of the real training step: throughput, model FLOPs, MFU and peak memory, fast versus naive.

``python -m pretrain.bench --config C [section.key=value ...] [--steps N] [--warmup N] [--naive | --both]
[--ablate NAME ...] [--synthetic] [--seq-len L] [--profile FILE]`` builds the real :class:`pretrain.trainer.Trainer`
(a temporary run directory: no checkpoints, no exports, no TensorBoard) and times ``train_step`` (teacher forward,
student forward and backward, optimizer step, through the DeepSpeed engine) including ``next_micro_batches`` (the data
wait), exactly as ``Trainer.fit`` runs them. It prints one JSON line per mode, then (with more than one mode) one
comparison line.

Modes, all of the same trainer (same weights, engine and data), interleaved step by step so that every mode sees the
same machine load; medians over the timed steps are reported:

- ``fast``: the configured step (LM heads on the gathered positions, the configured attention, half-precision
  teacher on GPU).
- ``naive`` (``--naive``, ``--both``): the plain way: full-vocabulary logits of teacher and student at every position,
  then select; eager ("standard") attention; the teacher in fp32 (the student keeps the run's precision, fp32 on CPU).
- ablations of the fast step, one change each (``--ablate``, repeatable): ``head`` (full logits then select),
  ``attention`` (eager attention), ``teacher-fp32`` (GPU: the teacher in fp32), ``host-sync`` (``.item()`` of every
  logged value after each micro-batch, as a loop that logs from host floats would), ``optimizer`` (torch AdamW's
  per-tensor loop instead of its fused kernel), ``allreduce`` (DeepSpeed's gradient all-reduce with one rank),
  ``malloc`` (CPU: glibc's allocator thresholds at their defaults instead of ``runtime.keep_freed_memory``),
  ``vocab-align`` (CUDA: the LM heads' vocabulary products unpadded: an odd vocabulary gives unaligned GEMMs).
  One ablation changes the recipe instead, to price a part of it: ``dropout`` (the student's dropout off, hidden
  and attention: what DistilBERT's dropout 0.1 costs per step).

Data: real shards (``data.dir``) or synthetic shards in the same format, written with ``data_prep``'s packer into the
temporary directory (uniformly random non-special ids of the teacher's vocabulary; no corpus needed): with
``--synthetic``, or when ``data.dir`` is ``synthetic:L`` (sequences of L tokens).
Teacher: ``teacher.name_or_path`` as usual, or ``random:MODEL_TYPE,key=value,...`` (e.g. ``random:bert,hidden_size=256,
num_hidden_layers=8,num_attention_heads=4,intermediate_size=1024,vocab_size=30522``): a randomly initialised
``AutoModelForMaskedLM`` of that ``transformers`` config and a word-level tokenizer of its vocabulary are saved in the
temporary directory and the trainer loads them as any local teacher.

FLOPs (:func:`step_flops`): model FLOPs of the matrix products the step actually does (PaLM-style MFU accounting,
Chowdhery et al. 2022, appendix B): teacher forward, student forward and backward (2x forward), the attention quadratic
term included, the LM heads on the positions they run on (gathered: the masked tokens; naive: every position).
Embedding lookups, norms, softmax and element-wise work are not counted. MFU = achieved FLOP/s / peak: on CPU the peak
is measured in the same run (best fp32 matrix product of ``--peak-size``, before and after the timed steps), on GPU the
datasheet dense peak of the precision used (:data:`DATASHEET_PEAK_TFLOPS`; ``--peak-tflops`` overrides). Peak memory:
one extra untimed step per mode after the timed ones, from a clean start: CPU the process's peak RSS (Linux ``VmHWM``,
reset through ``/proc/self/clear_refs`` after ``malloc_trim``); GPU ``torch.cuda.max_memory_allocated``. Results and
commands: docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.files import atomic_write_bytes
from pretrain.engine import OnMicroBatch
from pretrain.flops import _dims, datasheet_peak, device_name, measure_cpu_peak, step_flops
from pretrain.runtime import KEEP_FREED_BYTES, set_malloc_thresholds


class PeakMemory:
    """Peak memory of the steps between :meth:`reset` and :meth:`read` (bytes).

    GPU: ``torch.cuda.max_memory_allocated``. CPU (Linux): peak resident set size ``VmHWM``, reset by writing 5 to
    ``/proc/self/clear_refs`` after returning freed heap to the system (``malloc_trim``); where that is not possible,
    the process's peak RSS so far (``ru_maxrss``; then ``kind`` says so).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.kind = "cuda_max_memory_allocated" if self.cuda else "peak_rss"
        self._libc = None
        if not self.cuda:
            with contextlib.suppress(OSError, AttributeError):
                self._libc = ctypes.CDLL("libc.so.6")
            if not self._can_reset():
                self.kind = "peak_rss_process"

    @staticmethod
    def _can_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "peak_rss":
            if self._libc is not None:
                self._libc.malloc_trim(0)
            self._can_reset()

    def read(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "peak_rss":
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ----------------------------------------------------------------------------------------------------------------
# Synthetic teacher and shards


def parse_random_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"random:bert,hidden_size=256,..."`` -> ``("bert", {"hidden_size": 256, ...})`` (values parsed as JSON).

    Raises ``ValueError`` naming the bad part.
    """
    body = spec.split(":", 1)[1]
    model_type, *items = [p.strip() for p in body.split(",") if p.strip()]
    kwargs = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"teacher.name_or_path: {spec!r}: {item!r} is not key=value")
        key, value = item.split("=", 1)
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value
    return model_type, kwargs


def word_level_tokenizer(vocab_size: int, specials: dict[str, int]):
    """A fast word-level tokenizer of ``vocab_size`` ids: ``specials`` ({role: id}, roles cls/sep/pad/mask/unk and
    optionally bos/eos) at their ids, ``t<id>`` elsewhere. Enough for shards, masking and the trainer's checks."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {
        "bert": {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]", "unk": "[UNK]"},
        "roberta": {"cls": "<s>", "sep": "</s>", "pad": "<pad>", "mask": "<mask>", "unk": "<unk>"},
    }
    style = names["roberta" if specials.get("bos") is not None else "bert"]
    vocab = {f"t{i}": i for i in range(vocab_size)}
    for role, token in style.items():
        del vocab[f"t{specials[role]}"]
        vocab[token] = specials[role]
    tok = Tokenizer(models.WordLevel(vocab, unk_token=style["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {f"{role}_token": token for role, token in style.items()}
    if specials.get("bos") is not None:
        kwargs.update(bos_token=style["cls"], eos_token=style["sep"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=100_000, **kwargs)


def make_random_teacher(spec: str, folder: Path, seed: int = 0) -> Path:
    """Save a randomly initialised MLM teacher described by ``random:MODEL_TYPE,key=value,...`` and a word-level
    tokenizer of its vocabulary in ``folder`` (BERT ids: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103;
    RoBERTa-like ids: <s> 0, <pad> 1, </s> 2, <unk> 3, <mask> vocab-1). Returns ``folder``."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    from pretrain.teacher import PADDING_OFFSET_MODELS

    model_type, kwargs = parse_random_spec(spec)
    config = AutoConfig.for_model(model_type, **kwargs)
    v = int(config.vocab_size)
    if model_type in PADDING_OFFSET_MODELS:
        specials = {"cls": 0, "pad": 1, "sep": 2, "unk": 3, "mask": v - 1, "bos": 0, "eos": 2}
        config.pad_token_id, config.bos_token_id, config.eos_token_id = 1, 0, 2
    else:
        specials = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
        config.pad_token_id = 0
    torch.manual_seed(seed)
    model = AutoModelForMaskedLM.from_config(config)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    word_level_tokenizer(v, specials).save_pretrained(folder)
    return Path(folder)


def write_synthetic_shards(
    folder: Path, tokenizer, *, seq_len: int, num_sequences: int, valid_sequences: int = 16, seed: int = 0
) -> Path:
    """Shards in the ``data_prep`` format (manifest, ``.bin`` + index per split, ``token_counts.npy``) of
    ``num_sequences`` train and ``valid_sequences`` valid sequences of ``seq_len`` tokens: documents of 50-500
    uniformly random non-special ids packed FULL-SENTENCES by ``data_prep.prepare.Packer``. Returns ``folder``."""
    from data_prep import shards
    from data_prep.prepare import Packer
    from data_prep.tokenizer import token_dtype, tokenizer_record

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = tokenizer_record(tokenizer, "synthetic")
    vocab = record["vocab_size"]
    dtype = token_dtype(vocab)
    allowed = np.setdiff1d(np.arange(vocab), np.asarray(record["all_special_ids"]))
    rng = np.random.default_rng(seed)
    counts = np.zeros(vocab, np.int64)
    splits = {}
    for split, n in (("train", num_sequences), ("valid", valid_sequences)):
        writer = shards.ShardWriter(folder, split, dtype, shard_tokens=1 << 25)
        packer = Packer(
            writer, record["cls_token_id"], record["sep_token_id"], seq_len, counts if split == "train" else None
        )
        while packer.num_sequences < n:
            lengths = rng.integers(50, 501, size=64).astype(np.int64)
            packer.add(allowed[rng.integers(0, len(allowed), int(lengths.sum()))].astype(dtype), lengths)
        splits[split] = shards.split_summary(writer.close(), packer.num_documents)
    shards.atomic_save_npy(folder / shards.TOKEN_COUNTS, counts)
    manifest = {
        "format_version": shards.FORMAT_VERSION,
        "tokenizer": record,
        "max_seq_length": seq_len,
        "dtype": dtype.name,
        "splits": splits,
        "dropped": {},
        "sources": [{"synthetic": "uniform random ids"}],
        "seed": seed,
        "valid_fraction": valid_sequences / (num_sequences + valid_sequences),
    }
    atomic_write_bytes(folder / shards.MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Modes


@dataclasses.dataclass(frozen=True)
class Mode:
    """How one timed step runs; every field False = the configured (fast) step. ``full_logits``: LM heads on every
    position, then select; ``eager``: eager attention; ``teacher_fp32``: the teacher in fp32; ``host_sync``: ``.item()``
    of the logged values after each micro-batch; ``unfused_optimizer``: torch AdamW's per-tensor loop instead of its
    fused kernel; ``allreduce``: DeepSpeed's gradient all-reduce even with one rank; ``default_malloc``: glibc's
    allocator thresholds at their defaults (after warm-up) instead of :func:`pretrain.runtime.keep_freed_memory`;
    ``unaligned_vocab``: the LM heads' vocabulary products without padding to a multiple of 64 (CUDA;
    :func:`pretrain.distill.aligned_vocab`); ``no_dropout``: every ``nn.Dropout`` of the student at p = 0 (its hidden
    and attention dropout; a change of the recipe, to price it)."""

    name: str
    full_logits: bool = False
    eager: bool = False
    teacher_fp32: bool = False
    host_sync: bool = False
    unfused_optimizer: bool = False
    allreduce: bool = False
    default_malloc: bool = False
    unaligned_vocab: bool = False
    no_dropout: bool = False


FAST = Mode("fast")
NAIVE = Mode("naive", full_logits=True, eager=True, teacher_fp32=True)
ABLATION_MODES = {
    "head": Mode("fast-full-logits", full_logits=True),
    "attention": Mode("fast-eager-attention", eager=True),
    "teacher-fp32": Mode("fast-teacher-fp32", teacher_fp32=True),
    "host-sync": Mode("fast-host-sync", host_sync=True),
    "optimizer": Mode("fast-unfused-adamw", unfused_optimizer=True),
    "allreduce": Mode("fast-allreduce", allreduce=True),
    "malloc": Mode("fast-default-malloc", default_malloc=True),
    "vocab-align": Mode("fast-unaligned-vocab", unaligned_vocab=True),
    "dropout": Mode("fast-no-dropout", no_dropout=True),
}
ABLATIONS = tuple(ABLATION_MODES)


class ModeSwitch:
    """Puts a set-up :class:`pretrain.trainer.Trainer` into a :class:`Mode` between steps (same weights and engine).

    Raises ``SystemExit`` for an ablation that does not apply to the run (for example ``optimizer`` when the
    optimizer is not torch's fused AdamW)."""

    def __init__(self, trainer, modes: list[Mode]):
        from pretrain.teacher import teacher_dtype

        self.trainer = trainer
        self.on_micro_batch: OnMicroBatch = None  # host-sync mode: .item() of every loss part after each micro-batch
        self.model = trainer.model
        self.engine = trainer.engine
        self.attn = {m: m.config._attn_implementation for m in (self.model.student, self.model.teacher)}
        self.vocab_multiple = self.model.vocab_multiple
        # BERT / RoBERTa / ELECTRA / DistilBERT read their attention dropout from an nn.Dropout module's p too
        self.dropout_p = {m: m.p for m in self.model.student.modules() if isinstance(m, torch.nn.Dropout)}
        self.fast_teacher_dtype = teacher_dtype(trainer.cfg.teacher, trainer.cfg.deepspeed, trainer.cuda)
        self.allreduce = self.engine.enable_backward_allreduce
        opt = self.engine.optimizer
        self.torch_optimizer = getattr(opt, "optimizer", opt)
        self.fused = [g.get("fused") for g in self.torch_optimizer.param_groups]
        # the trainer tuned glibc (keep_freed_memory); setting the same values again says whether glibc is there
        self.malloc = (
            not trainer.cuda
            and "MALLOC_MMAP_THRESHOLD_" not in os.environ
            and set_malloc_thresholds(KEEP_FREED_BYTES, KEEP_FREED_BYTES)
        )
        for mode in modes:
            if mode.unfused_optimizer and not all(self.fused):
                raise SystemExit(
                    f"error: --ablate optimizer: the optimizer ({type(self.torch_optimizer).__name__}) "
                    f"is not torch's fused AdamW"
                )
            if mode.allreduce and self.allreduce:
                raise SystemExit(
                    "error: --ablate allreduce: the trainer all-reduces already (more than one rank or ZeRO)"
                )
            if mode.unaligned_vocab and not trainer.cuda:
                raise SystemExit("error: --ablate vocab-align: CUDA only (on CPU the heads run unpadded)")
            if mode.default_malloc and not self.malloc:
                raise SystemExit("error: --ablate malloc: CPU with glibc only, and MALLOC_MMAP_THRESHOLD_ unset")
            if mode.no_dropout and not any(self.dropout_p.values()):
                raise SystemExit("error: --ablate dropout: the student has no dropout to switch off")

    @staticmethod
    def _host_sync(parts: dict[str, torch.Tensor]) -> None:
        for v in parts.values():
            v.item()  # what a loop that logs host floats per micro-batch does

    def set(self, mode: Mode) -> None:
        """Switch to ``mode`` (outside the timed region)."""
        model, engine = self.model, self.engine
        model.set_paths(naive=mode.full_logits, vocab_multiple=1 if mode.unaligned_vocab else self.vocab_multiple)
        for m, p in self.dropout_p.items():
            m.p = 0.0 if mode.no_dropout else p
        for m, impl in self.attn.items():
            want = "eager" if mode.eager else impl
            if m.config._attn_implementation != want:
                m.set_attn_implementation(want)
        model.set_compiled(not mode.eager)  # the eager-attention modes run uncompiled
        dtype = torch.float32 if mode.teacher_fp32 else self.fast_teacher_dtype
        if next(model.teacher.parameters()).dtype != dtype:
            model.move_teacher(self.trainer.device, dtype)
        self.on_micro_batch = self._host_sync if mode.host_sync else None
        for g, fused in zip(self.torch_optimizer.param_groups, self.fused, strict=False):
            if "fused" in g:  # torch's Adam / AdamW
                g["fused"] = False if mode.unfused_optimizer else fused
        engine.enable_backward_allreduce = True if mode.allreduce else self.allreduce
        if self.malloc:  # glibc's dynamic mmap threshold tops out at 32 MiB, trim at twice that
            if mode.default_malloc:
                set_malloc_thresholds(32 << 20, 64 << 20)
            else:
                set_malloc_thresholds(KEEP_FREED_BYTES, KEEP_FREED_BYTES)


# ----------------------------------------------------------------------------------------------------------------
# The benchmark


def _spec_seq_len(data_dir: str) -> int | None:
    if data_dir.startswith("synthetic:"):
        try:
            return int(data_dir.split(":", 1)[1])
        except ValueError:
            raise SystemExit(f"error: data.dir {data_dir!r}: give synthetic:LENGTH, e.g. synthetic:128") from None
    return None


def prepare_run(args, tmp: Path):
    """Load the config with the bench's overrides, writing the random teacher / synthetic shards into ``tmp``."""
    from pretrain.config import load
    from pretrain.schema import ConfigError

    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    extra = {"train.output_dir": str(tmp / "run"), "train.export_init": "false", "train.tensorboard": "false"}
    teacher = cfg.teacher.name_or_path
    if teacher.startswith("random:"):
        try:
            extra["teacher.name_or_path"] = str(make_random_teacher(teacher, tmp / "teacher", seed=cfg.train.seed))
        except (ValueError, TypeError, KeyError) as e:
            raise SystemExit(f"error: teacher.name_or_path {teacher!r}: {e}") from None
    seq_len = _spec_seq_len(cfg.data.dir)
    if args.synthetic or seq_len is not None:
        from transformers import AutoTokenizer

        from data_prep.embedded import resolve_model

        tok = AutoTokenizer.from_pretrained(extra.get("teacher.name_or_path") or resolve_model(teacher))
        seq_len = args.seq_len or seq_len or 128
        modes = 1 + args.both + len(args.ablate)
        micro = int(cfg.deepspeed.get("train_micro_batch_size_per_gpu") or cfg.deepspeed["train_batch_size"])
        need = (args.warmup + args.steps) * modes * micro * int(cfg.deepspeed.get("gradient_accumulation_steps") or 1)
        extra["data.dir"] = str(
            write_synthetic_shards(
                tmp / "shards", tok, seq_len=seq_len, num_sequences=max(64, min(need, 4096)), seed=cfg.train.seed
            )
        )
    overrides = list(args.overrides) + [f"{k}={v}" for k, v in extra.items()]
    try:
        return load(args.config, overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def run_bench(args) -> list[dict]:
    """Set up the trainer, time the modes interleaved, return (and print) the JSON records."""
    from pretrain.trainer import Trainer

    modes = [NAIVE] if args.naive and not args.both else [FAST] + ([NAIVE] if args.both else [])
    modes += [ABLATION_MODES[a] for a in args.ablate]
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        cfg = prepare_run(args, Path(tmp))
        trainer = Trainer(cfg)
        try:
            trainer.setup()
            return _time_modes(args, trainer, modes)
        finally:
            trainer.close()


def _one_step(trainer, switch: ModeSwitch, cuda: bool) -> tuple[Any, list[dict], float, float, float]:
    """One ``fit``-style step (``Trainer.step_once``): (result, micro-batches, wall seconds, data-wait seconds,
    process CPU seconds)."""
    dev = trainer.device
    if cuda:
        torch.cuda.synchronize(dev)
    c0, t0 = time.process_time(), time.perf_counter()
    batches = trainer.next_micro_batches()
    t1 = time.perf_counter()
    res, batches = trainer.step_once(batches, on_micro_batch=switch.on_micro_batch)
    if cuda:
        torch.cuda.synchronize(dev)
    t2, c2 = time.perf_counter(), time.process_time()
    return res, batches, t2 - t0, t1 - t0, c2 - c0


def _step_model_flops(model, head_key: str, mode: Mode, res, batches) -> int:
    """Model FLOPs of a step: :func:`step_flops` per micro-batch, the heads on the rows they ran on (``head_key``:
    the count of ``res.parts`` the gathered heads run on, "n_masked" or "n_tokens")."""
    positions = sum(b["input_ids"].numel() for b in batches)
    head = positions if mode.full_logits else float(res.parts[head_key])
    return sum(
        step_flops(
            model,
            sequences=b["input_ids"].shape[0],
            seq_len=b["input_ids"].shape[1],
            head_positions=round(head * b["input_ids"].numel() / positions),
        )["total"]
        for b in batches
    )  # a micro-batch's head rows: its share of the step's gathered rows


STAT_KEYS = ("step_s", "data_wait_s", "cpu_s", "flops", "tokens", "sequences", "skipped")


def _timed_steps(args, trainer, switch: ModeSwitch, modes: list[Mode]) -> tuple[dict, dict[str, float], list[float]]:
    """``--warmup`` + ``--steps`` steps of every mode, interleaved; returns (per mode: {stat: the timed steps'
    values} over :data:`STAT_KEYS`, per mode: the first step's wall seconds, the load average before and after)."""
    cuda = trainer.device.type == "cuda"
    head_key = "n_masked" if trainer.cfg.loss.restrict_ce_to_mask else "n_tokens"
    stats: dict[str, dict[str, list[float]]] = {m.name: {k: [] for k in STAT_KEYS} for m in modes}
    first: dict[str, float] = {}
    load = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    for i in range(args.warmup + args.steps):
        for mode in modes:  # interleaved: every mode sees the same machine load
            switch.set(mode)
            res, batches, wall, wait, cpu = _one_step(trainer, switch, cuda)
            first.setdefault(mode.name, wall)  # includes torch.compile's compilation (train.compile)
            if i < args.warmup:
                continue
            values = (
                wall,
                wait,
                cpu,
                _step_model_flops(switch.model, head_key, mode, res, batches),
                float(res.parts["n_tokens"]),
                sum(b["input_ids"].shape[0] for b in batches),
                float(res.bad),
            )
            for k, v in zip(STAT_KEYS, values, strict=True):
                stats[mode.name][k].append(v)
    if hasattr(os, "getloadavg"):
        load.append(os.getloadavg()[0])
    return stats, first, load


def _peak_memory(trainer, switch: ModeSwitch, modes: list[Mode]) -> tuple[dict[str, int], str]:
    """One untimed step per mode, its peak memory (bytes) from a clean start (:class:`PeakMemory`); returns (per
    mode: the peak, what was measured)."""
    memory = PeakMemory(trainer.device)
    peak_memory = {}
    for mode in modes:
        switch.set(mode)
        memory.reset()
        _one_step(trainer, switch, trainer.device.type == "cuda")
        peak_memory[mode.name] = memory.read()
    return peak_memory, memory.kind


def _peak_flops(args, device_label: str, cuda: bool, precision: str, before: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s for MFU, its source): ``--peak-tflops``; on GPU the datasheet peak of ``precision``; on CPU the
    best of the matmul peak measured ``before`` the timed steps and one measured now."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "--peak-tflops"
    if cuda or before is None:
        return datasheet_peak(device_label, precision)
    after = measure_cpu_peak(args.peak_size)
    return max(before, after), (
        f"measured: best fp32 {args.peak_size}x{args.peak_size} matmul on {torch.get_num_threads()} "
        f"thread(s) (before {before / 1e9:.1f}, after {after / 1e9:.1f} GFLOP/s)"
    )


def _mode_record(mode: Mode, values: dict[str, list[float]], **common: Any) -> dict[str, Any]:
    """The JSON line of one mode from its timed steps' ``values`` (medians) and the run's ``common`` fields
    (device, device_name, precision, warmup, first_step_s, peak, peak_source, peak_memory, memory_kind,
    load_average, config)."""
    st = {k: _median(v) for k, v in values.items()}
    step_s, tok, peak = st["step_s"], st["tokens"], common["peak"]
    achieved = st["flops"] / step_s
    return {
        "benchmark": "distill_train_step",
        "mode": mode.name,
        "device": common["device"],
        "device_name": common["device_name"],
        "precision": common["precision"],
        "steps": len(values["step_s"]),
        "warmup": common["warmup"],
        "step_s": round(step_s, 4),
        "step_s_min": round(min(values["step_s"]), 4),
        "step_s_max": round(max(values["step_s"]), 4),
        "first_step_s": round(common["first_step_s"], 3),
        "cpu_s": round(st["cpu_s"], 4),
        "data_wait_s": round(st["data_wait_s"], 5),
        "skipped_steps": int(sum(values["skipped"])),
        "tokens_per_step": int(tok),
        "sequences_per_step": int(st["sequences"]),
        "tokens_per_s": round(tok / step_s, 1),
        "sequences_per_s": round(st["sequences"] / step_s, 3),
        "flops_per_token": round(st["flops"] / tok),
        "flops_per_step": int(st["flops"]),
        "achieved_flops_per_s": round(achieved),
        "peak_flops_per_s": None if peak is None else round(peak),
        "peak_source": common["peak_source"],
        "mfu": None if peak is None else float(f"{achieved / peak:.4g}"),
        "peak_memory_mib": round(common["peak_memory"] / 2**20, 1),
        "memory_kind": common["memory_kind"],
        "load_average": [round(x, 2) for x in common["load_average"]],
        "mode_detail": {k: v for k, v in dataclasses.asdict(mode).items() if k != "name"},
        "config": common["config"],
    }


def _comparison(out: list[dict[str, Any]]) -> dict[str, Any]:
    """The comparison line of several modes' records: tokens/s of each, the first mode's speed-up over the others
    (``speedup``: over naive)."""
    base = out[0]
    cmp = {
        "benchmark": "distill_train_step",
        "mode": "comparison",
        "reference": base["mode"],
        "tokens_per_s": {r["mode"]: r["tokens_per_s"] for r in out},
        "speedup_over": {r["mode"]: round(base["tokens_per_s"] / r["tokens_per_s"], 3) for r in out[1:]},
    }
    if any(r["mode"] == "naive" for r in out):
        cmp["speedup"] = cmp["speedup_over"]["naive"]
    return cmp


def _time_modes(args, trainer, modes: list[Mode]) -> list[dict]:
    """Time ``modes`` on the set-up ``trainer`` (:func:`_timed_steps`), measure their peak memory and the peak
    FLOP/s, print and return one JSON record per mode, then with several modes the comparison."""
    dev = trainer.device
    cuda = dev.type == "cuda"
    switch = ModeSwitch(trainer, modes)
    peak_before = None if cuda or args.peak_tflops else measure_cpu_peak(args.peak_size)
    stats, first, load = _timed_steps(args, trainer, switch, modes)
    peak_memory, memory_kind = _peak_memory(trainer, switch, modes)
    if args.profile:
        profile_step(trainer, switch, modes[0], Path(args.profile), rows=args.profile_rows)
    switch.set(FAST)
    name = device_name(dev)
    peak, peak_source = _peak_flops(args, name, cuda, trainer.precision, peak_before)
    common = {
        "device": dev.type,
        "device_name": name,
        "precision": trainer.precision,
        "warmup": args.warmup,
        "peak": peak,
        "peak_source": peak_source,
        "memory_kind": memory_kind,
        "load_average": load,
        "config": _describe(trainer),
    }
    out = []
    for mode in modes:
        rec = _mode_record(
            mode, stats[mode.name], first_step_s=first[mode.name], peak_memory=peak_memory[mode.name], **common
        )
        out.append(rec)
        print(json.dumps(rec), flush=True)
    if len(modes) > 1:
        out.append(_comparison(out))
        print(json.dumps(out[-1]), flush=True)
    return out


def profile_step(trainer, switch: ModeSwitch, mode: Mode, path: Path, rows: int = 40) -> None:
    """Profile one more step of ``mode`` with ``torch.profiler`` (CPU, and CUDA kernels on GPU) and write the
    operator table, sorted by self device time (CPU: self CPU time), to ``path`` (text)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    switch.set(mode)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        _one_step(trainer, switch, cuda)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# mode {mode.name}: one step, sorted by {sort}\n{table}\n")


def _describe(trainer) -> dict:
    """The run's shape for the JSON lines."""
    cfg, model = trainer.cfg, trainer.model
    t, s = model.teacher.config, model.student.config
    th, tl, _, tv = _dims(t)
    sh, sl, _, _ = _dims(s)
    seq = int(trainer.recipe.info.manifest["max_seq_length"])
    return {
        "teacher": {
            "model_type": t.model_type,
            "hidden": th,
            "layers": tl,
            "vocab": tv,
            "dtype": str(next(model.teacher.parameters()).dtype).replace("torch.", ""),
            "attention": t._attn_implementation,
        },
        "student": {
            "hidden": sh,
            "layers": sl,
            "attention": s._attn_implementation,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "seq_len": seq,
        "pad_to_multiple_of": cfg.data.pad_to_multiple_of,
        "micro_batch": trainer.plan.micro_batch,
        "accumulation": trainer.plan.accumulation,
        "world_size": trainer.world_size,
        "zero_stage": trainer.stage,
        "precision": trainer.precision,
        "optimizer": type(getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)).__name__,
        "gradient_allreduce": bool(trainer.engine.enable_backward_allreduce),
        "prefetch": cfg.data.prefetch,
        "compile": cfg.train.compile,
        "threads": torch.get_num_threads(),
        "loss_terms": sorted(cfg.loss.active()),
        "compiled_modules": model.compiled_modules(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="a run config (JSON), e.g. configs/bench-cpu-small.json")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first (default 1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--naive", action="store_true", help="time only the naive step")
    g.add_argument(
        "--both", action="store_true", help="time the fast and the naive step, interleaved; print the speed-up"
    )
    p.add_argument(
        "--ablate",
        action="append",
        default=[],
        choices=ABLATIONS,
        help="also time the fast step with one optimisation undone, or (dropout) with the student's "
        "dropout off (repeatable)",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="synthetic shards (random ids of the teacher's vocabulary) instead of data.dir",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        metavar="L",
        help="tokens per synthetic sequence (default: data.dir's synthetic:L, else 128)",
    )
    p.add_argument("--peak-size", type=int, default=2048, metavar="N", help="CPU peak: N x N fp32 matmul")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (overrides the measured / datasheet peak)"
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="FILE",
        help="after the timed steps, profile one step of the first mode (torch.profiler) and write its "
        "operator table to FILE",
    )
    p.add_argument("--profile-rows", type=int, default=40, metavar="N", help="rows of the --profile table")
    args = p.parse_intermixed_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.naive and args.ablate:
        p.error("--ablate modifies the fast step: use it without --naive")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
