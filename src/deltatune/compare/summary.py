"""From the store to the numbers a report shows: groups, seed statistics, comparisons, areas, times, claims.

A *group* is every cell trained under the same conditions except method and seed: same model,
task, data fraction, time budget and training settings. The no-training rows (`baselines:` in the
spec) of the same model and task join every group. Within a group each variant gets its mean ± std
over seeds on the evaluation split (test, where the task has one: the split that chose nothing; dev
chose the checkpoint and the learning rate) and, when the reference method (full fine-tuning) is in
the group, a paired bootstrap interval of its difference to the reference on the same test examples
and seeds. Each trained method is also compared with the strongest no-training row.

A verdict needs both runs trained as far as they could go. In the data sweep, a method whose dev curve
was still rising at its end (not converged) is not called worse: its verdict reads "inconclusive: not
converged after N steps". Likewise a method cannot be said to match or beat a reference that was itself
still rising. Under a time budget the budget is the question, so a verdict stands there and says that
the method was still improving when its time ran out. A "worse by" verdict on a method whose learning-rate
search chose the lowest or highest of its candidates says so: the method may do better outside that range.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deltatune.baselines import SEEDED
from deltatune.compare import stats, store
from deltatune.compare.spec import StatisticsConfig
from deltatune.search import rate_at_edge


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
    kind: str = "train"
    """'train', or 'baseline' for a no-training row."""
    split: str = "dev"
    """The split `values` are on: 'test', or 'dev' where the task has no test split."""
    dev_values: list[float] = field(default_factory=list)
    converged: list[bool | None] = field(default_factory=list)
    """Per seed: whether its dev curve had levelled off (None for a no-training row)."""
    steps: list[int] = field(default_factory=list)
    learning_rates: list[float | None] = field(default_factory=list)
    comparison: stats.BootstrapResult | None = None
    verdict: str | None = None
    matches: bool | None = None
    inconclusive: bool = False
    """A verdict withheld because the trailing side had not converged (see the module docstring)."""
    note: str | None = None
    """Why there is no comparison (no baseline in the group, no common seeds, outputs missing)."""
    times_to_target: list[float | None] = field(default_factory=list)
    degenerate: bool = False
    """Both this variant and the baseline predicted one class for every test example (every seed): a
    tie between two models that learned nothing yet, which says nothing about the methods."""
    untrained: str | None = None
    """The strongest no-training row of the group, which this trained variant is compared with."""
    versus_untrained: stats.BootstrapResult | None = None

    @property
    def still_rising(self) -> bool:
        return any(flag is False for flag in self.converged)

    @property
    def rate_edges(self) -> list[str]:
        """'lowest' / 'highest' for each seed whose learning-rate search chose that end of its range (its best
        rate may lie outside it); empty when every search chose inside, or none searched."""
        searches = [search for cell in self.cells if (search := (cell.get("record") or {}).get("lr_search"))]
        return sorted({edge for search in searches if (edge := rate_at_edge(search)) is not None})

    @property
    def unconverged_steps(self) -> list[int]:
        return sorted({steps for steps, flag in zip(self.steps, self.converged, strict=True) if flag is False})


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


LEARNING_RATE_SETTINGS = ("learning_rate", "lr_search", "lr_search_rungs")
"""Training settings that may differ between the methods compared: each method at its own best learning rate,
searched over its own candidates, is the comparison."""


def _settings_key(cell: dict) -> str:
    train = {
        key: value
        for key, value in ((cell.get("settings") or {}).get("train") or {}).items()
        if key not in LEARNING_RATE_SETTINGS
    }
    cap = (cell.get("settings") or {}).get("max_train_examples")
    return json.dumps({"train": train, "max_train_examples": cap}, sort_keys=True)


def _load_predictions(exp_dir: Path, cell: dict, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The cell's per-example outputs on its evaluation split (test where there is one), as predictions."""
    from safetensors.numpy import load_file

    name = "test_outputs.safetensors" if cell["evaluation_split"] == "test" else "dev_outputs.safetensors"
    path = exp_dir / (cell.get("run_dir") or f"cells/{cell['cell_id']}") / name
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    predictions = stats.predictions_from_outputs(tensors["outputs"], metric)
    labels = tensors["labels"].astype(np.float64)
    if metric not in stats.REGRESSION_METRICS:
        labels = labels.astype(np.int64)
    return predictions, labels


def analyze(exp_dir: str | Path, include_stale: bool = False) -> Analysis:
    """Everything the report shows, computed from EXP_DIR's store and the cells' per-example outputs."""
    exp_dir = Path(exp_dir)
    meta = store.load_meta(exp_dir)
    cells = store.load_cells(exp_dir, include_stale=include_stale)
    finished = [c for c in cells if c["status"] == "finished"]
    failed = [c for c in cells if c["status"] == "failed"]
    statistics = StatisticsConfig(**meta["statistics"]) if meta.get("statistics") else StatisticsConfig()
    baseline = meta.get("baseline")
    order = list(meta.get("methods") or []) + list(meta.get("baselines") or [])
    for cell in cells:
        if cell["variant"] not in order:
            order.append(cell["variant"])
    curves = store.load_curves(exp_dir, [c["cell_id"] for c in finished])
    for cell in finished:
        judged = judged_convergence(cell, curves.get(cell["cell_id"]))
        if judged is not None:
            cell["converged"] = judged

    by_group: dict[GroupKey, list[dict]] = defaultdict(list)
    untrained: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for cell in finished:
        if cell["kind"] == "baseline":
            untrained[(cell["model"], cell["task"])].append(cell)
            continue
        key = GroupKey(cell["model"], cell["task"], cell["data_fraction"], cell["time_budget_s"], _settings_key(cell))
        by_group[key].append(cell)

    groups = []
    # the data sweep (no budget) first, then the time budgets
    for key in sorted(
        by_group,
        key=lambda k: (k.task, k.model, k.time_budget_s is not None, k.budget_sort(), k.data_fraction, k.settings),
    ):
        members = by_group[key] + untrained.get((key.model, key.task), [])
        variants = {
            variant: _variant_result(variant, [c for c in members if c["variant"] == variant])
            for variant in sorted({c["variant"] for c in members}, key=order.index)
        }
        group = Group(key, by_group[key][0]["grid"], by_group[key][0]["primary_metric"], variants)
        _compare_to_baseline(exp_dir, group, baseline, statistics, curves)
        _compare_to_untrained(exp_dir, group, statistics)
        groups.append(group)

    return Analysis(
        title=meta.get("title") or "deltatune comparison",
        description=meta.get("description") or "",
        meta=meta,
        baseline=baseline,
        statistics=statistics,
        variants=order,
        finished=finished,
        failed=failed,
        groups=groups,
        areas=_areas(groups, baseline),
        curves=curves,
        total_cells=meta.get("total_cells") or len(cells),
    )


def _variant_result(variant: str, own: list[dict]) -> VariantResult:
    """One variant's cells under one condition, over its seeds."""
    own = sorted(own, key=lambda c: c["seed"])
    values = [c["primary_value"] for c in own]
    mean, std = stats.mean_and_std(values)
    metric_names = sorted({name for c in own for name in (c["dev_metrics"] or {})})
    splits = {c["evaluation_split"] for c in own}
    return VariantResult(
        variant=variant,
        method=own[0]["method"],
        cells=own,
        values=values,
        seeds=[c["seed"] for c in own],
        mean=mean,
        std=std,
        metric_means={name: stats.mean_and_std([_reported(c).get(name) for c in own])[0] for name in metric_names},
        trainable_params=own[0]["trainable_params"],
        total_params=own[0]["total_params"],
        delta_bytes=own[0]["delta_bytes"],
        peak_memory_bytes=_mean([c["peak_memory_bytes"] for c in own]),
        train_time_s=_mean([c["train_time_s"] for c in own]),
        examples_per_s=_mean([c["train_examples_per_s"] for c in own]),
        kind=own[0]["kind"],
        split=splits.pop() if len(splits) == 1 else "mixed",
        dev_values=[c["dev_value"] for c in own],
        converged=[None if c.get("converged") is None else bool(c["converged"]) for c in own],
        steps=[c["steps"] for c in own],
        learning_rates=[c.get("learning_rate") for c in own],
    )


def _reported(cell: dict) -> dict:
    """The metrics on the cell's evaluation split."""
    return (cell["test_metrics"] if cell["evaluation_split"] == "test" else cell["dev_metrics"]) or {}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _compare_to_baseline(
    exp_dir: Path, group: Group, baseline: str | None, statistics: StatisticsConfig, curves: dict[str, list[dict]]
) -> None:
    reference = group.variants.get(baseline) if baseline else None
    if reference is not None and reference.values:
        best = stats.mean_and_std(reference.dev_values)[0]
        if best > 0:  # a fraction of a non-positive best (MCC can be ≤ 0) is no target
            group.target = statistics.target_fraction * best
    for result in group.variants.values():
        if group.target is not None and result.kind == "train":
            result.times_to_target = [
                stats.time_to_target(
                    [
                        {"train_time_s": p["train_time_s"], "value": p["primary_value"]}
                        for p in curves.get(c["cell_id"], [])
                    ],
                    group.target,
                )
                for c in result.cells
            ]
        if result.variant == baseline:
            continue
        if reference is None:
            result.note = f"no {baseline or 'baseline'} run under these conditions" if baseline else "no baseline"
            continue
        paired = _paired_predictions(exp_dir, result, reference, group.primary_metric)
        if isinstance(paired, str):
            result.note = paired
            continue
        mine, theirs, labels = paired
        result.comparison = stats.paired_bootstrap(
            mine,
            theirs,
            labels,
            group.primary_metric,
            statistics.bootstrap_samples,
            statistics.confidence,
            statistics.seed,
        )
        result.verdict = stats.verdict(result.comparison, statistics.margin_points)
        result.matches = stats.matches(result.comparison, statistics.margin_points)
        if group.primary_metric not in stats.REGRESSION_METRICS and all(np.unique(p).size == 1 for p in mine + theirs):
            result.degenerate, result.matches = True, None
            result.verdict = "uninformative: both predict one class"
            continue
        _withhold_unconverged(result, reference, group.key.time_budget_s, baseline)


def _withhold_unconverged(
    result: VariantResult, reference: VariantResult, budget: float | None, baseline: str | None
) -> None:
    """A verdict holds only if the side behind had converged (see the module docstring)."""
    if budget is not None:
        if result.still_rising:
            result.verdict = f"{result.verdict} (still improving when its {budget:g} s ran out)"
        return
    if result.still_rising and not result.matches:
        result.inconclusive, result.matches = True, None
        result.verdict = f"inconclusive: not converged after {_steps(result.unconverged_steps)} steps"
    elif reference.still_rising and result.matches:
        result.inconclusive, result.matches = True, None
        result.verdict = f"inconclusive: {baseline} not converged after {_steps(reference.unconverged_steps)} steps"


def judged_convergence(cell: dict, curve: list[dict] | None) -> bool | None:
    """Whether a finished cell's dev curve had levelled off by the current rule (`training.still_improving`),
    so a store recorded under an earlier rule is judged as a new one would be; None for a row without a
    curve (no training), whose stored flag stands."""
    if cell.get("kind") == "baseline" or not curve:
        return None
    from deltatune.training import still_improving

    train_config = (cell.get("record") or {}).get("train_config") or {}
    tolerance = train_config.get("convergence_tolerance", 0.005)
    rising, _ = still_improving([point["metrics"].get(cell["primary_metric"]) for point in curve], tolerance)
    return not rising


def _steps(steps: list[int]) -> str:
    return "/".join(str(s) for s in steps)


def _paired_predictions(
    exp_dir: Path, result: VariantResult, reference: VariantResult, metric: str
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray] | str:
    """(this variant's predictions, the reference's, labels) over their common seeds, or why not.

    A no-training row that does not depend on the seed has one cell, paired with every seed of the other.
    """
    if result.split != reference.split:
        return f"evaluated on {result.split}, {reference.variant} on {reference.split}: not paired"
    seeds = _common_seeds(result, reference)
    if not seeds:
        return "no seed shared with the baseline"
    mine: list[np.ndarray] = []
    theirs: list[np.ndarray] = []
    labels: np.ndarray | None = None
    for seed in seeds:
        own = _load_predictions(exp_dir, _cell_for_seed(result, seed), metric)
        other = _load_predictions(exp_dir, _cell_for_seed(reference, seed), metric)
        if own is None or other is None:
            return f"{result.split} outputs missing"
        if not np.array_equal(own[1], other[1]) or (labels is not None and not np.array_equal(labels, own[1])):
            return f"{result.split} examples differ from the baseline's; not paired"
        labels = own[1]
        mine.append(own[0])
        theirs.append(other[0])
    assert labels is not None  # `seeds` is not empty
    return mine, theirs, labels


def _seedless(result: VariantResult) -> bool:
    return result.kind == "baseline" and len(result.cells) == 1 and result.variant not in SEEDED


def _common_seeds(result: VariantResult, reference: VariantResult) -> list[int]:
    if _seedless(result):
        return list(reference.seeds)
    if _seedless(reference):
        return list(result.seeds)
    return sorted(set(result.seeds) & set(reference.seeds))


def _cell_for_seed(result: VariantResult, seed: int) -> dict:
    return result.cells[0] if _seedless(result) else result.cells[result.seeds.index(seed)]


def _compare_to_untrained(exp_dir: Path, group: Group, statistics: StatisticsConfig) -> None:
    """Each trained variant against the strongest no-training row of the group (by its mean)."""
    rows = [r for r in group.variants.values() if r.kind == "baseline" and not math.isnan(r.mean)]
    if not rows:
        return
    strongest = max(rows, key=lambda r: r.mean)
    for result in group.variants.values():
        if result.kind != "train":
            continue
        paired = _paired_predictions(exp_dir, result, strongest, group.primary_metric)
        if isinstance(paired, str):
            continue
        result.untrained = strongest.variant
        result.versus_untrained = stats.paired_bootstrap(
            *paired, group.primary_metric, statistics.bootstrap_samples, statistics.confidence, statistics.seed
        )


def _areas(groups: list[Group], baseline: str | None) -> list[AreaRow]:
    """Area under the data-fraction curve per (model, task, budget, settings, variant), over seeds."""
    curves: dict[tuple, dict[str, dict[float, dict[int, float]]]] = defaultdict(lambda: defaultdict(dict))
    for group in groups:
        key = (group.key.model, group.key.task, group.key.time_budget_s, group.key.settings)
        for variant, result in group.variants.items():
            if result.kind == "train":
                curves[key][variant][group.key.data_fraction] = dict(zip(result.seeds, result.values, strict=True))
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
            areas = [
                stats.area_under_fraction_curve(fractions, [by_fraction[f][s] for f in fractions])
                for s in sorted(seeds)
            ]
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

    One sentence per trained variant and sweep (data amounts without a time budget; time budgets), from the
    paired intervals on the evaluation split: 'held' means the interval's lower end is above −margin.
    Conditions whose verdict was withheld because a run had not converged are counted apart, and so are
    ties between models that had learned nothing. Then one sentence per no-training row: which trained
    variants beat it.
    """
    sentences = []
    if analysis.baseline:
        for sweep in ("data amounts", "time budgets"):
            for variant in analysis.variants:
                if variant != analysis.baseline:
                    sentence = _claim(analysis, variant, sweep)
                    if sentence:
                        sentences.append(sentence)
    return sentences + _untrained_claims(analysis)


def _claim(analysis: Analysis, variant: str, sweep: str) -> str | None:
    margin = analysis.statistics.margin_points
    confidence = round(100 * analysis.statistics.confidence)
    several_models = len({g.key.model for g in analysis.groups}) > 1
    held, missed, inconclusive, degenerate = [], [], [], []
    for group in analysis.groups:
        if (group.key.time_budget_s is None) != (sweep == "data amounts"):
            continue
        result = group.variants.get(variant)
        if result is None or result.comparison is None or result.kind != "train":
            continue
        place = _place(group, sweep, several_models)
        difference, low, high = result.comparison.points()
        if result.degenerate:
            degenerate.append(place)
        elif result.inconclusive:
            inconclusive.append(f"{place} ({str(result.verdict).removeprefix('inconclusive: ')})")
        elif result.matches:
            held.append(place)
        elif high < 0:
            missed.append(
                f"{place} (worse by {-difference:.1f} points [{-high:.1f}, {-low:.1f}]"
                + (", still improving when its time ran out" if result.still_rising else "")
                + (
                    f"; its learning rate was the {' or '.join(result.rate_edges)} candidate searched, so it may "
                    "do better outside the range"
                    if result.rate_edges
                    else ""
                )
                + ")"
            )
        else:
            missed.append(
                f"{place} (not shown: {difference:+.1f} [{low:+.1f}, {high:+.1f}], interval wider than ±{margin:g})"
            )
    if not (held or missed or inconclusive or degenerate):
        return None
    text = (
        f"**{variant}** matches {analysis.baseline} (no more than {margin:g} point{'s' if margin != 1 else ''} "
        f"worse on {_split_name(analysis)}, {confidence}% paired bootstrap) across {sweep}: "
    )
    parts = []
    if held:
        parts.append("held on " + ", ".join(held))
    if missed:
        parts.append("did not hold on " + "; ".join(missed))
    if inconclusive:
        parts.append(
            f"inconclusive on {len(inconclusive)} (a run still improving at its end cannot be judged): "
            + "; ".join(inconclusive)
        )
    if degenerate:
        parts.append(
            "no evidence either way on " + ", ".join(degenerate) + f" (both it and {analysis.baseline} "
            "predicted a single class for every example: neither had learned the task yet)"
        )
    return text + "; ".join(parts) + "."


def _untrained_claims(analysis: Analysis) -> list[str]:
    """'Doing nothing: embedding-cosine scores 82.7 on stsb. full beat it on 2 of 3 conditions; not on stsb at
    25% (-1.2 [-2.0, -0.4]) ...'."""
    sentences = []
    several_models = len({g.key.model for g in analysis.groups}) > 1
    rows = dict.fromkeys(r.untrained for g in analysis.groups for r in g.variants.values() if r.untrained)
    for row in rows:
        scores: dict[str, float] = {}
        beaten: defaultdict[str, int] = defaultdict(int)
        shortfalls: defaultdict[str, list] = defaultdict(list)
        for group in analysis.groups:
            if row in group.variants:
                scores[group.key.task] = group.variants[row].mean
            for result in group.variants.values():
                if result.untrained != row or result.versus_untrained is None:
                    continue
                difference, low, high = result.versus_untrained.points()
                if low > 0:
                    beaten[result.variant] += 1
                    continue
                sweep = "data amounts" if group.key.time_budget_s is None else "time budgets"
                shortfalls[result.variant].append(
                    f"{_place(group, sweep, several_models)} ({difference:+.1f} [{low:+.1f}, {high:+.1f}]"
                    + (", not converged" if result.still_rising else "")
                    + ")"
                )
        shown = ", ".join(f"{100 * value:.1f} on {task}" for task, value in scores.items())
        parts = []
        for variant in [v for v in analysis.variants if v in beaten or v in shortfalls]:
            total = beaten[variant] + len(shortfalls[variant])
            text = f"{variant} beat it under {beaten[variant]} of {total} conditions"
            if shortfalls[variant]:
                text += "; not on " + ", ".join(shortfalls[variant])
            parts.append(text)
        sentences.append(
            f"**Doing nothing**: {row} (no training) scores {shown} ({_split_name(analysis)}). "
            + ". ".join(parts)
            + "."
        )
    return sentences


def _split_name(analysis: Analysis) -> str:
    splits = {cell["evaluation_split"] for cell in analysis.finished}
    return "test" if splits == {"test"} else "dev" if splits == {"dev"} else "test where there is one, else dev"


def _place(group: Group, sweep: str, several_models: bool = False) -> str:
    task = f"{group.key.task} ({group.key.model})" if several_models else group.key.task
    if sweep == "data amounts":
        return f"{task} at {100 * group.key.data_fraction:g}% of the data"
    return f"{task} with {group.key.time_budget_s:g} s"


__all__ = ["analyze", "Analysis", "Group", "GroupKey", "VariantResult", "AreaRow", "claims"]
