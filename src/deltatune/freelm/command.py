"""`deltatune freelm train` and `deltatune freelm eval`: the parser and the handlers.

    deltatune freelm train --model smollm2-135m --train-tasks snli,rotten-tomatoes,trec --out runs/freelm
    deltatune freelm eval runs/freelm --tasks sms-spam,disaster-tweets,stsb --baselines zero-shot,k-shot --k 4

Training flags are generated from `FreeLMConfig`'s fields by `deltatune.cli_options` (their help is the
field's docstring), so `--help` and the config cannot disagree. Method options are `--method.KEY=VALUE` as in `deltatune train`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deltatune.cli_options import add_config_options, add_switch, config_from_options
from deltatune.errors import DeltatuneError
from deltatune.freelm.config import FreeLMConfig

EVALUATION_FILE = "zero_shot_eval.json"


def add_freelm_parser(commands) -> None:
    """Add the `freelm` command group to the `deltatune` subcommands."""
    freelm = commands.add_parser(
        "freelm",
        help="FreeLM: train one model with language + teacher signals, evaluate it zero-shot on held-out tasks",
    )
    actions = freelm.add_subparsers(dest="freelm_command", required=True, metavar="ACTION")

    train = actions.add_parser(
        "train",
        help="train FreeLM on tasks in proposition format, alternating with the language signal",
        description="Method options: --method.KEY=VALUE (see `deltatune methods -v`). List flags take "
        "comma-separated values (--train-tasks snli,trec).",
    )
    train.add_argument("--model", default="smollm2-135m", help="a causal decoder: alias, local directory or hub id")
    train.add_argument("--method", default="lora", help="what adapts the decoder (see `deltatune methods`)")
    train.add_argument("--out", help="directory for the delta and run record (omit to save nothing)")
    add_switch(train, "--overwrite", help="replace an existing --out directory")
    add_switch(train, "--json", help="print the whole run record as JSON")
    add_config_options(train.add_argument_group("FreeLM (FreeLMConfig)"), FreeLMConfig)

    evaluate = actions.add_parser(
        "eval", help="zero-shot evaluation: FreeLM vs the base model's zero-shot and k-shot prompting"
    )
    evaluate.add_argument("run_dir", help="the --out directory of `deltatune freelm train`")
    evaluate.add_argument("--tasks", required=True, help="comma-separated catalog tasks, e.g. sms-spam,stsb")
    evaluate.add_argument(
        "--baselines",
        default="zero-shot,k-shot",
        help="comma-separated: zero-shot, k-shot, or none (default: zero-shot,k-shot)",
    )
    evaluate.add_argument("--k", type=int, default=4, help="demonstrations for the k-shot baseline (default: 4)")
    evaluate.add_argument(
        "--max-examples",
        type=int,
        default=300,
        help="examples per task, stratified (default: 300; 0 for the whole split)",
    )
    evaluate.add_argument("--split", default="test", help="split to evaluate on (default: test)")
    evaluate.add_argument(
        "--templates",
        default="all",
        help="proposition templates FreeLM averages over: 'all' or one index (default: all)",
    )
    evaluate.add_argument("--base", help="load the base model from here instead of the recorded name")
    evaluate.add_argument("--seed", type=int, default=0, help="seeds the example subset and the demonstrations")
    evaluate.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default: 16)")
    evaluate.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    evaluate.add_argument("--out-json", help=f"where to write the report (default: RUN_DIR/{EVALUATION_FILE})")
    add_switch(evaluate, "--json", help="print the report as JSON instead of a table")
    add_switch(evaluate, "--quiet", help="no progress lines")


def freelm_config_from(args: argparse.Namespace) -> FreeLMConfig:
    return config_from_options(FreeLMConfig, args)


def run_freelm_command(args: argparse.Namespace, method_options: dict[str, str]) -> int:
    if args.freelm_command == "train":
        return _train(args, method_options)
    if method_options:
        raise DeltatuneError("--method.KEY=VALUE options only apply to `deltatune freelm train`.")
    return _evaluate(args)


def _train(args: argparse.Namespace, method_options: dict[str, str]) -> int:
    from deltatune.freelm.artifact import run_freelm_training
    from deltatune.methods import build_method
    from deltatune.tasks import get_task

    problems = []
    config = None
    try:
        config = freelm_config_from(args)
    except DeltatuneError as error:
        problems.append(str(error))
    try:
        build_method(args.method, method_options)
    except DeltatuneError as error:
        problems.append(str(error))
    tasks = (
        config.train_tasks
        if config is not None
        else [t.strip() for t in (args.train_tasks or "").split(",") if t.strip()]
    )
    for task in tasks:
        try:
            get_task(task)
        except DeltatuneError as error:
            problems.append(f"--train-tasks: {error}")
    if problems:  # every argument problem at once, before anything slow happens
        raise DeltatuneError("\n".join(problems))
    record = run_freelm_training(
        args.model, config, args.method, method_options, out=args.out, overwrite=args.overwrite
    )
    print(json.dumps(record, indent=2) if args.json else summarize_training(record))
    if args.out:
        print(f"saved to {args.out}; evaluate with: deltatune freelm eval {args.out} --tasks TASK,...")
    return 0


def summarize_training(record: dict) -> str:
    training = record["freelm"]["training"]
    perplexity = record["freelm"]["perplexity"]
    lines = [
        f"FreeLM on {record['model']} with {record['method']}, tasks {', '.join(record['freelm']['train_tasks'])}",
        f"  trainable {record['trainable_params']:,} of {record['total_params']:,} params "
        f"({record['trainable_percent']:.3f}%)"
        + (f"; delta {record['delta_bytes'] / 1e6:.2f} MB" if record.get("delta_bytes") else ""),
        f"  {training['steps']} steps ({training['teacher_steps']} teacher, {training['language_steps']} language) "
        f"in {training['train_time_s']:.1f} s (CPU {training['train_cpu_time_s']:.1f} s): "
        f"{training['propositions_per_s']:.1f} propositions/s, "
        f"{training['language_tokens_per_s']:.0f} language tokens/s",
        f"  teacher loss {training['teacher_loss_first_10']:.4f} -> {training['teacher_loss_last_10']:.4f} "
        f"(mean of first/last 10 teacher steps); language loss {training['language_loss_first_10']:.4f} -> "
        f"{training['language_loss_last_10']:.4f}",
        f"  {perplexity['corpus']} validation perplexity {perplexity['before']:.2f} -> {perplexity['after']:.2f} "
        f"({perplexity['blocks']} blocks of {perplexity['block_length']} tokens)",
    ]
    for task, metrics in record["freelm"]["seen_task_dev_metrics"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "num_examples")
        lines.append(f"  zero-shot on {task} dev ({metrics['num_examples']} examples): {shown}")
    return "\n".join(lines)


def _evaluate(args: argparse.Namespace) -> int:
    from deltatune.freelm.evaluation import evaluate_freelm, format_table, write_report

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    baselines = (
        [] if args.baselines.strip().lower() == "none" else [b.strip() for b in args.baselines.split(",") if b.strip()]
    )
    if not tasks:
        raise DeltatuneError("--tasks needs at least one task, e.g. --tasks sms-spam,stsb")
    report = evaluate_freelm(
        args.run_dir,
        tasks,
        baselines,
        k=args.k,
        max_examples=args.max_examples or None,
        split=args.split,
        templates=args.templates,
        base=args.base,
        seed=args.seed,
        batch_size=args.batch_size,
        threads=args.threads,
        quiet=args.quiet or args.json,
    )
    path = write_report(report, args.out_json or Path(args.run_dir) / EVALUATION_FILE)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    if not args.json:
        print(f"report written to {path}")
    return 0


__all__ = ["add_freelm_parser", "freelm_config_from", "run_freelm_command", "summarize_training"]
