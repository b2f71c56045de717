"""What every command line of the project shares: its program name (:func:`prog`), its help formatter
(:class:`HelpFormatter`, which shows each option's default) and its progress bars (:func:`progress_bar`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def prog(fallback: str) -> str:
    """The program name for usage lines: the installed console script's (``bert-distill-*``) when ``sys.argv[0]``
    is one, else ``fallback`` (e.g. ``python -m pretrain.export``)."""
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    return name if name.startswith("bert-distill") else fallback


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already names its default or there is no
    default to show (``None``, ``False``, an empty list, suppressed)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default is None or default is False or default == [] or default == "":
            return text
        if default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action) or text


class RawHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """:class:`HelpFormatter` that keeps the description's line breaks."""


def progress_bar(total: int, desc: str, unit: str) -> Any:
    """A tqdm bar on stderr: redrawn twice a second on a terminal, every 30 s into a log file."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=f" {unit}", file=sys.stderr, mininterval=0.5 if tty else 30.0)
