"""`deltatune reader train` and `deltatune reader eval`: the parser and the handlers.

    deltatune reader train --model smollm2-135m --data wikitext-cloze --out runs/reader
    deltatune reader train --model smollm2-135m --data wikitext-cloze --top-k 0 --out runs/reader-closed
    deltatune reader eval runs/reader --against runs/reader-closed

Training flags are generated from `ReaderConfig`'s fields by `deltatune.cli_options` (their help is the
field's docstring).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deltatune.cli_options import add_config_options, add_switch, config_from_options
from deltatune.reader.config import ReaderConfig

EVALUATION_FILE = "reader_eval.json"


def add_reader_parser(commands) -> None:
    """Add the `reader` command group to the `deltatune` subcommands."""
    reader = commands.add_parser(
        "reader",
        help="frozen reader: a frozen decoder answers questions from retrieved "
        "passages; only a soft prompt and a re-ranker train",
    )
    actions = reader.add_subparsers(dest="reader_command", required=True, metavar="ACTION")
    train = actions.add_parser("train", help="train the reader's prompt and re-ranker (the decoder stays frozen)")
    train.add_argument("--model", default="smollm2-135m", help="a causal decoder: alias, local directory or hub id")
    train.add_argument(
        "--data",
        default="wikitext-cloze",
        help="wikitext-cloze (offline), a .jsonl file, or hub:ID (a SQuAD-style set, e.g. hub:rajpurkar/squad)",
    )
    train.add_argument("--out", help="directory for the trained parts and the record (omit to save nothing)")
    add_switch(train, "--overwrite", help="replace an existing --out directory")
    add_switch(train, "--json", help="print the whole record as JSON")
    add_config_options(train.add_argument_group("reader (ReaderConfig)"), ReaderConfig)

    evaluate = actions.add_parser(
        "eval", help="exact match and F1 of the reader against closed-book and open-book answering by the same decoder"
    )
    evaluate.add_argument("run_dir", help="the --out directory of `deltatune reader train`")
    evaluate.add_argument("--split", default="test", help="split to evaluate on (default: test)")
    evaluate.add_argument(
        "--baselines",
        default="closed-book,open-book,bm25-reader",
        help="comma-separated: closed-book, open-book, bm25-reader (the trained prompt without the "
        "re-ranker), or none (default: all three)",
    )
    evaluate.add_argument(
        "--against",
        default="",
        help="comma-separated other reader runs to compare, e.g. a closed-book prompt-tuning run (--top-k 0)",
    )
    evaluate.add_argument(
        "--max-examples", type=int, help="questions (seeded subset; default: the run's eval_examples; 0 for all)"
    )
    evaluate.add_argument("--data", help="evaluate on other data than the run was trained on")
    evaluate.add_argument("--out-json", help=f"where to write the report (default: RUN_DIR/{EVALUATION_FILE})")
    add_switch(evaluate, "--json", help="print the report as JSON instead of a table")
    add_switch(evaluate, "--quiet", help="no progress lines")


def reader_config_from(args: argparse.Namespace) -> ReaderConfig:
    return config_from_options(ReaderConfig, args)


def run_reader_command(args: argparse.Namespace) -> int:
    from deltatune.delta import write_json_atomic
    from deltatune.reader.artifact import evaluate_reader, format_report, run_reader_training

    if args.reader_command == "train":
        record = run_reader_training(
            args.model, args.data, reader_config_from(args), out=args.out, overwrite=args.overwrite
        )
        training = record["training"]
        print(
            json.dumps(record, indent=2)
            if args.json
            else f"frozen reader on {record['model']} ({record['decoder_params']:,} frozen parameters), data "
            f"{record['data']}: {record['trainable_params']:,} trained parameters, "
            f"{training['train_questions']} questions, {training['train_time_s']:.0f} s; prompt loss "
            f"{training['prompt_loss_first_10']} -> {training['prompt_loss_last_10']}; decoder weights "
            f"unchanged (sha256 {training['decoder_weights_sha256'][:12]})"
        )
        if args.out:
            print(f"saved to {args.out}; evaluate with: deltatune reader eval {args.out}")
        return 0
    baselines = (
        ()
        if args.baselines.strip().lower() == "none"
        else tuple(b.strip() for b in args.baselines.split(",") if b.strip())
    )
    against = tuple(a.strip() for a in args.against.split(",") if a.strip())
    log = None if args.quiet or args.json else (lambda message: print(message, flush=True))
    report = evaluate_reader(args.run_dir, args.split, baselines, against, args.max_examples, args.data, log)
    path = Path(args.out_json or Path(args.run_dir) / EVALUATION_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if not args.json:
        print(f"report written to {path}")
    return 0


__all__ = ["add_reader_parser", "reader_config_from", "run_reader_command"]
