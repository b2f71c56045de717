"""The training loop: DeepSpeed engine, frozen teacher, steps, logging, evaluation, checkpoints, resume, export.

One :class:`Trainer` per process (one process per rank). ``setup()`` checks the inputs before any work (:func:`preflight`:
teacher, tokenizer vs shards, sequence length vs position embeddings, MLM head vs loss terms), builds the student from
the teacher (``pretrain.student``), wraps ``DistillationModel`` (student + teacher + losses, ``pretrain.distill``) in a
DeepSpeed engine, and resumes from ``output_dir/checkpoints`` when a complete checkpoint is there. ``fit()`` runs the
steps; ``train_step()`` is one optimizer step over ``gradient_accumulation_steps`` micro-batches.

Host syncs: one per step, a 2-element all-reduce (MAX) at the accumulation boundary that agrees on (a) stopping, when
any rank got SIGTERM / SIGUSR1 (the handler only sets a flag), and (b) a non-finite loss. Losses and token counts stay
device tensors and are all-reduced once per ``log_interval``.

Preemption (DESIGN.md, "Preemption, measured with DeepSpeed 0.19.8"): every rank installs the handler; the ranks stop
at the same step boundary, save a checkpoint together and exit 0. Running the same command again resumes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pretrain import ds_config as dsc
from pretrain.checkpoint import CheckpointManager, atomic_write_text
from pretrain.config import RunConfig
from pretrain.data import BatchLoader, DataOrder, eval_batches, open_split
from pretrain.schema import ConfigError

# Models whose position ids start after the padding index (RoBERTa family): usable length = max_positions - pad - 1.
PADDING_OFFSET_MODELS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                         "data2vec-text", "xmod"}


class TrainingError(RuntimeError):
    """Training cannot go on (diverged: too many consecutive non-finite steps). Checkpoints already written are intact."""


# ----------------------------------------------------------------------------------------------------------------
# Process set-up


def setup_environment() -> None:
    """Environment for this process, before DeepSpeed is imported.

    Without a launcher (``python launch/pretrain.py``): a one-rank world on 127.0.0.1 with a free port. Without CUDA:
    DeepSpeed's CPU accelerator. On CPU without ``OMP_NUM_THREADS``: torch threads = usable cores / local ranks.
    A ``TORCH_CUDA_ARCH_LIST`` with architecture suffixes is rewritten for DeepSpeed's op builder
    (:func:`deepspeed_arch_list`).
    """
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    readable = arch and deepspeed_arch_list(arch)
    if readable != arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = readable
        if os.environ.get("RANK", "0") == "0":
            console(f"[pretrain] TORCH_CUDA_ARCH_LIST {arch!r} -> {readable!r} for DeepSpeed's op builder (it cannot "
                    f"read architecture suffixes such as '9.0a')")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        keep_freed_memory()
        if "OMP_NUM_THREADS" not in os.environ:
            local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            torch.set_num_threads(max(1, cores // max(1, local)))


def deepspeed_arch_list(value: str) -> str:
    """``TORCH_CUDA_ARCH_LIST`` without architecture suffixes: ``"8.0;9.0a+PTX"`` -> ``"8.0;9.0+PTX"``.

    DeepSpeed 0.19's just-in-time op builder (fused Adam) sorts the entries as numbers and fails with
    ``ValueError: invalid literal for int() with base 10: '0a'`` on ``9.0a`` (PyTorch's name for Hopper's
    architecture-specific features; CUDA images set it). Its ops need no such features, so the plain architecture is
    used; seen on an H100 image whose list was ``9.0a`` (docs/performance.md).
    """
    return re.sub(r"(\d+\.\d+)[a-z]+", r"\1", value)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
KEEP_FREED_BYTES = 1 << 30


def set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """glibc ``mallopt(M_MMAP_THRESHOLD, mmap_bytes)`` and ``mallopt(M_TRIM_THRESHOLD, trim_bytes)`` (bytes); returns
    False, changing nothing, without glibc."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, mmap_bytes)
        libc.mallopt(M_TRIM_THRESHOLD, trim_bytes)
    except (OSError, AttributeError):
        return False
    return True


def keep_freed_memory() -> None:
    """CPU: glibc keeps freed blocks up to 1 GiB for reuse (``mallopt`` M_MMAP_THRESHOLD and M_TRIM_THRESHOLD)
    instead of unmapping them, so the step's large activations are not page-faulted in anew every step (see
    docs/performance.md). Skipped when ``MALLOC_MMAP_THRESHOLD_`` is set (the user's choice) or without glibc."""
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        set_malloc_thresholds(KEEP_FREED_BYTES, KEEP_FREED_BYTES)


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed (NCCL on CUDA, gloo on CPU); returns (rank, world, device)."""
    setup_environment()
    import deepspeed
    import torch.distributed as dist
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import random
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class StopFlag:
    """SIGTERM / SIGUSR1 handler that only records the signal; the loop acts on it at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> None:
        """Install the handler for SIGTERM and SIGUSR1 (main thread only)."""
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


# ----------------------------------------------------------------------------------------------------------------
# Checks before any work


@dataclasses.dataclass
class Preflight:
    """What :func:`preflight` found: the teacher's local path or hub name, its config and tokenizer, whether it has an
    MLM head, and the shards' manifest."""

    teacher_path: str
    teacher_config: Any
    tokenizer: Any
    has_mlm_head: bool
    manifest: dict


def _has_mlm_head(config) -> bool:
    return any(a.endswith("ForMaskedLM") or a == "BertForPreTraining" for a in (config.architectures or []))


def max_sequence_length(config) -> int:
    """Longest sequence (tokens) the model's position embeddings allow."""
    limit = int(config.max_position_embeddings)
    if config.model_type in PADDING_OFFSET_MODELS:
        limit -= int(config.pad_token_id or 0) + 1
    return limit


def preflight(cfg: RunConfig) -> Preflight:
    """Check the run's inputs without loading weights; raises :class:`ConfigError` naming the key and what to do.

    Checks: the teacher loads (``teacher.name_or_path`` resolved with ``data_prep.embedded.resolve_model``); the
    shards exist and were made with the teacher's tokenizer (vocabulary size and special token ids from
    ``manifest.json``); the shards' ``max_seq_length`` (padded to ``data.pad_to_multiple_of``) fits the teacher's
    position embeddings; a teacher without MLM head is not asked for ``loss.alpha_ce`` / ``loss.alpha_mlm``.
    """
    from transformers import AutoConfig, AutoTokenizer
    from data_prep.embedded import resolve_model
    from data_prep.errors import DataPrepError
    from data_prep.shards import load_manifest
    name = cfg.teacher.name_or_path
    try:
        path = resolve_model(name)
    except Exception as e:  # data_prep's error for an unknown embedded:NAME or a failed fetch
        raise ConfigError(f"teacher.name_or_path: {name!r}: {e}") from None
    try:
        tconf = AutoConfig.from_pretrained(path, revision=cfg.teacher.revision)
        tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.teacher.revision)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"teacher.name_or_path: {name!r} cannot be loaded: it is not a local model directory "
                          f"(config.json and tokenizer files) nor a reachable Hugging Face hub model ({first}); check "
                          f"the path or name") from None
    has_mlm = _has_mlm_head(tconf)
    cfg.loss.check_models(teacher_has_mlm_head=has_mlm, student_has_mlm_head=has_mlm, teacher_name=name)
    try:
        manifest = load_manifest(cfg.data.dir)
    except DataPrepError as e:
        raise ConfigError(f"data.dir: {e}; prepare shards with `python -m data_prep prepare --tokenizer {name} ... "
                          f"--output {cfg.data.dir}`") from None
    tok = manifest.get("tokenizer", {})
    mine = {"vocab_size": len(tokenizer), "cls_token_id": tokenizer.cls_token_id,
            "sep_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id,
            "mask_token_id": tokenizer.mask_token_id, "unk_token_id": tokenizer.unk_token_id}
    diff = {k: (tok.get(k), v) for k, v in mine.items() if tok.get(k) != v}
    if diff:
        details = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items())
        raise ConfigError(f"data.dir: the shards in {cfg.data.dir} were made with the tokenizer "
                          f"{tok.get('name_or_path')!r}, which differs from the teacher {name!r}'s ({details}: "
                          f"shards vs teacher); prepare the shards with `python -m data_prep prepare --tokenizer "
                          f"{name} ...`")
    if int(tconf.vocab_size) < len(tokenizer):
        raise ConfigError(f"teacher.name_or_path: {name!r} has {tconf.vocab_size} embeddings but its tokenizer "
                          f"{len(tokenizer)} ids")
    seq = int(manifest["max_seq_length"])
    limit = max_sequence_length(tconf)
    m = cfg.data.pad_to_multiple_of
    padded = seq if tconf.model_type in PADDING_OFFSET_MODELS else -(-seq // m) * m
    if padded > limit:
        raise ConfigError(f"data.dir: the shards' max_seq_length {seq} (padded to {padded} with "
                          f"data.pad_to_multiple_of={m}) exceeds the {limit} positions of the teacher {name!r}; "
                          f"prepare shards with --max-seq-length {limit - limit % m if padded != seq else limit} "
                          f"or less")
    return Preflight(path, tconf, tokenizer, has_mlm, manifest)


def load_teacher(cfg: RunConfig, pf: Preflight):
    """The teacher model (fp32, eval mode): ``AutoModelForMaskedLM`` when its config lists an MLM architecture, else
    ``AutoModel`` (a bare encoder such as a sentence-transformers model)."""
    from transformers import AutoModel, AutoModelForMaskedLM
    cls = AutoModelForMaskedLM if pf.has_mlm_head else AutoModel
    kwargs = {"add_pooling_layer": False} if not pf.has_mlm_head and pf.teacher_config.model_type == "bert" else {}
    model = cls.from_pretrained(pf.teacher_path, revision=cfg.teacher.revision, dtype=torch.float32,
                                attn_implementation=cfg.teacher.attn_implementation, **kwargs)
    return model.eval()


def teacher_dtype(cfg: RunConfig, cuda: bool) -> torch.dtype:
    """The teacher's precision (``teacher.dtype``; "auto": the run's half precision on GPU, fp32 on CPU)."""
    if cfg.teacher.dtype != "auto":
        return getattr(torch, cfg.teacher.dtype)
    if not cuda:
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dsc.precision(cfg.deepspeed), torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Logging


class MetricsLogger:
    """Rank 0's outputs: ``metrics.jsonl`` lines, TensorBoard scalars and a console line.

    On resume from step ``resume_step``, lines of later steps (logged after that checkpoint by the interrupted run)
    are dropped from ``metrics.jsonl`` and TensorBoard purges them (``purge_step``), so each step is logged once.
    """

    def __init__(self, out: Path, *, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))
        self.file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(out) / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must hold ``step`` and ``split``)."""
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            split = record["split"]
            for k, v in record.items():
                if k not in ("step", "split", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{split}/{k}", v, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def console(message: str) -> None:
    print(message, flush=True)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------------------------------------------
# The trainer


@dataclasses.dataclass
class StepResult:
    """One optimizer step: ``parts`` sums over the micro-batches (device tensors: "loss", "loss_<term>",
    "n_masked", "n_tokens"), the micro-batch count, the learning rate used, and the ranks' agreement: ``stop``
    (a rank got a stop signal) and ``nonfinite`` (a rank saw a non-finite loss / gradient); ``applied`` is False
    when the optimizer skipped the step (non-finite values, fp16 overflow)."""

    parts: dict[str, torch.Tensor]
    micro_steps: int
    lr: float
    stop: bool
    nonfinite: bool
    applied: bool

    @property
    def bad(self) -> bool:
        return self.nonfinite or not self.applied


class Trainer:
    """One rank of a distillation run (see the module docstring).

    Usage: ``t = Trainer(cfg); t.setup(); t.fit(); t.close()``. Attributes after ``setup()``: ``engine`` (the
    DeepSpeed engine around ``model``, a ``pretrain.distill.DistillationModel``), ``masker``, ``loader``, ``plan``
    (batch arithmetic), ``step`` (optimizer steps done), ``rank``, ``world_size``, ``device``, ``out`` (run dir).
    """

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.stop = StopFlag()
        self.step = 0
        self.tokens_seen = 0
        self.masked_tokens_seen = 0
        self.bad_steps = 0
        self._acc: dict[str, torch.Tensor] = {}
        self._acc_micro = 0
        self._acc_steps = 0
        self._acc_skipped = 0
        self._acc_tokens: torch.Tensor | None = None
        self._acc_masked: torch.Tensor | None = None
        self._last_log_time = time.perf_counter()
        self._last_saved = -1
        self._last_eval = -1
        self._grad_norm: torch.Tensor | None = None
        self._loss_keys: list[str] = []
        self.logger: MetricsLogger | None = None
        self.loader = None

    # -- set-up ------------------------------------------------------------------------------------------------

    def setup(self) -> "Trainer":
        """Initialise everything (see the module docstring); resumes from the newest complete checkpoint."""
        cfg, tc = self.cfg, self.cfg.train
        if threading_main():
            self.stop.install()
        self.rank, self.world_size, self.device = init_distributed()
        import deepspeed
        import torch.distributed as dist
        from data_prep.errors import DataPrepError
        from data_prep.shards import load_token_counts
        from pretrain.distill import DistillationModel
        from pretrain.masking import Masker
        from pretrain.student import build_student
        self.dist = dist
        self.cuda = self.device.type == "cuda"
        self.out = Path(tc.output_dir)
        self.is_main = self.rank == 0
        self.ds_config = dsc.build(cfg, self.world_size, cuda=self.cuda)
        self.plan = dsc.BatchPlan(*(self.ds_config[k] for k in dsc.BATCH_KEYS))
        self.precision = dsc.precision(self.ds_config)
        self.stage = dsc.zero_stage(self.ds_config)
        pf = self.preflight = preflight(cfg)
        self.tokenizer = pf.tokenizer
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt = CheckpointManager(self.out / "checkpoints", rank=self.rank, world_size=self.world_size,
                                      keep_last=tc.keep_last, barrier=dist.barrier)
        resume = self._find_resume()  # before any heavy work: refuse a mismatched run directory early

        seed_everything(tc.seed)  # identical on every rank: the student (and any random init) must be identical
        teacher = load_teacher(cfg, pf)
        student, self.student_record = build_student(teacher, cfg.student)
        self.model = DistillationModel(student, teacher, cfg.loss, self.student_record["layer_map"])
        self.model.move_teacher(self.device, teacher_dtype(cfg, self.cuda))
        if tc.compile:
            self.model.compile_parts()
        self._st_files = self._sentence_transformers_files()
        if resume is None and tc.export_init and self.is_main and not (self.out / "student_init").is_dir():
            self._export_init(student)
        try:
            token_counts = load_token_counts(cfg.data.dir)
        except DataPrepError as e:
            raise ConfigError(f"data.dir: {e}") from None
        self.masker = Masker.from_tokenizer(cfg.masking, self.tokenizer, token_counts=token_counts, seed=tc.seed)
        self._own_grad_norm = self.stage == 0 and self.precision == "fp32"
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, model_parameters=params, config=self.ds_config)
        if self.world_size == 1 and self.stage == 0:
            self.engine.enable_backward_allreduce = False  # one rank: skip the flatten / all-reduce / copy-back

        train = open_split(cfg.data, "train")
        order = DataOrder(len(train), micro_batch=self.plan.micro_batch, world_size=self.world_size, rank=self.rank,
                          seed=tc.seed, shuffle=cfg.data.shuffle)
        self.loader = BatchLoader(train, order, pad_id=self.tokenizer.pad_token_id,
                                  multiple=cfg.data.pad_to_multiple_of, prefetch=cfg.data.prefetch,
                                  pin_memory=self.cuda)
        try:
            self.valid = open_split(cfg.data, "valid")
        except ConfigError as e:
            self.valid = None
            if self.is_main:
                console(f"[pretrain] WARNING: no evaluation: {e}")

        seed_everything(int(np.random.SeedSequence([tc.seed, self.rank]).generate_state(1)[0]))  # dropout per rank
        if resume is not None:
            self._load(*resume)
        else:
            if self.scheduler is not None and getattr(self.scheduler, "last_batch_iteration", 0) == -1:
                self.scheduler.step()  # DeepSpeed's Warmup* start at iteration -1: step k then uses the lr of k-1
            if self.is_main:
                atomic_write_text(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.logger = MetricsLogger(self.out, enabled=self.is_main, tensorboard=tc.tensorboard,
                                    resume_step=self.step if resume is not None else None)
        if self.is_main:
            n_s = sum(p.numel() for p in student.parameters())
            n_t = sum(p.numel() for p in teacher.parameters())
            console(f"[pretrain] {self.world_size} rank(s) on {self.device.type}, {self.precision}, ZeRO-{self.stage}; "
                    f"{self.plan.train_batch_size} sequences/step = micro {self.plan.micro_batch} x accumulation "
                    f"{self.plan.accumulation} x {self.world_size} ranks; teacher {n_t / 1e6:.1f}M -> student "
                    f"{n_s / 1e6:.1f}M parameters (layers {self.student_record['layer_map']}); "
                    f"{'resumed at step ' + str(self.step) if resume else 'fresh run'}; run dir {self.out}")
        return self

    def _sentence_transformers_files(self) -> dict:
        from pretrain.export import sentence_transformers_files
        return sentence_transformers_files(self.preflight.teacher_path) if self.is_main else {}

    def _write_hf_meta(self, folder: Path) -> None:
        from pretrain.export import write_hf_meta
        student = self.model.student
        write_hf_meta(folder, student.config, self.tokenizer, self._st_files, type(student).__name__)

    def _export_init(self, student) -> None:
        from pretrain.export import save_student
        with tempfile.TemporaryDirectory(dir=self.out) as meta:
            self._write_hf_meta(Path(meta))
            record = {k: v for k, v in self.student_record.items() if k != "copied"}
            save_student(student, self.out / "student_init", Path(meta),
                         {"step": 0, "teacher": self.cfg.teacher.name_or_path, "student": record})
        console(f"[pretrain] exported the initial student to {self.out / 'student_init'}")

    def _find_resume(self):
        """Rank 0 picks the newest complete checkpoint (warnings name skipped ones) and every rank gets its answer.
        Raises :class:`ConfigError` for a checkpoint of another teacher / student or (unless allowed) world size."""
        answer = [None]
        if self.is_main:
            try:
                tag, manifest, notes = self.ckpt.find_resume()
                for note in notes:
                    print(f"[pretrain] WARNING: {note}", file=sys.stderr, flush=True)
                answer = [(tag, manifest) if tag else None]
            except RuntimeError as e:
                answer = [("error", str(e))]
        self.dist.broadcast_object_list(answer, src=0)
        resume = answer[0]
        if resume is not None and resume[0] == "error":
            raise ConfigError(f"train.output_dir: {resume[1]}")
        if resume is None:
            return None
        tag, manifest = resume
        saved = manifest.get("config") or {}
        mine = self.cfg.to_dict()
        identity = {"teacher.name_or_path": ("teacher", "name_or_path"), "teacher.revision": ("teacher", "revision"),
                    **{f"student.{k}": ("student", k) for k in mine["student"]}}
        for key, (section, field) in identity.items():  # what the checkpoint's tensors depend on
            before = (saved.get(section) or {}).get(field)
            if before != mine[section][field]:
                raise ConfigError(
                    f"train.output_dir: {self.out} holds checkpoints of another run ({key} was {before!r}, this config "
                    f"says {mine[section][field]!r}); use another train.output_dir to start a new run, or the "
                    f"original value to resume")
        if manifest["world_size"] != self.world_size and not self.cfg.train.allow_world_size_change:
            raise ConfigError(
                f"train.allow_world_size_change: checkpoint {self.ckpt.root / tag} was written by "
                f"{manifest['world_size']} rank(s), this run has {self.world_size}; resuming with another world size "
                f"changes the data layout and the ZeRO partitioning. Run with {manifest['world_size']} rank(s), or "
                f"set train.allow_world_size_change=true to resume anyway")
        return tag, manifest

    def _load(self, tag: str, manifest: dict) -> None:
        """Load engine state, client state (step, cursor, counters) and this rank's RNG states from ``tag``."""
        same_world = manifest["world_size"] == self.world_size
        if not same_world and self.stage == 3:
            raise ConfigError(
                f"train.allow_world_size_change: {self.ckpt.root / tag} is a ZeRO-3 checkpoint of "
                f"{manifest['world_size']} rank(s); its partitioned weights cannot be loaded by {self.world_size} "
                f"rank(s) here. Resume with {manifest['world_size']} rank(s), or export it (python -m pretrain.export) "
                f"and start a new run from the export")
        # ZeRO-1/2 optimizer partitions do not re-shard (DeepSpeed 0.19): load the weights and the schedule, restart
        # the Adam moments. ZeRO-0 keeps everything.
        keep_optimizer = same_world or self.stage == 0
        load_path, client = self.engine.load_checkpoint(str(self.ckpt.root), tag=tag,
                                                        load_optimizer_states=keep_optimizer)
        if not keep_optimizer and self.is_main:
            print(f"[pretrain] WARNING: world size {manifest['world_size']} -> {self.world_size} with ZeRO-{self.stage}: "
                  f"weights, step and learning-rate schedule resumed; the AdamW moments restart from zero",
                  file=sys.stderr, flush=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.ckpt.root / tag}")
        self.step = int(client["step"])
        self.tokens_seen = int(client["tokens_seen"])
        self.masked_tokens_seen = int(client["masked_tokens_seen"])
        self._last_saved = self.step
        self.loader.load_state_dict(client["data"], allow_layout_change=self.cfg.train.allow_world_size_change)
        if not (same_world and self.ckpt.load_rng(tag)):
            seed_everything(int(np.random.SeedSequence([self.cfg.train.seed, self.rank, self.step])
                                .generate_state(1)[0]))
        if self.is_main:
            old = self.out / "config.json"
            new = json.dumps(self.cfg.to_dict(), indent=2) + "\n"
            if old.is_file() and old.read_text() != new:
                before, after = json.loads(old.read_text()), self.cfg.to_dict()
                changed = [f"{s}.{k}" for s in after if isinstance(after[s], dict)
                           for k in after[s] if (before.get(s) or {}).get(k) != after[s][k]]
                console(f"[pretrain] config changed since the last run: {changed}; config.json updated")
            atomic_write_text(old, new)
            console(f"[pretrain] resumed from {self.ckpt.root / tag} (step {self.step}, "
                    f"{self.tokens_seen:,} tokens seen)")

    # -- the step ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's client state: step, data cursor, tokens seen, the resolved config."""
        return {"step": self.step, "data": self.loader.state_dict(), "tokens_seen": self.tokens_seen,
                "masked_tokens_seen": self.masked_tokens_seen, "world_size": self.world_size,
                "config": self.cfg.to_dict()}

    def next_micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """The next step's ``gradient_accumulation_steps`` micro-batches from the loader (CPU tensors)."""
        return [next(self.loader) for _ in range(self.plan.accumulation)]

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step (collective: every rank calls it with its own micro-batches).

        Each micro-batch (``input_ids`` / ``attention_mask`` int64 [B, L]) is masked on the device
        (deterministic from (seed, step, rank, micro-step)), run through teacher and student, and back-propagated;
        DeepSpeed averages gradients over micro-batches and ranks and steps the optimizer at the last one. Before
        that step the ranks agree (one all-reduce) on stopping and on non-finite values; a non-finite step is
        skipped (DeepSpeed's overflow handling, or, for fp32 without ZeRO, dropped gradients).
        """
        engine, n = self.engine, len(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        stop = nonfinite = False
        lr = float(engine.get_lr()[0]) if engine.get_lr() else 0.0
        for m, batch in enumerate(micro_batches):
            ids = batch["input_ids"].to(self.device, non_blocking=True)
            mask = batch["attention_mask"].to(self.device, non_blocking=True)
            masked, labels = self.masker(ids, mask, step=self.step, rank=self.rank, micro_step=m)
            loss, parts = engine(masked, mask, labels)
            engine.backward(loss)
            for k, v in parts.items():
                v = v.detach().float()
                sums[k] = v if k not in sums else sums[k] + v
            if m == n - 1:
                stop, nonfinite = self._agree(sums["loss"])
            if m == n - 1 and nonfinite and self._own_grad_norm:
                self._skip_optimizer_step()
            else:
                engine.step()
        applied = bool(engine.was_step_applied()) and not (nonfinite and self._own_grad_norm)  # see _skip_...
        return StepResult(sums, n, lr, stop, nonfinite, applied)

    def _agree(self, loss_sum: torch.Tensor) -> tuple[bool, bool]:
        """All-reduce (MAX) of [stop requested, non-finite] at the accumulation boundary (the step's one host sync).
        For fp32 without ZeRO the gradient norm is computed here (DeepSpeed does not report it)."""
        bad = ~torch.isfinite(loss_sum)
        if self._own_grad_norm:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            self._grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
            bad = bad | ~torch.isfinite(self._grad_norm)
        flags = torch.stack([torch.tensor(float(self.stop.requested), device=self.device), bad.float()])
        self.dist.all_reduce(flags, op=self.dist.ReduceOp.MAX)
        stop, nonfinite = (v > 0 for v in flags.tolist())
        return stop, nonfinite

    def _skip_optimizer_step(self) -> None:
        """fp32 without ZeRO: DeepSpeed steps a plain torch optimizer and checks nothing, so skip its update here as
        DeepSpeed does on an fp16 overflow: the boundary's ``engine.step()`` runs (counters, gradients zeroed) with the
        optimizer's ``step`` disabled (weights and Adam moments unchanged) and the lr schedule is not advanced."""
        opt, sched = self.engine.optimizer, self.engine.lr_scheduler
        iteration = getattr(sched, "last_batch_iteration", None)
        opt.step = lambda *args, **kwargs: None
        try:
            self.engine.step()
        finally:
            del opt.step
        if iteration is not None:
            sched.step(iteration)

    # -- the loop ----------------------------------------------------------------------------------------------

    def fit(self) -> int:
        """Train to ``train.max_steps`` (or a stop signal); returns the process exit code (0).

        Raises :class:`TrainingError` after ``train.max_bad_steps`` consecutive skipped steps, or when a
        non-finite step was applied; checkpoints already written stay intact.
        """
        tc = self.cfg.train
        self._last_log_time = time.perf_counter()
        while self.step < tc.max_steps:
            res = self.train_step(self.next_micro_batches())
            self.step += 1
            self._accumulate(res)
            if res.nonfinite and res.applied:
                raise TrainingError(
                    f"step {self.step}: a non-finite loss was applied by the optimizer ({self.precision}, ZeRO-"
                    f"{self.stage}); stopping without saving. The last checkpoint ({self._last_saved}) is intact; "
                    f"lower the learning rate or check the data")
            self.bad_steps = self.bad_steps + 1 if res.bad else 0
            if self.bad_steps >= tc.max_bad_steps:
                raise TrainingError(
                    f"step {self.step}: {self.bad_steps} consecutive steps with a non-finite loss or gradient "
                    f"(train.max_bad_steps={tc.max_bad_steps}; skipped, weights unchanged); stopping. Checkpoints "
                    f"up to step {self._last_saved} are intact. Lower the learning rate, use bf16 instead of fp16, "
                    f"or check the data")
            last = self.step == tc.max_steps
            save = res.stop or last or (tc.save_interval and self.step % tc.save_interval == 0)
            if save or self.step % tc.log_interval == 0:
                self._log_train()
            if (tc.eval_interval and self.step % tc.eval_interval == 0) or last:
                self.evaluate()
            if save:  # skipped steps left the weights untouched, so saving after one is safe
                self.save()
            if res.stop:
                signame = signal.Signals(self.stop.signum).name if self.stop.signum else "a signal on another rank"
                if self.is_main:
                    console(f"[pretrain] stopped by {signame} at step {self.step}: checkpoint saved; run the same "
                            f"command again to resume")
                return 0
        if self._last_saved != self.step:
            self.save()
        self.export_final()
        return 0

    def _accumulate(self, res: StepResult) -> None:
        tok, msk = res.parts["n_tokens"], res.parts["n_masked"]
        self._acc_tokens = tok if self._acc_tokens is None else self._acc_tokens + tok
        self._acc_masked = msk if self._acc_masked is None else self._acc_masked + msk
        self._acc_steps += 1
        self.last_lr = res.lr
        if res.bad:
            self._acc_skipped += 1
            return
        for k, v in res.parts.items():
            if k.startswith("loss"):
                self._acc[k] = v if k not in self._acc else self._acc[k] + v
        self._acc_micro += res.micro_steps

    def _sync_counts(self) -> dict[str, float]:
        """All-reduce the interval's sums (one collective), update tokens seen; returns per-micro-batch means."""
        keys = sorted(self._acc)
        zero = torch.zeros((), device=self.device)
        vec = torch.stack([self._acc_tokens if self._acc_tokens is not None else zero,
                           self._acc_masked if self._acc_masked is not None else zero]
                          + [self._acc[k] for k in keys]).double()
        self.dist.all_reduce(vec)
        values = vec.tolist()
        tokens, masked = int(values[0]), int(values[1])
        self.tokens_seen += tokens
        self.masked_tokens_seen += masked
        denom = max(1, self._acc_micro * self.world_size)
        means = {k: v / denom for k, v in zip(keys, values[2:])}
        self._interval_tokens = tokens
        self._acc, self._acc_micro, self._acc_tokens, self._acc_masked = {}, 0, None, None
        return means

    def _log_train(self) -> None:
        """Sync the interval's metrics and write one train record (rank 0)."""
        if self._acc_steps == 0:
            return
        steps, skipped = self._acc_steps, self._acc_skipped
        means = self._sync_counts()
        now = time.perf_counter()
        elapsed = now - self._last_log_time
        self._last_log_time = now
        self._acc_steps = self._acc_skipped = 0
        if not self.is_main:
            return
        self._loss_keys = sorted(set(self._loss_keys) | set(means))
        means = {k: means.get(k) for k in self._loss_keys}  # None: every step of the interval was skipped
        rec = {"split": "train", "step": self.step, "epoch": self.loader.order.epoch, "tokens_seen": self.tokens_seen,
               "masked_tokens_seen": self.masked_tokens_seen, **means, "lr": self.last_lr,
               "grad_norm": self._grad_norm_value(), "loss_scale": self._loss_scale(),
               "tokens_per_s": self._interval_tokens / elapsed if elapsed > 0 else 0.0,
               "seconds_per_step": elapsed / steps, "skipped_steps": skipped, "time": time.time()}
        self.logger.log(rec)
        tc = self.cfg.train
        terms = " ".join(f"{k[5:]} {_fmt(v)}" for k, v in means.items() if k.startswith("loss_"))
        eta = (tc.max_steps - self.step) * rec["seconds_per_step"]
        console(f"step {self.step}/{tc.max_steps} | loss {_fmt(means.get('loss'))} ({terms}) | "
                f"lr {self.last_lr:.2e} | grad {_fmt(rec['grad_norm'], 3)} | "
                f"{rec['tokens_per_s']:,.0f} tok/s | {rec['seconds_per_step']:.2f} s/step | "
                f"{self.tokens_seen / 1e6:.2f}M tokens | eta {eta / 60:.1f} min"
                + (f" | {skipped} skipped" if skipped else ""))

    def _grad_norm_value(self) -> float | None:
        value = self._grad_norm if self._own_grad_norm else self.engine.get_global_grad_norm()
        if value is None:
            return None
        value = float(value)
        return value if math.isfinite(value) else None

    def _loss_scale(self) -> float:
        if self.precision != "fp16":
            return 1.0
        opt = self.engine.optimizer
        return float(getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", 1.0))

    # -- evaluation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Evaluate the student on the valid split (collective); rank 0 logs a ``"split": "valid"`` record.

        Over the first ``train.eval_sequences`` valid sequences, masked as in training (fixed masks): where the
        teacher has an MLM head, the student's MLM loss (mean cross-entropy on masked tokens, nats), perplexity
        (exp of it), accuracy (argmax = original token), KL(teacher || student) at temperature 1 and top-1 agreement
        with the teacher on the masked tokens; always, the cosine between student and teacher last hidden states
        (mean over real tokens) and between their mean-pooled sentence embeddings (mean over sequences), when the
        widths agree. Returns the record (rank 0) or None.
        """
        from pretrain.student import base_model, mlm_head
        self._last_eval = self.step
        if self.valid is None:
            return None
        student, teacher = self.model.student, self.model.teacher
        head_s, head_t = mlm_head(student), mlm_head(teacher)
        with_head = head_s is not None and head_t is not None
        same_width = student.config.hidden_size == teacher.config.hidden_size
        self.engine.eval()
        sums = torch.zeros(10, dtype=torch.float64, device=self.device)
        batches = eval_batches(self.valid, micro_batch=self.plan.micro_batch, world_size=self.world_size,
                               rank=self.rank, max_sequences=self.cfg.train.eval_sequences,
                               pad_id=self.tokenizer.pad_token_id, multiple=self.cfg.data.pad_to_multiple_of)
        for i, batch in enumerate(batches):
            ids = batch["input_ids"].to(self.device)
            mask = batch["attention_mask"].to(self.device)
            masked, labels = self.masker(ids, mask, step=0, rank=self.rank, micro_step=i)
            hs = base_model(student)(input_ids=masked, attention_mask=mask).last_hidden_state
            ht = base_model(teacher)(input_ids=masked, attention_mask=mask).last_hidden_state
            real = mask.bool()
            sums[5] += real.sum()
            sums[7] += ids.shape[0]
            if same_width:
                sums[6] += F.cosine_similarity(hs.float(), ht.float(), dim=-1)[real].sum()
                m = mask.unsqueeze(-1).float()
                ps, pt = (hs.float() * m).sum(1) / m.sum(1), (ht.float() * m).sum(1) / m.sum(1)
                sums[8] += F.cosine_similarity(ps, pt, dim=-1).sum()
            if with_head:
                pos = labels != -100
                ls, lt = head_s(hs[pos]).float(), head_t(ht[pos]).float()
                y = labels[pos]
                logp_s, logp_t = F.log_softmax(ls, -1), F.log_softmax(lt, -1)
                sums[0] += pos.sum()
                sums[1] += F.nll_loss(logp_s, y, reduction="sum")
                sums[2] += (ls.argmax(-1) == y).sum()
                sums[3] += (logp_t.exp() * (logp_t - logp_s)).sum()
                sums[4] += (ls.argmax(-1) == lt.argmax(-1)).sum()
        self.dist.all_reduce(sums)
        self.engine.train()
        v = sums.tolist()
        if not self.is_main:
            return None
        if v[7] == 0:
            console("[pretrain] WARNING: the valid split has fewer sequences than ranks; evaluation skipped")
            return None
        rec: dict[str, Any] = {"split": "valid", "step": self.step, "sequences": int(v[7]), "tokens": int(v[5])}
        if with_head and v[0] > 0:
            rec.update(mlm_loss=v[1] / v[0], perplexity=math.exp(min(v[1] / v[0], 50.0)), mlm_accuracy=v[2] / v[0],
                       kl_to_teacher=v[3] / v[0], agreement=v[4] / v[0], masked_tokens=int(v[0]))
        if same_width:
            rec.update(hidden_cosine=v[6] / v[5], pooled_cosine=v[8] / v[7])
        rec["time"] = time.time()
        self.logger.log(rec)
        shown = " | ".join(f"{k} {rec[k]:.4f}" for k in ("mlm_loss", "perplexity", "mlm_accuracy", "kl_to_teacher",
                                                          "agreement", "hidden_cosine", "pooled_cosine") if k in rec)
        console(f"valid @ step {self.step} | {shown}")
        return rec

    # -- checkpoints and export --------------------------------------------------------------------------------

    def save(self) -> Path:
        """Save a checkpoint of the current step (collective). Returns the tag directory."""
        if self._acc_tokens is not None:
            self._sync_counts()
        tag_dir = self.ckpt.save(self.engine, self.step, self.state_dict(), write_extra=self._write_hf_dir)
        self._last_saved = self.step
        if self.is_main:
            console(f"[pretrain] saved checkpoint {tag_dir}")
        return tag_dir

    def _write_hf_dir(self, tag_dir: Path) -> None:
        from pretrain.export import HF_DIR
        self._write_hf_meta(tag_dir / HF_DIR)

    def export_final(self) -> Path | None:
        """Rank 0 exports the last checkpoint to ``output_dir/student`` (ZeRO consolidated); others wait."""
        from pretrain.export import INFO, export_checkpoint, resolve_tag_dir
        out = self.out / "student"
        if self.is_main:
            info = out / INFO
            tag_dir = resolve_tag_dir(self.ckpt.root)
            if info.is_file() and json.loads(info.read_text()).get("checkpoint") == str(tag_dir.resolve()):
                console(f"[pretrain] {out} already holds the export of {tag_dir}")
            else:
                export_checkpoint(self.ckpt.root, out)
                console(f"[pretrain] exported the student to {out}")
        self.dist.barrier()
        return out

    def close(self) -> None:
        """Close the loader thread and the logs (the process group stays for the caller to destroy)."""
        if self.loader is not None:
            self.loader.close()
        if self.logger is not None:
            self.logger.close()


def threading_main() -> bool:
    """Whether this is the main thread (signal handlers can only be installed there)."""
    import threading
    return threading.current_thread() is threading.main_thread()


def run(cfg: RunConfig) -> int:
    """Set up and train one rank; returns the exit code. Used by ``launch/pretrain.py``."""
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.fit()
    finally:
        trainer.close()
