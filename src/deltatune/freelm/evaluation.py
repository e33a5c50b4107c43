"""Zero-shot evaluation of a FreeLM run against the base model's own zero-shot and k-shot prompting.

For each task: a stratified subset of `max_examples` examples of one split; the base decoder
answers first (likelihood of each answer's verbaliser after the prompt, without and with k
demonstrations from the task's training split), then the FreeLM delta is attached to the same
decoder and answers by proposition scoring. Every system sees the same examples; each task reports
its own metrics (binned regression tasks: Pearson/Spearman of the expected score over the bins,
plus bin accuracy), with time and examples per second.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from deltatune.batching import stratified_subset
from deltatune.delta import write_json_atomic
from deltatune.errors import DeltatuneError
from deltatune.freelm.artifact import attach_freelm_delta, read_freelm_manifest
from deltatune.freelm.scoring import (
    choose_demonstrations,
    demonstration_prefix,
    predictions_from_scores,
    proposition_scores,
    task_metrics,
    verbaliser_scores,
)
from deltatune.freelm.training import dev_check_examples
from deltatune.tasks.propositions import propositions_for

BASELINES = ("zero-shot", "k-shot")
SYSTEMS = ("freelm",) + BASELINES


def evaluate_freelm(
    directory: str | Path,
    tasks: Sequence[str],
    baselines: Sequence[str] = BASELINES,
    k: int = 4,
    max_examples: int | None = 300,
    split: str = "test",
    templates: str = "all",
    base: str | None = None,
    seed: int = 0,
    batch_size: int = 16,
    threads: int | None = None,
    quiet: bool = False,
) -> dict:
    """Metrics of FreeLM and the chosen baselines on each task; see the module docstring."""
    from deltatune.sources.data import load_task_data
    from deltatune.sources.models import load_causal_lm

    _check_arguments(tasks, baselines, k, templates, max_examples)
    manifest = read_freelm_manifest(directory)
    freelm = manifest.freelm or {}  # read_freelm_manifest refuses a manifest without it
    if threads:
        torch.set_num_threads(threads)

    log = (lambda message: None) if quiet else (lambda message: print(message, flush=True))
    causal_lm, tokenizer = load_causal_lm(base or manifest.base_model.name)
    causal_lm.eval()
    examples, left_out = {}, {}
    for task_name in tasks:
        data = load_task_data(task_name)
        evaluation = data.split(split)
        # the dev examples a run chose its kept checkpoint on (--keep-best-dev) would flatter it: never scored here
        held = selection_examples(freelm.get("config", {}), data, split)
        pool = [index for index in range(len(evaluation)) if index not in held]
        labels = [evaluation.labels[index] for index in pool]
        chosen = stratified_subset(labels, max_examples or len(pool), seed, data.task.is_regression)
        examples[task_name] = (data, evaluation.subset([pool[position] for position in chosen]))
        left_out[task_name] = len(held)

    results: dict[str, dict] = {}
    for task_name, (data, subset) in examples.items():
        results[task_name] = {
            "metric": data.task.metric,
            "num_examples": len(subset),
            "split": split,
            "train_task": task_name in freelm["train_tasks"],
            "selection_examples_left_out": left_out[task_name],
            "systems": {},
            "labels": list(subset.labels),
        }
        results[task_name]["systems"].update(
            _baseline_systems(causal_lm, tokenizer, task_name, data, subset, baselines, k, seed, batch_size, log)
        )

    # the delta goes onto the same decoder after the baselines, which need it untouched
    model, method = attach_freelm_delta(causal_lm, tokenizer, directory, manifest, base_name=base)
    _score_with_freelm(model, tokenizer, examples, results, templates, manifest.max_length, batch_size, log)
    return add_intervals(
        {
            "delta": str(directory),
            "base_model": manifest.base_model.name,
            "method": manifest.method,
            "train_tasks": freelm["train_tasks"],
            "training": freelm["training"],
            "split": split,
            "max_examples": max_examples,
            "seed": seed,
            "k": k,
            "tasks": results,
        }
    )


def selection_examples(config: dict, data, split: str) -> set[int]:
    """The indices of `split` on which a run with `config` (its recorded FreeLM config) chose its kept
    checkpoint: the stratified dev subset of each training task its dev checks scored, when it kept the best
    (`deltatune.freelm.training.dev_check_examples`). Empty otherwise."""
    count = config.get("dev_examples_per_task") or 0
    if split != "dev" or not config.get("keep_best_dev") or not count:
        return set()
    if data.task.name not in config.get("train_tasks", ()):
        return set()
    return set(dev_check_examples(data, count, config.get("seed", 0)))


def _score_with_freelm(
    model, tokenizer, examples: dict, results: dict, templates: str, max_length: int, batch_size: int, log
) -> None:
    """Add FreeLM's own system to each task's results: the best-scoring proposition per example."""
    template_indices = None if templates == "all" else [int(templates)]
    for task_name, (data, subset) in examples.items():
        propositions = propositions_for(data.task)
        if template_indices is not None and template_indices[0] >= len(propositions.templates):
            raise DeltatuneError(
                f"--templates={templates}: task {task_name!r} has only "
                f"{len(propositions.templates)} templates (0..{len(propositions.templates) - 1})."
            )
        log(f"{task_name}: FreeLM proposition scoring on {len(subset)} examples")
        started = _clock()
        scores = proposition_scores(
            model,
            tokenizer,
            propositions,
            subset.texts,
            template_indices,
            max_length=max_length,
            batch_size=batch_size,
        )
        results[task_name]["systems"]["freelm"] = {
            **_system_result(data.task, propositions, scores, subset, started),
            "templates": templates,
        }


def _check_arguments(
    tasks: Sequence[str], baselines: Sequence[str], k: int, templates: str, max_examples: int | None
) -> None:
    """Every problem with the arguments, raised once."""
    from deltatune.tasks import get_task

    problems = [
        f"unknown baseline {name!r} (choose from {', '.join(BASELINES)})" for name in baselines if name not in BASELINES
    ]
    if k < 1 and "k-shot" in baselines:
        problems.append(f"--k={k} must be at least 1 for the k-shot baseline")
    if templates != "all" and not templates.isdigit():
        problems.append(f"--templates={templates!r} must be 'all' or a template number (0, 1, 2, ...)")
    if max_examples is not None and max_examples < 1:
        problems.append(f"--max-examples={max_examples} must be at least 1")
    for task in tasks:
        try:
            get_task(task)
        except DeltatuneError as error:
            problems.append(str(error))
    if problems:
        raise DeltatuneError("\n".join(problems))


def _baseline_systems(
    causal_lm,
    tokenizer,
    task_name: str,
    data,
    subset,
    baselines: Sequence[str],
    k: int,
    seed: int,
    batch_size: int,
    log,
) -> dict[str, dict]:
    """The base decoder's own zero-shot and k-shot answers on one task's subset, as asked."""
    propositions = propositions_for(data.task)
    systems = {}
    if "zero-shot" in baselines:
        log(f"{task_name}: base model zero-shot on {len(subset)} examples")
        started = _clock()
        scores = verbaliser_scores(causal_lm, tokenizer, propositions, subset.texts, batch_size=batch_size)
        systems["zero-shot"] = _system_result(data.task, propositions, scores, subset, started)
    if "k-shot" in baselines:
        log(f"{task_name}: base model {k}-shot on {len(subset)} examples")
        started = _clock()
        train = data.split("train")
        shots = choose_demonstrations(propositions, train, k, seed)
        prefix = demonstration_prefix(tokenizer, propositions, train, shots)
        scores = verbaliser_scores(
            causal_lm, tokenizer, propositions, subset.texts, prefix=prefix, batch_size=batch_size
        )
        systems["k-shot"] = {
            **_system_result(data.task, propositions, scores, subset, started),
            "k": k,
            "demonstration_prefix_tokens": len(tokenizer(prefix, add_special_tokens=False)["input_ids"]),
        }
    return systems


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _system_result(task, propositions, scores, subset, started: tuple[float, float]) -> dict:
    seconds, cpu_seconds = time.perf_counter() - started[0], time.process_time() - started[1]
    return {
        "metrics": task_metrics(task, propositions, scores, subset.labels),
        "time_s": seconds,
        "cpu_time_s": cpu_seconds,
        "examples_per_s": len(subset) / seconds if seconds else 0.0,
        "predictions": predictions_from_scores(task, propositions, scores).tolist(),
    }


def add_intervals(report: dict, samples: int = 1000) -> dict:
    """95% paired-bootstrap intervals over examples (`deltatune.compare.stats.paired_bootstrap`) of each
    system's primary metric and of FreeLM minus each baseline, added to every task of `report`.

    A system's own interval is its difference from a predictor that scores exactly 0 on every resample
    (a constant prediction: Pearson, MCC and F1 are 0 for it; for accuracy, a label that never occurs)."""
    from deltatune.compare.stats import paired_bootstrap

    for result in report["tasks"].values():
        labels, metric = np.asarray(result["labels"]), result["metric"]
        zero = np.full(len(labels), -1 if metric == "accuracy" else 0)
        systems = result["systems"]
        for system in systems.values():
            interval = paired_bootstrap([np.asarray(system["predictions"])], [zero], labels, metric, samples)
            system["interval"] = [interval.low, interval.high]
        if "freelm" not in systems:
            continue
        for name in (n for n in systems if n != "freelm"):
            difference = paired_bootstrap(
                [np.asarray(systems["freelm"]["predictions"])],
                [np.asarray(systems[name]["predictions"])],
                labels,
                metric,
                samples,
            )
            systems["freelm"][f"minus_{name}"] = {
                "difference": difference.difference,
                "interval": [difference.low, difference.high],
            }
    return report


def format_table(report: dict) -> str:
    """task, metric, then one column per system, one row per metric of each task."""
    systems = [s for s in SYSTEMS if any(s in r["systems"] for r in report["tasks"].values())]
    names = {"freelm": "FreeLM", "zero-shot": "zero-shot", "k-shot": f"{report['k']}-shot"}
    header = ["task", "metric", *(names[s] for s in systems)]
    rows = []
    for task, result in report["tasks"].items():
        label = task + (" (seen)" if result["train_task"] else "")
        metric_names = list(next(iter(result["systems"].values()))["metrics"]) if result["systems"] else []
        for position, metric in enumerate(metric_names):
            cells = [
                _cell(result["systems"][s], metric, metric == result["metric"]) if s in result["systems"] else "-"
                for s in systems
            ]
            shown_metric = metric + (" *" if metric == result["metric"] else "")
            rows.append([label if position == 0 else "", shown_metric, *cells])
        freelm = result["systems"].get("freelm", {})
        for baseline in (s for s in systems if f"minus_{s}" in freelm):
            difference = freelm[f"minus_{baseline}"]
            low, high = difference["interval"]
            rows.append(
                [
                    "",
                    f"FreeLM - {names[baseline]}",
                    f"{difference['difference']:+.4f} [{low:+.4f}, {high:+.4f}]",
                    *([""] * (len(systems) - 1)),
                ]
            )
        rows.append(
            [
                "",
                "examples/s",
                *(f"{result['systems'][s]['examples_per_s']:.1f}" if s in result["systems"] else "-" for s in systems),
            ]
        )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    training = report.get("training", {})
    footer = [
        f"* the task's primary metric, with its 95% paired-bootstrap interval over examples; "
        f"{report['max_examples'] or 'all'} examples of the {report['split']} split per task (stratified, "
        f"seed {report['seed']})."
    ]
    left_out = {name: task.get("selection_examples_left_out", 0) for name, task in report["tasks"].items()}
    if any(left_out.values()):
        footer.append(
            "Left out of the pool: the dev examples the run chose its kept checkpoint on ("
            + ", ".join(f"{name} {count}" for name, count in left_out.items() if count)
            + "), so no figure here was scored on them."
        )
    if training:
        footer.append(
            f"FreeLM training: {training['steps']} steps ({training['teacher_steps']} teacher, "
            f"{training['language_steps']} language) in {training['train_time_s']:.0f} s "
            f"(CPU {training.get('train_cpu_time_s', float('nan')):.0f} s); "
            f"{training['propositions_per_s']:.1f} propositions/s, "
            f"{training['language_tokens_per_s']:.0f} language tokens/s."
        )
    return "\n".join(lines + [""] + footer)


def _cell(system: dict, metric: str, primary: bool) -> str:
    value = f"{system['metrics'][metric]:.4f}"
    if primary and "interval" in system:
        low, high = system["interval"]
        value += f" [{low:.3f}, {high:.3f}]"
    return value


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report)
    return path


__all__ = ["BASELINES", "add_intervals", "evaluate_freelm", "format_table", "write_report"]
