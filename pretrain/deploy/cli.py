"""``python -m pretrain.deploy MODEL_DIR``: ONNX export, optional int8, accuracy checks and speed, in one folder.

Writes ``OUTPUT`` (default ``MODEL_DIR/onnx``, the folder sentence-transformers' ONNX backend reads): model.onnx,
model_qint8_<isa>.onnx with ``--quantize int8``, checks.json (every check's verdict), and with ``--bench``
bench.json + bench.md. Everything is written into a temporary folder beside ``OUTPUT`` and renamed over it at the
end, so an error leaves the old folder (or none), never half of one. A check outside its tolerance still writes the
files; the command then prints one ``FAIL`` line naming it and exits with status 1. Bad input exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from data_prep.cli import HelpFormatter, prog
from data_prep.errors import DistillError
from data_prep.files import atomic_dir, atomic_write_text
from pretrain.card import refresh_after_deploy
from pretrain.deploy.common import CheckFailed, DeployError, detect_kind, load_tokenizer, load_torch_model
from pretrain.deploy.onnx_export import EXPORTERS, export_model
from pretrain.deploy.quantize import int8_filename, quantize_int8, quantize_static_int8
from pretrain.deploy.speed import benchmark, markdown_table
from pretrain.deploy.verify import (
    DEFAULT_TEXTS,
    TOLERANCES,
    CheckResult,
    check_int8,
    check_outputs,
    read_texts,
    tokenize,
)


@dataclasses.dataclass
class DeployResult:
    """What :func:`deploy` made: the output folder, its ONNX files, every check and the speed records."""

    out_dir: Path
    files: dict[str, Path]
    checks: list[CheckResult]
    bench: list[dict] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return all(c.passed for c in self.checks)


def deploy(
    model_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    quantize: str | None = None,
    per_channel: bool = True,
    reduce_range: bool = False,
    keep_embeddings_fp32: bool = False,
    tolerance: float = TOLERANCES["fp32"],
    int8_tolerance: float | None = None,
    texts_file: str | Path | None = None,
    bench: bool = False,
    threads: int = 2,
    repeats: int = 20,
    exporter: str = "dynamo",
    kind: str | None = None,
    static: bool = False,
    calibration_file: str | Path | None = None,
) -> DeployResult:
    """Export ``model_dir`` to ONNX in ``out_dir`` (default ``model_dir/onnx``), check it against PyTorch, quantize
    to int8 when ``quantize == "int8"`` (dynamic; with ``static``, static int8 calibrated on the texts of
    ``calibration_file``, :func:`pretrain.deploy.quantize.quantize_static_int8`) and check that against fp32, time
    all three with ``bench``; the folder is written atomically (``data_prep.files.atomic_dir``). Checks never
    raise: see ``DeployResult.passed``.

    Raises :class:`DeployError` for bad input (not a model folder, unsupported architecture, bad texts file or
    option, ``static`` without ``calibration_file``) before anything is written.
    """
    model_dir = Path(model_dir)
    kind = detect_kind(model_dir, kind)
    if quantize not in (None, "int8"):
        raise DeployError(f"--quantize {quantize!r}: only 'int8' is supported")
    if exporter not in EXPORTERS:
        raise DeployError(f"exporter {exporter!r} is not one of {', '.join(EXPORTERS)}")
    model = load_torch_model(model_dir, kind)
    tokenizer = load_tokenizer(model_dir)
    texts, labels = (
        read_texts(texts_file, getattr(model.config, "label2id", None)) if texts_file else (DEFAULT_TEXTS, None)
    )
    if static and quantize != "int8":
        raise DeployError("--int8-mode static needs --quantize int8")
    calibration = _calibration(tokenizer, static, calibration_file) if quantize == "int8" else None
    out = Path(out_dir) if out_dir is not None else model_dir / "onnx"
    with atomic_dir(out) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; a served model is read by other users
        files = {"fp32": export_model(model, kind, tmp / "model.onnx", exporter=exporter)}
        checks = [check_outputs(model, kind, files["fp32"], tokenizer, texts, tolerance)]
        if quantize == "int8":
            q = tmp / int8_filename()
            if static:
                files["int8"] = quantize_static_int8(
                    files["fp32"], q, calibration, per_channel=per_channel, reduce_range=reduce_range
                )
            else:
                files["int8"] = quantize_int8(
                    files["fp32"],
                    q,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                    exclude_embeddings=keep_embeddings_fp32,
                )
            checks.append(check_int8(kind, files["fp32"], q, tokenizer, texts, labels, int8_tolerance))
        records = []
        if bench:
            onnx_files = {f"onnxruntime-{k}": p for k, p in files.items()}
            records = benchmark(model_dir, onnx_files, kind=kind, threads=threads, repeats=repeats)
        _write_reports(tmp, out, checks, records)
    refresh_after_deploy(model_dir, out)  # a project export's model card gets the checks and speeds
    files = {k: out / p.name for k, p in files.items()}
    return DeployResult(out, files, checks, records)


def _calibration(tokenizer, static: bool, calibration_file: str | Path | None) -> list[dict] | None:
    """Calibration batches (16 texts each, up to 128 tokens) of ``calibration_file`` for static int8; None for
    dynamic int8. Raises :class:`DeployError` for static int8 without a calibration file."""
    if not static:
        return None
    if calibration_file is None:
        raise DeployError(
            "--int8-mode static needs a calibration set: pass --calibration FILE (a few hundred texts of the "
            "model's domain, one per line), or use the default dynamic int8 (no calibration needed)"
        )
    texts, _ = read_texts(calibration_file)
    return [tokenize(tokenizer, texts[i : i + 16]) for i in range(0, len(texts), 16)]


def _write_reports(tmp: Path, out: Path, checks: list[CheckResult], records: list[dict]) -> None:
    """checks.json (file paths as they will be after the rename to ``out``) and, with records, bench.json / .md."""
    for c in checks:
        c.file = str(out / Path(c.file).name)
    rows = [dataclasses.asdict(c) for c in checks]
    atomic_write_text(tmp / "checks.json", json.dumps(rows, indent=2) + "\n", 0o644)
    if records:
        atomic_write_text(tmp / "bench.json", json.dumps(records, indent=2) + "\n", 0o644)
        atomic_write_text(tmp / "bench.md", markdown_table(records), 0o644)


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`main`."""
    p = argparse.ArgumentParser(
        prog=prog("python -m pretrain.deploy"), description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("model_dir", help="a Hugging Face model folder (python -m pretrain.export wrote it)")
    p.add_argument("--output", help="output folder (default MODEL_DIR/onnx, where sentence-transformers looks)")
    p.add_argument("--quantize", choices=["int8"], help="also write dynamic-int8 model_qint8_<isa>.onnx")
    p.add_argument(
        "--per-channel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="int8: one weight scale per output channel (default; --no-per-channel: one per tensor)",
    )
    p.add_argument("--reduce-range", action="store_true", help="int8: 7-bit weights (CPUs without VNNI)")
    p.add_argument(
        "--int8-mode",
        choices=["dynamic", "static"],
        default="dynamic",
        help="int8: dynamic (activation ranges per call) or static (ranges calibrated on --calibration)",
    )
    p.add_argument("--calibration", help="static int8: calibration texts, one per line (or .jsonl with 'text')")
    p.add_argument("--keep-embeddings-fp32", action="store_true", help="int8: leave the embedding Gather in fp32")
    p.add_argument("--tolerance", type=float, default=TOLERANCES["fp32"], help="fp32 ONNX vs PyTorch max |diff|")
    p.add_argument("--int8-tolerance", type=float, help="int8 check tolerance (default: per kind, docs/deployment.md)")
    p.add_argument("--texts", help="check texts: one per line, or .jsonl with 'text' (+ 'label' for a classifier)")
    p.add_argument("--kind", choices=["encoder", "mlm", "classifier"], help="override the kind found in config.json")
    p.add_argument("--exporter", choices=list(EXPORTERS), default="dynamo", help="torch.onnx exporter")
    p.add_argument("--bench", action="store_true", help="time PyTorch, ONNX fp32 (and int8) at batch 1 and 32")
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime in --bench (default 2)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per runtime and batch in --bench")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run :func:`deploy` from the command line; print each check, exit 0 / 1 (a check failed) / 2 (bad input)."""
    a = build_parser().parse_args(argv)
    try:
        if a.threads < 1 or a.repeats < 1:
            raise DeployError(f"--threads {a.threads} and --repeats {a.repeats} must be at least 1")
        result = deploy(
            a.model_dir,
            a.output,
            quantize=a.quantize,
            per_channel=a.per_channel,
            reduce_range=a.reduce_range,
            keep_embeddings_fp32=a.keep_embeddings_fp32,
            tolerance=a.tolerance,
            int8_tolerance=a.int8_tolerance,
            texts_file=a.texts,
            bench=a.bench,
            threads=a.threads,
            repeats=a.repeats,
            exporter=a.exporter,
            kind=a.kind,
            static=a.int8_mode == "static",
            calibration_file=a.calibration,
        )
        for c in result.checks:
            print(c.line())
        if result.bench:
            print(markdown_table(result.bench), end="")
        print(f"wrote {result.out_dir}")
        failed = [c for c in result.checks if not c.passed]
        if failed:
            raise CheckFailed(f"FAILED: {failed[0].line()}")
    except DistillError as e:
        print(f"error: {e}" if not isinstance(e, CheckFailed) else str(e), file=sys.stderr)
        return e.exit_code
    return 0
