"""The command lines agree with each other (issue 24 item 8): every command's ``--help`` works, names the command
as it was run, gives every option a help text and shows its default; ``export`` takes ``--output`` as well as its
old positional OUT; ``downstream --teacher NAME=PATH``; ``--no-plot`` says nothing about the plot."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import data_prep.__main__ as data_cli
import pretrain.config
import pretrain.deploy.cli
import pretrain.evaluate
import pretrain.export
import pretrain.main
import pretrain.slurm
import pretrain.tasks.downstream_cli as ds_cli
import pretrain.tasks.taskmode_cli as tm_cli
from data_prep.cli import prog

# (entry point, the name it has when run with python, its console script in pyproject.toml)
COMMANDS: list[tuple[Callable[..., int], str, str]] = [
    (pretrain.main.main, "python -m pretrain.main", "bert-distill-pretrain"),
    (pretrain.slurm.main, "python launch/slurm.py", "bert-distill-slurm"),
    (data_cli.main, "python -m data_prep", "bert-distill-data"),
    (pretrain.config.main, "python -m pretrain.config", "bert-distill-config"),
    (pretrain.export.main, "python -m pretrain.export", "bert-distill-export"),
    (pretrain.evaluate.main, "python -m pretrain.evaluate", "bert-distill-evaluate"),
    (ds_cli.main, "python -m pretrain.downstream", "bert-distill-downstream"),
    (tm_cli.main, "python -m pretrain.taskmode", "bert-distill-taskmode"),
    (pretrain.deploy.cli.main, "python -m pretrain.deploy", "bert-distill-deploy"),
]
IDS = [c[2] for c in COMMANDS]


def _parsers(main: Callable[..., int], argv: list[str], monkeypatch) -> list[argparse.ArgumentParser]:
    """Every parser (subcommands' included) that ``main(argv)`` builds; ``argv`` must make it exit 0 (``--help``)."""
    made: list[argparse.ArgumentParser] = []
    init = argparse.ArgumentParser.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(argparse.ArgumentParser, "__init__", record)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return made


def _subcommands(parsers: list[argparse.ArgumentParser]) -> list[str]:
    return [
        name for p in parsers for a in p._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices
    ]


@pytest.mark.parametrize(("main", "name", "script"), COMMANDS, ids=IDS)
def test_every_option_has_help_and_shows_its_default(main, name, script, monkeypatch, capsys):
    parsers = _parsers(main, ["--help"], monkeypatch)
    for sub in _subcommands(parsers):  # each subcommand's --help too
        parsers += _parsers(main, [sub, "--help"], monkeypatch)
    assert capsys.readouterr().out.startswith(f"usage: {name}")
    checked = 0
    assert parsers[0].description
    for p in parsers:
        if p.description:  # subcommands may have none (their help line in the command's help serves)
            assert p.description.rstrip()[-1] in ".)`", (p.prog, p.description)  # not cut off mid-sentence
        fmt = p._get_formatter()
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction) or a.help == argparse.SUPPRESS:
                continue
            where = f"{p.prog} {'/'.join(a.option_strings) or a.dest}"
            assert a.help and a.help.strip(), f"{where}: no help"
            shown = a.default not in (None, False, [], "", argparse.SUPPRESS)
            if shown and a.option_strings:
                assert "default" in fmt._expand_help(a).lower(), f"{where}: default {a.default!r} not in its help"
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize(("main", "name", "script"), COMMANDS, ids=IDS)
def test_program_name_is_the_console_script_when_run_as_one(main, name, script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"/venv/bin/{script}", "--help"])
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: {script} ")


def test_prog_helper():
    assert prog("python -m x") in ("python -m x", *[c[2] for c in COMMANDS])  # pytest's argv[0] is not a script


def test_console_scripts_in_pyproject_are_the_commands_tested():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    scripts = {line.split("=")[0].strip() for line in text.splitlines() if line.startswith("bert-distill-")}
    assert scripts == set(IDS)


def test_seeds_defaults_are_stated(capsys):
    for main, flag, default in ((pretrain.evaluate.main, "--downstream-seeds", 2), (ds_cli.main, "--seeds", 3)):
        with pytest.raises(SystemExit):
            main(["--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert f"default: {default}" in help_text.split(flag, 1)[1], flag


@pytest.fixture
def export_calls(monkeypatch):
    calls = []

    def fake(checkpoint_dir, out, tag=None, *, overwrite=False):
        calls.append((checkpoint_dir, out))
        return Path(out)

    monkeypatch.setattr(pretrain.export, "export_checkpoint", fake)
    return calls


@pytest.mark.parametrize(
    "argv",
    [["ck", "--output", "exp"], ["ck", "exp"], ["ck", "exp", "--output", "exp"], ["--output", "exp", "ck"]],
)
def test_export_takes_output_or_the_positional(argv, export_calls):
    assert pretrain.export.main(argv) == 0
    assert export_calls == [("ck", "exp")]


@pytest.mark.parametrize("argv", [["ck", "a", "--output", "b"], ["ck"]])
def test_export_refuses_two_different_outputs_or_none(argv, export_calls, capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.export.main(argv)
    assert e.value.code == 2 and export_calls == []
    assert "--output" in capsys.readouterr().err


@pytest.fixture
def downstream_calls(monkeypatch):
    calls = []

    def fake(tasks, models, output, **kwargs):
        calls.append((models, kwargs))
        return {}

    monkeypatch.setattr(ds_cli, "run_downstream", fake)
    monkeypatch.setattr(ds_cli, "render_downstream_markdown", lambda result: "table")
    return calls


@pytest.mark.parametrize(("flags", "png"), [([], True), (["--no-plot"], False)])
def test_no_plot_says_nothing_about_the_plot(flags, png, tmp_path, downstream_calls, capsys):
    argv = ["--model", "a=A", "--output", str(tmp_path), *flags]
    assert ds_cli.main(argv) == 0
    assert downstream_calls[0][1]["plot"] is png
    assert ("downstream.png" in capsys.readouterr().out) is png


def test_downstream_teacher_name_or_name_and_path(tmp_path, downstream_calls):
    base = ["--model", "a=A", "--output", str(tmp_path)]
    assert ds_cli.main([*base, "--teacher", "big=models/big", "--student", "a"]) == 0
    models, kwargs = downstream_calls[0]
    assert [(m.name, m.path) for m in models] == [("big", "models/big"), ("a", "A")]
    assert kwargs["teacher"] == "big" and kwargs["student"] == "a"
    assert ds_cli.main([*base, "--student", "mine=M", "--teacher", "a"]) == 0  # the documented bare-name form
    models, kwargs = downstream_calls[1]
    assert [(m.name, m.path) for m in models] == [("a", "A"), ("mine", "M")]
    assert kwargs["teacher"] == "a" and kwargs["student"] == "mine"
    assert ds_cli.main([*base, "--teacher", "=x"]) == 2
