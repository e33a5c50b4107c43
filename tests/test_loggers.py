"""`--report-to tensorboard,mlflow`: the scalars a tiny run writes, read back from the stores themselves."""

import importlib.util
import json

import pytest
import torch

from conftest import build_tiny_model, build_tokenizer
from deltatune.config import build_config
from deltatune.errors import DeltatuneError
from deltatune.methods import build_method, prepare_model
from deltatune.training import TrainConfig, _lr_factor, plan_steps, train
from test_training import SENTIMENT, sentiment_splits

needs_logging_extra = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None or importlib.util.find_spec("mlflow") is None,
    reason="the logging extra is not installed",
)


def tiny_run(**config):
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model("bert"), build_tokenizer()
    method = build_method("lora")
    prepare_model(model, method)
    train_split, dev_split = sentiment_splits(n_train=64, n_dev=24)
    test_split = sentiment_splits(n_train=1, n_dev=16)[1]
    settings = dict(epochs=2, batch_size=16, learning_rate=3e-3, quiet=True, seed=3, eval_every=2)
    settings.update(config)
    result = train(
        model, tokenizer, SENTIMENT, train_split, dev_split, method, TrainConfig(**settings), test_split=test_split
    )
    return model, result


def scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = (log_dir / "tensorboard").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@needs_logging_extra
def test_tensorboard_holds_every_step_and_evaluation_and_the_loggers_change_nothing_trained(tmp_path):
    plain_model, plain = tiny_run()
    logged_model, result = tiny_run(report_to=("tensorboard", "mlflow"), log_dir=str(tmp_path))
    for (name, a), (_, b) in zip(plain_model.state_dict().items(), logged_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert [(p["step"], p["metrics"]) for p in plain.learning_curve] == [
        (p["step"], p["metrics"]) for p in result.learning_curve
    ]

    written = scalars(tmp_path)
    assert [step for step, _ in written["train/loss"]] == list(range(1, result.steps + 1))
    plan = plan_steps(64, TrainConfig(epochs=2, batch_size=16))
    expected_rates = [
        3e-3 * _lr_factor(step, plan.warmup_steps, plan.planned_steps, "linear") for step in range(result.steps)
    ]
    assert [value for _, value in written["train/learning_rate"]] == pytest.approx(expected_rates, rel=1e-6)
    assert all(value > 0 for _, value in written["train/examples_per_s"])
    assert written["dev/accuracy"] == [
        (point["step"], pytest.approx(point["metrics"]["accuracy"], abs=1e-6)) for point in result.learning_curve
    ]
    assert written["test/f1"] == [(result.steps, pytest.approx(result.test_metrics["f1"], abs=1e-6))]


@needs_logging_extra
def test_mlflow_file_store_holds_the_run_metrics(tmp_path):
    from mlflow.tracking import MlflowClient

    _, result = tiny_run(report_to=("mlflow",), log_dir=str(tmp_path), epochs=1)
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("deltatune").experiment_id])
    assert run.info.run_name.startswith("toy-sentiment-lora-lr0.003-seed3")
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "dev/accuracy")
    assert [(m.step, m.value) for m in history] == [
        (point["step"], pytest.approx(point["metrics"]["accuracy"], abs=1e-9)) for point in result.learning_curve
    ]
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, result.steps + 1))
    test = client.get_metric_history(run.info.run_id, "test/accuracy")
    assert [m.value for m in test] == [pytest.approx(result.test_metrics["accuracy"])]


def test_report_to_parses_from_the_command_line_and_refuses_unknown_loggers():
    config = build_config(TrainConfig, {"report_to": "tensorboard,mlflow"}, prefix="--")
    assert config.report_to == ("tensorboard", "mlflow")
    with pytest.raises(DeltatuneError, match="report-to='wandb'.*tensorboard"):
        build_config(TrainConfig, {"report-to": "wandb"}, prefix="--")


def test_a_missing_logger_package_names_the_extra_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(DeltatuneError, match=r"report_to=mlflow needs the mlflow package.*deltatune\[logging\]"):
        TrainConfig(report_to=("mlflow",))


@needs_logging_extra
def test_the_command_line_reports_to_tensorboard_outside_the_run_directory(tmp_path, capsys):
    from conftest import make_sentiment_rows, save_tiny_model_dir
    from deltatune.cli import main
    from test_cli import train_args, write_csv

    model_dir = save_tiny_model_dir(tmp_path / "tiny-bert", "bert")
    data = write_csv(tmp_path / "reviews.csv", make_sentiment_rows(80))
    out, logs = tmp_path / "run", tmp_path / "logs"
    assert (
        main(train_args(model_dir, data, out, "--epochs", "1", "--report-to", "tensorboard", "--log-dir", str(logs)))
        == 0
    )
    record = json.loads((out / "run.json").read_text())
    assert record["train_config"]["report_to"] == ["tensorboard"]
    assert [step for step, _ in scalars(logs)["train/loss"]] == list(range(1, record["steps"] + 1))
    assert not (out / "logs").exists()

    assert main(train_args(model_dir, data, tmp_path / "other", "--report-to", "wandb")) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_a_compare_spec_passes_report_to_to_its_cells_without_changing_their_identity(tmp_path):
    from conftest import make_sentiment_rows, save_tiny_model_dir
    from deltatune.compare.spec import parse_spec, read_spec_file, train_config_for
    from test_cli import write_csv

    save_tiny_model_dir(tmp_path / "tiny-bert", "bert")
    write_csv(tmp_path / "toy.csv", make_sentiment_rows(40))

    def cells(train: str):
        path = tmp_path / "grid.yaml"
        path.write_text(
            "models: [tiny-bert]\ntasks: [{name: toy, path: toy.csv, text_fields: [text]}]\n"
            f"methods: [bitfit]\ntrain: {train}\n",
            encoding="utf-8",
        )
        return parse_spec(read_spec_file(path)).cells

    (plain,), (logged,) = cells("{epochs: 1}"), cells("{epochs: 1, report_to: [tensorboard], log_dir: logs}")
    assert plain.cell_id == logged.cell_id
    payload = {"train": logged.train, "data_fraction": 1.0, "seed": logged.seed, "time_budget_s": None}
    config = train_config_for(payload)
    assert config.report_to == ("tensorboard",) and config.log_dir == "logs"


@needs_logging_extra
@pytest.mark.parametrize("lr_search", [None, (1e-3, 3e-3)], ids=["one-rate", "rate-search"])
def test_an_interrupted_run_closes_its_loggers_and_marks_the_mlflow_run_failed(tmp_path, monkeypatch, lr_search):
    """Ctrl-C in the middle of training: every logger is closed (no MLflow run left RUNNING), the error still
    reaches the caller, and the model's training-time changes are undone."""
    from mlflow.tracking import MlflowClient

    from deltatune import run as run_module
    from deltatune.training import Trainer

    steps = []
    original = Trainer._step

    def interrupted_step(self):
        steps.append(self.learning_rate)
        if len(steps) == 3:
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(Trainer, "_step", interrupted_step)
    closed = []
    original_close = Trainer.close
    monkeypatch.setattr(
        Trainer, "close", lambda self, failed=False: closed.append(failed) or original_close(self, failed)
    )
    with pytest.raises(KeyboardInterrupt):
        if lr_search is None:
            tiny_run(report_to=("mlflow", "tensorboard"), log_dir=str(tmp_path), epochs=1)
        else:  # the search builds one trainer per rate through the run path
            torch.manual_seed(0)
            model, tokenizer = build_tiny_model("bert"), build_tokenizer()
            train_split, dev_split = sentiment_splits(n_train=64, n_dev=24)
            prepared = run_module.prepare_data(
                model,
                tokenizer,
                SENTIMENT,
                train_split,
                dev_split,
                None,
                TrainConfig(batch_size=16, quiet=True, seed=3),
            )
            config = TrainConfig(
                epochs=1,
                batch_size=16,
                quiet=True,
                seed=3,
                eval_every=2,
                lr_search=lr_search,
                report_to=("mlflow",),
                log_dir=str(tmp_path),
            )
            run_module._train(model, tokenizer, SENTIMENT, prepared, "lora", {}, build_method("lora"), config, None)
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("deltatune").experiment_id])
    assert len(runs) == (1 if lr_search is None else 2)
    statuses = sorted(run.info.status for run in runs)
    # nothing left RUNNING; the interrupted trainer FAILED (a rate the search had already stopped FINISHED)
    assert "RUNNING" not in statuses and "FAILED" in statuses, statuses
    assert True in closed
