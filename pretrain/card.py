"""Model cards: a ``README.md`` in every exported model folder, written with huggingface_hub's ``ModelCard``.

In the manner of DistilBERT's card: front matter (``base_model`` = the teacher's hub id where it has one,
``library_name``, ``pipeline_tag``, ``tags``, ``datasets``, the teacher's ``license``, and the measured results as
``model-index`` eval results), then the model, its intended uses and limitations, training data, the recipe, the
results table, the deployment checks and the training machine (front matter: :mod:`pretrain.card_index`). Everything
comes from files the pipeline writes, read by :mod:`pretrain.card_sources`:

- the folder: ``config.json`` (architecture: library and pipeline tag), its provenance file (``distill_export.json``
  of :mod:`pretrain.export`, ``downstream_finetune.json`` of ``--save-model``, ``truncation.json`` of a truncation
  baseline), ``onnx/checks.json`` and ``onnx/bench.json`` (:mod:`pretrain.deploy`);
- the run directory (the exported checkpoint's run, else the folder's parent): ``config.json`` (teacher, recipe),
  ``environment.json`` (hardware, versions), ``metrics.jsonl`` (steps, tokens, time), ``student_init/
  distill_export.json`` (layer map), the shards' ``manifest.json`` (datasets);
- ``report.json`` (:mod:`pretrain.evaluate`): given when the report is written, else the one the card last used or
  ``RUN/report.json``, each only when it names this folder and is newer than its weights;
- the teacher's own ``README.md`` front matter (licence, language), read locally (its folder or the hub cache).

The card is written at export and rewritten when the report is written and after a deployment export. Offline there
is no hub validation: a card round-trips through ``ModelCard.load`` (tests/test_card.py). Core level: imports nothing
from ``pretrain.tasks`` or ``pretrain.deploy``. ``python -m pretrain.card FOLDER [--push-to-hub REPO]`` rewrites one
folder's card (docs/deployment.md, "Model cards").
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from data_prep.cli import HelpFormatter, prog
from data_prep.errors import DistillError
from data_prep.files import atomic_write_text
from pretrain.card_index import REPORT_METRICS, card_data, model_name, source_name
from pretrain.card_sources import (
    CARD,
    ROLES,
    CardError,
    CardInputs,
    gather,
    hub_id,
    is_export,
    is_number,
    read_json,
)
from pretrain.report import machine_summaries

PRUNED_SIZES = ("hidden_size", "num_attention_heads", "intermediate_size")  # [teacher, student] in the prune record


def _teacher_ref(inp: CardInputs) -> str:
    """``the teacher [hub id](link) (`name`)`` / ``the base model ...`` for a fine-tune, or that it is unrecorded."""
    noun, hub = ("the base model" if inp.kind == "finetune" else "the teacher"), hub_id(inp.teacher)
    if hub:
        return f"{noun} [{hub}](https://huggingface.co/{hub})" + (f" (`{inp.teacher}`)" if inp.teacher != hub else "")
    return f"{noun} `{inp.teacher}` (a local folder, no hub id)" if inp.teacher else f"{noun} (not recorded)"


def _description(inp: CardInputs) -> list[str]:
    cfg, rec = inp.config, inp.student_record
    shape = (
        f"{cfg.get('num_hidden_layers', cfg.get('n_layers'))}-layer {cfg.get('model_type')} model "
        f"({(cfg.get('architectures') or ['?'])[0]}, hidden size {cfg.get('hidden_size', cfg.get('dim'))}, "
        f"{cfg.get('num_attention_heads', cfg.get('n_heads'))} heads)"
    )
    what = {
        "export": "a student distilled with bert-distill from",
        "finetune": f"fine-tuned on `{inp.info.get('task')}` (seed {inp.info.get('seed')}) from",
        "truncation": f"the first {len(inp.info.get('layers') or [])} layers, not distilled (a baseline), of",
    }[inp.kind]
    lines = [f"# {model_name(inp)}", "", f"A {shape}: {what} {_teacher_ref(inp)}.", ""]
    if inp.kind == "export" and inp.name == "student_init":
        lines += ["This is the student **before** distillation (the run's baseline column).", ""]
    if rec.get("layer_map") is not None:
        lines.append(
            f"- Layer map (student layer i <- teacher layer): {rec.get('layer_map')} of the teacher's "
            f"{rec.get('teacher_layers')}; architecture `{rec.get('architecture')}`, "
            f"initialisation `{rec.get('init')}`."
        )
    prune = rec.get("prune") or {}
    if prune:  # the sizes and the method; the kept channels and scores stay in distill_export.json
        sizes = ", ".join(f"{k} {prune[k][0]} -> {prune[k][1]}" for k in PRUNED_SIZES if len(prune.get(k) or []) == 2)
        calib = prune.get("calibration") or {}
        lines.append(
            f"- Pruned ({prune.get('method')}): {sizes}; importance on {calib.get('sequences')} calibration "
            f"sequences ({calib.get('source')})."
        )
    for key in ("notes", "initialized"):
        if rec.get(key):
            lines.append(f"- {key}: {rec[key]}")
    return lines


def _recipe(inp: CardInputs) -> list[str]:
    rc = inp.run_config
    if not rc:
        return []
    loss, train, ds = rc.get("loss") or {}, rc.get("train") or {}, rc.get("deepspeed") or {}
    terms = ", ".join(f"{k} = {v}" for k, v in loss.items() if k.startswith("alpha_") and is_number(v) and v)
    opt = (ds.get("optimizer") or {}).get("params") or {}
    tr = inp.training or {}
    accumulation = ds.get("gradient_accumulation_steps")
    micro, total = ds.get("train_micro_batch_size_per_gpu"), ds.get("train_batch_size")
    if accumulation is None and is_number(micro) and is_number(total) and micro:  # derived: batch / (micro x ranks)
        accumulation = total // (micro * (tr.get("world_size") or 1))
    tokens = tr.get("tokens_seen")
    lines = ["## Training procedure", ""]
    lines.append(f"- Loss terms (weights): {terms or 'none recorded'}; temperature {loss.get('temperature')}.")
    lines.append(
        f"- Layers compared: layer_pairs {loss.get('layer_pairs')}, cos_layers {loss.get('cos_layers')}, "
        f"relation_layers {loss.get('relation_layers')}."
    )
    lines.append(
        f"- Steps: {tr.get('steps', 'n/a')} done of train.max_steps {train.get('max_steps')}; "
        + (f"{tokens:,} tokens seen" if is_number(tokens) else "tokens seen not logged")
        + f"; batch {total} sequences per step (micro-batch {micro}, accumulation {accumulation}, ranks "
        f"{tr.get('world_size')}); "
        f"{(ds.get('optimizer') or {}).get('type')} lr {opt.get('lr')}; seed {train.get('seed')}"
        + (f"; stages {train.get('stages')}" if train.get("stages") else "")
        + "."
    )
    task = rc.get("task") or {}
    if task.get("name"):
        lines.append(
            f"- Task distillation on `{task['name']}` (student `{task.get('student')}`, head `{task.get('head')}`)."
        )
    lines.append(f"- The whole resolved config: `{inp.run / 'config.json' if inp.run else 'config.json'}` of the run.")
    return [*lines, ""]


def _training_data(inp: CardInputs) -> list[str]:
    m = inp.manifest
    if not m:
        return []
    splits = m.get("splits") or {}
    sizes = ", ".join(
        f"{k}: {v.get('num_sequences', 0):,} sequences, {v.get('num_tokens', 0):,} tokens"
        for k, v in splits.items()
        if isinstance(v, dict)
    )
    specs = ", ".join(f"`{source_name(s.get('spec', ''))}`" for s in m.get("sources", []) if isinstance(s, dict))
    return [
        "## Training data",
        "",
        f"Sources {specs or 'not recorded'} (the shards' manifest.json), tokenized with the teacher's tokenizer into "
        f"sequences of at most {m.get('max_seq_length')} tokens ({sizes}).",
        "",
    ]


def _cell(v: Any) -> str:
    if not is_number(v):
        return "n/a"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4g}"


def _results(inp: CardInputs) -> list[str]:
    report = inp.report or {}
    cols = [r for r, row in report.items() if r not in ("meta", "downstream") and isinstance(row, dict)]
    lines = ["## Evaluation results", ""]
    if not cols and inp.kind != "finetune":
        return [
            *lines,
            "Not evaluated yet: `python -m pretrain.evaluate --student THIS_FOLDER ...` rewrites this card with the "
            "measured results (teacher, baseline and student).",
            "",
        ]
    if cols:
        meta = report.get("meta", {})
        lines += [
            f"From `report.json` ({meta.get('date')}, split `{meta.get('split')}`); this model is the "
            f"**{ROLES.get(inp.role or '', inp.role or 'not a column')}** column.",
            "",
            "| metric | " + " | ".join(ROLES.get(c, c) for c in cols) + " |",
            "| --- |" + " ---: |" * len(cols),
            "| parameters (encoder) | " + " | ".join(_cell(report[c].get("params")) for c in cols) + " |",
        ]
        for key, (_, label) in REPORT_METRICS.items():
            if any(is_number(report[c].get(key)) for c in cols):
                lines.append(f"| {label} | " + " | ".join(_cell(report[c].get(key)) for c in cols) + " |")
        lines.append("")
        seed = (inp.run_config.get("train") or {}).get("seed")
        lines += [
            f"One distillation run (train.seed {seed}): its numbers are of that one student, without a spread over "
            "training seeds; a speed is the median of the timed repeats ([min, max] in the model-index `args`); the "
            "downstream rows are means over fine-tuning seeds with their std.",
            "",
        ]
    ds = report.get("downstream") or {}
    for tname, task in ds.get("tasks", {}).items():
        lines.append(f"Downstream `{tname}` ({ds.get('mode')}, score mean ± std over seeds):")
        for model, r in task.get("results", {}).items():
            share = r.get("share_of_teacher")
            lines.append(
                f"- {model}: {_cell(r.get('score_mean'))} ± {_cell(r.get('score_std'))} "
                f"({len(r.get('runs', []))} seed(s))" + (f", {100 * share:.1f}% of the teacher" if share else "")
            )
        lines.append("")
    if inp.kind == "finetune":
        for split, values in (inp.info.get("metrics") or {}).items():
            lines.append(f"- `{inp.info.get('task')}` {split}: {values} (seed {inp.info.get('seed')})")
        lines.append("")
    return lines


def _limitations(inp: CardInputs) -> list[str]:
    lines = ["## Intended uses and limitations", ""]
    report, role = inp.report or {}, inp.role or "student"
    teacher, mine = report.get("teacher") or {}, report.get(role) or {}
    for key in ("recall_at_1", "mlm_accuracy", "agreement", "embedding_cosine"):
        if role != "teacher" and is_number(mine.get(key)) and is_number(teacher.get(key)) and teacher[key]:
            lines.append(
                f"- Measured: {REPORT_METRICS[key][1]} {mine[key]:.4g} against the teacher's {teacher[key]:.4g} "
                f"({100 * mine[key] / teacher[key]:.1f}%) on the held-out split."
            )
    bench = (report.get("meta") or {}).get("throughput") or {}
    if role != "teacher" and is_number(mine.get("speedup")):
        lines.append(
            f"- Measured speed: {mine['speedup']:.2f}x the teacher's tokens/s (PyTorch, batch "
            f"{bench.get('batch_size')} x {bench.get('seq_length')} tokens, {report['meta'].get('device')})."
        )
    for c in inp.checks:
        if isinstance(c, dict) and c.get("passed") is False:
            lines.append(
                f"- Deployment check FAILED: {c.get('name')} {c.get('value')} (tolerance {c.get('tolerance')})."
            )
    tr, max_len = inp.training or {}, inp.manifest.get("max_seq_length")
    if tr:
        lines.append(
            f"- Trained {tr.get('steps')} steps"
            + (
                f" on sequences of at most {max_len} tokens: longer inputs were never seen in distillation"
                if max_len
                else ""
            )
            + "; quality outside the training sources is not measured."
        )
    lang = inp.teacher_meta.get("language")
    lines.append(
        f"- Inherited from {_teacher_ref(inp)}: its training data, biases and limitations"
        + (f", and its language(s) ({lang})" if lang else "")
        + "; read its card."
    )
    if inp.teacher_meta.get("license"):
        lines.append(f"- Licence: the teacher's, `{inp.teacher_meta['license']}` (its card's front matter).")
    return [*lines, ""]


def _deployment(inp: CardInputs) -> list[str]:
    if not inp.checks and not inp.bench:
        return []
    lines = ["## Deployment (onnx/, python -m pretrain.deploy)", ""]
    for c in inp.checks:
        if isinstance(c, dict) and is_number(c.get("value")):
            verdict = "PASS" if c.get("passed") else "FAIL"
            lines.append(
                f"- {verdict} {c.get('name')}: {c.get('value'):.6g} {c.get('unit')} (tolerance {c.get('tolerance')})"
            )
    if inp.bench:
        r0 = inp.bench[0]
        lines += ["", f"Speed on {r0.get('cpu')} ({r0.get('threads')} threads, sequence {r0.get('seq_len')}):", ""]
        lines += ["| runtime | batch | p50 ms | p95 ms | sequences/s |", "| --- | ---: | ---: | ---: | ---: |"]
        lines += [
            f"| {r.get('runtime')} | {r.get('batch')} | {_cell(r.get('p50_ms'))} | {_cell(r.get('p95_ms'))} | "
            f"{_cell(r.get('throughput_seq_s'))} |"
            for r in inp.bench
            if isinstance(r, dict)
        ]
    return [*lines, ""]


def _environment(inp: CardInputs) -> list[str]:
    lines = ["## Hardware, time and software", ""]
    seen = [f"- Trained on {m}." for m in machine_summaries(inp.environment, python=True)]
    lines += seen or ["- The run directory records no training machine (environment.json)."]
    wall = (inp.training or {}).get("wall_seconds")
    if is_number(wall):
        lines.append(f"- Training time: {wall:,.0f} s from the first step to the last record (metrics.jsonl).")
    env = (inp.report or {}).get("meta", {}).get("environment") or {}
    if env:
        lines.append(f"- Evaluated on CPU {env.get('cpu')}, GPU {env.get('gpu') or 'none'}; torch {env.get('torch')}.")
    return [*lines, ""]


def card_text(inp: CardInputs) -> str:
    """The whole README.md: front matter (:func:`card_data`) and the body."""
    data = card_data(inp)
    library = data.library_name
    usage = (
        f'from sentence_transformers import SentenceTransformer\nmodel = SentenceTransformer("{inp.name}")'
        if library == "sentence-transformers"
        else f'from transformers import pipeline\npipe = pipeline("{data.pipeline_tag}", model="{inp.name}")'
    )
    if (inp.folder / "downstream_head.safetensors").is_file():  # a mean-pooled head: not a transformers class
        usage = "# the encoder loads with AutoModel; its head is downstream_head.safetensors (pretrain.tasks)"
    body = [*_description(inp), "", "```python", usage, "```", ""]
    body += _limitations(inp) + _training_data(inp) + _recipe(inp) + _results(inp) + _deployment(inp)
    body += _environment(inp)
    body += [
        "Written by `pretrain.card` from the run's files; rewritten when the report or a deployment export is made."
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"


def write_card(
    folder: str | os.PathLike,
    *,
    report: dict | None = None,
    report_path: str | os.PathLike | None = None,
    final: str | os.PathLike | None = None,
) -> Path:
    """Write (atomically, :func:`data_prep.files.atomic_write_text`) ``folder/README.md`` from :func:`gather`.

    ``report`` / ``report_path``: the evaluation report (else :func:`find_report`); ``final``: the folder's path once
    in place, when ``folder`` is the temporary folder of an atomic export (names the model). Returns the card's path.
    Raises :class:`CardError` (not a model folder), :class:`data_prep.files.DiskFullError`."""
    path = str(Path(report_path).resolve()) if report_path else None
    inp = gather(folder, report, path)
    if final is not None:
        inp.name = Path(final).name
    return atomic_write_text(Path(folder) / CARD, card_text(inp), what="model card")


def refresh_from_report(report: dict, report_path: str | os.PathLike) -> list[Path]:
    """Rewrite the card of each project export the report evaluated (``meta.paths`` student and student_init) with
    the report's numbers; returns the cards written."""
    paths = report.get("meta", {}).get("paths", {})
    folders = [Path(paths[r]) for r in ("student", "student_init") if isinstance(paths.get(r), str)]
    return [write_card(f, report=report, report_path=report_path) for f in folders if is_export(f)]


def refresh_after_deploy(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """After a deployment export into ``out_dir``: rewrite ``model_dir``'s card (its ``onnx/`` checks and speeds)
    when it is a project export; a card in ``out_dir`` too when that is outside ``model_dir``. Returns the cards."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not is_export(model_dir):
        return []
    cards = [write_card(model_dir)]
    if out_dir.resolve() != (model_dir / "onnx").resolve():
        inp = gather(model_dir)
        inp.checks = read_json(out_dir / "checks.json") or []
        inp.bench = read_json(out_dir / "bench.json") or []
        cards.append(atomic_write_text(out_dir / CARD, card_text(inp), what="model card"))
    return cards


def check_push(repo: str) -> None:
    """Refuse ``--push-to-hub REPO`` before any work: a malformed repo id, ``HF_HUB_OFFLINE`` set, or the hub
    endpoint (``HF_ENDPOINT``) not reachable within 5 s. Raises :class:`CardError` saying which and what to do."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise CardError(f"--push-to-hub {repo!r}: not a hub repo id ({e}); give NAME or ORG/NAME") from None
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    if flag in ("1", "ON", "YES", "TRUE") or (not flag and constants.HF_HUB_OFFLINE):
        raise CardError(
            f"--push-to-hub {repo}: HF_HUB_OFFLINE is set, nothing can be uploaded; nothing was done. Unset it on a "
            "machine with network (and `hf auth login`), or run without --push-to-hub and upload the folder later "
            "(python -m pretrain.card FOLDER --push-to-hub REPO)"
        )
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)), 5).close()
    except OSError as e:
        raise CardError(
            f"--push-to-hub {repo}: the hub {endpoint} is not reachable ({e}); nothing was done. Run without "
            "--push-to-hub and upload the folder from a machine with network (python -m pretrain.card FOLDER "
            "--push-to-hub REPO)"
        ) from None


def push_to_hub(folder: str | os.PathLike, repo: str) -> str:
    """Upload ``folder`` (its card included) to the model repo ``repo`` (created if missing) with huggingface_hub's
    ``upload_folder``; the folder-writer marker is left out. Returns the commit URL. Call :func:`check_push`
    first. Raises :class:`CardError` when the hub refuses (no token, no write access) or the connection fails; the
    folder is left as it is."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    from data_prep.files import OUTPUT_MARKER

    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder), repo_id=repo, repo_type="model", ignore_patterns=[OUTPUT_MARKER]
        )
    except (HfHubHTTPError, LocalTokenNotFoundError, OSError) as e:
        cause = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise CardError(
            f"--push-to-hub {repo}: the upload of {folder} failed ({cause}); "
            "log in (`hf auth login` or HF_TOKEN) with write access and run python -m pretrain.card FOLDER "
            "--push-to-hub REPO; the folder is intact"
        ) from None
    return str(getattr(info, "commit_url", info))


def main(argv: list[str] | None = None) -> int:
    """``python -m pretrain.card FOLDER [--report FILE] [--push-to-hub REPO]``: rewrite FOLDER's README.md (and
    upload the folder); exit 0, or 2 with one line for a folder that is not a model or a refused push."""
    p = argparse.ArgumentParser(
        prog=prog("python -m pretrain.card"), description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("folder", help="an exported model folder (RUN/student, a --save-model folder, ...)")
    p.add_argument("--report", metavar="FILE", help="report.json to take the results from (default: found beside)")
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this hub model repo")
    a = p.parse_args(argv)
    try:
        if a.push_to_hub:
            check_push(a.push_to_hub)
        report = read_json(Path(a.report)) if a.report else None
        if a.report and not isinstance(report, dict):
            raise CardError(f"--report {a.report}: no such file or not a JSON report (pretrain.evaluate writes one)")
        print(f"wrote {write_card(a.folder, report=report, report_path=a.report)}")
        if a.push_to_hub:
            print(f"pushed {a.folder} to {push_to_hub(a.folder, a.push_to_hub)}")
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
