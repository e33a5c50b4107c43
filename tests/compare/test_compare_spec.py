"""Grid specs: expansion, every problem reported at once, stable cell identities, presets, the CLI front."""

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import make_sentiment_rows, save_tiny_model_dir
from deltatune.cli import main
from deltatune.compare.presets import estimate_seconds, preset_spec
from deltatune.compare.spec import parse_method_flag, parse_spec, read_spec_file, spec_from_flags
from deltatune.errors import DeltatuneError


@pytest.fixture
def workspace(tmp_path):
    save_tiny_model_dir(tmp_path / "tiny-bert", "bert")
    with open(tmp_path / "toy.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(make_sentiment_rows(40))
    return tmp_path


def write_spec(directory, text: str, name: str = "grid.yaml"):
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


GRID = """
    title: a small grid
    models: [tiny-bert]
    tasks:
      - stsb
      - {name: toy, path: toy.csv, text_fields: [text]}
    methods:
      - full
      - bitfit
      - {name: lora-r4, method: lora, config: {r: 4}}
      - {name: lora-r16, method: lora, config: {r: 16, alpha: 32}}
    fractions: [0.1, 0.5, 1.0]
    time_budgets: [null, 60]
    seeds: [0, 1]
    train: {epochs: 2, batch_size: 16}
"""


def test_a_spec_expands_to_the_cross_product_seed_first(workspace):
    spec = parse_spec(read_spec_file(write_spec(workspace, GRID)))
    assert len(spec.cells) == 2 * 4 * 3 * 2 * 2  # tasks × methods × fractions × budgets × seeds
    assert len({cell.cell_id for cell in spec.cells}) == len(spec.cells)
    assert [m.name for m in spec.methods] == ["full", "bitfit", "lora-r4", "lora-r16"]
    assert spec.baseline == "full" and spec.keep_deltas is False
    # all of seed 0 comes first, so the first half of a grid already compares every method
    assert {cell.seed for cell in spec.cells[: len(spec.cells) // 2]} == {0}
    lora16 = next(c for c in spec.cells if c.method.name == "lora-r16")
    assert lora16.method.resolved_config["r"] == 16 and lora16.method.resolved_config["alpha"] == 32.0
    toy = next(c for c in spec.cells if c.task.name == "toy")
    assert toy.task.data["path"] == str((workspace / "toy.csv").resolve()) and toy.task.data_sha256
    assert toy.model == str((workspace / "tiny-bert").resolve())


def test_every_problem_is_reported_at_once(workspace):
    path = write_spec(
        workspace,
        """
        modles: [tiny-bert]
        models: [minilm-l7, ./no/such/dir]
        tasks: [stbs, {name: mine, path: missing.csv, text_fields: [text]}]
        methods: [lroa, {name: lora-x, method: lora, config: {rank: 4}}]
        fractions: [0.5, 1.5]
        time_budgets: [-3]
        seeds: [zero]
        train: {epoch: 2, seed: 3}
        baseline: fulll
        keep_deltas: maybe
    """,
    )
    with pytest.raises(DeltatuneError) as caught:
        parse_spec(read_spec_file(path))
    message = str(caught.value)
    for expected in (
        "unknown key 'modles'",
        "Did you mean 'models'",
        "unknown model 'minilm-l7'",
        "minilm-l6",
        "no/such/dir",
        "unknown task 'stbs'",
        "'stsb'",
        "missing.csv",
        "unknown method 'lroa'",
        "lora-x",
        "method.rank",
        "fractions[1]=1.5",
        "time_budgets[0]=-3",
        "seeds[0]='zero'",
        "train.epoch",
        "train.seed is a grid axis",
        "baseline='fulll'",
        "keep_deltas='maybe'",
        "nothing was run",
    ):
        assert expected in message, f"{expected!r} missing from:\n{message}"


def test_cell_identity_is_stable_and_means_settings(workspace):
    path = write_spec(workspace, GRID)
    first = parse_spec(read_spec_file(path))
    again = parse_spec(read_spec_file(path))
    assert [c.cell_id for c in first.cells] == [c.cell_id for c in again.cells]

    # order of keys and lists, a renamed variant, and defaults written out change nothing
    reordered = write_spec(
        workspace,
        name="reordered.yaml",
        text="""
        seeds: [1, 0]
        train: {batch_size: 16, epochs: 2.0}
        time_budgets: [60, null]
        fractions: [1.0, 0.5, 0.1]
        methods:
          - {name: lora-big, method: lora, config: {alpha: 32, r: 16}}
          - {name: lora-r4, method: lora, config: {r: 4, alpha: 16.0}}
          - bitfit
          - full
        tasks:
          - {path: toy.csv, text_fields: [text], name: toy}
          - stsb
        models: [tiny-bert]
    """,
    )
    assert {c.cell_id for c in parse_spec(read_spec_file(reordered)).cells} == {c.cell_id for c in first.cells}

    # any change to what a cell computes changes its id
    changed = write_spec(workspace, GRID.replace("epochs: 2", "epochs: 3"), name="changed.yaml")
    assert not {c.cell_id for c in parse_spec(read_spec_file(changed)).cells} & {c.cell_id for c in first.cells}
    (workspace / "toy.csv").write_text((workspace / "toy.csv").read_text() + "a good film,positive\n")
    edited = parse_spec(read_spec_file(path))
    toy_ids = lambda spec: {c.cell_id for c in spec.cells if c.task.name == "toy"}  # noqa: E731
    stsb_ids = lambda spec: {c.cell_id for c in spec.cells if c.task.name == "stsb"}  # noqa: E731
    assert not toy_ids(edited) & toy_ids(first) and stsb_ids(edited) == stsb_ids(first)

    # the same id in another process (no dependence on Python's per-process hash seed)
    code = (
        "import sys; from deltatune.compare.spec import parse_spec, read_spec_file; "
        "print(parse_spec(read_spec_file(sys.argv[1])).cells[0].cell_id)"
    )
    other = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert other.stdout.strip() == edited.cells[0].cell_id


def test_cli_flags_build_the_same_cells_as_yaml(workspace):
    from_yaml = parse_spec(
        read_spec_file(
            write_spec(
                workspace,
                """
        models: [tiny-bert]
        tasks: [stsb]
        methods: [full, {name: lora-r16, method: lora, config: {r: 16, alpha: 32}}]
        fractions: [0.5]
        seeds: [3]
        train: {epochs: 2}
    """,
            )
        )
    )
    from_flags = parse_spec(
        spec_from_flags(
            models=[str(workspace / "tiny-bert")],
            tasks=["stsb"],
            methods=["full", "lora-r16=lora:r=16,alpha=32"],
            fractions=[0.5],
            seeds=[3],
            train={"epochs": "2"},
        )
    )
    assert [c.cell_id for c in from_flags.cells] == [c.cell_id for c in from_yaml.cells]
    assert parse_method_flag("bitfit") == "bitfit"
    assert parse_method_flag("lora:r=4") == {"name": "lora", "method": "lora", "config": {"r": "4"}}


def test_sub_grids_are_unioned_and_shared_cells_run_once(workspace):
    spec = parse_spec(
        read_spec_file(
            write_spec(
                workspace,
                """
        models: [tiny-bert]
        tasks: [stsb]
        methods: [full, bitfit]
        seeds: [0]
        grids:
          - {name: data, fractions: [0.5, 1.0]}
          - {name: time, fractions: [1.0], time_budgets: [30, 90], train: {epochs: 50}}
          - {name: again, fractions: [1.0]}
    """,
            )
        )
    )
    assert len(spec.cells) == 2 * 2 + 2 * 2  # 'again' adds nothing new
    assert {c.grid for c in spec.cells} == {"data", "time"}
    assert {c.train["epochs"] for c in spec.cells if c.grid == "time"} == {50.0}


def test_two_names_for_the_same_settings_is_a_problem(workspace):
    with pytest.raises(DeltatuneError, match="resolve to the same settings"):
        parse_spec(
            read_spec_file(
                write_spec(
                    workspace,
                    """
            models: [tiny-bert]
            tasks: [stsb]
            methods: [lora, {name: lora-8, method: lora, config: {r: 8}}]
        """,
                )
            )
        )


def test_a_method_variant_can_carry_its_own_training_settings(workspace):
    spec = parse_spec(
        read_spec_file(
            write_spec(
                workspace,
                """
        models: [tiny-bert]
        tasks: [stsb]
        methods: [full, {name: full-fast, method: full, train: {learning_rate: 1e-4}}]
        train: {epochs: 2}
    """,
            )
        )
    )
    rates = {c.method.name: c.train["learning_rate"] for c in spec.cells}
    assert rates == {"full": None, "full-fast": 1e-4}
    assert {c.train["epochs"] for c in spec.cells} == {2.0}
    with pytest.raises(DeltatuneError, match=r"(?s)methods \(full-fast\): Invalid TrainConfig.*learning_rat"):
        parse_spec(
            read_spec_file(
                write_spec(
                    workspace,
                    """
            models: [tiny-bert]
            tasks: [stsb]
            methods: [{name: full-fast, method: full, train: {learning_rat: 1e-4}}]
        """,
                )
            )
        )


def test_a_task_can_carry_its_own_training_settings_under_the_methods(workspace):
    plain = parse_spec(
        read_spec_file(
            write_spec(
                workspace,
                """
        models: [tiny-bert]
        tasks: [stsb, {name: toy, path: toy.csv, text_fields: [text]}]
        methods: [full, {name: full-fast, method: full, train: {learning_rate: 1e-4}}]
        train: {epochs: 2, min_steps: 10}
    """,
            )
        )
    )
    spec = parse_spec(
        read_spec_file(
            write_spec(
                workspace,
                """
        models: [tiny-bert]
        tasks: [stsb, {name: toy, path: toy.csv, text_fields: [text], train: {min_steps: 50, learning_rate: 3e-5}}]
        methods: [full, {name: full-fast, method: full, train: {learning_rate: 1e-4}}]
        train: {epochs: 2, min_steps: 10}
    """,
            )
        )
    )
    settings = {(c.task.name, c.method.name): (c.train["min_steps"], c.train["learning_rate"]) for c in spec.cells}
    # the task's settings go over the grid's, a method variant's over the task's
    assert settings == {
        ("stsb", "full"): (10, None),
        ("stsb", "full-fast"): (10, 1e-4),
        ("toy", "full"): (50, 3e-5),
        ("toy", "full-fast"): (50, 1e-4),
    }
    # a task without settings of its own keeps its cells' identities: a stored grid resumes them
    before = {(c.task.name, c.method.name): c.cell_id for c in plain.cells}
    after = {(c.task.name, c.method.name): c.cell_id for c in spec.cells}
    assert [key for key in after if after[key] == before[key]] == [("stsb", "full"), ("stsb", "full-fast")]
    with pytest.raises(DeltatuneError) as caught:
        parse_spec(
            read_spec_file(
                write_spec(
                    workspace,
                    """
            models: [tiny-bert]
            tasks: [{task: stsb, train: {min_step: 5}}, {task: sst2, train: 7}]
            methods: [full]
        """,
                )
            )
        )
    message = str(caught.value)
    assert "tasks (stsb): Invalid TrainConfig" in message and "min_step" in message
    assert "tasks[1] (sst2): train must be a mapping" in message and "not 7" in message


def test_presets_are_valid_at_every_size():
    for size, cells in (("demo", 3 * 2), ("small", 4 * 3 * 2 * 3), ("full", 4 * 5 * 3 * (4 + 3))):
        spec = parse_spec(preset_spec("doering2024", size))
        assert len(spec.cells) == cells
        assert spec.baseline == "full"
    # the small size reads 500 dev examples at each evaluation, the demo all of dev; their estimates are the
    # minutes and the hours their docs promise, and reading part of dev is estimated to cost less
    for size, limit, evaluated in (("demo", 12 * 60, None), ("small", 150 * 60, 500)):
        spec = parse_spec(preset_spec("doering2024", size))
        assert {cell.payload()["train"].get("eval_examples") for cell in spec.cells} == {evaluated}
        assert estimate_seconds(spec) < limit
    # the small size's classification tasks train at least 250 steps, STS-B keeps the demo's budget
    small = parse_spec(preset_spec("doering2024", "small"))
    assert {(c.task.name, c.train["min_steps"]) for c in small.cells} == {
        ("stsb", 80),
        ("rotten-tomatoes", 250),
        ("sms-spam", 250),
        ("snli", 250),
    }
    whole_dev = preset_spec("doering2024", "small")
    whole_dev["train"]["eval_examples"] = None
    assert estimate_seconds(parse_spec(whole_dev)) > estimate_seconds(parse_spec(preset_spec("doering2024", "small")))
    full = parse_spec(preset_spec("doering2024", "full"))
    assert {m.name for m in full.methods} == {"full", "bitfit", "houlsby", "pfeiffer", "lora"}
    assert {t.name: t.max_train_examples for t in full.tasks}["snli"] == 5000
    with pytest.raises(DeltatuneError, match="Did you mean 'demo'"):
        preset_spec("doering2024", "dmeo")


def test_cli_dry_run_and_invalid_specs_run_nothing(workspace, capsys):
    assert main(["compare", "--preset", "doering2024", "--size", "demo", "--dry-run"]) == 0
    output = capsys.readouterr().out
    assert "6 cells" in output and "lora on stsb" in output
    out = workspace / "experiment"
    bad = write_spec(workspace, "models: [tiny-bert]\ntasks: [stbs]\nmethods: [lroa]\n")
    assert main(["compare", str(bad), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "unknown task 'stbs'" in error and "unknown method 'lroa'" in error
    assert not out.exists()
    assert main(["compare", "--preset", "doering2024", "--size", "demo", "--seeds", "0", "1", "--print-spec"]) == 0
    assert "seeds:\n- 0\n- 1" in capsys.readouterr().out
    # a setting several task entries share is written out at each: a spec to start from, without YAML anchors
    assert main(["compare", "--preset", "doering2024", "--size", "small", "--print-spec"]) == 0
    printed = capsys.readouterr().out
    assert "&" not in printed and printed.count("min_steps: 250") == 3
    assert json.loads(json.dumps(preset_spec("doering2024", "demo")))  # presets are plain data


def test_baselines_and_the_learning_rate_search_in_a_spec(workspace):
    spec = parse_spec(
        read_spec_file(
            write_spec(
                workspace,
                GRID
                + """
    lr_search: auto
    baselines: [majority, embedding-cosine, few-shot]
    """,
            )
        )
    )
    # lr_search at the top is short for train: {lr_search: ...}, so it is part of every cell's identity
    assert all(cell.train["lr_search"] == "auto" for cell in spec.cells)
    assert spec.baselines == ("majority", "embedding-cosine", "few-shot")
    rows = {(c.task.name, c.baseline, c.seed) for c in spec.baseline_cells}
    # embedding-cosine scores similarity pairs only (stsb, not the one-text toy task); few-shot runs once per seed
    assert rows == {
        ("stsb", "majority", 0),
        ("toy", "majority", 0),
        ("stsb", "embedding-cosine", 0),
        ("stsb", "few-shot", 0),
        ("stsb", "few-shot", 1),
        ("toy", "few-shot", 0),
        ("toy", "few-shot", 1),
    }
    assert len({c.cell_id for c in spec.every_cell}) == len(spec.cells) + 7
    again = parse_spec(read_spec_file(write_spec(workspace, GRID + "    baselines: [majority]\n", "again.yaml")))
    assert {c.cell_id for c in again.baseline_cells} <= {c.cell_id for c in spec.baseline_cells}
    with pytest.raises(DeltatuneError, match="unknown baseline 'majorty'.*Did you mean 'majority'"):
        parse_spec(read_spec_file(write_spec(workspace, GRID + "    baselines: [majorty]\n", "bad.yaml")))
    with pytest.raises(DeltatuneError, match="lr_search"):
        parse_spec(read_spec_file(write_spec(workspace, GRID + "    lr_search: [0]\n", "bad2.yaml")))


def test_new_train_fields_at_their_defaults_leave_stored_cells_alone():
    # the demo preset's cells as stored before eval_examples and regression_loss existed (a changed preset
    # changes these on purpose); a TrainConfig field added since must stay out of the identity at its default
    # (`LATER_FIELD_DEFAULTS`), or every stored experiment would train again on resume
    demo = parse_spec(preset_spec("doering2024", "demo"))
    assert [cell.cell_id for cell in demo.cells[:3]] == ["64e81dc424fde2b1", "71c907a3c45bc0bf", "efa04515019c00bb"]
    # away from its default the field is part of the identity
    small = preset_spec("doering2024", "small")
    whole_dev = preset_spec("doering2024", "small")
    whole_dev["train"]["eval_examples"] = None
    assert not {c.cell_id for c in parse_spec(small).cells} & {c.cell_id for c in parse_spec(whole_dev).cells}
