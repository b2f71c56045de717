"""The report's pictures and markdown do not mislead (issue 24 item 7): axes from zero naming metric and split, no
one-point curves, one meaning of "embedding cosine", speeds with their spread, and the training provenance."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest

from pretrain.report import loss_curves_figure, render_markdown, same_speed_pairs, training_provenance
from pretrain.tasks.summary import downstream_figure, render_downstream_markdown, summarise


def _downstream(speeds: dict[str, list[float]], scores: dict[str, float]) -> dict:
    """A fine-tuning result of one task, two seeds, scores near those of the demo (72.9 vs 65)."""
    params = {"teacher": 4_000_000, "student_init": 2_000_000, "student": 2_000_000}
    results = {
        m: {
            "runs": [
                {
                    "score": scores[m] + d,
                    "metrics": {"test": {"accuracy": scores[m] + d}},
                    "inference_examples_per_s": speeds[m][i],
                    "train_examples_per_s": 10.0,
                }
                for i, d in enumerate((-0.005, 0.005))
            ]
        }
        for m in params
    }
    task = {
        "results": results,
        "kind": "classification",
        "report_splits": ["test"],
        "select_split": "dev",
        "settings": {
            "epochs": 1,
            "lr": 1e-4,
            "batch_size": 8,
            "max_length": 64,
            "warmup_ratio": 0.1,
            "weight_decay": 0,
        },
        "manifest": {"splits": {"test": {"used": {"count": 100}}}},
    }
    result = {
        "mode": "finetune",
        "seeds": 2,
        "teacher": "teacher",
        "student": "student",
        "models": {m: {"params": p} for m, p in params.items()},
        "tasks": {"sst2": task},
        "timing": {"seconds": 1.0},
        "device": "cpu",
    }
    return summarise(result)


SCORES = {"teacher": 0.75, "student_init": 0.65, "student": 0.729}


def test_downstream_axis_starts_at_zero_and_names_metric_and_split():
    result = _downstream({m: [100.0, 110.0] for m in SCORES}, SCORES)
    fig = downstream_figure(result)
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0.0 and ax.get_ylim()[1] >= 100.0
    assert ax.get_ylabel() == "test accuracy (%)"
    plt.close(fig)


def _records(valid_steps: list[int]) -> list[dict]:
    train = [
        {
            "split": "train",
            "step": s,
            "loss": 1.0 / s,
            "loss_ce": 1.0 / s,
            "time": 100.0 + s,
            "seconds_per_step": 1.0,
            "tokens_seen": 50 * s,
        }
        for s in (10, 20, 30)
    ]
    valid = [
        {"split": "valid", "step": s, "mlm_loss": 2.0, "pooled_cosine": 0.6, "agreement": 0.5, "time": 100.0 + s}
        for s in valid_steps
    ]
    return train + valid


def test_one_point_eval_series_gives_no_panel():
    fig = loss_curves_figure(_records([30]))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["train loss", "train loss terms"]  # no valid panel, no valid marker on the loss panel
    assert fig.axes[0].get_ylim()[0] == 0.0 and fig.axes[0].get_ylabel() == "loss (nats)"
    assert all("valid" not in t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts())
    plt.close(fig)


def test_eval_curves_with_two_points_name_the_split_and_start_at_zero():
    fig = loss_curves_figure(_records([15, 30]))
    scores = fig.axes[2]
    assert scores.get_ylim()[0] == 0.0 and "valid" in scores.get_ylabel() and "valid" in scores.get_title()
    labels = [t.get_text() for t in scores.get_legend().get_texts()]
    assert "valid pooled cosine" in labels and "valid top-1 agreement" in labels
    assert "valid mlm_loss" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    plt.close(fig)


def _eval_report(student_speeds: tuple[float, float, float], tmp_path) -> dict:
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000030").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000030")
    (run / "checkpoints" / "step_00000030" / "checkpoint.json").write_text(json.dumps({"world_size": 2}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records([30])))
    machine = {"cpu": "Train CPU 1", "gpu": "H200", "gpus": 2, "torch": "2.13", "transformers": "5.25"}
    starts = [{**machine, "deepspeed": "0.19.8", "world_size": 2, "step": s, "time": 0.0} for s in (0, 20)]
    (run / "environment.json").write_text(json.dumps({"starts": starts}))

    def row(p: int, s: tuple[float, float, float]) -> dict:
        return {
            "params": p,
            "tokens_per_s": s[1],
            "embedding_cosine": 0.6044,
            "recall_at_1": 0.5,
        }

    meta = {
        "split": "valid",
        "device": "cpu",
        "threads": 2,
        "paths": {},
        "throughput": {"batch_size": 4, "seq_length": 16, "warmup": 1, "iters": 5},
        "retrieval": {},
        "environment": {"cpu": "Test CPU 9000", "gpu": None, "torch": "2.x", "transformers": "5.x"},
        "training": training_provenance(run / "metrics.jsonl"),
    }
    speeds = {"teacher": (4000.0, 4100.0, 4200.0), "student_init": (9000.0, 9593.0, 9800.0), "student": student_speeds}
    meta["speed_spread"] = {m: {"min": v[0], "median": v[1], "max": v[2], "repeats": 5} for m, v in speeds.items()}
    return {
        "teacher": row(4_000_000, speeds["teacher"]),
        "student_init": row(2_000_000, speeds["student_init"]),
        "student": row(2_000_000, student_speeds),
        "meta": meta,
    }


def test_report_has_provenance_and_speed_spread(tmp_path):
    report = _eval_report((9100.0, 9688.0, 9900.0), tmp_path)
    assert report["meta"]["training"]["wall_seconds"] == pytest.approx(30.0)  # 10 s before step 10, 20 s to step 30
    md = render_markdown(report, None)
    assert "30 optimizer steps, 1,500 tokens seen, 30 s from the first step to the last record, ranks: 2" in md
    assert "CPU Test CPU 9000, GPU none; torch 2.x, transformers 5.x" in md
    # the training machine from the run's environment.json, each distinct machine once (two starts, one machine)
    assert (
        "Trained on CPU Train CPU 1, 2 x H200, 2 rank(s); torch 2.13, transformers 5.25, DeepSpeed 0.19.8 "
        "(2 start(s), environment.json)." in md
    )
    assert "| 4,100 [4,000-4,200] | 9,593 [9,000-9,800] | 9,688 [9,100-9,900] |" in md
    assert "valid pooled cosine 0.6000" in md and 'not the training log\'s "valid pooled cosine"' in md


def test_same_architecture_speeds_within_spread_are_not_shown_as_different(tmp_path):
    cols = ["teacher", "student_init", "student"]
    overlapping = _eval_report((9100.0, 9688.0, 9900.0), tmp_path)
    assert same_speed_pairs(overlapping, cols) == [("student_init", "student")]
    assert "the same speed within timing noise" in render_markdown(overlapping, None)
    apart = _eval_report((12000.0, 12500.0, 13000.0), tmp_path / "b")
    assert same_speed_pairs(apart, cols) == [] and "timing noise." not in render_markdown(apart, None)
    # downstream: equal-size student_init / student with overlapping examples/s over the seeds' runs
    ds = _downstream({"teacher": [100.0, 110.0], "student_init": [369.0, 300.0], "student": [307.0, 320.0]}, SCORES)
    md = render_downstream_markdown(ds)
    assert "| `student_init` | 2.0M | 334 [300-369] |" in md
    assert "`student_init` and `student` have the same architecture" in md and "`teacher` and" not in md
