"""From the store to the numbers a report shows: groups, seed statistics, comparisons, areas, times, claims.

A *group* is every cell trained under the same conditions except method and seed: same model,
task, data fraction, time budget and training settings. Within a group each method variant gets
its mean ± std over seeds and, when the baseline (full fine-tuning) is in the group, a paired
bootstrap interval of its difference to the baseline on the same dev examples and seeds.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deltatune.compare import stats, store
from deltatune.compare.spec import StatisticsConfig


@dataclass(frozen=True)
class GroupKey:
    model: str
    task: str
    data_fraction: float
    time_budget_s: float | None
    settings: str
    """Canonical JSON of the shared training settings: cells trained differently are never compared."""

    def budget_sort(self) -> float:
        return math.inf if self.time_budget_s is None else self.time_budget_s


@dataclass
class VariantResult:
    variant: str
    method: str
    cells: list[dict]
    values: list[float]
    seeds: list[int]
    mean: float
    std: float
    metric_means: dict[str, float]
    trainable_params: int | None
    total_params: int | None
    delta_bytes: int | None
    peak_memory_bytes: float | None
    train_time_s: float | None
    examples_per_s: float | None
    comparison: stats.BootstrapResult | None = None
    verdict: str | None = None
    matches: bool | None = None
    note: str | None = None
    """Why there is no comparison (no baseline in the group, no common seeds, dev outputs missing)."""
    times_to_target: list[float | None] = field(default_factory=list)
    degenerate: bool = False
    """Both this variant and the baseline predicted one class for every dev example (every seed): a
    tie between two models that learned nothing yet, which says nothing about the methods."""


@dataclass
class Group:
    key: GroupKey
    grid: str
    primary_metric: str
    variants: dict[str, VariantResult]
    target: float | None = None
    """Time-to-target threshold: target_fraction × the baseline's mean best dev metric."""


@dataclass
class AreaRow:
    model: str
    task: str
    time_budget_s: float | None
    settings: str
    variant: str
    fractions: list[float]
    mean: float
    std: float
    difference: float | None
    """Against the baseline's area (metric units); None without a baseline."""


@dataclass
class Analysis:
    title: str
    description: str
    meta: dict
    baseline: str | None
    statistics: StatisticsConfig
    variants: list[str]
    """Every variant, in the spec's order (report colours follow it)."""
    finished: list[dict]
    failed: list[dict]
    groups: list[Group]
    areas: list[AreaRow]
    curves: dict[str, list[dict]]
    total_cells: int

    @property
    def tasks(self) -> list[str]:
        seen: dict[str, None] = {}
        for group in self.groups:
            seen.setdefault(group.key.task, None)
        return list(seen)

    def groups_for(self, task: str) -> list[Group]:
        return [g for g in self.groups if g.key.task == task]


def _settings_key(cell: dict) -> str:
    train = dict((cell.get("settings") or {}).get("train") or {})
    cap = (cell.get("settings") or {}).get("max_train_examples")
    return json.dumps({"train": train, "max_train_examples": cap}, sort_keys=True)


def _load_predictions(exp_dir: Path, cell: dict, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    from safetensors.numpy import load_file

    path = exp_dir / (cell.get("run_dir") or f"cells/{cell['cell_id']}") / "dev_outputs.safetensors"
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    predictions = stats.predictions_from_outputs(tensors["outputs"], metric)
    labels = tensors["labels"].astype(np.float64)
    if metric not in stats.REGRESSION_METRICS:
        labels = labels.astype(np.int64)
    return predictions, labels


def analyze(exp_dir: str | Path, include_stale: bool = False) -> Analysis:
    """Everything the report shows, computed from EXP_DIR's store and the cells' dev outputs."""
    exp_dir = Path(exp_dir)
    meta = store.load_meta(exp_dir)
    cells = store.load_cells(exp_dir, include_stale=include_stale)
    finished = [c for c in cells if c["status"] == "finished"]
    failed = [c for c in cells if c["status"] == "failed"]
    statistics = StatisticsConfig(**meta["statistics"]) if meta.get("statistics") else StatisticsConfig()
    baseline = meta.get("baseline")
    order = list(meta.get("methods") or [])
    for cell in cells:
        if cell["variant"] not in order:
            order.append(cell["variant"])
    curves = store.load_curves(exp_dir, [c["cell_id"] for c in finished])

    by_group: dict[GroupKey, list[dict]] = defaultdict(list)
    for cell in finished:
        key = GroupKey(cell["model"], cell["task"], cell["data_fraction"], cell["time_budget_s"], _settings_key(cell))
        by_group[key].append(cell)

    groups = []
    # the data sweep (no budget) first, then the time budgets
    for key in sorted(by_group, key=lambda k: (k.task, k.model, k.time_budget_s is not None, k.budget_sort(),
                                               k.data_fraction, k.settings)):
        members = by_group[key]
        metric = members[0]["primary_metric"]
        variants: dict[str, VariantResult] = {}
        for variant in sorted({c["variant"] for c in members}, key=order.index):
            own = sorted([c for c in members if c["variant"] == variant], key=lambda c: c["seed"])
            values = [c["primary_value"] for c in own]
            mean, std = stats.mean_and_std(values)
            metric_names = sorted({name for c in own for name in (c["dev_metrics"] or {})})
            variants[variant] = VariantResult(
                variant=variant, method=own[0]["method"], cells=own, values=values, seeds=[c["seed"] for c in own],
                mean=mean, std=std,
                metric_means={name: stats.mean_and_std([c["dev_metrics"].get(name) for c in own])[0]
                              for name in metric_names},
                trainable_params=own[0]["trainable_params"], total_params=own[0]["total_params"],
                delta_bytes=own[0]["delta_bytes"],
                peak_memory_bytes=_mean([c["peak_memory_bytes"] for c in own]),
                train_time_s=_mean([c["train_time_s"] for c in own]),
                examples_per_s=_mean([c["train_examples_per_s"] for c in own]))
        group = Group(key, members[0]["grid"], metric, variants)
        _compare_to_baseline(exp_dir, group, baseline, statistics, curves)
        groups.append(group)

    return Analysis(title=meta.get("title") or "deltatune comparison", description=meta.get("description") or "",
                    meta=meta, baseline=baseline, statistics=statistics, variants=order, finished=finished,
                    failed=failed, groups=groups, areas=_areas(groups, baseline), curves=curves,
                    total_cells=meta.get("total_cells") or len(cells))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _compare_to_baseline(exp_dir: Path, group: Group, baseline: str | None, statistics: StatisticsConfig,
                         curves: dict[str, list[dict]]) -> None:
    reference = group.variants.get(baseline) if baseline else None
    if reference is not None and reference.values:
        best = stats.mean_and_std(reference.values)[0]
        if best > 0:  # a fraction of a non-positive best (MCC can be ≤ 0) is no target
            group.target = statistics.target_fraction * best
    for result in group.variants.values():
        if group.target is not None:
            result.times_to_target = [
                stats.time_to_target([{"train_time_s": p["train_time_s"], "value": p["primary_value"]}
                                      for p in curves.get(c["cell_id"], [])], group.target)
                for c in result.cells]
        if result.variant == baseline:
            continue
        if reference is None:
            result.note = f"no {baseline or 'baseline'} run under these conditions" if baseline else "no baseline"
            continue
        common = sorted(set(result.seeds) & set(reference.seeds))
        if not common:
            result.note = "no seed shared with the baseline"
            continue
        method_predictions, baseline_predictions, labels = [], [], None
        for seed in common:
            mine = _load_predictions(exp_dir, result.cells[result.seeds.index(seed)], group.primary_metric)
            theirs = _load_predictions(exp_dir, reference.cells[reference.seeds.index(seed)], group.primary_metric)
            if mine is None or theirs is None:
                result.note = "dev outputs missing"
                break
            if not np.array_equal(mine[1], theirs[1]) or (labels is not None and not np.array_equal(labels, mine[1])):
                result.note = "dev examples differ from the baseline's; not paired"
                break
            labels = mine[1]
            method_predictions.append(mine[0])
            baseline_predictions.append(theirs[0])
        else:
            result.comparison = stats.paired_bootstrap(method_predictions, baseline_predictions, labels,
                                                       group.primary_metric, statistics.bootstrap_samples,
                                                       statistics.confidence, statistics.seed)
            result.verdict = stats.verdict(result.comparison, statistics.margin_points)
            result.matches = stats.matches(result.comparison, statistics.margin_points)
            if group.primary_metric not in stats.REGRESSION_METRICS and all(
                    np.unique(p).size == 1 for p in method_predictions + baseline_predictions):
                result.degenerate, result.matches = True, None
                result.verdict = "uninformative: both predict one class"


def _areas(groups: list[Group], baseline: str | None) -> list[AreaRow]:
    """Area under the data-fraction curve per (model, task, budget, settings, variant), over seeds."""
    curves: dict[tuple, dict[str, dict[float, dict[int, float]]]] = defaultdict(lambda: defaultdict(dict))
    for group in groups:
        key = (group.key.model, group.key.task, group.key.time_budget_s, group.key.settings)
        for variant, result in group.variants.items():
            curves[key][variant][group.key.data_fraction] = dict(zip(result.seeds, result.values))
    rows = []
    for key, variants in curves.items():
        per_variant = {}
        for variant, by_fraction in variants.items():
            fractions = sorted(by_fraction)
            if len(fractions) < 2:
                continue
            seeds = set.intersection(*(set(by_fraction[f]) for f in fractions))
            if not seeds:
                continue
            areas = [stats.area_under_fraction_curve(fractions, [by_fraction[f][s] for f in fractions])
                     for s in sorted(seeds)]
            per_variant[variant] = (fractions, *stats.mean_and_std(areas))
        reference = per_variant.get(baseline) if baseline else None
        for variant, (fractions, mean, std) in per_variant.items():
            difference = None
            if reference is not None and variant != baseline and reference[0] == fractions:
                difference = mean - reference[1]
            rows.append(AreaRow(key[0], key[1], key[2], key[3], variant, fractions, mean, std, difference))
    return rows


def claims(analysis: Analysis) -> list[str]:
    """'X matches full fine-tuning across data amounts: held on A, B; did not hold on C (worse by …)'.

    One sentence per non-baseline variant and sweep (data amounts without a time budget; time
    budgets), from the paired intervals: 'held' means the interval's lower end is above −margin.
    """
    if not analysis.baseline:
        return []
    margin = analysis.statistics.margin_points
    confidence = round(100 * analysis.statistics.confidence)
    sentences = []
    for sweep in ("data amounts", "time budgets"):
        for variant in analysis.variants:
            if variant == analysis.baseline:
                continue
            held, missed, degenerate = [], [], []
            for group in analysis.groups:
                if (group.key.time_budget_s is None) != (sweep == "data amounts"):
                    continue
                result = group.variants.get(variant)
                if result is None or result.comparison is None:
                    continue
                place = _place(group, sweep, several_models=len({g.key.model for g in analysis.groups}) > 1)
                difference, low, high = result.comparison.points()
                if result.degenerate:
                    degenerate.append(place)
                elif result.matches:
                    held.append(place)
                elif high < 0:
                    missed.append(f"{place} (worse by {-difference:.1f} points [{-high:.1f}, {-low:.1f}])")
                else:
                    missed.append(f"{place} (not shown: {difference:+.1f} [{low:+.1f}, {high:+.1f}], "
                                  f"interval wider than ±{margin:g})")
            if not held and not missed and not degenerate:
                continue
            text = (f"**{variant}** matches {analysis.baseline} (no more than {margin:g} point"
                    f"{'s' if margin != 1 else ''} worse, {confidence}% paired bootstrap) across {sweep}: ")
            parts = []
            if held:
                parts.append("held on " + ", ".join(held))
            if missed:
                parts.append("did not hold on " + "; ".join(missed))
            if degenerate:
                parts.append("no evidence either way on " + ", ".join(degenerate) + f" (both it and {analysis.baseline} "
                             "predicted a single class for every dev example: neither had learned the task yet)")
            sentences.append(text + "; ".join(parts) + ".")
    return sentences


def _place(group: Group, sweep: str, several_models: bool = False) -> str:
    task = f"{group.key.task} ({group.key.model})" if several_models else group.key.task
    if sweep == "data amounts":
        return f"{task} at {100 * group.key.data_fraction:g}% of the data"
    return f"{task} with {group.key.time_budget_s:g} s"


__all__ = ["analyze", "Analysis", "Group", "GroupKey", "VariantResult", "AreaRow", "claims"]
