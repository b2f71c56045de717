"""``python -m data_prep {prepare,verify,inspect,fetch-embedded,bench}``: the data preparation command line.

Heavy imports (transformers, datasets) happen inside the subcommands, so worker processes that import this module
start fast. User errors print ``error: ...`` and exit with status 2; ``verify`` exits 1 when a file is bad, and any
command exits 1 with one ``error: could not write ...`` line when the disk is full.
"""

from __future__ import annotations

import argparse
import json
import sys

from data_prep.cli import HelpFormatter, prog


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize, pack and shard a corpus",
        formatter_class=HelpFormatter,
        description="Tokenize documents with the teacher's fast tokenizer, split them train/valid by "
        "document, pack them RoBERTa FULL-SENTENCES style and write memory-mappable "
        "shards + manifest.json + token_counts.npy. Resumable: run the same command "
        "again after an interruption.",
    )
    p.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="S",
        help="embedded | wikipedia[:CONFIG] | bookcorpus | text:GLOB | jsonl:GLOB[:FIELD] | "
        "parquet:GLOB[:FIELD] | hf:NAME[:CONFIG[:SPLIT[:FIELD]]]; repeat for several",
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="NAME_OR_PATH",
        help="hub name, local folder, or embedded:minilm-l6 / embedded:bert-tiny-mlm (the teacher's)",
    )
    p.add_argument(
        "--max-seq-length",
        type=int,
        required=True,
        metavar="N",
        help="tokens per sequence including CLS and SEP (e.g. 512)",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="output folder")
    _add_prepare_options(p)


def _add_prepare_options(p) -> None:
    """``prepare``'s optional arguments (its split, sharding, workers and output handling)."""
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=0.01,
        metavar="F",
        help="fraction of documents held out for the valid split (default 0.01)",
    )
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=1 << 25,
        metavar="N",
        help="tokens per shard file (default 33554432 = 64 MiB of uint16); also the resume granularity",
    )
    p.add_argument(
        "--num-proc",
        type=int,
        default=None,
        metavar="N",
        help="tokenizer worker processes (default: the CPUs available; 0 = in the main process)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/valid split (default 0)")
    p.add_argument(
        "--min-doc-tokens",
        type=int,
        default=1,
        metavar="N",
        help="drop (and count) documents with fewer tokens (default 1: only empty ones)",
    )
    p.add_argument(
        "--errors",
        choices=("strict", "replace"),
        default="strict",
        help="undecodable bytes in text/jsonl files: stop naming file and offset (strict, default) or "
        "substitute U+FFFD (replace)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a different (finished or unfinished) run's output in --output (only prepare's own files are "
        "deleted; a training run directory is refused always)",
    )
    p.add_argument(
        "--batch-chars",
        type=int,
        default=1 << 19,
        metavar="N",
        help="characters per tokenization task (default 524288); does not change the output",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stats-json", metavar="FILE", help="also write timing / throughput / peak RSS as JSON here")


def _prepare(args) -> int:
    from data_prep.prepare import PrepareConfig, default_num_proc, prepare

    cfg = PrepareConfig(
        sources=args.source,
        tokenizer=args.tokenizer,
        max_seq_length=args.max_seq_length,
        output=args.output,
        valid_fraction=args.valid_fraction,
        shard_tokens=args.shard_tokens,
        num_proc=default_num_proc() if args.num_proc is None else args.num_proc,
        seed=args.seed,
        min_doc_tokens=args.min_doc_tokens,
        errors=args.errors,
        overwrite=args.overwrite,
        batch_chars=args.batch_chars,
        progress=not args.no_progress,
        stats_json=args.stats_json,
    )
    prepare(cfg)
    return 0


def _verify(args) -> int:
    from data_prep.shards import verify

    problems, totals = verify(args.dir)
    for line in problems:
        print(f"BAD {line}", file=sys.stderr)
    if problems:
        print(f"verify {args.dir}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(
        f"verify {args.dir}: OK, {totals['shards']} shards, {totals['sequences']:,} sequences, "
        f"{totals['tokens']:,} tokens, {totals['bytes']:,} bytes checked (size + sha256)"
    )
    return 0


def _inspect(args) -> int:
    from data_prep.shards import ShardedTokens

    ds = ShardedTokens(args.dir, args.split)
    m = ds.manifest
    tok_name = args.tokenizer or m["tokenizer"]["name_or_path"]
    sp = m["splits"][args.split]
    print(
        f"{args.dir} [{args.split}]: {len(ds):,} sequences, {sp['num_tokens']:,} tokens, {sp['num_documents']:,} "
        f"documents, {len(sp['shards'])} shard(s), dtype {m['dtype']}, max_seq_length {m['max_seq_length']}, "
        f"tokenizer {m['tokenizer']['name_or_path']}"
    )
    try:
        from data_prep.tokenizer import load_tokenizer

        tok = load_tokenizer(tok_name)
    except Exception as e:  # show ids rather than nothing
        print(f"(cannot load tokenizer {tok_name!r}: {e}; showing ids)")
        tok = None
    for i in range(args.start, min(args.start + args.n, len(ds))):
        ids = ds[i]
        text = tok.decode(ids.tolist(), skip_special_tokens=False) if tok is not None else " ".join(map(str, ids))
        print(f"--- sequence {i} ({len(ids)} tokens)\n{text}")
    return 0


def _fetch(args) -> int:
    from data_prep.embedded import fetch_embedded

    for name, path in fetch_embedded(args.cache_dir).items():
        print(f"{name}\t{path}")
    return 0


def _bench(args) -> int:
    from data_prep.bench import run_bench

    print(
        json.dumps(
            run_bench(
                tokenizer=args.tokenizer,
                num_proc=args.num_proc,
                min_tokens=args.min_tokens,
                max_seq_length=args.max_seq_length,
                workdir=args.workdir,
            )
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line: prepare (:func:`_add_prepare`), verify, inspect, fetch-embedded, bench."""
    parser = argparse.ArgumentParser(
        prog=prog("python -m data_prep"), description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    fmt = HelpFormatter
    v = sub.add_parser("verify", help="check every shard's size and sha256 against the manifest", formatter_class=fmt)
    v.add_argument("dir", help="a prepared folder (prepare --output; holds manifest.json)")
    i = sub.add_parser("inspect", help="decode sequences for a person to read", formatter_class=fmt)
    i.add_argument("dir", help="a prepared folder (prepare --output; holds manifest.json)")
    i.add_argument("--split", default="train", choices=("train", "valid"), help="which split's sequences")
    i.add_argument("--n", type=int, default=3, help="how many sequences (default 3)")
    i.add_argument("--start", type=int, default=0, help="first sequence (default 0)")
    i.add_argument("--tokenizer", help="decode with this tokenizer instead of the manifest's")
    f = sub.add_parser(
        "fetch-embedded", help="download + verify the embedded corpus and teachers, print paths", formatter_class=fmt
    )
    f.add_argument("--cache-dir", help="cache folder (default: $BERT_DISTILL_CACHE or ~/.cache/bert-distill)")
    b = sub.add_parser(
        "bench", help="prepare throughput vs the batched tokenizer and per-line encode, peak RSS", formatter_class=fmt
    )
    b.add_argument("--tokenizer", default="embedded:minilm-l6", help="tokenizer to time (as prepare's --tokenizer)")
    b.add_argument(
        "--num-proc", type=int, default=None, help="tokenizer worker processes (default: the CPUs available)"
    )
    b.add_argument("--min-tokens", type=int, default=8_000_000, help="corpus size in tokens (default 8M)")
    b.add_argument("--max-seq-length", type=int, default=512, help="tokens per sequence including CLS and SEP")
    b.add_argument("--workdir", help="keep the corpus and shards here (default: a temporary folder)")
    return parser


COMMANDS = {"prepare": _prepare, "verify": _verify, "inspect": _inspect, "fetch-embedded": _fetch, "bench": _bench}


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (0 ok, 1 verify found problems or a full disk, 2 user error)."""
    from data_prep.errors import DistillError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DistillError as e:  # DataPrepError: 2; DiskFullError: 1
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last finished shard", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
