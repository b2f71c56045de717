"""Export a student as a Hugging Face model directory: config, safetensors weights, tokenizer files, and the teacher's
sentence-transformers files (pooling, modules.json) when it has them, so that the student loads with the Auto classes,
``pipeline("fill-mask")`` (with an MLM head) and ``SentenceTransformer(dir)`` (for a sentence-encoder teacher).

``python -m pretrain.export CHECKPOINT_DIR OUT`` exports any checkpoint of a run, ZeRO stages 0-3 alike:
CHECKPOINT_DIR is ``output_dir/checkpoints`` (its ``latest`` is used, or ``--tag``) or one tag directory. ZeRO
checkpoints are consolidated to fp32 with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (the fp32 master
weights); stage-0 checkpoints give the module weights, cast to fp32. Each tag carries an ``hf/`` folder (student config,
tokenizer, sentence-transformers files), so a checkpoint exports without the teacher or the shards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from data_prep.cli import HelpFormatter, prog
from data_prep.errors import DistillError
from data_prep.files import atomic_dir, check_replaceable
from pretrain.card import check_push, push_to_hub, write_card
from pretrain.rundir import EXPORT_INFO as INFO
from pretrain.rundir import latest_tag_in

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
HF_DIR = "hf"


def sentence_transformers_files(teacher: str) -> dict[str, Path]:
    """The teacher's sentence-transformers files: ``{relative path: local file}`` (empty when it is not one).

    ``teacher`` is a local directory or a hub name (files come from the Hugging Face cache, downloaded if needed).
    Covers ``modules.json``, ``sentence_bert_config.json``, ``config_sentence_transformers.json`` and the files of
    every module folder named in ``modules.json`` (``1_Pooling/config.json``, ``2_Dense/...``).
    """

    def get(rel: str) -> Path | None:
        if Path(teacher).is_dir():
            p = Path(teacher) / rel
            return p if p.is_file() else None
        from transformers.utils import cached_file

        # None for a file the repository does not have, or when the hub is unreachable and the file is not cached;
        # any other hub error (a gated or missing repository, a bad revision) surfaces
        found = cached_file(
            teacher, rel, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False
        )
        return Path(found) if found else None

    modules = get("modules.json")
    if modules is None:
        return {}
    out = {rel: p for rel in ST_FILES if (p := get(rel)) is not None}
    for mod in json.loads(modules.read_text()):
        sub = mod.get("path", "")
        if not sub:
            continue
        if Path(teacher).is_dir():
            folder = Path(teacher) / sub
            for p in folder.rglob("*") if folder.is_dir() else []:
                if p.is_file():
                    out[str(p.relative_to(teacher))] = p
        else:
            for rel in (f"{sub}/config.json", f"{sub}/model.safetensors", f"{sub}/pytorch_model.bin"):
                if (p := get(rel)) is not None:
                    out[rel] = p
    return out


def write_hf_meta(folder: Path, config, tokenizer, st_files: dict[str, Path], architecture: str) -> None:
    """Write the student's ``config.json`` (with ``architectures = [architecture]``), the tokenizer files and the
    sentence-transformers files into ``folder`` (created); a Pooling module's ``word_embedding_dimension`` becomes the
    student's width."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = config.__class__.from_dict(config.to_dict())
    config.architectures = [architecture]
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for rel, src in st_files.items():
        dst = folder / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        if dst.name == "config.json" and dst.parent != folder:  # a sentence-transformers module's config
            module = json.loads(dst.read_text())
            width = getattr(config, "hidden_size", None) or getattr(config, "dim", None)
            if "word_embedding_dimension" in module and width:  # a narrower (pruned / random) student's width
                module["word_embedding_dimension"] = int(width)
                dst.write_text(json.dumps(module, indent=2))


def save_student(
    model: torch.nn.Module,
    out: str | Path,
    meta_dir: Path,
    info: dict[str, Any],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
) -> Path:
    """Save ``model`` (fp32 safetensors) with the files of ``meta_dir`` (see :func:`write_hf_meta`) to ``out``.

    Atomic (:func:`data_prep.files.atomic_dir`, writer kind ``"export"``): written to a temporary sibling directory,
    then renamed over ``out``, which must be new, empty, an earlier export or (``overwrite``) another non-empty folder;
    a run directory or a folder containing one of ``inputs`` is refused
    (:class:`data_prep.files.OutputExistsError`). ``info`` goes to ``distill_export.json`` (provenance: checkpoint,
    step); a model card ``README.md`` is written with them (:func:`pretrain.card.write_card`). A full disk raises
    :class:`data_prep.files.DiskFullError` (the export's size, the free space; ``out`` is unchanged). Returns ``out``.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"save_student: a transformers PreTrainedModel is needed, got {type(model).__name__}")
    out = Path(out)
    meta_files = [p for p in Path(meta_dir).rglob("*") if p.is_file()]
    needed = sum(p.numel() * 4 for p in model.parameters()) + sum(p.stat().st_size for p in meta_files)
    with atomic_dir(out, kind="export", overwrite=overwrite, inputs=inputs, needed=needed) as tmp:
        for src in meta_files:  # config.json too: save_pretrained rewrites it
            dst = tmp / src.relative_to(meta_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / INFO).write_text(json.dumps(info, indent=1))
        write_card(tmp, final=out)  # README.md: teacher, data, recipe, machine (pretrain.card)
    return out


def resolve_tag_dir(checkpoint_dir: str | Path, tag: str | None = None) -> Path:
    """The tag directory to export: ``checkpoint_dir`` itself when it is one (holds ``hf/``), else
    ``checkpoint_dir/tag`` or ``checkpoint_dir/<latest>``. Raises ``FileNotFoundError`` saying what is missing."""
    root = Path(checkpoint_dir)
    if (root / HF_DIR).is_dir() and tag is None:
        return root
    if tag is None:
        tag = latest_tag_in(root)
        if tag is None:
            raise FileNotFoundError(
                f"{root}: no 'latest' file and no {HF_DIR}/ folder; give a run's checkpoints/ "
                f"directory, one of its step_* directories, or --tag"
            )
    tag_dir = root / tag
    if not tag_dir.exists():
        kept = sorted(p.name for p in root.glob("step_*") if p.is_dir())
        raise FileNotFoundError(
            f"{root}: no checkpoint {tag!r} (train.keep_last deletes older ones); the kept tags are {kept or 'none'}"
        )
    if not (tag_dir / HF_DIR).is_dir():
        raise FileNotFoundError(f"{tag_dir}: not a checkpoint of this project (no {HF_DIR}/ folder)")
    return tag_dir


def student_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The student's fp32 weights from a checkpoint tag (keys as in the Hugging Face student's ``state_dict``).

    ZeRO (any stage): DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``; stage 0: the module of
    ``mp_rank_00_model_states.pt``. Distillation-only tensors (projections) are dropped.
    """
    tag_dir = Path(tag_dir)
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not states:
            raise FileNotFoundError(f"{tag_dir}: no DeepSpeed model states file (mp_rank_00_model_states.pt)")
        full = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
    return {k[len("student.") :]: v.float() for k, v in full.items() if k.startswith("student.")}


def build_student_like(meta_dir: Path, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A randomly initialised student of the class and config saved in ``meta_dir/config.json`` (without a pooler
    when ``state`` has none, like a student of a sentence encoder)."""
    import inspect

    import transformers

    config = transformers.AutoConfig.from_pretrained(meta_dir)
    cls = getattr(transformers, (config.architectures or ["AutoModel"])[0])
    kwargs = {}
    if "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
        kwargs["add_pooling_layer"] = any(k.startswith("pooler.") or ".pooler." in k for k in state)
    model = cls(config, **kwargs)
    if not isinstance(model, transformers.PreTrainedModel):
        raise RuntimeError(f"{meta_dir / 'config.json'}: architecture {cls.__name__} is not a transformers model")
    return model


def export_checkpoint(
    checkpoint_dir: str | Path, out: str | Path, tag: str | None = None, *, overwrite: bool = False
) -> Path:
    """Export a checkpoint's student to the Hugging Face directory ``out`` (see the module docstring).

    ``out`` is checked before anything is read (:func:`data_prep.files.check_replaceable`): new, empty or an earlier
    export; another non-empty folder only with ``overwrite``; never a run directory or a folder that contains the
    checkpoint. Raises :class:`data_prep.files.OutputExistsError`, :class:`data_prep.files.DiskFullError`,
    ``FileNotFoundError`` (no checkpoint), ``RuntimeError`` (weights that do not fit the student).
    """
    tag_dir = resolve_tag_dir(checkpoint_dir, tag)
    check_replaceable(out, kind="export", overwrite=overwrite, inputs=[tag_dir, checkpoint_dir])
    meta = tag_dir / HF_DIR
    state = student_state_dict(tag_dir)
    model = build_student_like(meta, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise RuntimeError(
            f"{tag_dir}: checkpoint weights do not fit {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    step = None
    if (tag_dir / "checkpoint.json").is_file():
        step = json.loads((tag_dir / "checkpoint.json").read_text()).get("step")
    info = {"checkpoint": str(tag_dir.resolve()), "step": step}
    return save_student(model.eval(), out, meta, info, overwrite=overwrite, inputs=[tag_dir, checkpoint_dir])


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m pretrain.export CHECKPOINT_DIR --output DIR [--tag TAG] [--overwrite] [--push-to-hub REPO]``
    (``OUT`` positional instead of ``--output`` as before; both given and different: exit 2); exit 0, 1 (a full disk)
    or 2 (no checkpoint, a refused OUT, weights that do not fit, ``--push-to-hub`` offline), the error on one line
    without a traceback."""
    p = argparse.ArgumentParser(
        prog=prog("python -m pretrain.export"), description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("checkpoint_dir", help="a run's checkpoints/ directory (uses 'latest') or one step_* directory")
    p.add_argument(
        "--output",
        metavar="DIR",
        help="output Hugging Face model directory: new, empty or an earlier export (replaced atomically); never a "
        "run directory or a folder that contains CHECKPOINT_DIR",
    )
    p.add_argument("out", nargs="?", metavar="OUT", help="the same as --output DIR (older spelling, kept)")
    p.add_argument("--tag", help="checkpoint tag under CHECKPOINT_DIR, e.g. step_00001000")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the output folder even when it is non-empty and this command did not write it (its files are "
        "deleted)",
    )
    p.add_argument("--onnx", action="store_true", help="also write OUT/onnx/model.onnx, checked (docs/deployment.md)")
    p.add_argument("--quantize", choices=["int8"], help="with --onnx: also OUT/onnx/model_qint8_<isa>.onnx, checked")
    p.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="then upload the exported folder (with its model card) to this hub model repo (huggingface_hub); "
        "refused before any work when offline (HF_HUB_OFFLINE, or the hub not reachable)",
    )
    args = p.parse_args(argv)
    if args.out and args.output and Path(args.out).resolve() != Path(args.output).resolve():
        p.error(f"OUT {args.out} and --output {args.output} differ; give one of them")
    if not (args.out or args.output):
        p.error("give the output folder: --output DIR (or a second positional OUT)")
    try:
        if args.push_to_hub:
            check_push(args.push_to_hub)
        out = export_checkpoint(args.checkpoint_dir, args.output or args.out, args.tag, overwrite=args.overwrite)
        print(f"exported {out}")
        rc = _deploy(out, args.quantize) if args.onnx or args.quantize else 0
        if args.push_to_hub and rc == 0:  # after the ONNX files, so that they are uploaded with the weights
            print(f"pushed {out} to {push_to_hub(out, args.push_to_hub)}")
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return rc


def _deploy(out: Path, quantize: str | None) -> int:
    """``--onnx`` / ``--quantize``: ``python -m pretrain.deploy OUT`` on the export; its exit status. The core's one
    import of pretrain.deploy, lazy and in this command line only (docs/design.md)."""
    from pretrain.deploy.cli import main as deploy_main

    return deploy_main([str(out), *(["--quantize", quantize] if quantize else [])])


if __name__ == "__main__":
    sys.exit(main())
