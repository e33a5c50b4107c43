"""The training loop on tiny random models and toy data built here."""

import random
from itertools import pairwise

import pytest
import torch

from conftest import build_tiny_model, build_tokenizer, make_sentiment_rows
from deltatune.batching import collate, encode, length_bucketed_batches, stratified_subset
from deltatune.errors import DeltatuneError
from deltatune.methods import build_method, prepare_model
from deltatune.tasks.spec import Split, TaskSpec
from deltatune.training import TrainConfig, train

SENTIMENT = TaskSpec(
    "toy-sentiment", ("text",), ("negative", "positive"), metric="accuracy", metrics=("accuracy", "f1")
)
SIMILARITY = TaskSpec(
    "toy-similarity", ("a", "b"), score_range=(0.0, 1.0), metric="pearson", metrics=("pearson", "spearman")
)


def sentiment_splits(n_train=160, n_dev=40):
    def split(rows):
        return Split([(r["text"],) for r in rows], [1 if r["label"] == "positive" else 0 for r in rows])

    return split(make_sentiment_rows(n_train, seed=1)), split(make_sentiment_rows(n_dev, seed=2))


def trained(method_name="full", kind="bert", **config):
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model(kind), build_tokenizer()
    method = build_method(method_name)
    prepare_model(model, method)
    train_split, dev_split = sentiment_splits()
    settings = dict(epochs=6, batch_size=16, learning_rate=3e-3, quiet=True, seed=3)
    settings.update(config)
    result = train(model, tokenizer, SENTIMENT, train_split, dev_split, method, TrainConfig(**settings))
    return model, result


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_full_fine_tuning_learns_the_toy_task(kind):
    _, result = trained(kind=kind)
    assert result.best_metrics["accuracy"] >= 0.9, result.learning_curve
    assert result.steps == 6 * 10


def test_same_seed_gives_identical_metrics_and_weights():
    model_a, result_a = trained(epochs=2)
    model_b, result_b = trained(epochs=2)
    assert result_a.best_metrics == result_b.best_metrics and result_a.steps == result_b.steps
    assert [c["metrics"] for c in result_a.learning_curve] == [c["metrics"] for c in result_b.learning_curve]
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_time_budget_stops_cleanly_and_still_evaluates():
    _, result = trained(epochs=1000, time_budget_s=0.5)
    assert result.stopped_by == "time_budget"
    assert result.train_time_s < 5
    assert result.learning_curve and result.learning_curve[-1]["step"] == result.steps


def test_max_steps_and_early_stopping():
    _, result = trained(max_steps=7, eval_every=2)
    assert result.steps == 7 and result.stopped_by == "max_steps"
    assert [c["step"] for c in result.learning_curve] == [2, 4, 6, 7]
    _, result = trained(epochs=50, eval_every=1, early_stopping_patience=2, learning_rate=1e-9)
    assert result.stopped_by == "early_stopping" and result.steps < 50 * 10


def test_model_keeps_its_best_dev_state():
    model, result = trained(epochs=3, eval_every=3)
    best = max(c["metrics"]["accuracy"] for c in result.learning_curve)
    assert result.best_metrics["accuracy"] == best


def test_data_budget_trains_on_a_stratified_subset():
    _, result = trained(epochs=1, data_fraction=0.25)
    assert result.num_train_examples == 40
    labels = [i % 3 for i in range(90)]
    chosen = stratified_subset(labels, 30, seed=0, regression=False)
    assert len(chosen) == 30 and sorted(labels[i] for i in chosen).count(0) == 10
    assert chosen == stratified_subset(labels, 30, seed=0, regression=False)


def test_length_bucketing_covers_every_example_once_and_reduces_padding():
    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(1000)]
    batches = length_bucketed_batches(lengths, 16, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(1000))

    def efficiency(batches):
        return sum(lengths[i] for b in batches for i in b) / sum(len(b) * max(lengths[i] for i in b) for b in batches)

    plain = [list(range(i, min(i + 16, 1000))) for i in range(0, 1000, 16)]
    assert efficiency(batches) > 0.9 > efficiency(plain)


def test_encode_truncates_and_counts_and_collate_pads_on_the_right():
    tokenizer = build_tokenizer()
    split = Split([("the man plays guitar the dog eats food", "a cat"), ("good", "bad")], [0.5, 1.0])
    encoded = encode(tokenizer, SIMILARITY, split, max_length=6)
    assert encoded.num_truncated == 1 and max(encoded.lengths) == 6
    batch = collate(encoded, [0, 1], tokenizer.pad_token_id, regression=True)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 0]
    assert batch["labels"].dtype == torch.float32


def test_regression_trains_on_a_pair_task():
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model("bert", num_labels=1), build_tokenizer()
    method = build_method("full")
    prepare_model(model, method)
    rng = random.Random(0)
    words = ["good", "bad", "happy", "sad", "dog", "cat"]

    def rows(n):
        texts, labels = [], []
        for _ in range(n):
            a, b = rng.choice(words), rng.choice(words)
            texts.append((f"the {a}", f"a {b}"))
            labels.append(((a in ("good", "happy")) + (b in ("good", "happy"))) / 2)
        return Split(texts, labels)

    result = train(
        model,
        tokenizer,
        SIMILARITY,
        rows(300),
        rows(60),
        method,
        TrainConfig(epochs=8, batch_size=16, learning_rate=3e-3, quiet=True),
    )
    assert result.best_metrics["pearson"] > 0.5
    # targets are standardised for training; the saved dev outputs are back in the task's units
    mean, std = result.target_scale
    assert 0 < mean < 1 and std > 0
    assert abs(float(result.best_dev_outputs[:, 0].mean()) - sum(result.dev_labels) / len(result.dev_labels)) < 0.15


def test_slanted_triangular_schedule_rises_then_falls_to_a_32nd():
    from deltatune.training import _lr_factor

    factors = [_lr_factor(step, 10, 100, "slanted_triangular") for step in range(101)]
    assert factors[0] == pytest.approx(1 / 32) and factors[10] == pytest.approx(1.0)
    assert factors[100] == pytest.approx(1 / 32)
    assert all(a < b for a, b in pairwise(factors[:11]))
    assert all(a > b for a, b in pairwise(factors[10:101]))


def test_discriminative_learning_rates_decay_by_depth():
    from deltatune.methods.layers import layer_layout
    from deltatune.training import _optimizer_groups

    model = build_tiny_model("bert")
    method = build_method("full")
    prepare_model(model, method)
    groups = _optimizer_groups(model, method, 1.0, TrainConfig(layer_lr_decay=0.5))
    layout = layer_layout(model)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert rate[id(named["classifier.weight"])] == 1.0
    assert rate[id(named["bert.encoder.layer.1.attention.self.query.weight"])] == 0.5
    assert rate[id(named["bert.encoder.layer.0.attention.self.query.weight"])] == 0.25
    assert rate[id(named["bert.embeddings.word_embeddings.weight"])] == 0.125
    assert layout.num_layers == 2


def test_gradual_unfreezing_trains_the_top_first_then_everything():
    from deltatune.training import GradualUnfreezing

    model = build_tiny_model("bert")
    prepare_model(model, build_method("full"))
    unfreezing = GradualUnfreezing(model, every=5)
    named = dict(model.named_parameters())
    assert named["classifier.weight"].requires_grad
    assert not named["bert.encoder.layer.1.output.dense.weight"].requires_grad
    unfreezing.update(5)
    assert named["bert.encoder.layer.1.output.dense.weight"].requires_grad
    assert not named["bert.encoder.layer.0.output.dense.weight"].requires_grad
    unfreezing.update(15)
    assert all(p.requires_grad for p in model.parameters())
    # through the loop: still learns, and every parameter ends up trainable again
    model, result = trained(
        epochs=6,
        gradual_unfreezing=True,
        unfreeze_every=3,
        layer_lr_decay=0.8,
        schedule="slanted_triangular",
        warmup_ratio=0.1,
    )
    assert result.best_metrics["accuracy"] >= 0.8
    assert all(p.requires_grad for p in model.parameters())


def test_min_steps_takes_more_epochs_when_the_data_are_few():
    _, result = trained(epochs=1, min_steps=25)  # 160 examples of batch 16: 10 steps an epoch
    assert result.steps == 25 and result.planned_steps == 25 and result.stopped_by == "min_steps"
    _, result = trained(epochs=3, min_steps=5)
    assert result.steps == 30 and result.stopped_by == "epochs"


def test_a_curve_still_rising_at_its_end_is_not_converged():
    from deltatune.training import still_improving

    assert still_improving([0.5, 0.6, 0.7], 0.005) == (True, pytest.approx(0.2))  # the last two over the first
    assert still_improving([0.5, 0.7, 0.703, 0.701], 0.005)[0] is False  # levelled off within the tolerance
    assert still_improving([0.5, 0.8, 0.7, 0.75], 0.005)[0] is False  # its best came two evaluations before the end
    # one dip after a climb is not a plateau (an SNLI BitFit curve): the last two still beat the earlier best
    assert still_improving([0.418, 0.438, 0.504, 0.518, 0.5], 0.005) == (True, pytest.approx(0.014))
    assert still_improving([0.5, 0.8, 0.7], 0.005)[0] is True
    assert still_improving([0.5, 0.8], 0.005)[0] is True and still_improving([0.8, 0.5], 0.005)[0] is False
    assert still_improving([0.6], 0.005) == (True, None)  # one point cannot show convergence
    _, flat = trained(epochs=3, eval_every=5, learning_rate=1e-12)  # nothing moves: converged at once
    assert flat.converged and flat.last_gain is not None and abs(flat.last_gain) < 1e-9
    rising, gain = still_improving([p["metrics"]["accuracy"] for p in flat.learning_curve], 0.005)
    assert (not rising, gain) == (flat.converged, flat.last_gain)


def test_the_kept_state_is_scored_on_test_once():
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model("bert"), build_tokenizer()
    method = build_method("full")
    prepare_model(model, method)
    train_split, dev_split = sentiment_splits()
    test_split = sentiment_splits(n_train=2, n_dev=30)[1]
    result = train(
        model,
        tokenizer,
        SENTIMENT,
        train_split,
        dev_split,
        method,
        TrainConfig(epochs=2, batch_size=16, learning_rate=3e-3, quiet=True),
        test_split=test_split,
    )
    assert result.test_outputs.shape == (30, 2) and len(result.test_labels) == 30
    predictions = result.test_outputs.argmax(axis=1)
    assert result.test_metrics["accuracy"] == pytest.approx(float((predictions == result.test_labels).mean()))
    assert all(point["step"] for point in result.learning_curve)  # the curve holds dev evaluations only


def test_train_config_checks_each_literal_field_against_the_choices_the_cli_offers():
    with pytest.raises(DeltatuneError, match=r"schedule='cosine' must be one of linear, constant, slanted_triangular"):
        TrainConfig(schedule="cosine")
    with pytest.raises(DeltatuneError, match=r"head='x' must be one of auto, cross-encoder, bi-encoder$"):
        TrainConfig(head="x")
    with pytest.raises(DeltatuneError, match=r"^regime='foo' must be one of standard, mezo, hft, surgical, promot$"):
        TrainConfig(regime="foo")  # said once
