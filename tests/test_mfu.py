"""The FLOP counter behind MFU in every mode against PyTorch's own count (torch.utils.flop_counter: every matmul /
bmm run, backward included; the counter follows the same PaLM convention: forward products x 2 FLOPs, backward 2x
the student's forward), MFU of real tiny runs in (0, 1], and the task metric on the valid console line."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForSequenceClassification, BertModel

from pretrain import flops
from pretrain.config import load
from pretrain.distill import DistillationModel
from pretrain.losses import LossConfig
from pretrain.metrics import valid_line
from pretrain.tasks.distill import TaskDistillationModel
from tests.helpers import read_metrics, train_in_process
from tests.test_taskmode import TINY, _teacher, task_overrides

B, SEQ = 3, 10


@pytest.fixture(scope="module")
def task_teacher(tmp_path_factory) -> str:
    """test_taskmode's tiny fine-tuned TREC classifier, saved."""
    return _teacher(str(tmp_path_factory.mktemp("mfu-teacher")))


def _bert(cls, hidden: int, layers: int):
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=2 * hidden
    )
    cfg.num_labels = 3
    model = cls(cfg)
    model.set_attn_implementation("eager")  # PyTorch counts the attention products of eager attention
    return model


def _counted(model, *args, **kw) -> int:
    """PyTorch's FLOPs of one forward (teacher without grad inside the model) and the student's backward."""
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(*args, **kw)
        loss.backward()
    return counter.get_total_flops()


def _task_model(student_hidden: int, loss: LossConfig, precomputed: bool = False) -> TaskDistillationModel:
    teacher = _bert(BertForSequenceClassification, 16, 2).eval()
    student = _bert(BertForSequenceClassification, student_hidden, 1)
    model = TaskDistillationModel(student, teacher, loss, [1], regression=False).train()
    model.precomputed_teacher_logits = precomputed  # type: ignore[assignment]  # torch stubs: Tensor | Module only
    return model


@pytest.mark.parametrize(
    ("case", "student_hidden", "loss", "precomputed"),
    [
        ("task_kd", 16, LossConfig(alpha_ce=1.0, alpha_mlm=0.0, alpha_cos=0.0, alpha_label=0.5), False),
        ("task_precomputed", 16, LossConfig(alpha_ce=1.0, alpha_mlm=0.0, alpha_cos=0.0), True),
        ("task_narrow_hidden", 8, LossConfig(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0, alpha_mse=1.0), False),
    ],
)
def test_task_step_flops_equal_pytorchs_count(case, student_hidden, loss, precomputed):
    """Exact (tolerance 0): the classification heads once per sequence, no teacher forward with precomputed logits,
    a narrow student with TinyBERT projections (hidden term: stage 1 of two-step)."""
    model = _task_model(student_hidden, loss, precomputed)
    ids = torch.randint(5, 50, (B, SEQ), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2])
    t_logits = torch.randn(B, 3) if precomputed else None
    got = _counted(model, ids, torch.ones_like(ids), labels, teacher_logits=t_logits)
    want = flops.step_flops(model, sequences=B, seq_len=SEQ, head_positions=B)
    assert got == want["total"]
    assert (want["teacher_forward"] == 0) == precomputed
    per_batch, per_row = flops.split_flops(model)
    assert per_batch(B, SEQ) + B * per_row() == want["total"]


def test_pretraining_without_mlm_head_within_one_percent():
    """A sentence encoder (BertModel, no MLM head) with the pooled loss: the counter counts no head; PyTorch also
    counts the unused pooler's forward (2 H^2 per sequence), hence the 1% tolerance."""
    teacher = _bert(BertModel, 16, 2).eval()
    student = _bert(BertModel, 16, 1)
    loss = LossConfig(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0, alpha_pool=1.0)
    model = DistillationModel(student, teacher, loss, [1]).train()
    ids = torch.randint(5, 50, (B, SEQ))
    got = _counted(model, ids, torch.ones_like(ids), torch.full_like(ids, -100))
    want = flops.step_flops(model, sequences=B, seq_len=SEQ, head_positions=0)["total"]
    assert abs(got - want) <= 0.01 * got


def _task_run(teacher_dir: str, out, **extra) -> list[dict]:
    over = task_overrides(teacher_dir, out, steps=4, **{"train.eval_interval": 4, **extra})
    train_in_process(load(TINY, over))
    return read_metrics(out)


def test_task_runs_report_mfu_at_most_one_and_the_task_metric(task_teacher, tmp_path, capfd):
    """Tiny task runs (on the fly and with precomputed teacher logits): every train record's 0 < mfu <= 1, and the
    valid console line shows the task metric, the task score and the teacher's score."""
    recs = _task_run(task_teacher, tmp_path / "kd")
    pre = _task_run(
        task_teacher,
        tmp_path / "pre",
        **{"task.teacher_logits": "precompute", "loss.alpha_label": 0.5, "student.layers": [0]},
    )
    mfus = [r["mfu"] for r in recs + pre if r.get("split") == "train"]
    assert len(mfus) == 8 and all(0 < m <= 1 for m in mfus), mfus
    out = capfd.readouterr()
    valid = [line for line in (out.out + out.err).splitlines() if "valid @ step 4" in line]
    assert valid and all("task_accuracy" in v and "task_score" in v and "teacher_score" in v for v in valid), valid


def test_pretraining_valid_line_is_unchanged():
    rec = {"step": 5, "mlm_loss": 2.0, "perplexity": 7.389, "agreement": 0.5, "split": "valid"}
    assert valid_line(rec) == "valid @ step 5 | mlm_loss 2.0000 | perplexity 7.3890 | agreement 0.5000"


def test_two_step_and_pruned_runs_report_mfu_at_most_one(task_teacher, tmp_path):
    """The modes not run above: two-step task distillation (train.stages, the logit terms off in stage 1) and a
    pruned, narrower pretraining student: every train record's 0 < mfu <= 1 (issue 24 item 3)."""
    from tests.helpers import tiny_overrides

    stages = [{"steps": 2, "loss": {"alpha_ce": 0.0, "alpha_mse": 1.0}}, {"steps": 2}]
    two_step = _task_run(task_teacher, tmp_path / "two", **{"train.stages": stages})
    over = tiny_overrides("bert", tmp_path / "pruned", steps=4, **{"student.init": "prune", "student.hidden_size": 16})
    train_in_process(load(TINY, over))
    mfus = [r["mfu"] for r in two_step + read_metrics(tmp_path / "pruned") if r.get("split") == "train"]
    assert len(mfus) == 8 and all(0 < m <= 1 for m in mfus), mfus
