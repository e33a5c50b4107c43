"""The `compare`, `results` and `report` subcommands: argument parsing and the glue to the library.

    deltatune compare grid.yaml --out runs/grid --jobs 2
    deltatune compare grid.yaml --out runs/grid --backend ray --address ray://head:10001
    deltatune compare --preset doering2024 --size demo --out demo-output/doering2024-demo
    deltatune compare --tasks stsb --methods full bitfit lora-r16=lora:r=16 --fractions 0.1 1.0 \\
        --seeds 0 1 2 --epochs 3 --out runs/quick
    deltatune results runs/grid --format csv > cells.csv
    deltatune report runs/grid

A spec file or preset gives the grid; axis flags (--tasks, --methods, ...) replace that axis, and
training flags (--epochs, --batch-size, ...) are laid over its `train` settings.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from deltatune.cli_options import add_config_options, add_switch, typed_options
from deltatune.errors import DeltatuneError
from deltatune.training import TrainConfig

BACKENDS = ("local", "ray")
"""Where `compare` runs cells: processes on this machine, or Ray tasks (`deltatune.compare.ray_backend`)."""
TRAIN_DEST = "train_"
"""Where the training flags land in the parsed arguments (args.train_epochs, ...), apart from the grid's own."""
_NOT_TRAIN_FLAGS = {"data_fraction", "seed", "time_budget_s", "num_examples", "quiet"}
"""TrainConfig fields that are grid axes (or meaningless for a grid), so they get no training flag."""


def _budget(text: str) -> float | None:
    if text.lower() in ("none", "null", "-"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not seconds or 'none'") from None


def add_compare_parser(commands) -> None:
    compare = commands.add_parser(
        "compare",
        help="run a grid of methods × tasks × data fractions × time budgets × seeds, resumably",
        description="Run every cell of a grid in its own process, record each finished cell once in "
        "EXP_DIR/results.sqlite, and write EXP_DIR/report.html. Interrupt at any time (Ctrl-C, kill) "
        "and run the same command again to resume. Methods on the command line: NAME, "
        "NAME:KEY=VALUE,... or LABEL=NAME:KEY=VALUE,... (e.g. lora-r16=lora:r=16).",
    )
    compare.add_argument("spec", nargs="?", help="YAML grid spec (see deltatune.compare.spec for the format)")
    compare.add_argument("--out", help="experiment directory (results, cells, logs, report)")
    compare.add_argument("--preset", help="a ready-made grid instead of a spec file: doering2024")
    compare.add_argument("--size", default="full", help="preset size: demo, small or full (default full)")
    compare.add_argument("--models", nargs="+", metavar="MODEL", help="model aliases, directories or hub ids")
    compare.add_argument("--tasks", nargs="+", metavar="TASK", help="catalog tasks (see `deltatune tasks`)")
    compare.add_argument("--methods", nargs="+", metavar="METHOD", help="methods and variants")
    compare.add_argument("--fractions", nargs="+", type=float, metavar="F", help="data fractions, e.g. 0.1 0.3 1.0")
    compare.add_argument(
        "--time-budgets",
        nargs="+",
        type=_budget,
        metavar="SECONDS",
        help="training time budgets in seconds; 'none' for no budget",
    )
    compare.add_argument("--seeds", nargs="+", type=int, metavar="SEED")
    compare.add_argument("--max-train-examples", type=int, help="take fractions of a fixed pool of this many examples")
    compare.add_argument("--baseline", help="the method every other is compared against (default: full)")
    compare.add_argument(
        "--baselines",
        nargs="+",
        metavar="NAME",
        help="rows without training: majority, embedding-cosine, zero-shot, few-shot",
    )
    compare.add_argument("--title", help="the report's title")
    add_switch(
        compare,
        "--keep-deltas",
        default=None,
        help="keep every cell's delta.safetensors (default: the spec's keep_deltas, else keep only run.json "
        "and dev outputs)",
    )
    compare.add_argument("--jobs", type=int, default=1, help="cells to run at the same time (default 1)")
    compare.add_argument(
        "--backend",
        default="local",
        help="where cells run: local (processes on this machine, default) or ray (Ray tasks; needs the ray extra)",
    )
    compare.add_argument(
        "--address",
        help="with --backend ray: the cluster to run on, auto or ray://HOST:PORT "
        "(default: a Ray instance of this machine's own)",
    )
    compare.add_argument(
        "--reuse",
        nargs="+",
        default=[],
        metavar="EXP_DIR",
        help="earlier experiment directories: a cell of this grid finished there with the same settings is "
        "copied in instead of run again",
    )
    add_switch(compare, "--retry-failed", help="run cells recorded as failed again")
    add_switch(compare, "--dry-run", help="validate and list the cells, run nothing")
    add_switch(compare, "--print-spec", help="print the resulting spec as YAML and exit")
    add_switch(compare, "--report", default=True, help="write the report at the end (--no-report: do not)")
    add_config_options(
        compare.add_argument_group("training settings shared by every cell (TrainConfig)"),
        TrainConfig,
        dest_prefix=TRAIN_DEST,
        skip=_NOT_TRAIN_FLAGS,
    )


def add_results_parser(commands) -> None:
    results = commands.add_parser("results", help="export an experiment's results: csv, parquet or markdown")
    results.add_argument("exp_dir")
    results.add_argument("--format", default="csv", help="csv (default), parquet or markdown")
    results.add_argument("--table", default="cells", help="cells (one row per cell, default) or curves")
    results.add_argument("--out", help="write to this file (needed for parquet) instead of printing")
    add_switch(results, "--all-cells", help="include cells no longer in the current spec")
    results.add_argument(
        "--columns",
        help="keep only these comma-separated columns, in order; 'brief' for the "
        "settings, primary metric, cost and speed",
    )


def add_report_parser(commands) -> None:
    report = commands.add_parser("report", help="write an experiment's HTML report and Markdown summary")
    report.add_argument("exp_dir")
    report.add_argument("--out", help="directory for report.html and report.md (default: EXP_DIR)")
    add_switch(report, "--all-cells", help="include cells no longer in the current spec")


def build_spec_mapping(args: argparse.Namespace) -> dict:
    """The spec mapping from a file or preset, with the command line's axes and settings laid over it."""
    from deltatune.compare.presets import preset_spec
    from deltatune.compare.spec import read_spec_file, spec_from_flags

    if args.spec and args.preset:
        raise DeltatuneError("Give a spec file or --preset, not both.")
    base: dict = {}
    if args.spec:
        base = read_spec_file(args.spec)
    elif args.preset:
        base = preset_spec(args.preset, args.size)
    train = typed_options(args, TRAIN_DEST)
    spec = spec_from_flags(
        models=args.models,
        tasks=args.tasks,
        methods=args.methods,
        fractions=args.fractions,
        time_budgets=args.time_budgets,
        seeds=args.seeds,
        train=train,
        base=base,
        max_train_examples=args.max_train_examples,
        baseline=args.baseline,
        title=args.title,
        keep_deltas=args.keep_deltas,
        baselines=args.baselines,
    )
    if not base and not (args.tasks and args.methods):
        raise DeltatuneError(
            "Say what to compare: a spec file (deltatune compare grid.yaml --out DIR), a preset "
            "(--preset doering2024 --size demo), or at least --tasks and --methods."
        )
    return spec


def _command_line(args: argparse.Namespace) -> str:
    if sys.argv[1:2] == ["compare"]:
        return "deltatune " + shlex.join(sys.argv[1:])
    parts = ["deltatune", "compare"]
    if args.spec:
        parts.append(args.spec)
    if args.preset:
        parts += ["--preset", args.preset, "--size", args.size]
    if args.out:
        parts += ["--out", args.out]
    return shlex.join(parts) + " ..."


def compare_command(args: argparse.Namespace) -> int:
    import yaml

    from deltatune.compare.report import write_report
    from deltatune.compare.runner import run_grid
    from deltatune.compare.spec import parse_spec

    mapping = build_spec_mapping(args)
    if args.print_spec:
        printable = {k: v for k, v in mapping.items() if not k.startswith("_")}

        class Plain(yaml.SafeDumper):  # a setting shared by several entries is written out at each, no &anchors
            def ignore_aliases(self, data) -> bool:
                return True

        print(yaml.dump(printable, Dumper=Plain, sort_keys=False, allow_unicode=True), end="")
        return 0
    if args.backend not in BACKENDS:
        raise DeltatuneError(f"--backend {args.backend!r} is not a grid backend. Available: {', '.join(BACKENDS)}.")
    if args.address is not None and args.backend != "ray":
        raise DeltatuneError(
            f"--address {args.address!r} names a Ray cluster, which only --backend ray uses. Add "
            "--backend ray, or leave --address out to run the cells on this machine."
        )
    spec = parse_spec(mapping)
    done = _finished_elsewhere(spec, args.out, args.reuse)
    estimate_text = _estimate_text(spec, done)
    if args.dry_run:
        untrained = f" and {len(spec.baseline_cells)} without training" if spec.baseline_cells else ""
        print(f"{spec.title}: {len(spec.cells)} cells{untrained}" + (f"; {estimate_text}" if estimate_text else ""))
        for cell in spec.every_cell:
            where = f"  ({done[cell.cell_id]})" if cell.cell_id in done else ""
            print(f"  {cell.cell_id}  [{cell.grid}] {cell.describe()}{where}")
        return 0
    if not args.out:
        raise DeltatuneError("Give --out EXP_DIR: the directory for the results (an existing one is resumed).")
    if estimate_text:
        print(f"estimated time for the whole grid: {estimate_text}")
    options = {
        "jobs": args.jobs,
        "retry_failed": args.retry_failed,
        "say": lambda text: print(text, flush=True),
        "command": _command_line(args),
        "reuse": args.reuse,
    }
    if args.backend == "ray":
        from deltatune.compare.ray_backend import run_grid_on_ray

        summary = run_grid_on_ray(spec, args.out, address=args.address, **options)
    else:
        summary = run_grid(spec, args.out, **options)
    finished = summary.finished_before + summary.recovered + summary.finished_now
    if finished and args.report:
        html, markdown = write_report(args.out)
        print(f"report: {html}\nsummary: {markdown}")
    if summary.interrupted:
        return 130
    failed = summary.failed_now + summary.failed_kept
    if failed:
        print(
            f"{failed} cell(s) failed; their errors are in the report and in {Path(args.out) / 'logs'}/. "
            "Fix the cause and run again with --retry-failed.",
            file=sys.stderr,
        )
        return 1
    return 0


def _estimate_text(spec, done: dict[str, str]) -> str | None:
    """How long the grid should take (None when a task's size is unknown), and what is left of it given `done`."""
    from deltatune.compare.presets import estimate_cell_seconds, estimate_seconds
    from deltatune.compare.runner import _format_duration

    estimate = estimate_seconds(spec)
    if estimate is None:
        return None
    text = (
        f"at most about {_format_duration(estimate)} one cell at a time on a 2-core CPU with native bf16 "
        "(a Xeon with AMX or an AMD Zen 4; MiniLM-L6 in bf16), about "
        f"{_format_duration(2 * estimate)} on one without, which trains in fp32; early stopping usually "
        "ends cells sooner"
    )
    if not done:
        return text
    if len(done) == len(spec.every_cell):
        return text + "; all of its cells are finished already (in --out or --reuse)"
    left = sum(estimate_cell_seconds(cell) for cell in spec.every_cell if cell.cell_id not in done)
    return (
        text + f"; {len(done)} of its cells are finished already (in --out or --reuse), the other "
        f"{len(spec.every_cell) - len(done)} at most about {_format_duration(left)}"
    )


def _finished_elsewhere(spec, out: str | None, reuse: list[str]) -> dict[str, str]:
    """The cells of `spec` that need no run: finished in `out`, or in a `reuse` experiment (cell id -> where)."""
    from contextlib import closing

    from deltatune.compare import store
    from deltatune.compare.runner import reusable_from, reuse_sources

    sources = reuse_sources(reuse, Path(out).resolve() if out else None)
    done: dict[str, str] = {}
    if out and store.store_path(out).is_file():
        with closing(store.connect_read_only(out)) as connection:
            finished = {cell_id for cell_id, status in store.statuses(connection).items() if status == "finished"}
        done = {cell.cell_id: "finished" for cell in spec.every_cell if cell.cell_id in finished}
    for cell in spec.every_cell:
        source = None if cell.cell_id in done else reusable_from(sources, cell.cell_id)
        if source is not None:
            done[cell.cell_id] = f"finished in {source}"
    return done


def results_command(args: argparse.Namespace) -> int:
    from deltatune.compare.results import export_results

    if args.out and Path(args.out).is_dir():
        raise DeltatuneError(
            f"--out {args.out} is a directory; give a file name, e.g. --out {Path(args.out) / 'cells'}"
            f".{'md' if args.format == 'markdown' else args.format}"
        )
    try:
        text = export_results(
            args.exp_dir, args.format, args.out, include_stale=args.all_cells, table=args.table, columns=args.columns
        )
    except OSError as error:
        raise DeltatuneError(
            f"Cannot write --out {args.out}: {error.strerror or error}. Give a file in a directory you can write to."
        ) from None
    if text is not None:
        sys.stdout.write(text)
    else:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def report_command(args: argparse.Namespace) -> int:
    from deltatune.compare.report import write_report

    html, markdown = write_report(args.exp_dir, args.out, include_stale=args.all_cells)
    print(f"report: {html}\nsummary: {markdown}")
    return 0


__all__ = [
    "add_compare_parser",
    "add_results_parser",
    "add_report_parser",
    "compare_command",
    "results_command",
    "report_command",
    "build_spec_mapping",
]
