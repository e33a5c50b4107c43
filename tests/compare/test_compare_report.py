"""Summary statistics, exports and the report, on a synthetic experiment with a known answer (no training)."""

import csv
import io
import os
import re
import shutil

import numpy as np
import pytest
from compare_fakes import EXPECTED_PLOTS, build_fake_experiment

from deltatune.cli import main
from deltatune.compare.browser import check_page, find_chromium
from deltatune.compare.report import write_report
from deltatune.compare.results import BRIEF_COLUMNS, export_results
from deltatune.compare.summary import analyze, claims
from deltatune.errors import DeltatuneError


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return build_fake_experiment(tmp_path_factory.mktemp("fake") / "experiment")


@pytest.fixture(scope="module")
def report(experiment):
    return write_report(experiment)


def test_analysis_finds_the_planted_differences(experiment):
    analysis = analyze(experiment)
    assert len(analysis.finished) == 92 and len(analysis.failed) == 1
    assert analysis.tasks == ["alpha", "beta"]
    # the data sweep comes before the time budgets
    assert [(g.key.data_fraction, g.key.time_budget_s) for g in analysis.groups_for("alpha")] == [
        (0.1, None),
        (0.5, None),
        (1.0, None),
        (1.0, 5.0),
        (1.0, 20.0),
    ]
    dev_gaps = []
    for group in analysis.groups:
        bitfit, lora = group.variants["bitfit"], group.variants["lora"]
        # verdicts read test, where bitfit is worse; on dev it is as good as full
        assert bitfit.split == "test" and bitfit.verdict.startswith("worse by") and not bitfit.matches
        assert bitfit.mean < group.variants["full"].mean - 0.06
        dev_gaps.append(np.mean(group.variants["full"].dev_values) - np.mean(bitfit.dev_values))
        assert not lora.verdict.startswith("worse"), (group.key, lora.verdict)
        assert group.variants["full"].comparison is None and len(bitfit.values) == 3
        # the no-training row of the task sits in every group, compared on the same test examples
        untrained = group.variants["majority" if group.key.task == "alpha" else "embedding-cosine"]
        assert untrained.kind == "baseline" and untrained.comparison is not None
        assert bitfit.untrained == untrained.variant and bitfit.versus_untrained is not None
    assert abs(np.mean(dev_gaps)) < 0.02
    # far behind but still rising: inconclusive, not 'worse by'
    unconverged = analysis.groups_for("beta")[0].variants["lora"]
    assert unconverged.comparison.high < 0 and unconverged.inconclusive
    assert unconverged.verdict == "inconclusive: not converged after 50 steps"
    areas = {(a.task, a.variant, a.time_budget_s): a for a in analysis.areas}
    assert areas[("alpha", "bitfit", None)].difference < -0.05 and areas[("alpha", "full", None)].difference is None
    assert areas[("alpha", "full", None)].fractions == [0.1, 0.5, 1.0]
    assert ("alpha", "majority", None) not in areas
    largest = analysis.groups_for("alpha")[2]
    assert largest.target == pytest.approx(0.95 * np.mean(largest.variants["full"].dev_values))
    sentences = claims(analysis)
    bitfit_data = next(s for s in sentences if s.startswith("**bitfit**") and "data amounts" in s)
    assert "did not hold on alpha at 10% of the data (worse by" in bitfit_data and "held on" not in bitfit_data
    lora_data = next(s for s in sentences if s.startswith("**lora**") and "data amounts" in s)
    assert "inconclusive on 1" in lora_data and "beta at 10% of the data (not converged after 50 steps)" in lora_data
    assert "beta at 10% of the data (worse" not in lora_data
    assert any(s.startswith("**lora**") and "time budgets" in s for s in sentences)
    nothing = next(s for s in sentences if s.startswith("**Doing nothing**: embedding-cosine"))
    assert "full beat it under" in nothing and "not on beta at 10% of the data" in nothing


def test_the_html_report_is_self_contained_and_has_every_plot(report):
    html_path, markdown_path = report
    html = html_path.read_text(encoding="utf-8")
    assert set(re.findall(r'data-plot="([^"]+)"', html)) == EXPECTED_PLOTS
    for forbidden in ("http://", "https://", "<script", "<link", "<img", "src=", "@import", "url("):
        assert forbidden not in html, forbidden
    assert "Synthetic comparison" in html and "worse by" in html and "Failed cells" in html
    assert "SIGKILL" in html  # the failed cell's error is shown
    markdown = markdown_path.read_text(encoding="utf-8")
    assert markdown.startswith("# Synthetic comparison")
    assert "## Claims checked" in markdown and "| 10% of the data | bitfit | 3 |" in markdown
    assert "## Area under the data-fraction curve" in markdown and "## Failed cells" in markdown


def test_exports_in_every_format(experiment, tmp_path):
    rows = list(csv.DictReader(io.StringIO(export_results(experiment, "csv"))))
    assert len(rows) == 93 and {
        "dev_accuracy",
        "test_accuracy",
        "dev_pearson",
        "primary_value",
        "dev_value",
        "evaluation_split",
        "learning_rate",
        "converged",
        "kind",
        "peak_memory_bytes",
        "delta_bytes",
        "train_time_s",
        "method_config",
        "error",
    } <= set(rows[0])
    assert sum(row["status"] == "failed" for row in rows) == 1 and sum(row["kind"] == "baseline" for row in rows) == 2
    first = rows[0]  # the reported value is the test one; dev stays beside it
    assert first["evaluation_split"] == "test" and first["primary_value"] == first["test_accuracy"]
    assert first["dev_value"] == first["dev_accuracy"] != first["test_accuracy"]
    markdown = export_results(experiment, "markdown")
    assert markdown.splitlines()[0].startswith("| cell_id | status |") and len(markdown.splitlines()) == 95
    curves = list(csv.DictReader(io.StringIO(export_results(experiment, "csv", table="curves"))))
    assert len(curves) == 90 * 5 and curves[0]["train_time_s"]
    import pyarrow.parquet as pq

    export_results(experiment, "parquet", tmp_path / "cells.parquet")
    table = pq.read_table(tmp_path / "cells.parquet")
    assert table.num_rows == 93 and "primary_value" in table.column_names
    with pytest.raises(DeltatuneError, match="--out FILE.parquet"):
        export_results(experiment, "parquet")
    with pytest.raises(DeltatuneError, match="not one of csv, parquet, markdown"):
        export_results(experiment, "xlsx")


def test_export_keeps_chosen_columns(experiment):
    brief = export_results(experiment, "markdown", columns="brief").splitlines()
    assert brief[0] == "| " + " | ".join(BRIEF_COLUMNS) + " |" and len(brief) == 95
    chosen = list(csv.DictReader(io.StringIO(export_results(experiment, "csv", columns="method,primary_value"))))
    assert list(chosen[0]) == ["method", "primary_value"] and len(chosen) == 93
    with pytest.raises(DeltatuneError, match="no column 'pearsn'.*dev_pearson"):
        export_results(experiment, "csv", columns="method,pearsn")


def test_results_and_report_commands(experiment, tmp_path, capsys):
    assert main(["results", str(experiment), "--format", "markdown"]) == 0
    assert "| cell_id |" in capsys.readouterr().out
    assert main(["report", str(experiment), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "report.md").is_file()
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    assert "holds no results" in capsys.readouterr().err


@pytest.mark.skipif(
    find_chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium); CI installs it"
)
def test_the_report_renders_in_a_real_browser_without_errors(report, tmp_path):
    html_path, _ = report
    screenshot = tmp_path / "report.png"
    check = check_page(html_path, screenshot=screenshot, window=(1280, 2400))
    assert check.errors == []
    assert check.title == "Synthetic comparison" and check.tables >= 5
    assert {plot["name"] for plot in check.plots} == EXPECTED_PLOTS
    for plot in check.plots:  # each chart really laid out and drew something
        assert plot["width"] > 300 and plot["height"] > 150 and plot["marks"] > 5, plot
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
    keep = os.environ.get("DELTATUNE_SCREENSHOT_DIR")
    if keep:  # to look at it: DELTATUNE_SCREENSHOT_DIR=docs/results pytest tests/compare -k browser
        shutil.copy(screenshot, os.path.join(keep, "report-synthetic.png"))


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_the_browser_check_catches_errors_and_network_loads(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><title>broken</title></head><body>"
        '<img src="https://example.invalid/x.png"><script>undefinedFunction();</script></body></html>'
    )
    check = check_page(page)
    assert any("undefinedFunction" in error for error in check.errors), check.errors
    assert any("failed to load" in error for error in check.errors), check.errors
    assert check.plots == []


def test_cells_from_different_code_versions_are_flagged(experiment):
    from deltatune.compare.report import _versions

    analysis = analyze(experiment)
    assert "WARNING" not in _versions(analysis) and "git 0123456789" in _versions(analysis)
    analysis.finished[0]["record"] = {
        **analysis.finished[0]["record"],
        "git": {"commit": "fedcba9876543210", "dirty": True},
    }
    assert "WARNING: the cells ran on 2 different versions" in _versions(analysis)


def test_a_tie_between_models_that_predict_one_class_is_no_evidence(experiment, tmp_path):
    """full and bitfit both answer one class everywhere at 10%: that cell must not count as 'held'."""
    from safetensors.numpy import load_file, save_file

    from deltatune.compare.summary import analyze, claims

    experiment = shutil.copytree(experiment, tmp_path / "copy")  # the fixture is shared: change a copy

    for variant in ("full", "bitfit"):
        for seed in (0, 1, 2):
            path = experiment / "cells" / f"alpha-{variant}-0.1-0-{seed}" / "test_outputs.safetensors"
            tensors = load_file(str(path))
            constant = np.zeros_like(tensors["outputs"])
            constant[:, 1] = 1.0
            save_file({"outputs": constant, "labels": tensors["labels"]}, str(path))
    analysis = analyze(experiment)
    (group,) = [
        g
        for g in analysis.groups
        if g.key.task == "alpha" and g.key.data_fraction == 0.1 and g.key.time_budget_s is None
    ]
    bitfit, lora = group.variants["bitfit"], group.variants["lora"]
    assert bitfit.degenerate and bitfit.matches is None and bitfit.verdict.startswith("uninformative")
    assert not lora.degenerate  # lora still learned: better than a one-class baseline, and counted
    sentence = next(c for c in claims(analysis) if c.startswith("**bitfit**") and "data amounts" in c)
    assert "no evidence either way on alpha at 10% of the data" in sentence
    assert "held on alpha at 10%" not in sentence and "alpha at 10% of the data (worse" not in sentence


def test_markdown_export_keeps_small_learning_rates_readable():
    from deltatune.compare.results import _markdown_value

    assert [_markdown_value(v) for v in (5e-05, 0.0001, 0.003, 0.8529, 0.0, 12345.6)] == [
        "5e-05",
        "0.0001",
        "0.003",
        "0.8529",
        "0.0000",
        "12346",
    ]


def test_the_report_says_which_part_of_dev_chose_the_checkpoints(experiment):
    from deltatune.compare.report import _evaluation_fact

    analysis = analyze(experiment)
    assert "chosen on dev;" in _evaluation_fact(analysis)
    first = analysis.finished[0]["record"]
    analysis.finished[0]["record"] = {
        **first,
        "train_config": {**(first.get("train_config") or {}), "eval_examples": 500},
    }
    fact = _evaluation_fact(analysis)
    assert "chosen on a fixed stratified 500 examples of dev" in fact and "all of dev" in fact


def test_the_report_marks_a_rate_chosen_at_an_end_of_its_range(experiment):
    from deltatune.compare.report import _search_note, _search_table

    analysis = analyze(experiment)
    searched = [cell for cell in analysis.finished if (cell.get("record") or {}).get("lr_search")]
    # every fake cell searches (0.001, 0.01) and keeps 0.001, the lowest
    assert {row[5] for row in _search_table(analysis)[1]} == {"0.001 (lowest candidate)"}
    assert f"{len(searched)} of {len(searched)} searches chose the lowest or the highest" in _search_note(analysis)
    caveat = "its learning rate was the lowest candidate searched, so it may do better outside the range"
    bitfit = next(s for s in claims(analysis) if s.startswith("**bitfit**") and "data amounts" in s)
    assert "(worse by" in bitfit and caveat in bitfit  # a method found worse may have been held back by its range
    for cell in searched:  # a third candidate below: 0.001 is now inside the range
        search = cell["record"]["lr_search"]
        lower = {**search["candidates"][1], "learning_rate": 1e-4, "stopped_at_rung": 0}
        cell["record"] = {**cell["record"], "lr_search": {**search, "candidates": [lower, *search["candidates"]]}}
    assert {row[5] for row in _search_table(analysis)[1]} == {"0.001"}
    assert "may lie outside" not in _search_note(analysis)
    assert not any("candidate searched" in sentence for sentence in claims(analysis))


def test_the_report_gives_each_tasks_training_budget(experiment):
    from deltatune.compare.report import _budget_fact

    analysis = analyze(experiment)
    # the fake grid's two sub-grids train 3 and 50 epochs: each task of each
    assert _budget_fact(analysis) == "alpha (data), beta (data): batch 32, at most 3 epochs; " + (
        "alpha (time), beta (time): batch 32, at most 50 epochs"
    )
    analysis.finished = [cell for cell in analysis.finished if cell.get("grid") == "data"]
    assert _budget_fact(analysis) == "batch 32, at most 3 epochs"  # one budget for every task: said once
    for cell in analysis.finished:
        if cell["task"] == "beta":
            cell["settings"] = {**cell["settings"], "train": {"batch_size": 16, "min_steps": 250, "eval_every": 25}}
    assert _budget_fact(analysis) == "alpha: batch 32, at most 3 epochs; beta: batch 16, at least 250 steps, " + (
        "dev every 25 steps"
    )


def test_a_stored_cell_is_judged_converged_by_the_current_rule():
    from deltatune.compare.summary import judged_convergence

    # recorded as converged by the rule before (its last evaluation was not its best), though it still climbs
    cell = {"kind": "train", "primary_metric": "accuracy", "converged": 1, "record": {"train_config": {}}}
    curve = [{"metrics": {"accuracy": value}} for value in (0.418, 0.438, 0.504, 0.518, 0.5)]
    assert judged_convergence(cell, curve) is False
    assert judged_convergence(cell, [{"metrics": {"accuracy": v}} for v in (0.4, 0.52, 0.518, 0.519)]) is True
    assert judged_convergence({**cell, "kind": "baseline"}, curve) is None and judged_convergence(cell, []) is None
