"""Markdown table of the effects recorded by tests/helpers.py (one JSON-lines file per variant, named VARIANT.jsonl):
one row per test and effect, one column per variant, the threshold and the margin (docs/testing.md).

Margin: for an effect that must exceed a threshold, the smallest measured effect / the threshold (inf for 0); for a
tolerance, 1 / the largest share of the tolerance used. Usage: ``python scripts/effects_table.py OUT/*.jsonl``."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    rows: dict[tuple[str, str], dict] = {}
    variants = [Path(p).stem for p in paths]
    for path, variant in zip(paths, variants, strict=True):
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            row = rows.setdefault((r["test"], r["name"]), {"kind": r["kind"], "threshold": r["threshold"], "v": {}})
            seen = row["v"].setdefault(variant, [])
            seen.append(r["value"])
    print("| test | effect | " + " | ".join(variants) + " | threshold | margin |")
    print("|---" * (len(variants) + 4) + "|")
    for (test, name), row in rows.items():
        tol = row["kind"].startswith("tolerance")
        # several records of one effect in a variant (parametrized tests, repeated checks): the worst one
        worst = {v: (max(x) if tol else min(x)) for v, x in row["v"].items()}
        cells = [f"{worst[v]:.3g}" if v in worst else "-" for v in variants]
        values = list(worst.values())
        if tol:
            margin = 1 / max(values) if max(values) > 0 else float("inf")
        else:
            margin = min(values) / row["threshold"] if row["threshold"] > 0 else float("inf")
        short = test.replace("tests/", "").replace(".py::", "::")
        kind = "<=" if tol else ">"
        print(f"| {short} | {name} | " + " | ".join(cells) + f" | {kind} {row['threshold']:g} | {margin:.3g}x |")


if __name__ == "__main__":
    main(sys.argv[1:])
