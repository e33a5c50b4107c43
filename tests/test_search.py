"""The learning-rate search: successive halving on dev, and a survivor that trains exactly as a single run."""

import dataclasses
import math

import pytest

from deltatune.search import (
    edge_note,
    learning_rate_candidates,
    rate_at_edge,
    search_cost,
    successive_halving,
    widened_range,
)
from deltatune.training import TrainConfig
from test_run import local  # noqa: F401 - the fixture: a tiny BERT directory and a toy CSV


class ScriptedTrainer:
    """A stand-in for `Trainer`: its dev score at each step is given, so the ranking is known."""

    class Best:
        value, step = -math.inf, 0

    class Data:
        rung_dev = list(range(500))

    def __init__(
        self, scores_by_step: dict[int, float], planned_steps: int = 80, diverges_at: int | None = None
    ) -> None:
        self.scores, self.planned, self.diverges_at = scores_by_step, planned_steps, diverges_at
        self.best, self.data, self.step, self.train_time = self.Best(), self.Data(), 0, 0.0
        self.stopped_by, self.closed, self.diverged = None, False, None

    def advance(self, until: float = 1.0) -> None:
        if self.diverged is not None:
            return
        self.step = round(until * self.planned)
        if self.diverges_at is not None and self.step >= self.diverges_at:  # stopped before that step
            self.step, self.stopped_by = self.diverges_at - 1, "diverged"
            self.diverged = f"Training diverged at step {self.diverges_at}"
        self.train_time = self.step / 10
        self.best.value = max(value for step, value in self.scores.items() if step <= self.step)
        if until >= 1.0:
            self.stopped_by = "epochs"

    def rung_score(self) -> float:
        return self.scores[self.step]

    def close(self) -> None:
        self.closed = True


def test_successive_halving_stops_the_losers_at_their_rung_and_keeps_the_best():
    # rate 3 starts slow but ends best; rate 4 leads at the first rung and fades; rates 1 and 2 are poor
    scripts = {
        1.0: {10: 0.1, 20: 0.2, 80: 0.3},
        2.0: {10: 0.2, 20: 0.3, 80: 0.4},
        3.0: {10: 0.5, 20: 0.7, 80: 0.9},
        4.0: {10: 0.6, 20: 0.65, 80: 0.7},
    }
    trainers = {rate: ScriptedTrainer(script) for rate, script in scripts.items()}
    result = successive_halving(trainers.__getitem__, list(scripts), (0.125, 0.25), "accuracy")
    assert result.trainer is trainers[3.0] and result.record["chosen"] == 3.0
    by_rate = {c["learning_rate"]: c for c in result.record["candidates"]}
    assert by_rate[1.0]["steps"] == by_rate[2.0]["steps"] == 10  # stopped at the first rung (1/8 of 80 steps)
    assert by_rate[4.0]["steps"] == 20 and by_rate[4.0]["stopped_at_rung"] == 1
    assert by_rate[3.0]["steps"] == 80 and by_rate[3.0]["rung_scores"] == [0.5, 0.7]
    assert by_rate[1.0]["rung_scores"] == [0.1] and by_rate[4.0]["rung_scores"] == [0.6, 0.65]
    assert trainers[1.0].closed and trainers[4.0].closed and not trainers[3.0].closed
    # the chosen rate had the best dev score at the last rung, and the best dev score of all
    assert by_rate[3.0]["rung_scores"][-1] > by_rate[4.0]["rung_scores"][-1]
    assert by_rate[3.0]["best_dev"] == max(c["best_dev"] for c in result.record["candidates"])
    assert result.record["planned_cost_runs"] == pytest.approx(1.5) and result.record["rung_examples"] == 500


def test_a_candidate_that_diverged_ranks_last_and_is_never_chosen_over_one_that_did_not():
    # rate 4 scores best on the rung part of dev with the state it kept, but its loss became NaN
    scripts = {
        1.0: {10: 0.1, 20: 0.2, 80: 0.3},
        2.0: {10: 0.2, 20: 0.3, 80: 0.4},
        4.0: {9: 0.9, 10: 0.9, 20: 0.9, 80: 0.9},
    }
    trainers = {
        rate: ScriptedTrainer(script, diverges_at=10 if rate == 4.0 else None) for rate, script in scripts.items()
    }
    result = successive_halving(trainers.__getitem__, list(scripts), (0.125, 0.25), "accuracy")
    by_rate = {c["learning_rate"]: c for c in result.record["candidates"]}
    assert result.record["chosen"] == 2.0 and by_rate[4.0]["stopped_at_rung"] == 0
    assert by_rate[4.0]["diverged"].startswith("Training diverged at step 10") and "diverged" not in by_rate[2.0]


def _recording(trainers: dict, made: list[float]):
    """A `make_trainer` that hands out the scripted trainers and notes each rate it was asked for."""

    def make(rate: float) -> ScriptedTrainer:
        made.append(rate)
        return trainers[rate]

    return make


def test_a_search_that_chose_an_end_goes_past_it_until_it_keeps_a_rate_inside():
    # 3.0 wins the search at the top of the range; 4.5 (one step past: 3 * 3/2) does better; 6.8 past that is worse
    scripts = {
        1.0: {10: 0.1, 20: 0.2, 80: 0.3},
        2.0: {10: 0.2, 20: 0.3, 80: 0.4},
        3.0: {10: 0.5, 20: 0.7, 80: 0.8},
        4.5: {10: 0.6, 20: 0.8, 80: 0.9},
        6.8: {10: 0.4, 20: 0.5, 80: 0.6},
    }
    made: list[float] = []
    trainers = {rate: ScriptedTrainer(script) for rate, script in scripts.items()}
    result = successive_halving(_recording(trainers, made), [1.0, 2.0, 3.0], (0.125, 0.25), "pearson", extend=3)
    assert made == [1.0, 2.0, 3.0, 4.5, 6.8]  # the third extension was not needed: 4.5 lies inside 1..6.8
    assert result.trainer is trainers[4.5] and result.record["chosen"] == 4.5 and rate_at_edge(result.record) is None
    by_rate = {c["learning_rate"]: c for c in result.record["candidates"]}
    assert by_rate[4.5]["extension"] and by_rate[6.8]["extension"] and "extension" not in by_rate[3.0]
    assert by_rate[4.5]["steps"] == by_rate[6.8]["steps"] == 80 and by_rate[4.5]["rung_scores"] == []
    assert by_rate[3.0]["stopped_at_rung"] == by_rate[6.8]["stopped_at_rung"] == 2  # dropped after the rungs
    assert trainers[3.0].closed and trainers[6.8].closed and not trainers[4.5].closed
    assert result.record["planned_cost_runs"] == pytest.approx(search_cost(3, (0.125, 0.25)) + 2)
    # with one extension allowed, 4.5 is kept and is again the end: the record still says so
    trainers = {rate: ScriptedTrainer(script) for rate, script in scripts.items()}
    one = successive_halving(trainers.__getitem__, [1.0, 2.0, 3.0], (0.125, 0.25), "pearson", extend=1)
    assert one.record["chosen"] == 4.5 and rate_at_edge(one.record) == "highest"
    assert "a larger --lr-search-extend" in (edge_note(one.record) or "")


def test_no_rate_past_the_range_without_extend_or_when_the_choice_is_inside():
    scripts = {1.0: {10: 0.1, 20: 0.2, 80: 0.3}, 2.0: {10: 0.5, 20: 0.6, 80: 0.7}, 3.0: {10: 0.3, 20: 0.4, 80: 0.5}}
    for rates, extend in (([1.0, 2.0, 3.0], 2), ([1.0, 2.0], 0)):
        made: list[float] = []
        trainers = {rate: ScriptedTrainer(script) for rate, script in scripts.items()}
        result = successive_halving(_recording(trainers, made), rates, (0.125, 0.25), "pearson", extend=extend)
        assert made == rates and result.record["chosen"] == 2.0
        assert not any(c.get("extension") for c in result.record["candidates"])
    # every candidate diverged: the one kept carries the message, and nothing trains past it
    made = []
    diverging = {rate: ScriptedTrainer({9: rate / 10, 80: rate / 5}, diverges_at=10) for rate in (1.0, 2.0)}
    result = successive_halving(_recording(diverging, made), [1.0, 2.0], (0.125, 0.25), "pearson", extend=2)
    assert made == [1.0, 2.0] and result.trainer.diverged is not None


def test_search_cost_of_the_default_rungs():
    assert search_cost(4, (0.125, 0.25)) == pytest.approx(1.5)
    assert search_cost(3, (0.125, 0.25)) == pytest.approx(3 / 8 + 2 / 8 + 3 / 4)
    assert search_cost(1, (0.125, 0.25)) == pytest.approx(1.0)
    assert search_cost(2, ()) == pytest.approx(2.0)


def _searched(rates, chosen) -> dict:
    return {"candidates": [{"learning_rate": rate} for rate in rates], "chosen": chosen}


def test_a_rate_chosen_at_an_end_of_the_range_is_named_with_a_range_that_reaches_past_it():
    rates = (1e-5, 2e-5, 5e-5, 1e-4)
    assert rate_at_edge(_searched(rates, 1e-5)) == "lowest" and rate_at_edge(_searched(rates, 1e-4)) == "highest"
    assert rate_at_edge(_searched(rates, 2e-5)) is None and edge_note(_searched(rates, 5e-5)) is None
    assert rate_at_edge(_searched((3e-3,), 3e-3)) is None  # one candidate: nothing was searched
    # one step past the end, the two end candidates' ratio again, centred on the chosen rate
    assert widened_range(_searched(rates, 1e-5)) == (5e-6, 1e-5, 2e-5)
    assert widened_range(_searched((2e-4, 5e-4, 1e-3, 3e-3), 3e-3)) == (1e-3, 3e-3, 9e-3)
    note = edge_note(_searched(rates, 1e-5))
    assert note is not None and "1e-05 is the lowest" in note and "below" in note
    assert "--lr-search 5e-06,1e-05,2e-05" in note
    assert "above" in (edge_note(_searched((5e-5, 1e-4), 1e-4)) or "")


def test_candidates_come_from_the_spec_or_the_method():
    from deltatune.methods import build_method

    bitfit = build_method("bitfit")
    assert learning_rate_candidates(TrainConfig(lr_search="auto"), bitfit) == bitfit.learning_rate_candidates
    assert bitfit.default_learning_rate in bitfit.learning_rate_candidates
    assert learning_rate_candidates(TrainConfig(lr_search=(3e-3, 1e-3)), bitfit) == (1e-3, 3e-3)
    with pytest.raises(Exception, match="lr_search"):
        TrainConfig(lr_search=(0.0,))


def test_the_searched_run_is_the_single_run_at_the_chosen_rate(local):  # noqa: F811 - the fixture imported above
    from deltatune.run import run_training

    model, data = local
    settings = dict(max_steps=40, batch_size=8, eval_every=6, quiet=True, seed=3, precision="fp32")
    searched = run_training(
        model, data, "full", {}, TrainConfig(lr_search=(1e-7, 3e-3, 1e-2), lr_search_rungs=(0.25, 0.5), **settings)
    )
    search = searched.lr_search
    chosen = search["chosen"]
    assert chosen == searched.learning_rate
    steps = {c["learning_rate"]: c["steps"] for c in search["candidates"]}
    assert sorted(steps.values()) == [10, 20, 40]  # cut at the rungs (1/4 and 1/2 of 40 steps); one survivor
    survivor = next(c for c in search["candidates"] if c["steps"] == 40)
    assert survivor["learning_rate"] == chosen and len(survivor["rung_scores"]) == 2
    assert max(c["rung_scores"][-1] for c in search["candidates"] if c["steps"] >= 20) == survivor["rung_scores"][-1]
    # the survivor trained, was evaluated and kept its checkpoint exactly as a single run at its rate
    single = run_training(model, data, "full", {}, TrainConfig(learning_rate=chosen, **settings))

    def curve(record):
        return [(point["step"], point["metrics"]) for point in record.learning_curve]

    assert curve(searched) == curve(single) and [p["step"] for p in single.learning_curve][:2] == [6, 12]
    assert searched.dev_metrics == single.dev_metrics and searched.test_metrics == single.test_metrics
    # the summary a user reads names a rate chosen at an end of the range, and only then
    from deltatune.run import summarize

    def summary(chosen: float) -> str:
        return summarize(dataclasses.replace(searched, lr_search={**search, "chosen": chosen}))

    assert "NOTE: the chosen learning rate 0.01 is the highest candidate" in summary(1e-2)
    assert "NOTE" not in summary(3e-3)


def test_a_real_search_trains_past_the_end_it_chose(local):  # noqa: F811 - the fixture imported above
    from deltatune.run import run_training

    model, data = local
    settings = dict(max_steps=16, batch_size=8, eval_every=8, quiet=True, seed=3, precision="fp32")
    record = run_training(
        model,
        data,
        "full",
        {},
        TrainConfig(lr_search=(1e-4, 1e-3), lr_search_extend=1, lr_search_rungs=(0.5,), **settings),
    )
    search = record.lr_search
    rates = [c["learning_rate"] for c in search["candidates"]]
    assert rates[:2] == [1e-4, 1e-3] and rates[2] in (1e-5, 1e-2)  # two candidates: either choice is an end
    assert [bool(c.get("extension")) for c in search["candidates"]] == [False, False, True]
    assert search["candidates"][2]["steps"] == 16 and record.learning_rate == search["chosen"]
    with pytest.raises(Exception, match="lr_search_extend"):
        TrainConfig(lr_search="auto", lr_search_extend=-1)
    with pytest.raises(Exception, match="extends a learning-rate search, and none is set"):
        TrainConfig(lr_search_extend=2)


def _count_forwards(monkeypatch) -> list[int]:
    """Patch the training loop's `predict_encoded` to note how many examples each scoring pass reads."""
    import deltatune.training as training

    sizes: list[int] = []
    real = training.predict_encoded

    def counted(model, encoded, *args, **kwargs):
        sizes.append(len(encoded))
        return real(model, encoded, *args, **kwargs)

    monkeypatch.setattr(training, "predict_encoded", counted)
    return sizes


def test_a_rung_on_an_evaluation_step_reads_that_evaluation_instead_of_scoring_again(local, monkeypatch):  # noqa: F811
    import deltatune.training as training
    from deltatune.run import run_training

    model, data = local
    monkeypatch.setattr(training, "RUNG_DEV_EXAMPLES", 6)  # a rung part strictly smaller than dev
    sizes = _count_forwards(monkeypatch)
    settings = dict(max_steps=40, batch_size=8, eval_every=10, quiet=True, seed=3, precision="fp32")
    record = run_training(
        model, data, "full", {}, TrainConfig(lr_search=(1e-7, 3e-3), lr_search_rungs=(0.25,), **settings)
    )
    # two candidates evaluated at step 10 (where the rung is), the survivor at 20, 30, 40, then test: no rung pass
    dev_size = sizes[0]
    assert sizes[:-1] == [dev_size] * 5 and dev_size > 6
    survivor = next(c for c in record.lr_search["candidates"] if c["stopped_at_rung"] is None)
    assert record.lr_search["rung_examples"] == 6 and len(survivor["rung_scores"]) == 1

    # the score read from the evaluation is the score of a pass over the rung's examples alone
    from deltatune.sources.models import load_model_for_task, load_tokenizer
    from deltatune.sources.records import load_data_from_record
    from deltatune.training import Trainer, prepare_data

    task_data = load_data_from_record(data)
    task_model, _ = load_model_for_task(model, task_data.task)
    tokenizer = load_tokenizer(model)
    config = TrainConfig(learning_rate=3e-3, **settings)
    prepared = prepare_data(
        task_model, tokenizer, task_data.task, task_data.split("train"), task_data.split("dev"), None, config
    )
    from deltatune.methods import build_method
    from deltatune.run import prepare_model

    method = build_method("full", {})
    prepare_model(task_model, method, tokenizer)
    trainer = Trainer(task_model, method, task_data.task, prepared, config)
    trainer.advance(0.25)
    before = len(sizes)
    reused = trainer.rung_score()
    assert len(sizes) == before  # no forward pass
    assert reused == pytest.approx(trainer.score(prepared.rung_dev), abs=1e-6)
    assert len(sizes) == before + 1 and sizes[-1] == 6
    trainer.close()


def test_eval_examples_cuts_the_evaluations_to_a_fixed_part_of_dev_and_records_the_whole(local, monkeypatch):  # noqa: F811
    from deltatune.run import run_training

    model, data = local
    settings = dict(max_steps=24, batch_size=8, eval_every=8, quiet=True, seed=5, precision="fp32", learning_rate=3e-3)
    whole = run_training(model, data, "full", {}, TrainConfig(**settings))
    sizes = _count_forwards(monkeypatch)
    part = run_training(model, data, "full", {}, TrainConfig(eval_examples=6, **settings))
    # three evaluations of 6 examples, then the kept state over the whole of dev, then test
    assert sizes[:3] == [6, 6, 6] and sizes[3] > 6 and len(sizes) == 5
    assert [p["step"] for p in part.learning_curve] == [8, 16, 24]
    # training does not depend on what dev is read, so the kept state is one the whole-dev run also evaluated:
    # its record holds that state's whole-dev metrics
    kept = next(p for p in whole.learning_curve if p["step"] == part.best_step)
    assert part.dev_metrics == pytest.approx(kept["metrics"], abs=1e-9) and part.test_metrics is not None

    def curve(record):
        return [(point["step"], point["metrics"]) for point in record.learning_curve]

    # asking for at least all of dev is the default run
    same = run_training(model, data, "full", {}, TrainConfig(eval_examples=10_000, **settings))
    assert curve(same) == curve(whole) and same.dev_metrics == whole.dev_metrics
    with pytest.raises(Exception, match="eval_examples=0"):
        TrainConfig(eval_examples=0)
