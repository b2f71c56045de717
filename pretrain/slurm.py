"""Run the training job on a SLURM cluster: ``submit`` a preemptible, requeueing batch job, or write a DeepSpeed
``hostfile`` from the allocation's node list.

    python launch/slurm.py submit --config C --nodes N --gpus-per-node G [--partition P] [--time T] [--account A]
                                  [--dry-run] [section.key=value ...]
    python launch/slurm.py hostfile [--nodelist LIST] [--slots G] [-o hostfile]

``bert-distill-slurm`` (installed) and ``python -m pretrain.slurm`` are the same command. User errors print
``error: ...`` and exit 2, as the other commands do.

Launch design (docs/cluster.md has the reasons): the batch script starts every rank with ``srun`` itself, G tasks per
node, each task exporting ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` from SLURM's
variables before it ``exec``s ``python -m pretrain.main`` (the same environment rendezvous torchrun and the DeepSpeed
launcher provide; ``deepspeed.init_distributed`` reads it). No launcher process sits between SLURM and the ranks, so a
signal reaches every rank at once and a crashed rank ends the step (``--kill-on-bad-exit``).

Preemption: ``#SBATCH --signal=B:USR1@120`` sends USR1 to the batch script 120 s before the time limit (and
``scancel --signal=USR1 --batch JOB`` does the same by hand). The script forwards it to ``srun``, which passes it to
every rank; the ranks agree on a stop step, checkpoint together and exit 0; the script then runs
``scontrol requeue`` (unless ``python -m pretrain.rundir finished`` says the run is finished), and the requeued job
runs the same command, which resumes from the latest checkpoint. Each task ignores USR1 until the trainer installs its
handler (a signal during start-up is not fatal). SIGTERM (``scancel``, preemption by SLURM with
``PreemptMode=REQUEUE``) is forwarded the same way; whether the job comes back is then SLURM's decision.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from data_prep.cli import HelpFormatter, RawHelpFormatter, prog
from data_prep.errors import DistillError
from data_prep.files import atomic_write_text
from pretrain.rundir import RunDir

if TYPE_CHECKING:
    from pretrain.config import RunConfig, TrainConfig

TRAINER_MODULE = "pretrain.main"  # what each rank runs: python -m TRAINER_MODULE --config C overrides


class SubmitError(DistillError, RuntimeError):
    """A user error of ``slurm.py``: the message names the option, file or value and what to do."""

    exit_code = 2


# ---- node lists ---------------------------------------------------------------------------------------------------

_ITEM = re.compile(r"([^\[\]]*)(?:\[([^\[\]]*)\])?")


def _expand_range(spec: str, where: str) -> list[str]:
    """``"01-03,7"`` -> ``["01", "02", "03", "7"]``: zero padding follows the width of each range's lower bound."""
    out = []
    for part in spec.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"node list {where!r}: bad range {part!r} (expected N or N-M with digits)")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"node list {where!r}: range {part!r} runs backwards")
        width = len(lo) if lo.startswith("0") else 0
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list (``SLURM_JOB_NODELIST``) into host names, in order.

    Pure Python, the fallback of :func:`hostnames` where ``scontrol`` is not available. Supports the hostlist syntax
    SLURM writes: comma-separated items, each a name with zero or more bracketed ranges, expanded as a product
    (``node[01-03,07],gpu5`` -> node01 node02 node03 node07 gpu5; ``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2). Zero padding
    follows the lower bound of a range (``n[08-10]`` -> n08 n09 n10; ``n[8-10]`` -> n8 n9 n10).

    Raises:
        ValueError: an empty list, unbalanced brackets, a non-numeric or backwards range.
    """
    text = nodelist.strip()
    if not text:
        raise ValueError("node list is empty")
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if depth not in (0, 1):
            raise ValueError(f"node list {nodelist!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"node list {nodelist!r}: unbalanced brackets")
    hosts = []
    for item in items:
        if not item:
            raise ValueError(f"node list {nodelist!r}: empty item")
        names = [""]
        pos = 0
        while pos < len(item):
            m = _ITEM.match(item, pos)
            if not m or m.end() == pos:
                raise ValueError(f"node list {nodelist!r}: cannot parse {item[pos:]!r}")
            prefix, spec = m.group(1), m.group(2)
            names = [n + prefix for n in names]
            if spec is not None:
                names = [n + v for n in names for v in _expand_range(spec, nodelist)]
            pos = m.end()
        hosts += names
    return hosts


def hostnames(nodelist: str) -> list[str]:
    """Host names of a SLURM node list: ``scontrol show hostnames`` where it works, else :func:`expand_nodelist`."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            proc = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
            names = proc.stdout.split()
            if proc.returncode == 0 and names and not proc.stderr.strip():
                return names
        except (OSError, subprocess.TimeoutExpired):
            pass
    return expand_nodelist(nodelist)


def hostfile_text(hosts: list[str], slots: int) -> str:
    """A DeepSpeed hostfile (``HOST slots=N`` per line) for ``deepspeed --hostfile`` (pdsh launch)."""
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` atomically (the project's one atomic write), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text, mode=mode)


# ---- the batch script ---------------------------------------------------------------------------------------------


@dataclass
class JobSpec:
    """Everything the batch script needs. Paths are absolute; ``python`` is the interpreter of the ranks (and of the
    script's ``finished`` check); ``train_args`` the trainer's arguments (``--config C overrides``)."""

    run_dir: Path
    workdir: Path
    python: str
    train_args: list[str]
    nodes: int
    ranks_per_node: int
    gres: str | None
    job_name: str
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    signal_lead_s: int = 120
    sbatch_args: list[str] = field(default_factory=list)
    srun_args: list[str] = field(default_factory=list)


# The fixed body of the batch script; the parameters above it are written by render_script.
_BODY = r"""
set -uo pipefail
log() { echo "[slurm.py $(date '+%F %T')] $*"; }
log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s): $SLURM_JOB_NODELIST"

# Rendezvous: rank 0 listens on the first host of the allocation, on a port derived from the job id.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
log "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT, $RANKS_PER_NODE rank(s) per node"
log "per-node logs: $LOG_DIR/$SLURM_JOB_ID-node<N>.log"
log "command: ${TRAIN_CMD[*]}"

# Preemption. USR1 (--signal=B:USR1@..., or scancel --signal=USR1 --batch|--full) and TERM (scancel, preemption)
# reach this shell; forward them to srun, which passes them to every rank. The ranks finish their step, agree on a
# stop step, checkpoint together and exit 0. The trap also keeps this shell alive (USR1's default action kills).
caught=""
usr1=""
srun_pid=""
# shellcheck disable=SC2329  # invoked by the traps
forward() {
    caught=$1
    if [ "$1" = USR1 ]; then usr1=1; fi
    log "caught SIG$1; forwarding it to the ranks"
    if [ -n "$srun_pid" ]; then kill -s "$1" "$srun_pid" 2>/dev/null; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# One srun task per rank: the task exports the rendezvous variables from SLURM's and becomes the trainer (exec).
# shellcheck disable=SC2016  # the single-quoted variables are expanded by each task's shell
srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node="$RANKS_PER_NODE" --kill-on-bad-exit=1 --label \
     --output="$LOG_DIR/%j-node%n.log" --open-mode=append "${SRUN_ARGS[@]}" \
     bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS \
                     LOCAL_SIZE=$RANKS_PER_NODE LOCAL_WORLD_SIZE=$RANKS_PER_NODE \
                     NODE_RANK=$SLURM_NODEID CROSS_RANK=$SLURM_NODEID CROSS_SIZE=$SLURM_JOB_NUM_NODES
              if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
                  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}
              fi
              trap "" USR1  # ignored until the trainer installs its handler: a USR1 during start-up is not fatal
              exec "$@"' rank "${TRAIN_CMD[@]}" &
srun_pid=$!
if [ -n "$caught" ]; then kill -s "$caught" "$srun_pid" 2>/dev/null; fi  # a signal that came before srun started
# `wait` returns early when a trapped signal arrives: wait again until srun has really exited.
while :; do
    wait "$srun_pid"; rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done
log "ranks exited with status $rc"

# USR1 asked for checkpoint-and-come-back: requeue once the ranks saved and exited cleanly. The requeued job runs this
# script again (same job id, logs appended) and the trainer resumes from its latest checkpoint. Not when the run is
# finished (the signal came during the final evaluation or export): `python -m pretrain.rundir finished` exits 0 when
# the final export is of the latest checkpoint (pretrain/rundir.py owns that rule). Any other answer requeues: a
# finished run's requeued trainer only exports again and exits.
finished() { "$PYTHON" -m pretrain.rundir finished "$RUN_DIR"; }
if [ -n "$usr1" ] && [ "$rc" -eq 0 ]; then
    if finished; then
        log "the run is finished (its latest checkpoint is exported): not requeued"
    else
        log "checkpoint written; requeueing job $SLURM_JOB_ID (it resumes from the latest checkpoint)"
        scontrol requeue "$SLURM_JOB_ID"
    fi
elif [ -n "$caught" ] && [ "$rc" -eq $((128 + $(kill -l "$caught"))) ] && finished; then
    # A signal that comes while a finished rank exits (Python restores the default action at shutdown) kills it;
    # the work is done and exported, so the job succeeded.
    log "the run is finished (its latest checkpoint is exported); the ranks were ended by SIG$caught at exit"
    rc=0
fi
exit "$rc"
"""


def script_path(run_dir: Path) -> Path:
    """Where ``submit`` writes the batch script: ``RUN/slurm/job.sbatch``."""
    return RunDir(run_dir).slurm / "job.sbatch"


def render_script(job: JobSpec) -> str:
    """The sbatch script for ``job`` (bash): ``#SBATCH`` options, the parameters, then the fixed body above."""
    q = shlex.quote
    o = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", f"--ntasks-per-node={job.ranks_per_node}"]
    if job.gres:
        o.append(f"--gres={job.gres}")
    if job.cpus_per_task:
        o.append(f"--cpus-per-task={job.cpus_per_task}")
    for key in ("partition", "account", "time"):
        if getattr(job, key):
            o.append(f"--{key}={getattr(job, key)}")
    run = RunDir(job.run_dir)
    o += [
        f"--chdir={job.workdir}",
        f"--output={run.slurm}/%j.log",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{job.signal_lead_s}",
        *job.sbatch_args,
    ]
    srun_args = [f"--cpus-per-task={job.cpus_per_task}"] if job.cpus_per_task else []
    if job.gres and job.gres.startswith("gpu"):
        srun_args.append("--gpu-bind=none")  # every rank sees all GPUs of its node and picks LOCAL_RANK's (P2P works)
    srun_args += job.srun_args
    lines = [
        "#!/bin/bash",
        f"# Written by bert-distill-slurm (launch/slurm.py) on "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}.",
        f"# Resubmit (resumes from the latest checkpoint): sbatch {q(str(script_path(job.run_dir)))}",
        *[f"#SBATCH {opt}" for opt in o],
        "",
        f"RUN_DIR={q(str(job.run_dir))}",
        f"LOG_DIR={q(str(run.slurm))}",
        f"PYTHON={q(job.python)}",
        f"RANKS_PER_NODE={job.ranks_per_node}",
        f'TRAIN_CMD=("$PYTHON" -m {TRAINER_MODULE} {" ".join(q(a) for a in job.train_args)})',
        f"SRUN_ARGS=({' '.join(q(a) for a in srun_args)})",
        "export RANKS_PER_NODE",
    ]
    return "\n".join(lines) + "\n" + _BODY


# ---- submit -------------------------------------------------------------------------------------------------------


def check_run_dir(run_dir: Path, resolved: dict, world_size: int, allow_world_size_change: bool) -> None:
    """Refuse a run directory whose checkpoints the job could not resume, before anything is queued.

    The newest checkpoint with a manifest (``pretrain.checkpoint``: ``step_*/checkpoint.json``) is judged by the
    trainer's own rule, :meth:`pretrain.rundir.RunDir.check_same_run`: the same run when its identity keys
    (``teacher.name_or_path``, ``teacher.revision``, ``student.*``) are this config's, and written by the same number
    of ranks unless ``train.allow_world_size_change``. Other changes (``teacher.dtype``, a longer schedule, new
    intervals, loss weights) are the same run, resumed. A directory without checkpoints is a new run.

    Raises:
        SubmitError: the checkpoints are another run's (naming the differing keys), none is complete, or the world
            size differs; the message says what to do.
    """
    from pretrain.checkpoint import MANIFEST, list_tags

    run = RunDir(run_dir)
    tags = list_tags(run.checkpoints)
    if not tags:
        return
    complete = [t for _, t in tags if (run.checkpoints / t / MANIFEST).is_file()]
    if not complete:
        raise SubmitError(
            f"{run.checkpoints} holds checkpoints ({', '.join(t for _, t in tags[:3])}) but none is "
            f"complete; move the directory away to start over, or choose a new train.output_dir"
        )
    manifest_path = run.checkpoints / complete[0] / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SubmitError(f"{manifest_path} is unreadable ({e}); move {run.checkpoints} away to start over") from None
    try:
        run.check_same_run({"tag": complete[0], **manifest}, resolved, world_size, allow_world_size_change)
    except ValueError as e:
        raise SubmitError(
            f"train.output_dir: {e} (this job: --nodes x --gpus-per-node = {world_size} rank(s))"
        ) from None


def _active_jobs_for(script: Path) -> list[str]:
    """Ids of this user's pending/running jobs whose batch script is ``script`` (best effort; [] if unknown)."""
    squeue = shutil.which("squeue")
    if not squeue:
        return []
    try:
        proc = subprocess.run([squeue, "-h", "--me", "-o", "%i|%T|%o"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    jobs = []
    for line in proc.stdout.splitlines():
        parts = line.split("|", 2)
        if len(parts) == 3 and parts[2].strip() == str(script):
            jobs.append(f"{parts[0]} ({parts[1]})")
    return jobs


def validate(args: argparse.Namespace) -> tuple[RunConfig, dict]:
    """Load and validate the run config for the requested world size; return (RunConfig, resolved dict).

    Raises :class:`SubmitError` with the config error's message (file, key, value, what to do).
    """
    from pretrain import ds_config
    from pretrain.config import load
    from pretrain.schema import ConfigError

    world_size = args.nodes * args.gpus_per_node
    try:
        cfg = load(args.config, args.overrides)
        ds_config.build(cfg.deepspeed, max_steps=cfg.train.max_steps, world_size=world_size, cuda=bool(args.gres))
    except ConfigError as e:
        raise SubmitError(
            f"invalid config (world size {world_size} = {args.nodes} node(s) x {args.gpus_per_node}): {e}"
        ) from None
    data_dir = Path(cfg.data.dir)
    if not cfg.task.name and not (data_dir / "manifest.json").is_file():  # task distillation reads its task
        raise SubmitError(
            f"data.dir {cfg.data.dir!r} has no manifest.json (shards made by `python -m data_prep "
            f"prepare`); fix data.dir in {args.config} or on the command line"
        )
    return cfg, cfg.to_dict()


def build_job(args: argparse.Namespace, train: TrainConfig) -> JobSpec:
    """The :class:`JobSpec` of a ``submit`` command line whose config validated with the ``train`` section
    (its ``output_dir``, relative to the working directory, is the run directory)."""
    workdir = Path.cwd()
    run_dir = (workdir / train.output_dir).resolve()
    return JobSpec(
        run_dir=run_dir,
        workdir=workdir,
        python=args.python,
        train_args=["--config", str(Path(args.config).resolve()), *args.overrides],
        nodes=args.nodes,
        ranks_per_node=args.gpus_per_node,
        gres=args.gres,
        job_name=args.job_name or f"distill-{run_dir.name}",
        partition=args.partition,
        account=args.account,
        time=args.time,
        cpus_per_task=args.cpus_per_task,
        signal_lead_s=args.signal_lead,
        sbatch_args=args.sbatch_arg,
        srun_args=args.srun_arg,
    )


def submit(args: argparse.Namespace) -> int:
    """``slurm.py submit``: validate, write RUN/slurm/job.sbatch, ``sbatch`` it, print the job id (stdout).

    With ``--dry-run`` the script goes to stdout and nothing is written or submitted. Raises :class:`SubmitError`.
    """
    if args.gres == "auto":
        args.gres = f"gpu:{args.gpus_per_node}"
    elif args.gres.lower() == "none":
        args.gres = None
    cfg, resolved = validate(args)
    job = build_job(args, cfg.train)
    check_run_dir(job.run_dir, resolved, args.nodes * args.gpus_per_node, cfg.train.allow_world_size_change)
    script = render_script(job)
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    sbatch = shutil.which("sbatch")
    if not sbatch:
        raise SubmitError(
            "sbatch not found on PATH: run this on a SLURM login node (or load the slurm module), or "
            "use --dry-run to print the batch script"
        )
    path = script_path(job.run_dir)
    active = _active_jobs_for(path)
    if active:
        raise SubmitError(f"job(s) {', '.join(active)} already train {job.run_dir}; wait for them or scancel them")
    _write(path, script, 0o755)
    proc = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = proc.stderr.strip() or proc.stdout.strip()
        raise SubmitError(f"sbatch refused the job (exit {proc.returncode}): {reason}\nthe script is {path}")
    job_id = proc.stdout.strip().split(";")[0]
    print(
        f"submitted job {job_id}: {job.nodes} node(s) x {job.ranks_per_node} rank(s); script {path}; "
        f"logs {path.parent}/{job_id}.log and {job_id}-node<N>.log",
        file=sys.stderr,
    )
    print(job_id)
    return 0


def hostfile(args: argparse.Namespace) -> int:
    """``slurm.py hostfile``: write a DeepSpeed hostfile for the allocation (stdout, or ``-o PATH`` atomically)."""
    nodelist = args.nodelist or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise SubmitError("no node list: run inside a SLURM allocation (SLURM_JOB_NODELIST) or give --nodelist")
    slots = args.slots
    if slots is None:
        env = os.environ.get("SLURM_GPUS_ON_NODE") or os.environ.get("SLURM_NTASKS_PER_NODE")
        if not env or not env.isdigit():
            raise SubmitError("slots per host unknown: give --slots (GPUs per node); SLURM_GPUS_ON_NODE is not set")
        slots = int(env)
    try:
        text = hostfile_text(hostnames(nodelist), slots)
    except ValueError as e:
        raise SubmitError(str(e)) from None
    if args.output:
        _write(Path(args.output), text)
        print(f"wrote {args.output}: {len(text.splitlines())} host(s), {slots} slot(s) each", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def parser() -> argparse.ArgumentParser:
    """The command line: ``submit`` (:func:`_add_submit`) and ``hostfile``; ``prog`` is the installed command's
    name when run as one, else ``python launch/slurm.py``."""
    p = argparse.ArgumentParser(
        prog=prog("python launch/slurm.py"), description=__doc__.split("\n\n")[0], formatter_class=RawHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    _add_submit(
        sub.add_parser(
            "submit",
            help="validate a run config and submit it as a preemptible, requeueing job",
            formatter_class=HelpFormatter,
        )
    )
    h = sub.add_parser(
        "hostfile",
        help="write a DeepSpeed hostfile from SLURM_JOB_NODELIST (for pdsh launch)",
        formatter_class=HelpFormatter,
    )
    h.add_argument("--nodelist", help="SLURM host list (default $SLURM_JOB_NODELIST)")
    h.add_argument("--slots", type=_positive, help="slots (GPUs) per host (default $SLURM_GPUS_ON_NODE)")
    h.add_argument("-o", "--output", help="file to write (default stdout)")
    h.set_defaults(func=hostfile)
    return p


def _add_submit(s: argparse.ArgumentParser) -> None:
    """The ``submit`` subcommand's arguments."""
    s.add_argument("--config", required=True, help="run config (JSON)")
    s.add_argument("--nodes", type=_positive, required=True, help="nodes (>= 1)")
    s.add_argument(
        "--gpus-per-node",
        type=_positive,
        required=True,
        help="GPUs per node = ranks per node (>= 1); with --gres none, CPU ranks per node",
    )
    s.add_argument("--partition", help="SLURM partition")
    s.add_argument("--time", help="time limit (SLURM format, e.g. 2-00:00:00); USR1 comes --signal-lead s before it")
    s.add_argument("--account", help="SLURM account to charge")
    s.add_argument("--job-name", help="job name (default distill-<run directory name>)")
    s.add_argument("--cpus-per-task", type=_positive, help="CPUs per rank (also OMP_NUM_THREADS)")
    s.add_argument(
        "--gres",
        default="auto",
        help='generic resources per node: "auto" = gpu:<gpus-per-node>; "gpu:a100:8" for typed GPUs; '
        '"none" for CPU-only ranks (tests)',
    )
    s.add_argument(
        "--signal-lead",
        type=_positive,
        default=120,
        help="seconds before the time limit that USR1 is sent (checkpoint time + one step; default 120)",
    )
    s.add_argument(
        "--python",
        default=sys.executable,
        help="Python interpreter on the compute nodes, with this package installed: it runs the ranks "
        "(-m pretrain.main) and the batch script's finished check (default: this one, %(default)s)",
    )
    s.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra sbatch option, repeatable (--sbatch-arg=--qos=high --sbatch-arg=--exclusive)",
    )
    s.add_argument(
        "--srun-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra srun option for the ranks, repeatable (--srun-arg=--container-image=...)",
    )
    s.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides, passed to the job as well")
    s.set_defaults(func=submit)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status: 0, or 2 for a user error (``error: ...`` on stderr; argparse's usage
    errors exit 2 too)."""
    p = parser()
    # overrides may come anywhere on the line (`submit --config C train.max_steps=9 --nodes 2`): collect the strays
    args, extra = p.parse_known_args(argv)
    strays = [a for a in extra if a.startswith("-") or "=" not in a or args.command != "submit"]
    if strays:
        p.error(f"unrecognized arguments: {' '.join(strays)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
