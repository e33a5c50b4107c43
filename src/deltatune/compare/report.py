"""`deltatune report EXP_DIR`: one self-contained HTML page and a Markdown summary of an experiment.

The HTML opens from disk with no server and no network: the charts are inline SVG, the style is
inline CSS, and there is no script at all. The page is a Jinja2 template (templates/report.html.j2,
autoescaped) with its style sheet beside it (templates/report.css); this module computes what it
shows. The Markdown carries the same tables and the claims, for a README or a pull request. Every
number says which split it is on: the reported metric, the intervals and the verdicts on test (where
the task has a test split), the learning curves, the learning-rate search and the checkpoint choice
on dev.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import time
from dataclasses import dataclass
from html import escape
from pathlib import Path

import jinja2
from markupsafe import Markup

from deltatune.compare import stats
from deltatune.compare.summary import Analysis, Group, VariantResult, analyze, claims
from deltatune.compare.svg import Plot, bar_chart, method_colors
from deltatune.search import rate_at_edge

REPORT_HTML = "report.html"
REPORT_MARKDOWN = "report.md"

TEMPLATES = "templates"
"""The package folder of the page template (report.html.j2) and its style sheet (report.css)."""


def _points(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _mean_std(mean: float, std: float, count: int) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if count > 1 else f"{100 * mean:.1f}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def _count(value: int | None) -> str:
    if value is None:
        return "–"
    if value >= 1e6:
        return f"{value / 1e6:.3g}M"
    if value >= 1e3:
        return f"{value / 1e3:.3g}k"
    return str(value)


def _seconds(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def _split(analysis: Analysis) -> str:
    """The split the reported numbers are on."""
    splits = {cell["evaluation_split"] for cell in analysis.finished}
    return splits.pop() if len(splits) == 1 else "test/dev"


def _rate(result: VariantResult) -> str:
    rates = sorted({r for r in result.learning_rates if r is not None})
    return "/".join(f"{r:g}" for r in rates) if rates else "–"


def _convergence(result: VariantResult) -> str:
    """'yes', 'no (360 steps)' or, over seeds, '2/3' (converged of seeds)."""
    flags = [f for f in result.converged if f is not None]
    if not flags:
        return "–"
    if len(flags) == 1:
        return "yes" if flags[0] else f"no ({result.steps[0]} steps)"
    return f"{sum(flags)}/{len(flags)}"


def _label(result: VariantResult) -> str:
    return result.variant + (" (no training)" if result.kind == "baseline" else "")


def _condition(group: Group) -> str:
    text = f"{100 * group.key.data_fraction:g}% of the data"
    if group.key.time_budget_s is not None:
        text += f", {group.key.time_budget_s:g} s budget"
    return text


def _verdict_class(result, baseline: str | None) -> str:
    if result.variant == baseline:
        return "base"
    if result.verdict is None or result.inconclusive:
        return "unclear"
    if result.matches:
        return "good"
    if result.verdict.startswith("worse"):
        return "bad"
    return "unclear"


def _difference(result) -> str:
    if result.comparison is None:
        return "–"
    difference, low, high = result.comparison.points()
    return f"{difference:+.1f} [{low:+.1f}, {high:+.1f}]"


def _time_to_target(result) -> str:
    times = result.times_to_target
    if not times:
        return "–"
    reached = sorted(t for t in times if t is not None)
    if not reached:
        return f"not reached (0/{len(times)})"
    middle = len(reached) // 2
    median = reached[middle] if len(reached) % 2 else (reached[middle - 1] + reached[middle]) / 2
    return f"{_seconds(median)} ({len(reached)}/{len(times)})"


def _models(analysis: Analysis, task: str) -> list[str]:
    return list(dict.fromkeys(g.key.model for g in analysis.groups_for(task)))


def _main_groups(analysis: Analysis, task: str, model: str | None = None) -> list[Group]:
    """The data-fraction sweep of a task (and model): groups without a time budget, in the most common settings."""
    candidates = [
        g for g in analysis.groups_for(task) if g.key.time_budget_s is None and (model is None or g.key.model == model)
    ]
    if not candidates:
        return []
    counts: dict[tuple, int] = {}
    for group in candidates:
        counts[(group.key.model, group.key.settings)] = counts.get((group.key.model, group.key.settings), 0) + 1
    model, settings = max(counts, key=lambda k: (counts[k], k == (candidates[0].key.model, candidates[0].key.settings)))
    return sorted(
        [g for g in candidates if g.key.model == model and g.key.settings == settings],
        key=lambda g: g.key.data_fraction,
    )


def _budget_groups(analysis: Analysis, task: str, model: str | None = None) -> list[Group]:
    return sorted(
        [
            g
            for g in analysis.groups_for(task)
            if g.key.time_budget_s is not None and (model is None or g.key.model == model)
        ],
        key=_budget_of,
    )


def _budget_of(group: Group) -> float:
    """The time budget of a group that has one (see `_budget_groups`)."""
    assert group.key.time_budget_s is not None
    return group.key.time_budget_s


def build_plots(
    analysis: Analysis, task: str, colors: dict[str, str], model: str | None = None
) -> list[tuple[str, str]]:
    """(svg, caption) for each chart of one task (on one model, when the grid has several)."""
    several = model is not None and len(_models(analysis, task)) > 1
    where = (
        _PlotPlace(task, f"@{model}", f" on {Path(model).name}")
        if several and model is not None
        else _PlotPlace(task, "", "")
    )
    main = _main_groups(analysis, task, model)
    metric = (main or analysis.groups_for(task))[0].primary_metric
    plots = []
    if main:
        plots += [
            _fraction_plot(analysis, main, where, metric, colors),
            _time_plot(analysis, main[-1], where, metric, colors),
            _params_plot(analysis, main[-1], where, metric, colors),
        ]
    budgets = _budget_groups(analysis, task, model)
    if budgets:
        plots.append(_budget_plot(analysis, budgets, where, metric, colors))
    return plots


@dataclass(frozen=True)
class _PlotPlace:
    """Which task (and model, when the grid has several) a chart shows: in its name and in its title."""

    task: str
    suffix: str
    """Added to the chart's name, e.g. '@minilm-l6'."""
    on_model: str
    """Added to the chart's title, e.g. ' on minilm-l6'."""


def _fraction_plot(
    analysis: Analysis, main: list[Group], where: _PlotPlace, metric: str, colors: dict[str, str]
) -> tuple[str, str]:
    plot = Plot(
        f"fraction:{where.task}{where.suffix}",
        f"{where.task}{where.on_model}: {metric} against training data",
        "fraction of the training data",
        f"{_split(analysis)} {metric} × 100",
        subtitle="line: mean over seeds · band: min–max · dots: single seeds",
    )
    fractions = [g.key.data_fraction for g in main]
    plot.x_ticks = sorted(set([0.0, *fractions, 1.0])) if len(fractions) <= 6 else None
    for variant in analysis.variants:
        rows = [(g.key.data_fraction, g.variants[variant]) for g in main if variant in g.variants]
        if not rows:
            continue
        if rows[0][1].kind == "baseline":  # no training: one level for every fraction
            plot.hline(100 * rows[0][1].mean, colors[variant], label=f"{variant} (no training)")
            continue
        xs = [x for x, _ in rows]
        plot.band(xs, [100 * min(r.values) for _, r in rows], [100 * max(r.values) for _, r in rows], colors[variant])
        plot.line(
            xs,
            [100 * r.mean for _, r in rows],
            colors[variant],
            label=variant,
            tooltips=[
                f"{variant} at {x:g}: {_mean_std(r.mean, r.std, len(r.values))} ({len(r.values)} seed(s))"
                for x, r in rows
            ],
        )
        seed_x = [x for x, r in rows for _ in r.values]
        seed_y = [100 * v for _, r in rows for v in r.values]
        plot.points(
            seed_x,
            seed_y,
            colors[variant],
            radius=2.2,
            opacity=0.45,
            tooltips=[
                f"{variant} at {x:g}, seed {s}: {100 * v:.2f}"
                for x, r in rows
                for s, v in zip(r.seeds, r.values, strict=True)
            ],
        )
    return (
        plot.render(),
        f"Each method's {_split(analysis)} metric as the training set grows "
        "(stratified subsets, the same for every method); dashed: rows without training.",
    )


def _time_plot(
    analysis: Analysis, largest: Group, where: _PlotPlace, metric: str, colors: dict[str, str]
) -> tuple[str, str]:
    plot = Plot(
        f"time:{where.task}{where.suffix}",
        f"{where.task}{where.on_model}: dev {metric} against training time",
        "training seconds (evaluation time excluded)",
        f"dev {metric} × 100",
        x_from_zero=True,
        subtitle=f"learning curves at fraction {largest.key.data_fraction:g}; one line per seed",
    )
    for variant in analysis.variants:
        result = largest.variants.get(variant)
        if result is None or result.kind == "baseline":
            continue
        for index, cell in enumerate(result.cells):
            # an undefined metric (the correlation of constant predictions) is stored as null: no point for it
            curve = [p for p in analysis.curves.get(cell["cell_id"], []) if p["primary_value"] is not None]
            plot.line(
                [p["train_time_s"] for p in curve],
                [100 * p["primary_value"] for p in curve],
                colors[variant],
                label=variant if index == 0 else None,
                width=1.8,
                opacity=0.85 if index == 0 else 0.5,
                markers=True,
                tooltips=[
                    f"{variant} seed {cell['seed']}: {100 * p['primary_value']:.2f} after "
                    f"{p['train_time_s']:.1f} s (step {p['step']})"
                    for p in curve
                ],
            )
    if largest.target is not None:
        plot.hline(
            100 * largest.target,
            "#9a9a9a",
            label=f"target: {analysis.statistics.target_fraction:g} × {analysis.baseline}'s best",
        )
    return (
        plot.render(),
        "How fast each method gets there: dev metric at each evaluation against "
        "the training clock (at the chosen learning rate). A curve whose last point is "
        "its best by more than the tolerance had not converged. Time-to-target is "
        "where a curve first crosses the line.",
    )


def _params_plot(
    analysis: Analysis, largest: Group, where: _PlotPlace, metric: str, colors: dict[str, str]
) -> tuple[str, str]:
    plot = Plot(
        f"params:{where.task}{where.suffix}",
        f"{where.task}{where.on_model}: {metric} against trainable parameters",
        "trainable parameters (log)",
        f"{_split(analysis)} {metric} × 100",
        x_log=True,
        subtitle=f"fraction {largest.key.data_fraction:g}; bars: ± 1 std over seeds",
    )
    for variant in analysis.variants:
        result = largest.variants.get(variant)
        if result is None or not result.trainable_params:
            continue
        plot.error_bars(
            [result.trainable_params],
            [100 * (result.mean - result.std)],
            [100 * (result.mean + result.std)],
            colors[variant],
        )
        plot.points(
            [result.trainable_params],
            [100 * result.mean],
            colors[variant],
            label=variant,
            radius=5,
            opacity=0.95,
            tooltips=[
                f"{variant}: {result.trainable_params:,} trainable parameters, "
                f"{_mean_std(result.mean, result.std, len(result.values))}"
            ],
        )
    return (
        plot.render(),
        "What each method buys with its parameters: fewer trainable parameters "
        "mean smaller deltas and less optimizer memory.",
    )


def _budget_plot(
    analysis: Analysis, budgets: list[Group], where: _PlotPlace, metric: str, colors: dict[str, str]
) -> tuple[str, str]:
    seconds = [_budget_of(g) for g in budgets]
    plot = Plot(
        f"budget:{where.task}{where.suffix}",
        f"{where.task}{where.on_model}: {metric} against time budget",
        "training time budget (s)",
        f"{_split(analysis)} {metric} × 100",
        x_log=len(set(seconds)) > 2 and max(seconds) / min(seconds) >= 8,
        subtitle="line: mean over seeds · band: min–max",
    )
    for variant in analysis.variants:
        rows = [(_budget_of(g), g.variants[variant]) for g in budgets if variant in g.variants]
        if not rows or rows[0][1].kind == "baseline":
            continue
        xs = [x for x, _ in rows]
        plot.band(xs, [100 * min(r.values) for _, r in rows], [100 * max(r.values) for _, r in rows], colors[variant])
        plot.line(
            xs,
            [100 * r.mean for _, r in rows],
            colors[variant],
            label=variant,
            tooltips=[f"{variant} with {x:g} s: {_mean_std(r.mean, r.std, len(r.values))}" for x, r in rows],
        )
    return (
        plot.render(),
        "Each method given the same wall-clock training budget: which is best when time, not data, is what runs out.",
    )


def cost_plots(analysis: Analysis, colors: dict[str, str]) -> list[tuple[str, str]]:
    variants = [
        v for v in analysis.variants if any(c["variant"] == v and c["kind"] == "train" for c in analysis.finished)
    ]
    memory, delta = [], []
    for variant in variants:
        cells = [c for c in analysis.finished if c["variant"] == variant]
        peaks = [c["peak_memory_bytes"] for c in cells if c["peak_memory_bytes"]]
        deltas = sorted(c["delta_bytes"] for c in cells if c["delta_bytes"])
        memory.append(max(peaks) if peaks else None)
        delta.append(deltas[len(deltas) // 2] if deltas else None)
    palette = [colors[v] for v in variants]
    return [
        (
            bar_chart(
                "memory",
                "Peak memory per method",
                variants,
                [m / 2**30 if m else None for m in memory],
                palette,
                "peak resident memory of the cell process (GiB)",
                [f"{m / 2**30:.2f} GiB" if m else "n/a" for m in memory],
                subtitle="largest over its cells; the whole process (model, data, optimizer)",
            ),
            "Peak resident memory of the training process, including the frozen model itself.",
        ),
        (
            bar_chart(
                "delta",
                "Delta size per method",
                variants,
                delta,
                palette,
                "bytes on disk (log scale)",
                [_bytes(d) for d in delta],
                log=True,
                subtitle="what ships per task: delta.safetensors",
            ),
            "The saved delta per task (the trainable tensors only), on a log scale.",
        ),
    ]


def _facts(analysis: Analysis) -> list[tuple[str, str]]:
    meta = analysis.meta
    machine = meta.get("machine") or {}
    finished, failed = len(analysis.finished), len(analysis.failed)
    facts = [
        ("cells", f"{finished} finished, {failed} failed, of {analysis.total_cells} in the spec" + _reused(meta)),
        ("command", meta.get("command") or "–"),
        (
            "machine",
            f"{machine.get('cpu', '?')}; {machine.get('cpu_count', '?')} cores; "
            f"{_bytes(machine.get('memory_bytes'))} memory; {machine.get('platform', '?')}",
        ),
        ("software", f"python {machine.get('python', '?')}, torch {machine.get('torch', '?')}" + _versions(analysis)),
        (
            "parallelism",
            f"{machine.get('jobs', '?')} cell(s) at a time, {machine.get('threads_per_cell', '?')} thread(s) each",
        ),
        ("training", _budget_fact(analysis)),
        ("evaluation", _evaluation_fact(analysis)),
        (
            "statistics",
            f"{analysis.statistics.bootstrap_samples} paired bootstrap resamples (examples and seeds), "
            f"{round(100 * analysis.statistics.confidence)}% intervals, 'matches' = not worse than "
            f"{analysis.baseline or 'the baseline'} by more than {analysis.statistics.margin_points:g} "
            "point(s)",
        ),
        ("generated", time.strftime("%Y-%m-%d %H:%M %Z")),
    ]
    return facts


def _budget_fact(analysis: Analysis) -> str:
    """Each task's training budget (tasks of one budget together): a spec may give a task, or a sub-grid, its own."""
    budgets: dict[str, list[str]] = {}
    trained = [cell for cell in analysis.finished if cell.get("kind") != "baseline"]
    several_grids = len({cell.get("grid") for cell in trained}) > 1
    for cell in trained:
        train = (cell.get("settings") or {}).get("train") or {}
        parts = [f"batch {train.get('batch_size', '?')}"]
        if train.get("min_steps"):
            parts.append(f"at least {train['min_steps']} steps")
        if train.get("epochs"):
            parts.append(f"at most {train['epochs']:g} epochs")
        if train.get("max_steps"):
            parts.append(f"at most {train['max_steps']} steps")
        if train.get("eval_every"):
            parts.append(f"dev every {train['eval_every']} steps")
        if train.get("early_stopping_patience"):
            parts.append(f"early stopping after {train['early_stopping_patience']} evaluations without improvement")
        tasks = budgets.setdefault(", ".join(parts), [])
        label = f"{cell['task']} ({cell.get('grid')})" if several_grids else cell["task"]
        if label not in tasks:
            tasks.append(label)
    if not budgets:
        return "–"
    if len(budgets) == 1:
        return next(iter(budgets))
    return "; ".join(f"{', '.join(tasks)}: {budget}" for budget, tasks in budgets.items())


def _reused(meta: dict) -> str:
    """Where cells taken finished from other experiments (`--reuse`) came from."""
    reused = meta.get("reused") or {}
    if not reused:
        return ""
    sources = ", ".join(f"{count} from {source}" for source, count in reused.items())
    return f" ({sources}: finished there with the same settings, copied by --reuse)"


def _evaluation_fact(analysis: Analysis) -> str:
    split = _split(analysis)
    searched = any((c.get("record") or {}).get("lr_search") for c in analysis.finished)
    parts = sorted(
        {
            n
            for c in analysis.finished
            if (n := ((c.get("record") or {}).get("train_config") or {}).get("eval_examples")) is not None
        }
    )
    where = "dev" if not parts else f"a fixed stratified {' or '.join(f'{n:,}' for n in parts)} examples of dev"
    text = (
        "checkpoint" + (" and learning rate (successive halving)" if searched else "") + f" chosen on {where}; "
        f"reported metrics, intervals and verdicts on {split}"
    )
    if parts:
        text += " (the dev column scores the kept state on all of dev)"
    if split != "test":
        text += " (WARNING: a task without a test split is judged on the dev data that chose the checkpoint)"
    return text + "; a run whose dev curve still rose at its end is 'not converged' and gets no worse-by verdict"


def _versions(analysis: Analysis) -> str:
    """Library versions and source commit; says so when cells ran on different ones (a grid resumed after
    an upgrade, or an editable install changed under a running grid)."""
    seen: dict[tuple, int] = {}
    for cell in analysis.finished:
        record = cell.get("record") or {}
        versions, git = record.get("versions") or {}, record.get("git") or {}
        key = (versions.get("transformers", "?"), versions.get("deltatune", "?"), git.get("commit"), git.get("dirty"))
        seen[key] = seen.get(key, 0) + 1
    if not seen:
        return ""
    (transformers, deltatune, commit, dirty), _ = max(seen.items(), key=lambda item: item[1])
    text = f", transformers {transformers}, deltatune {deltatune}"
    if commit:
        text += f" (git {commit[:10]}{', with local changes' if dirty else ''})"
    if len(seen) > 1:
        described = "; ".join(
            f"{count} on transformers {t}, deltatune {d}"
            + (f", git {c[:10]}{'+changes' if changed else ''}" if c else "")
            for (t, d, c, changed), count in seen.items()
        )
        text += f". WARNING: the cells ran on {len(seen)} different versions ({described})"
    return text


def _task_rows(analysis: Analysis, task: str) -> list[tuple[Group, list]]:
    return [
        (group, [group.variants[v] for v in analysis.variants if v in group.variants])
        for group in analysis.groups_for(task)
    ]


def render_html(analysis: Analysis) -> str:
    """The report page: the template (templates/report.html.j2) filled with what the analysis says."""
    colors = method_colors(analysis.variants, analysis.baseline)
    sentences = claims(analysis)
    return _page_template().render(
        style=Markup(_template_file("report.css")),
        title=analysis.title,
        description=analysis.description,
        facts=_facts(analysis),
        legend=[{"name": v, "color": colors[v], "is_baseline": v == analysis.baseline} for v in analysis.variants],
        claims_note=_claims_note(analysis),
        claims=[_markdown_bold(s) for s in sentences],
        tasks=[_task_section(analysis, task, colors) for task in analysis.tasks],
        cost_plots=_markup_plots(cost_plots(analysis, colors)),
        search=_table_context(*_search_table(analysis)),
        search_note=_search_note(analysis),
        areas=_table_context(*_area_table(analysis)),
        split=_split(analysis),
        time_to_target=_table_context(*_time_to_target_table(analysis)),
        target_fraction=f"{analysis.statistics.target_fraction:g}",
        baseline=analysis.baseline,
        failed=[
            {
                "cell_id": c["cell_id"],
                "variant": c["variant"],
                "task": c["task"],
                "error": c["error"] or "",
                "condition": f"fraction {c['data_fraction']:g}{_budget_text(c['time_budget_s'])}, seed {c['seed']}",
            }
            for c in analysis.failed
        ],
        finished=len(analysis.finished),
        cells=_table_context(*_cell_table(analysis)),
    )


def _template_file(name: str) -> str:
    """A file of the package's templates folder, read through importlib.resources (a wheel or a checkout)."""
    return (importlib.resources.files("deltatune.compare") / TEMPLATES / name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _page_template() -> jinja2.Template:
    # autoescape: titles, method names, task names and errors come from the user's spec and data
    environment = jinja2.Environment(
        loader=jinja2.FunctionLoader(_template_file),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    return environment.get_template("report.html.j2")


def _markup_plots(plots: list[tuple[str, str]]) -> list[tuple[Markup, str]]:
    """Charts are SVG markup built (and escaped) by deltatune.compare.svg; captions are text."""
    return [(Markup(svg), caption) for svg, caption in plots]


def _table_context(header: list[str], rows: list[list[str]]) -> dict:
    return {"header": header, "rows": rows}


def _task_section(analysis: Analysis, task: str, colors: dict[str, str]) -> dict:
    """One task's part of the page: its charts (per model, when the grid has several) and its table."""
    return {
        "name": task,
        "metric": analysis.groups_for(task)[0].primary_metric,
        "models": [
            {"name": model, "plots": _markup_plots(build_plots(analysis, task, colors, model))}
            for model in _models(analysis, task)
        ],
        "table": _task_table(analysis, task, colors),
    }


_SEARCH_NOTE = (
    "Each cell trains every candidate learning rate from the same start; at each rung the candidates "
    "are scored on a fixed stratified part of dev and the better half goes on, the rest stop. Shown: "
    "dev × 100 at each rung (that part of dev) and, for the survivor, its best on all of dev at the "
    "end; the chosen rate is the survivor. A rate 'past the range' was trained as a whole run after the search "
    "chose an end of its range (lr_search_extend), its best on all of dev shown. Cost: optimizer steps of all "
    "candidates together, and as a multiple of the chosen run's own steps."
)


def _search_note(analysis: Analysis) -> str:
    """The search table's note, and how many cells chose a rate at an end of their range (their best rate may
    lie outside it)."""
    searches = [search for c in analysis.finished if (search := (c.get("record") or {}).get("lr_search"))]
    at_edge = sum(rate_at_edge(search) is not None for search in searches)
    if not at_edge:
        return _SEARCH_NOTE
    return (
        f"{_SEARCH_NOTE} {at_edge} of {len(searches)} searches chose the lowest or the highest of their "
        "candidates (marked): their best rate may lie outside the range searched, so those cells may be below "
        "their method's best; a range that reaches past the chosen rate settles it."
    )


def _claims_note(analysis: Analysis) -> str:
    return (
        f"Verdicts compare each method with {analysis.baseline or 'the baseline'} on the same {_split(analysis)} "
        "examples and seeds. A run whose dev curve was still rising at its end is not judged worse: its "
        "verdict is 'inconclusive: not converged', counted apart below."
    )


def _markdown_bold(text: str) -> Markup:
    """A claim with its **bold** parts in <strong>, everything else escaped."""
    pieces = escape(text).split("**")
    return Markup("".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(pieces)))


def _row_cells(analysis: Analysis, result: VariantResult) -> list[str]:
    """What the per-task tables show for one variant under one condition (plain text)."""
    verdict = "baseline" if result.variant == analysis.baseline else result.verdict or result.note or "–"
    versus = "–"
    if result.versus_untrained is not None:
        difference, low, high = result.versus_untrained.points()
        versus = f"{difference:+.1f} [{low:+.1f}, {high:+.1f}]"
    return [
        str(len(result.values)),
        _mean_std(result.mean, result.std, len(result.values)),
        _mean_std(*_dev_mean_std(result), len(result.values)),
        _difference(result),
        verdict,
        versus,
        _rate(result),
        _convergence(result),
        _count(result.trainable_params) if result.kind == "train" else "–",
        _bytes(result.delta_bytes),
        _seconds(result.train_time_s) if result.kind == "train" else "–",
        _time_to_target(result),
    ]


def _dev_mean_std(result: VariantResult) -> tuple[float, float]:
    return stats.mean_and_std(result.dev_values)


def _table_header(analysis: Analysis) -> list[str]:
    split = _split(analysis)
    untrained = "Δ vs best untrained [CI]"
    return [
        "seeds",
        f"{split} (× 100)",
        "dev (× 100)",
        f"Δ vs {analysis.baseline or 'baseline'} on {split} [CI]",
        "verdict",
        untrained,
        "learning rate",
        "converged",
        "trainable",
        "delta",
        "train time",
        "time to target",
    ]


def _task_table(analysis: Analysis, task: str, colors: dict[str, str]) -> dict:
    """Every condition of a task, each variant's row under it (the template lays it out)."""
    several_models = len({g.key.model for g in analysis.groups}) > 1
    return {
        "header": ["method", *_table_header(analysis)],
        "numeric": {1, 2, 3, 4, 6, 7, 9, 10, 11},
        "verdict_column": 5,
        "groups": [
            {
                "condition": _condition(group),
                "model": group.key.model if several_models else None,
                "rows": [
                    {
                        "color": colors[result.variant],
                        "label": _label(result),
                        "verdict_class": _verdict_class(result, analysis.baseline),
                        "cells": _row_cells(analysis, result),
                    }
                    for result in results
                ],
            }
            for group, results in _task_rows(analysis, task)
        ],
    }


def _search_table(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    """Every cell that searched its learning rate: each candidate's best dev score at each rung it reached."""
    header = [
        "task",
        "method",
        "condition",
        "seed",
        "candidates: best dev at each rung → at the end",
        "chosen",
        "cost (steps, all candidates)",
    ]
    rows = []
    for cell in sorted(
        analysis.finished,
        key=lambda c: (
            c["task"],
            analysis.variants.index(c["variant"]),
            c["data_fraction"],
            c["time_budget_s"] or 0,
            c["seed"],
        ),
    ):
        search = (cell.get("record") or {}).get("lr_search")
        if not search:
            continue
        shown = []
        for candidate in search["candidates"]:
            scores = [f"{100 * v:.1f}" if v is not None else "–" for v in candidate["rung_scores"]]
            if candidate["stopped_at_rung"] is None or candidate.get("extension"):
                scores.append(f"{100 * candidate['best_dev']:.1f}" if candidate["best_dev"] is not None else "–")
            shown.append(
                f"{candidate['learning_rate']:g}: "
                + " → ".join(scores)
                + (" (past the range)" if candidate.get("extension") else "")
                + (" (stopped)" if candidate["stopped_at_rung"] is not None else "")
            )
        condition = f"fraction {cell['data_fraction']:g}" + (
            f", {cell['time_budget_s']:g} s" if cell["time_budget_s"] is not None else ""
        )
        rows.append(
            [
                cell["task"],
                cell["variant"],
                condition,
                str(cell["seed"]),
                "; ".join(shown),
                f"{search['chosen']:g}" + (f" ({edge} candidate)" if (edge := rate_at_edge(search)) else ""),
                f"{search['steps']} ({search['steps'] / max(1, cell['steps']):.2f}×)",
            ]
        )
    return header, rows


def _area_table(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    header = ["task", "method", "fractions", "area (× 100)", f"Δ vs {analysis.baseline or 'baseline'}"]
    rows = []
    for row in sorted(
        analysis.areas,
        key=lambda r: (
            r.task,
            r.time_budget_s or 0,
            analysis.variants.index(r.variant) if r.variant in analysis.variants else 0,
        ),
    ):
        task = row.task + (f" (budget {row.time_budget_s:g} s)" if row.time_budget_s is not None else "")
        rows.append(
            [
                task,
                row.variant,
                ", ".join(f"{f:g}" for f in row.fractions),
                f"{100 * row.mean:.1f} ± {100 * row.std:.1f}",
                f"{100 * row.difference:+.1f}" if row.difference is not None else "–",
            ]
        )
    return header, rows


def _time_to_target_table(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    header = ["task", "condition", "target (× 100)", "method", "time to target (median, seeds reached)"]
    rows = []
    for task in analysis.tasks:
        for group in [g for model in _models(analysis, task) for g in _main_groups(analysis, task, model)[-1:]]:
            if group.target is None:
                continue
            for variant in analysis.variants:
                result = group.variants.get(variant)
                if result is not None:
                    rows.append(
                        [task, _condition(group), f"{100 * group.target:.1f}", variant, _time_to_target(result)]
                    )
    return header, rows


def _cell_table(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    header = [
        "cell",
        "task",
        "method",
        "fraction",
        "budget",
        "seed",
        f"{_split(analysis)} (× 100)",
        "dev (× 100)",
        "learning rate",
        "steps",
        "stopped by",
        "converged",
        "train s",
        "peak memory",
    ]
    rows = []
    for cell in sorted(
        analysis.finished,
        key=lambda c: (c["task"], c["variant"], c["data_fraction"], c["time_budget_s"] or 0, c["seed"]),
    ):
        converged = cell.get("converged")
        rows.append(
            [
                cell["cell_id"],
                cell["task"],
                cell["variant"] + (" (no training)" if cell["kind"] == "baseline" else ""),
                f"{cell['data_fraction']:g}" if cell["kind"] == "train" else "–",
                f"{cell['time_budget_s']:g}" if cell["time_budget_s"] is not None else "–",
                str(cell["seed"]),
                _points(cell["primary_value"]),
                _points(cell["dev_value"]),
                f"{cell['learning_rate']:g}" if cell.get("learning_rate") else "–",
                str(cell["steps"]),
                cell["stopped_by"] or "–",
                "–" if converged is None else ("yes" if converged else "no"),
                _seconds(cell["train_time_s"]),
                _bytes(cell["peak_memory_bytes"]),
            ]
        )
    return header, rows


def _budget_text(seconds: float | None) -> str:
    """ ", budget 30 s" for a cell with a time budget, "" for one without."""
    return f", budget {seconds:g} s" if seconds is not None else ""


def _md(text, one_line: bool = True) -> str:
    """Text for report.md: names and errors come from the user's spec and data, and Markdown renders raw HTML,
    so <, > and & are written as entities (a label like <script> stays text, as in the HTML report)."""
    text = escape(str(text), quote=False)
    return " ".join(text.split("\n")) if one_line else text


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def clean(text: str) -> str:
        return _md(text).replace("|", "\\|")

    lines = ["| " + " | ".join(clean(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(analysis: Analysis) -> str:
    lines = [f"# {_md(analysis.title)}", ""]
    if analysis.description:
        lines += [_md(analysis.description, one_line=False), ""]
    lines += [f"- **{k}**: {_md(v)}" for k, v in _facts(analysis)] + [""]
    lines += ["## Claims checked", "", _claims_note(analysis), ""]
    sentences = claims(analysis)
    lines += [f"- {_md(s)}" for s in sentences] if sentences else ["No comparison against a baseline yet."]
    lines.append("")
    for task in analysis.tasks:
        metric = analysis.groups_for(task)[0].primary_metric
        lines += [f"## {_md(task)} ({_split(analysis)} {_md(metric)} × 100; dev beside it)", ""]
        rows = [
            [_condition(group), _label(result), *_row_cells(analysis, result)]
            for group, results in _task_rows(analysis, task)
            for result in results
        ]
        lines += [_markdown_table(["condition", "method", *_table_header(analysis)], rows), ""]
    search = _search_table(analysis)
    if search[1]:
        lines += ["## Learning-rate search (dev)", "", _search_note(analysis), "", _markdown_table(*search), ""]
    if analysis.areas:
        lines += [
            "## Area under the data-fraction curve (× 100, mean ± std over seeds)",
            "",
            _markdown_table(*_area_table(analysis)),
            "",
        ]
    ttt = _time_to_target_table(analysis)
    if ttt[1]:
        lines += [
            f"## Time to {analysis.statistics.target_fraction:g} × {_md(analysis.baseline)}'s best (training seconds)",
            "",
            _markdown_table(*ttt),
            "",
        ]
    if analysis.failed:
        lines += ["## Failed cells", ""]
        lines += [
            _markdown_table(
                ["cell", "method", "task", "fraction", "seed", "error"],
                [
                    [
                        c["cell_id"],
                        c["variant"],
                        c["task"],
                        f"{c['data_fraction']:g}",
                        str(c["seed"]),
                        (c["error"] or "").strip().splitlines()[0] if c["error"] else "",
                    ]
                    for c in analysis.failed
                ],
            ),
            "",
        ]
    lines += [
        f"Intervals: paired bootstrap over {_split(analysis)} examples, with seeds resampled too (multi-bootstrap, "
        "Sellam et al. 2022); Δ in points (metric × 100). The HTML report (report.html) has the plots.",
        "",
    ]
    return "\n".join(lines)


def write_report(
    exp_dir: str | Path, out_dir: str | Path | None = None, include_stale: bool = False
) -> tuple[Path, Path]:
    """Write report.html and report.md (into `out_dir`, default EXP_DIR); returns their paths."""
    from deltatune.errors import DeltatuneError

    exp_dir = Path(exp_dir)
    out = Path(out_dir) if out_dir is not None else exp_dir
    analysis = analyze(exp_dir, include_stale=include_stale)  # before any directory is made: EXP_DIR may be wrong
    html_path, markdown_path = out / REPORT_HTML, out / REPORT_MARKDOWN
    if not analysis.finished:
        raise DeltatuneError(f"{exp_dir} has no finished cells yet ({len(analysis.failed)} failed); nothing to report.")
    if out.exists() and not out.is_dir():
        raise DeltatuneError(f"--out {out} is a file, not a directory. Give a directory for report.html and report.md.")
    pages = ((html_path, render_html(analysis)), (markdown_path, render_markdown(analysis)))
    try:
        out.mkdir(parents=True, exist_ok=True)
        for path, text in pages:
            temporary = path.with_suffix(path.suffix + ".tmp")
            try:
                temporary.write_text(text, encoding="utf-8")
                temporary.replace(path)
            finally:
                temporary.unlink(missing_ok=True)
    except OSError as error:
        raise DeltatuneError(
            f"Cannot write the report into {out}: {error.strerror or error}. Give a directory you "
            "can write to (--out DIR)."
        ) from None
    return html_path, markdown_path


__all__ = ["write_report", "render_html", "render_markdown", "REPORT_HTML", "REPORT_MARKDOWN"]
