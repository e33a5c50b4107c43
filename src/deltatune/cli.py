"""The `deltatune` command.

    deltatune train --model minilm-l6 --task stsb --method bitfit --out runs/stsb-bitfit
    deltatune eval runs/stsb-bitfit --split test
    deltatune predict runs/stsb-bitfit "A man is playing a guitar." "A person plays an instrument."
    deltatune models | tasks | methods
    deltatune fetch minilm-l6 stsb
    deltatune export RUN_DIR --format peft|hf --out DIR [--push-to-hub REPO]
    deltatune merge RUN_DIR... --how linear|task-arithmetic|ties|dare --out DIR
    deltatune serve RUN_DIR... [--host 127.0.0.1] [--port 8000]
    deltatune analyze RUN_DIR
    deltatune demo

Training options are generated from `TrainConfig`'s fields by `deltatune.cli_options` (as are FreeLM's,
the reader's and the server's from their configs), so `--help` and the config can never disagree; every
on/off option has its `--no-` form. Method options are `--method.KEY=VALUE`, checked against the
method's config class.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import typing
from pathlib import Path

# Only light modules here: torch and transformers are imported inside main(), so Ctrl-C while they load
# is handled like any other interruption instead of ending in a traceback from an import.
from deltatune import interrupts
from deltatune.cli_options import add_config_options, add_switch, config_from_options, split_method_options
from deltatune.config import describe_fields
from deltatune.errors import DeltatuneError

if typing.TYPE_CHECKING:
    from deltatune.training import TrainConfig


def json_text(data) -> str:
    from deltatune.delta import json_text as strict_json

    return strict_json(data)


def _train_config_from(args: argparse.Namespace) -> TrainConfig:
    from deltatune.training import TrainConfig

    return config_from_options(TrainConfig, args)


def _data_from(args: argparse.Namespace) -> dict:
    from deltatune.run import data_record

    if args.data:
        if args.task:
            raise DeltatuneError("Pass either --task NAME (a catalog task) or --data FILE (your own data), not both.")
        if not args.text_fields:
            raise DeltatuneError(
                "--data needs --text-fields naming the input column(s), e.g. "
                "--text-fields review or --text-fields question,answer."
            )
        local = {
            "path": str(Path(args.data).resolve()),
            "text_fields": [c.strip() for c in args.text_fields.split(",") if c.strip()],
            "label_field": args.label_field,
            "labels": [c.strip() for c in args.labels.split(",")] if args.labels else None,
            "regression": args.regression,
            "dev_path": str(Path(args.dev_data).resolve()) if args.dev_data else None,
            "test_path": str(Path(args.test_data).resolve()) if args.test_data else None,
        }
        return data_record(Path(args.data).stem, local=local)
    if not args.task:
        raise DeltatuneError("Say what to train on: --task NAME (see `deltatune tasks`) or --data FILE.")
    from deltatune.tasks import get_task

    get_task(args.task)
    return data_record(args.task, source=args.source)


def command_train(args: argparse.Namespace, method_options: dict[str, str]) -> int:
    from deltatune.methods import get_method_entry
    from deltatune.run import run_training, summarize

    problems = []
    for check in (lambda: get_method_entry(args.method), lambda: _train_config_from(args), lambda: _data_from(args)):
        try:
            check()
        except DeltatuneError as error:
            problems.append(str(error))
    if problems:  # every argument problem at once, before anything slow happens
        raise DeltatuneError("\n".join(problems))
    config = _train_config_from(args)
    from deltatune.distributed import current_rank

    main_process = current_rank() == 0  # under torchrun / accelerate launch only rank 0 speaks
    record = run_training(
        args.model,
        _data_from(args),
        args.method,
        method_options,
        config,
        out=args.out,
        overwrite=args.overwrite,
        say=None if config.quiet or not main_process else print,
    )
    if not main_process or record is None:
        return 0
    print(json_text(record.to_json()) if args.json else summarize(record))
    if args.out:
        print(f"saved to {args.out}")
    return 0


def command_eval(args: argparse.Namespace) -> int:
    import deltatune
    from deltatune.delta import read_manifest

    if read_manifest(args.run_dir).task.name == "freelm-propositions":
        raise DeltatuneError(
            f"{args.run_dir} is a FreeLM model (one model for all tasks): evaluate it with "
            f"`deltatune freelm eval {args.run_dir} --tasks TASK,...`."
        )
    tuned = on_device(deltatune.load(args.run_dir, base=args.base), args.device)
    metrics = tuned.evaluate(args.split, precision=args.precision, data_changed_ok=args.data_changed_ok)
    if args.json:
        print(json_text({"split": args.split, **metrics}))
    else:
        print(f"{tuned.task.name} {args.split}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def command_predict(args: argparse.Namespace) -> int:
    import deltatune

    tuned = on_device(deltatune.load(args.run_dir, base=args.base), args.device)
    (result,) = tuned.predict(*args.texts, precision=args.precision)
    if args.json:
        print(json_text(result))
    elif "score" in result:
        print(f"score {result['score']:.4f}")
    else:
        ranked = sorted(result["probabilities"].items(), key=lambda kv: -kv[1])
        print(f"{result['label']}  (" + ", ".join(f"{k} {v:.3f}" for k, v in ranked) + ")")
    return 0


def on_device(tuned, device: str):
    """A loaded delta's model moved to `--device` (prediction follows the model there)."""
    from deltatune.devices import resolve_device

    tuned.model.to(resolve_device(device))
    return tuned


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """`--device`, the same on every command that computes."""
    from deltatune.devices import DEVICE_CHOICES

    parser.add_argument(
        "--device",
        default="auto",
        metavar="|".join(DEVICE_CHOICES),
        help="where to compute: auto (a CUDA GPU when present, else Apple MPS, else the CPU), "
        "cpu, cuda, cuda:N or mps (default: auto)",
    )


def command_models(args: argparse.Namespace) -> int:
    from deltatune.sources.models import MODEL_ALIASES

    for alias in MODEL_ALIASES.values():
        print(f"{alias.name:14} {alias.description}\n{'':14} from: {alias.origin}")
    print(
        "\nAny other value of --model is a local directory or a Hugging Face hub id "
        "(loaded with from_pretrained, safetensors only)."
    )
    return 0


def command_tasks(args: argparse.Namespace) -> int:
    from deltatune.tasks import TASKS

    for task in TASKS.values():
        if task.labels:
            labels = ", ".join(task.labels)
        else:
            assert task.score_range is not None  # a task without class labels has a score range
            labels = f"score {task.score_range[0]:g}..{task.score_range[1]:g}"
        print(f"{task.name:16} {task.description}")
        print(f"{'':16} fields: {', '.join(task.text_fields)}; labels: {labels}")
        print(f"{'':16} metric: {task.metric} (also {', '.join(m for m in task.metrics if m != task.metric) or '-'})")
        print(f"{'':16} source: {task.source}")
    return 0


def command_methods(args: argparse.Namespace) -> int:
    from deltatune.methods import REGISTRY

    width = max(len(name) for name in REGISTRY) + 2
    for name in sorted(REGISTRY):
        entry = REGISTRY[name]
        print(f"{entry.name:{width}}{entry.summary}")
        if args.verbose:
            print(f"{'':{width}}default learning rate {entry.method_class.default_learning_rate:g}")
            for field_name, type_name, default, help_text in describe_fields(entry.config_class):
                print(f"{'':{width}}--method.{field_name}={default!r} ({type_name}) {help_text}")
    if not args.verbose:
        print("\n`deltatune methods -v` lists each method's --method.KEY=VALUE options.")
    return 0


def command_fetch(args: argparse.Namespace) -> int:
    from deltatune.sources.data import load_task_data
    from deltatune.sources.models import MODEL_ALIASES, resolve_model
    from deltatune.tasks import get_task

    for name in args.names:
        if name in MODEL_ALIASES:
            print(f"{name}: {resolve_model(name)}")
        else:
            data = load_task_data(get_task(name).name, source="mirror")
            sizes = ", ".join(f"{k} {len(v)}" for k, v in data.splits.items())
            print(f"{name}: {sizes}")
    return 0


def command_export(args: argparse.Namespace) -> int:
    from deltatune.hf_export import export_command

    return export_command(args)


def command_analyze(args: argparse.Namespace) -> int:
    from deltatune.analysis import analyze_run, format_report

    rows = analyze_run(args.run_dir, base=args.base, rank_by=args.rank_by)
    print(json_text(rows) if args.json else format_report(rows))
    return 0


def command_demo(args: argparse.Namespace) -> int:
    from deltatune.demo import run_demo

    run_demo(
        Path(args.out),
        model=args.model,
        task=args.task,
        methods=args.methods.split(","),
        epochs=args.epochs,
        quiet=args.quiet,
    )
    return 0


def command_freelm(args: argparse.Namespace, method_options: dict[str, str]) -> int:
    from deltatune.freelm.command import run_freelm_command

    return run_freelm_command(args, method_options)


def command_reader(args: argparse.Namespace) -> int:
    from deltatune.reader.command import run_reader_command

    return run_reader_command(args)


def command_compare(args: argparse.Namespace) -> int:
    from deltatune.compare.commands import compare_command

    return compare_command(args)


def command_results(args: argparse.Namespace) -> int:
    from deltatune.compare.commands import results_command

    return results_command(args)


def command_report(args: argparse.Namespace) -> int:
    from deltatune.compare.commands import report_command

    return report_command(args)


def run_serve_command(args: argparse.Namespace) -> int:
    from deltatune.serve.command import run_serve_command as run

    return run(args)


def merge_command(args: argparse.Namespace) -> int:
    from deltatune.merge import merge_command as run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltatune",
        description="Adapt pretrained language models cheaply, "
        "ship each task as a tiny delta, and find out which method is best.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from deltatune.compare.commands import add_compare_parser, add_report_parser, add_results_parser
    from deltatune.freelm.command import add_freelm_parser
    from deltatune.merge import add_merge_parser
    from deltatune.reader.command import add_reader_parser
    from deltatune.serve.command import add_serve_parser

    for add_command in (
        _add_train_parser,
        _add_eval_parser,
        _add_predict_parser,
        _add_listing_parsers,
        _add_export_parser,
        _add_analyze_parser,
        _add_demo_parser,
        add_freelm_parser,
        add_reader_parser,
        add_compare_parser,
        add_results_parser,
        add_report_parser,
        add_serve_parser,
        add_merge_parser,
    ):
        add_command(commands)
    return parser


def _add_train_parser(commands) -> None:
    from deltatune.sources.data import SOURCES
    from deltatune.training import TrainConfig

    train = commands.add_parser(
        "train",
        help="fine-tune a model on a task with a method and save the delta",
        description="Method options: --method.KEY=VALUE (see `deltatune methods -v`).",
    )
    train.add_argument("--model", default="minilm-l6", help="alias (see `deltatune models`), local directory or hub id")
    train.add_argument("--task", help="catalog task (see `deltatune tasks`)")
    train.add_argument(
        "--source",
        default="auto",
        choices=SOURCES,
        help="where catalog data come from (auto: the packaged mirror when there is one)",
    )
    train.add_argument("--data", help="your own CSV/TSV/JSONL/Parquet training file instead of --task")
    train.add_argument("--dev-data", help="with --data: a dev file (else a stratified dev split is made)")
    train.add_argument("--test-data", help="with --data: a test file (else a stratified test split is made)")
    train.add_argument("--text-fields", help="with --data: the input column, or two comma-separated for pairs")
    train.add_argument("--label-field", default="label", help="with --data: the label column")
    train.add_argument(
        "--labels", help="with --data: the class names in order, comma-separated (else sorted unique values)"
    )
    add_switch(train, "--regression", help="with --data: the label is a number to predict")
    train.add_argument("--method", default="full", help="adaptation method (see `deltatune methods`)")
    train.add_argument("--out", help="directory for the delta and run record (omit to save nothing)")
    add_switch(train, "--overwrite", help="replace an existing --out directory")
    add_switch(train, "--json", help="print the whole run record as JSON")
    add_config_options(train.add_argument_group("training (TrainConfig)"), TrainConfig)


def add_precision_option(parser: argparse.ArgumentParser) -> None:
    """`--precision` of prediction, the same on every command that predicts."""
    from deltatune.precision import PRECISIONS

    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="bf16 autocast, fp32, fp16 (CUDA), or auto: bf16 on CPUs with native bf16 and "
        "on GPUs that support it (default)",
    )


def _add_eval_parser(commands) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a saved delta on a split of its task")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--split", default="dev", help="train, dev or test")
    evaluate.add_argument("--base", help="load the base model from here instead of the recorded name")
    add_switch(evaluate, "--json", help="print the metrics as JSON")
    add_switch(
        evaluate,
        "--data-changed-ok",
        help="evaluate even if the data differ from what the delta was trained on (its recorded sha256); "
        "re-made splits may then overlap the training rows",
    )
    add_precision_option(evaluate)
    add_device_option(evaluate)


def _add_predict_parser(commands) -> None:
    predict = commands.add_parser("predict", help="predict for one example (two texts for a pair task)")
    predict.add_argument("run_dir")
    predict.add_argument("texts", nargs="+")
    predict.add_argument("--base", help="load the base model from here instead of the recorded name")
    add_switch(predict, "--json", help="print the prediction as JSON")
    add_precision_option(predict)
    add_device_option(predict)


def _add_listing_parsers(commands) -> None:
    commands.add_parser("models", help="model aliases and where they come from")
    commands.add_parser("tasks", help="every task: fields, labels, metric, source")
    methods = commands.add_parser("methods", help="every registered method")
    add_switch(methods, "-v", "--verbose", help="also list each method's options")
    fetch = commands.add_parser("fetch", help="fetch models and data sets from their packaged mirrors now")
    fetch.add_argument("names", nargs="+", help="model aliases and task names")


def _add_export_parser(commands) -> None:
    from deltatune.hf_export import add_hf_export_options

    export = commands.add_parser("export", help="write a run as a plain transformers model (hf) or a PEFT adapter")
    export.add_argument("run_dir")
    export.add_argument(
        "--format",
        default="peft",
        choices=("peft", "hf"),
        help="hf: the base with the delta merged in, head and tokenizer (transformers.pipeline "
        "loads it); peft: a LoRA or (IA)3 adapter in PEFT's format",
    )
    export.add_argument("--out", required=True, help="directory to write the export to")
    export.add_argument(
        "--base-model-name-or-path",
        help="what PEFT records as the base (default: the hub id of "
        "a deltatune alias, the absolute path of a local base, or the hub id the run used)",
    )
    add_switch(export, "--overwrite", help="replace an existing --out directory")
    add_hf_export_options(export)


def _add_analyze_parser(commands) -> None:
    from deltatune.analysis import RankBy

    analyze = commands.add_parser("analyze", help="per-layer distance between the fine-tuned and pretrained weights")
    analyze.add_argument("run_dir")
    analyze.add_argument("--base", help="load the base model from here instead of the recorded name")
    analyze.add_argument(
        "--rank-by",
        default="matrix_angle",
        choices=typing.get_args(RankBy),
        help="rank layers by the mean angle of their weight matrices (matrix_angle, as the library's "
        "analyze_run does), the angle of the whole layer (angle), or the mean absolute change per "
        "parameter (l1_mean) (default: matrix_angle)",
    )
    add_switch(analyze, "--json", help="print the rows as JSON")


def _add_demo_parser(commands) -> None:
    demo = commands.add_parser("demo", help="fine-tune with full FT and BitFit, print and save a comparison")
    demo.add_argument("--out", default="demo-output")
    demo.add_argument("--model", default="minilm-l6")
    demo.add_argument("--task", default="stsb")
    demo.add_argument("--methods", default="full,bitfit")
    demo.add_argument("--epochs", type=float, default=1.0)
    add_switch(demo, "--quiet", help="no progress lines")


class _WarningLines(logging.StreamHandler):
    """Prints deltatune's warnings (a clamped max_length, labels training never shows) as
    'deltatune: warning: ...' on whatever sys.stderr is at that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.setLevel(logging.WARNING)
        self.setFormatter(logging.Formatter("deltatune: warning: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _show_warnings() -> None:
    package_logger = logging.getLogger("deltatune")
    if not any(isinstance(handler, _WarningLines) for handler in package_logger.handlers):
        package_logger.addHandler(_WarningLines())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _show_warnings()
    interrupts.install()
    try:
        argv, method_options = split_method_options(argv)
        args = build_parser().parse_args(argv)
        if method_options and args.command not in ("train", "freelm"):
            raise DeltatuneError("--method.KEY=VALUE options only apply to `deltatune train`.")
        handlers = {
            "train": lambda: command_train(args, method_options),
            "eval": lambda: command_eval(args),
            "predict": lambda: command_predict(args),
            "models": lambda: command_models(args),
            "tasks": lambda: command_tasks(args),
            "methods": lambda: command_methods(args),
            "fetch": lambda: command_fetch(args),
            "demo": lambda: command_demo(args),
            "export": lambda: command_export(args),
            "analyze": lambda: command_analyze(args),
            "freelm": lambda: command_freelm(args, method_options),
            "reader": lambda: command_reader(args),
            "compare": lambda: command_compare(args),
            "results": lambda: command_results(args),
            "report": lambda: command_report(args),
            "serve": lambda: run_serve_command(args),
            "merge": lambda: merge_command(args),
        }
        return handlers[args.command]()
    except DeltatuneError as error:
        print(f"deltatune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deltatune: interrupted; nothing half-written was kept.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `deltatune results ... | head`: the reader left, which is not an error
        sys.stderr.close()
        return 0
    except OSError as error:
        if error.errno not in _ENVIRONMENT_ERRORS:
            raise  # anything else is a bug in deltatune: keep the traceback
        where = f": {error.filename}" if error.filename else ""
        print(
            f"deltatune: error: {error.strerror or error}{where}. {_ENVIRONMENT_ERRORS[error.errno]}", file=sys.stderr
        )
        return 2


_ENVIRONMENT_ERRORS = {
    errno.EACCES: "Give paths you can read and write, or fix the permissions.",
    errno.EPERM: "Give paths you can read and write, or fix the permissions.",
    errno.EROFS: "That file system is read-only: write somewhere else.",
    errno.ENOSPC: "The disk is full: free some space and run again (finished results are kept).",
    errno.EDQUOT: "The disk quota is used up: free some space and run again (finished results are kept).",
}
"""OSErrors that are the user's environment, not a deltatune bug: printed as one line with the fix."""


if __name__ == "__main__":
    sys.exit(main())
