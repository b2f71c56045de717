"""Task distillation's step as wired (:class:`pretrain.tasks.distill.TaskDistillationModel`), against independent
references from the raw teacher and student classifiers (issue 23 item 1; the references, error budget and
comparison are those of tests/test_wiring.py).

Terms (docs/task-distillation.md): KL at T = 2 x T^2 between the class distributions, mean over the examples
(DistilBERT's soft targets; Hinton et al. 2015); cross-entropy on the gold labels; ``1 - cos`` of the softened class
distributions (the Distillator recipe); for a regression task (one output) MSE to the teacher's output and to the gold
score; the hidden and relation terms on the classifiers' encoders. Teacher logits computed on the fly, or given
(``task.teacher_logits: "precompute"``), in which case the given ones are the targets.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from pretrain.losses import LossConfig
from pretrain.student import StudentConfig, build_student
from pretrain.tasks.distill import TaskDistillationModel
from tests import tiny
from tests.test_wiring import (
    T,
    assert_matches,
    cross_entropy,
    kl_rows,
    loss_cfg,
    one_minus_cos,
    perturb,
    representation_reference,
)

CLASSES = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def classifier_pair(tok, num_labels: int, **config: Any):
    """(teacher classifier, student copied from its layers 0 and 2 and perturbed, layer map). The teacher's
    classifier weights x 40: logits of a few units, so that the temperature matters. ``config``: more BertConfig
    keys."""
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        id2label={i: f"c{i}" for i in range(num_labels)},
        label2id={f"c{i}": i for i in range(num_labels)},
        **config,
    )
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        teacher.classifier.weight.mul_(40.0)
    student, record = build_student(teacher, StudentConfig())
    assert record["layer_map"] == [0, 2]  # tests/test_wiring.PAIRS
    return teacher, perturb(student), record["layer_map"]


@pytest.fixture(scope="module")
def classifiers(bert_tok):
    return classifier_pair(bert_tok, CLASSES)


@pytest.fixture(scope="module")
def regressors(bert_tok):
    return classifier_pair(bert_tok, 1)


@pytest.fixture(scope="module")
def pair_batch(bert_tok):
    """Sentence pairs with segment ids and right padding: (input_ids, attention_mask, token_type_ids)."""
    lines = tiny.corpus(1)
    enc = bert_tok(
        lines[:6],
        lines[1:7],
        padding=True,
        truncation=True,
        max_length=48,
        return_tensors="pt",
        return_token_type_ids=True,
    )
    assert (enc["attention_mask"] == 0).any() and (enc["token_type_ids"] == 1).any()
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


def task_reference(model, cfg: LossConfig, batch, labels, *, regression: bool, teacher_logits=None):
    """Every active task term from the raw classifiers' outputs (fp64, differentiable w.r.t. the student)."""
    ids, am, tt = batch
    kw = {"attention_mask": am, "token_type_ids": tt, "output_hidden_states": True}
    with torch.no_grad():
        t_out = model.teacher(input_ids=ids, **kw)
    s_out = model.student(input_ids=ids, **kw)
    s = s_out.logits.double()
    t = (t_out.logits if teacher_logits is None else teacher_logits).double()
    active, out = cfg.active(), {}
    if "label" in active:
        out["label"] = (s[:, 0] - labels.double()).pow(2).mean() if regression else cross_entropy(s, labels)
    if "ce" in active:
        out["ce"] = (s - t).pow(2).mean() if regression else kl_rows(s, t, cfg.temperature)
    if "prob_cos" in active:
        out["prob_cos"] = one_minus_cos(torch.softmax(s / cfg.temperature, -1), torch.softmax(t / cfg.temperature, -1))
        out["prob_cos"] = out["prob_cos"].mean()
    out.update(representation_reference(model, cfg, s_out.hidden_states, t_out.hidden_states, am))
    return out


CLASSIFICATION: dict[str, dict[str, Any]] = {
    "kl_T2": {"ce": 1.0},
    "label_ce": {"label": 1.0},
    "prob_cos_T2": {"prob_cos": 1.0},
    "distillator_T2": {"label": 1 / 3, "ce": 1 / 3, "prob_cos": 1 / 3},
    "kl_with_hidden_and_relations": {"ce": 2.0, "cos": 1.0, "mse": 0.5, "att": 1.0, "val": 0.5, "pool": 3.0},
}


@pytest.mark.parametrize("case", list(CLASSIFICATION))
def test_classification_terms_against_reference(case, classifiers, pair_batch):
    teacher, student, layer_map = classifiers
    cfg = loss_cfg(**CLASSIFICATION[case])
    model = TaskDistillationModel(student, teacher, cfg, layer_map, regression=False)
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    loss, logs = model(*pair_batch[:2], labels, token_type_ids=pair_batch[2])
    ref = task_reference(model, cfg, pair_batch, labels, regression=False)
    assert_matches(model, cfg, loss, logs, ref)
    assert float(logs["n_masked"]) == 6 and int(logs["n_tokens"]) == int(pair_batch[1].sum())


def test_precomputed_teacher_logits_are_the_targets(classifiers, pair_batch):
    """Given logits (the cache of ``task.teacher_logits: "precompute"``) replace the teacher's: the KL and cosine read
    them (they differ from the teacher's own, so reading the teacher's would fail)."""
    teacher, student, layer_map = classifiers
    cfg = loss_cfg(ce=1.0, prob_cos=0.5, label=0.25)
    model = TaskDistillationModel(student, teacher, cfg, layer_map, regression=False)
    given = torch.randn(6, CLASSES, generator=torch.Generator().manual_seed(5)) * 3
    labels = torch.tensor([1, 0, 2, 2, 1, 0])
    loss, logs = model(*pair_batch[:2], labels, token_type_ids=pair_batch[2], teacher_logits=given)
    ref = task_reference(model, cfg, pair_batch, labels, regression=False, teacher_logits=given)
    assert_matches(model, cfg, loss, logs, ref)


REGRESSION: dict[str, dict[str, Any]] = {
    "label_mse": {"label": 1.0},
    "output_mse": {"ce": 1.0},
    "both_with_hidden": {"label": 0.5, "ce": 1.0, "mse": 2.0, "cos": 1.0},
}


@pytest.mark.parametrize("case", list(REGRESSION))
def test_regression_terms_against_reference(case, regressors, pair_batch):
    """A regression task (one output, float scores): MSE to the gold score and to the teacher's output."""
    teacher, student, layer_map = regressors
    cfg = loss_cfg(**REGRESSION[case])
    model = TaskDistillationModel(student, teacher, cfg, layer_map, regression=True)
    scores = torch.tensor([0.5, 3.0, 1.25, 4.5, 2.0, 0.0])
    loss, logs = model(*pair_batch[:2], scores, token_type_ids=pair_batch[2])
    ref = task_reference(model, cfg, pair_batch, scores, regression=True)
    assert_matches(model, cfg, loss, logs, ref)
    assert T == 2.0  # the KL's temperature is not used for regression: MSE of the raw outputs


# ----------------------------------------------------------------------------------- a regression task, end to end
def test_regression_task_distillation_runs_and_its_first_step_equals_a_recomputation(tmp_path):
    """Task distillation of a regression task (a CSV of scores, a one-output teacher) on the trainer: it runs, the
    student keeps one output, and step 1's logged terms equal a recomputation from the exported initial student and
    the teacher on the step's two micro-batches (the trainer's data order, padded to 8): MSE to the teacher's output
    and to the gold score, mean over the micro-batches (fp32, rtol 1e-5)."""
    import csv

    import numpy as np
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pretrain.config import load
    from pretrain.data import DataOrder
    from pretrain.tasks import LocalFields, load_task
    from pretrain.tasks.examples import collate, encode
    from tests.helpers import REPO, read_metrics, train_in_process
    from tests.test_taskmode import task_overrides

    rng = np.random.default_rng(0)
    folder = tmp_path / "scores"
    folder.mkdir()
    lines = tiny.corpus(1)
    scores: dict[str, list[float]] = {}
    for split, n in (("train", 48), ("dev", 16), ("test", 16)):
        scores[split] = [round(float(rng.uniform(0, 5)), 2) for _ in range(n)]
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["sentence", "score"])
            for i in range(n):
                words = rng.choice(" ".join(lines).split(), size=int(rng.integers(3, 12)))
                w.writerow([" ".join(words) + f" {split}{i}", scores[split][i]])
    tok = tiny.bert_tokenizer()
    # no dropout (the trainer's forward is then the recomputation's function); weights of std 0.2, so that the
    # layers the student leaves out change the output
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0}
    teacher = classifier_pair(tok, 1, problem_type="regression", initializer_range=0.2, **no_dropout)[0]
    teacher_dir = tiny.save_model_dir(tmp_path / "teacher", teacher, tok)
    out = tmp_path / "run"
    extra: dict[str, Any] = {"task.name": f"csv:{folder}", "task.text_field": "sentence", "task.label_field": "score"}
    extra.update({"loss.alpha_label": 0.5, "loss.temperature": 2.0, "student.layers": [0, 2]})
    cfg = load(REPO / "configs" / "tiny-cpu.json", task_overrides(str(teacher_dir), out, steps=2, **extra))
    train_in_process(cfg)
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2]
    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert student.config.num_labels == 1 and student.config.problem_type == "regression"
    # step 1 recomputed: the train split as the recipe encodes it, the first two micro-batches of the data order
    init = AutoModelForSequenceClassification.from_pretrained(out / "student_init").eval()
    task = load_task(f"csv:{folder}", fields=LocalFields(text="sentence", label="score"))
    assert task.kind == "regression"
    train = encode(AutoTokenizer.from_pretrained(teacher_dir), task.splits["train"], cfg.task.max_length, False)
    order = DataOrder(len(train), micro_batch=8, world_size=1, rank=0, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    ce, label = [], []
    for b in range(2):
        batch = collate(train, order.indices(0, b), tok.pad_token_id, multiple=8)
        with torch.no_grad():
            kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            s, t = init(**kw).logits.double(), teacher(**kw).logits.double()
        ce.append(float((s - t).pow(2).mean()))
        gold = torch.tensor([scores["train"][i] for i in order.indices(0, b)], dtype=torch.float64)  # the CSV's
        label.append(float((s[:, 0] - gold).pow(2).mean()))
    assert recs[0]["loss_ce"] == pytest.approx(np.mean(ce), rel=1e-5) and np.mean(ce) > 1e-3
    assert recs[0]["loss_label"] == pytest.approx(np.mean(label), rel=1e-5)
    assert recs[0]["loss"] == pytest.approx(np.mean(ce) + 0.5 * np.mean(label), rel=1e-5)
    # the probability cosine of one output is a constant: refused before any weights, naming the key
    from pretrain.schema import ConfigError
    from pretrain.tasks.recipe import TaskRecipe

    bad = load(
        REPO / "configs" / "tiny-cpu.json",
        task_overrides(str(teacher_dir), tmp_path / "bad", steps=2, **extra, **{"loss.alpha_prob_cos": 1.0}),
    )
    with pytest.raises(ConfigError, match=r"loss\.alpha_prob_cos: 1\.0 on the regression task"):
        TaskRecipe(bad).preflight(world_size=1)
