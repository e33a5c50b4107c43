"""FreeLM on a tiny random Llama: the schedule, the teacher signal, zero-shot scoring, baselines, the delta, the CLI."""

import json
import random

import numpy as np
import pytest
import torch

from conftest import build_tokenizer, make_sentiment_rows, tiny_llama_config
from deltatune.errors import DeltatuneError
from deltatune.freelm import (
    LANGUAGE,
    TEACHER,
    FreeLMConfig,
    build_freelm_model,
    proposition_scores,
    signal_schedule,
    train_freelm,
    verbaliser_scores,
)
from deltatune.freelm.artifact import load_freelm, prepare_freelm_model, run_freelm_training
from deltatune.freelm.scoring import choose_demonstrations, demonstration_prefix, predictions_from_scores, task_metrics
from deltatune.freelm.training import build_proposition_set, example_batches, teacher_accuracy, teacher_loss
from deltatune.methods import build_method
from deltatune.tasks import TASKS
from deltatune.tasks.propositions import PropositionTemplate, TaskPropositions, equal_bins
from deltatune.tasks.spec import Split, TaskData, TaskSpec

POSITIVE, NEGATIVE = ["good", "great", "happy", "fresh"], ["bad", "awful", "sad", "rotten"]
TOY_TASK = TaskSpec("toy-mood", ("text",), ("sad", "happy"))
TOY_TEMPLATE = PropositionTemplate("{text} so the man is {answer}", ("sad", "happy"))
TOY_PROPOSITIONS = TaskPropositions(
    "toy-mood",
    ("text",),
    templates=(
        TOY_TEMPLATE,
        PropositionTemplate("{answer} {text}", ("sad", "happy")),
        PropositionTemplate("a {answer} man is the {text}", ("sad", "happy")),
    ),
    prompt="{text} so the man is",
    verbalisers=(" sad", " happy"),
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and two threads crawl when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_causal_lm(seed=0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def toy_data(count=64, seed=0) -> TaskData:
    """'the movie is good' is happy, 'the movie is bad' is sad: one sentiment word decides the label."""
    rng = random.Random(seed)
    labels = [i % 2 for i in range(count)]
    texts = [(f"the movie is {rng.choice(POSITIVE if label else NEGATIVE)}",) for label in labels]
    split = Split(texts, labels)
    return TaskData(TOY_TASK, {"train": split, "dev": split})


LANGUAGE_TEXTS = [row["text"] for row in make_sentiment_rows(40)]


def lora_freelm(seed=0, **overrides):
    causal = tiny_causal_lm(seed, **overrides)
    method = build_method("lora", {})
    model, names, _, _ = prepare_freelm_model(causal, build_tokenizer(), method)
    return model, method, names, causal


# ----------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("ratio, language, teacher", [(1, 6, 6), (2, 8, 4), (0.5, 4, 8), (0, 0, 12), (1.5, 7, 5)])
def test_ratio_schedule_keeps_the_ratio_at_every_step(ratio, language, teacher):
    schedule = signal_schedule(12, ratio, "ratio")
    assert schedule.count(LANGUAGE) == language and schedule.count(TEACHER) == teacher
    for step in range(1, 13):  # never more than one step away from the exact share
        share = ratio / (1 + ratio)
        assert abs(schedule[:step].count(LANGUAGE) - step * share) < 1


def test_ratio_schedule_interleaves_evenly():
    assert signal_schedule(6, 2, "ratio") == [TEACHER, LANGUAGE, LANGUAGE] * 2
    assert signal_schedule(6, 0.5, "ratio") == [TEACHER, TEACHER, LANGUAGE] * 2
    assert signal_schedule(4, 1, "ratio") == [TEACHER, LANGUAGE] * 2


def test_interactive_schedule_alternates_whole_stages():
    assert signal_schedule(8, 1, "interactive", stage_steps=1) == [LANGUAGE, TEACHER] * 4
    assert (
        signal_schedule(10, 1.5, "interactive", stage_steps=2)
        == [LANGUAGE] * 3 + [TEACHER] * 2 + [LANGUAGE] * 3 + [TEACHER] * 2
    )
    assert set(signal_schedule(5, 0, "interactive", stage_steps=3)) == {TEACHER}


def test_schedule_and_config_errors_name_the_option():
    with pytest.raises(DeltatuneError, match="lm_ratio=-1"):
        signal_schedule(4, -1)
    with pytest.raises(DeltatuneError, match="schedule='often'"):
        signal_schedule(4, 1, "often")
    with pytest.raises(DeltatuneError, match=r"steps=0 must be at least 1.*lm_ratio=-2"):
        FreeLMConfig(steps=0, lm_ratio=-2)


# ----------------------------------------------------------------------------------------------- the model


def test_teacher_head_and_language_head_share_one_decoder():
    causal = tiny_causal_lm()
    model = build_freelm_model(causal)
    assert model.backbone is causal.model
    assert model.lm_head is causal.lm_head
    assert tuple(model.classifier.score.weight.shape) == (2, causal.config.hidden_size)
    assert not any(p.is_meta for p in model.parameters())
    tokens = build_tokenizer()(["the movie is good", "a dog"], padding=True, return_tensors="pt")
    ids = tokens["input_ids"]
    torch.testing.assert_close(model.language_loss(ids[:1]), causal(input_ids=ids[:1], labels=ids[:1]).loss)
    logits = model.teacher_logits(ids, tokens["attention_mask"])
    alone = model.teacher_logits(ids[1:, :4], tokens["attention_mask"][1:, :4])  # 'a dog' is [CLS] a dog [SEP]
    torch.testing.assert_close(logits[1:], alone, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- training


def test_training_alternates_in_the_configured_ratio_and_each_signal_trains_what_it_should():
    model, method, names, _ = lora_freelm()
    lora_a = model.classifier.model.layers[0].self_attn.q_proj.lora_A
    events = []
    previous = {"head": None, "lora": lora_a.detach().clone()}

    def record(step, signal, loss):
        head = model.classifier.score.weight  # the standardized head that trains in place of `score`
        events.append(
            (
                signal,
                previous["head"] is not None and not torch.equal(head, previous["head"]),
                not torch.equal(lora_a, previous["lora"]),
            )
        )
        previous["head"], previous["lora"] = head.detach().clone(), lora_a.detach().clone()

    config = FreeLMConfig(
        train_tasks=("toy-mood",),
        steps=9,
        lm_ratio=2,
        teacher_batch_size=4,
        lm_batch_size=2,
        lm_sequence_length=8,
        max_length=32,
        learning_rate=1e-2,
        warmup_ratio=0,
        quiet=True,
    )
    result = train_freelm(
        model,
        build_tokenizer(),
        [toy_data()],
        LANGUAGE_TEXTS,
        config,
        method,
        propositions={"toy-mood": TOY_PROPOSITIONS},
        callback=record,
    )
    assert [signal for signal, _, _ in events] == [TEACHER, LANGUAGE, LANGUAGE] * 3
    assert [entry["signal"] for entry in result.history] == [signal for signal, _, _ in events]
    assert (result.teacher_steps, result.language_steps) == (3, 6)
    assert (result.propositions_seen, result.language_tokens_seen) == (12, 6 * 2 * 8)
    for step, (signal, head_moved, lora_moved) in enumerate(events):
        if step:  # the first step has nothing to compare the head with
            assert head_moved == (signal == TEACHER), "the teacher head trains on teacher steps only"
        assert lora_moved, "the shared decoder adaptation trains on both signals"


def test_interactive_training_runs_stages():
    model, method, _, _ = lora_freelm()
    config = FreeLMConfig(
        train_tasks=("toy-mood",),
        steps=8,
        lm_ratio=1,
        schedule="interactive",
        stage_steps=2,
        teacher_batch_size=4,
        lm_batch_size=1,
        lm_sequence_length=8,
        max_length=32,
        quiet=True,
    )
    result = train_freelm(
        model,
        build_tokenizer(),
        [toy_data()],
        LANGUAGE_TEXTS,
        config,
        method,
        propositions={"toy-mood": TOY_PROPOSITIONS},
    )
    assert [e["signal"] for e in result.history] == [LANGUAGE, LANGUAGE, TEACHER, TEACHER] * 2


def test_proposition_set_has_one_true_and_the_requested_false_per_example():
    data = toy_data(10)
    config = FreeLMConfig(train_tasks=("toy-mood",), negatives_per_example=1, max_length=32)
    propositions = build_proposition_set([data], build_tokenizer(), config, {"toy-mood": TOY_PROPOSITIONS})
    assert len(propositions) == 20 and sum(propositions.labels) == 10
    for index in range(10):
        true, false = propositions.texts[2 * index], propositions.texts[2 * index + 1]
        word = data.splits["train"].texts[index][0].split()[-1]
        answer = "happy" if word in POSITIVE else "sad"
        assert word in true and answer in true and word in false and answer not in false.replace(word, "")
        assert propositions.labels[2 * index : 2 * index + 2] == [1, 0]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_teacher_loss_falls_on_a_learnable_proposition_set(precision):
    # a wider tiny model: the 32-wide one is slow to leave the symmetric start of this XOR-like task
    model, method, _, _ = lora_freelm(hidden_size=64, intermediate_size=128)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    single = TaskPropositions(
        "toy-mood", ("text",), (TOY_TEMPLATE,) * 3, TOY_PROPOSITIONS.prompt, TOY_PROPOSITIONS.verbalisers
    )
    config = FreeLMConfig(
        train_tasks=("toy-mood",),
        steps=400,
        lm_ratio=0,
        teacher_batch_size=16,
        max_length=32,
        learning_rate=1e-2,
        quiet=True,
        seed=0,
        precision=precision,
    )
    data = toy_data()
    result = train_freelm(model, build_tokenizer(), [data], [], config, method, propositions={"toy-mood": single})
    assert result.precision == precision and result.summary()["precision"] == precision
    # bf16 holds the frozen decoder weights in bf16 while training: afterwards they are the exact fp32 values
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert parameter.dtype == torch.float32 and torch.equal(parameter, frozen[name]), name
    assert result.mean_loss(TEACHER, first=True) > 0.6
    assert result.mean_loss(TEACHER, first=False) < 0.2
    propositions = build_proposition_set([data], build_tokenizer(), config, {"toy-mood": single})
    assert teacher_accuracy(model, build_tokenizer(), propositions, 32) > 0.95


def test_an_examples_true_and_false_propositions_share_one_template():
    data = toy_data(30)
    config = FreeLMConfig(train_tasks=("toy-mood",), max_length=32, seed=1)
    propositions = build_proposition_set([data], build_tokenizer(), config, {"toy-mood": TOY_PROPOSITIONS})
    members = propositions.group_members()
    assert len(members) == 30 and all(len(group) == 2 for group in members)
    frames = set()
    for group in members:
        true, false = (propositions.texts[i] for i in group)

        def frame(text):
            return text.replace("happy", "ANSWER").replace("sad", "ANSWER")

        assert true != false and frame(true) == frame(false)  # the same template, only the answer differs
        frames.add(0 if "so the man is" in true else 1 if true.startswith(("happy", "sad")) else 2)
    assert frames == {0, 1, 2}  # the template is still drawn among the paraphrases, per example


def test_example_batches_keep_every_example_whole():
    propositions = build_proposition_set(
        [toy_data(40)],
        build_tokenizer(),
        FreeLMConfig(train_tasks=("toy-mood",), max_length=32),
        {"toy-mood": TOY_PROPOSITIONS},
    )
    lengths = [len(text.split()) for text in propositions.texts]
    batches = example_batches(propositions, lengths, 8, random.Random(0))
    assert sorted(i for batch in batches for i in batch) == list(range(len(propositions)))  # each once a pass
    for batch in batches:
        assert len(batch) <= 8
        groups = [propositions.groups[i] for i in batch]
        assert all(groups.count(g) == 2 for g in groups)  # both propositions of every example present


def test_contrastive_teacher_loss_is_the_gold_candidates_softmax_and_ignores_shared_shifts():
    torch.manual_seed(0)
    logits = torch.randn(5, 2, requires_grad=True)
    labels = torch.tensor([1, 0, 0, 1, 0])
    groups = torch.tensor([0, 0, 0, 1, 1])  # two examples: three candidates, then two
    loss = teacher_loss(logits, labels, groups, "contrastive")
    odds = logits[:, 1] - logits[:, 0]
    expected = -(torch.log_softmax(odds[:3], 0)[0] + torch.log_softmax(odds[3:], 0)[0]) / 2
    torch.testing.assert_close(loss, expected)
    shifted = logits.detach() + torch.tensor([[0.0, 3.0]] * 3 + [[-2.0, 0.0]] * 2)  # per-example shifts cancel
    torch.testing.assert_close(teacher_loss(shifted, labels, groups, "contrastive"), loss.detach())
    binary = teacher_loss(logits, labels, groups, "binary")
    torch.testing.assert_close(binary, torch.nn.functional.cross_entropy(logits, labels))
    torch.testing.assert_close(teacher_loss(logits, labels, groups, "both"), binary + loss)
    with pytest.raises(DeltatuneError, match="teacher_loss='hinge'"):
        FreeLMConfig(teacher_loss="hinge")


def test_eval_every_records_a_dev_curve():
    model, method, _, _ = lora_freelm()
    config = FreeLMConfig(
        train_tasks=("toy-mood",),
        steps=6,
        lm_ratio=0,
        teacher_batch_size=4,
        max_length=32,
        dev_examples_per_task=8,
        eval_every=3,
        quiet=True,
    )
    result = train_freelm(
        model, build_tokenizer(), [toy_data()], [], config, method, propositions={"toy-mood": TOY_PROPOSITIONS}
    )
    assert [point["step"] for point in result.dev_curve] == [3, 6]
    for point in result.dev_curve:
        assert 0 <= point["toy-mood"]["accuracy"] <= 1 and point["toy-mood"]["num_examples"] == 8
    assert result.summary()["dev_curve"] == result.dev_curve
    assert model.training is False  # back in evaluation mode after training, as before


def test_a_non_finite_loss_stops_freelm_before_its_step_with_the_fix():
    model, method, _, _ = lora_freelm()
    lora_a = model.classifier.model.layers[0].self_attn.q_proj.lora_A
    states = []
    language_loss = model.language_loss
    model.language_loss = lambda ids: language_loss(ids) * float("nan")  # every language step diverges
    config = FreeLMConfig(
        train_tasks=("toy-mood",),
        steps=6,
        lm_ratio=1,
        teacher_batch_size=4,
        lm_batch_size=1,
        lm_sequence_length=8,
        max_length=32,
        learning_rate=1e-2,
        quiet=True,
    )
    with pytest.raises(DeltatuneError, match=r"diverged at step 2: the training loss became nan.*--learning-rate"):
        train_freelm(
            model,
            build_tokenizer(),
            [toy_data()],
            LANGUAGE_TEXTS,
            config,
            method,
            propositions={"toy-mood": TOY_PROPOSITIONS},
            callback=lambda step, signal, loss: states.append(lora_a.detach().clone()),
        )
    assert len(states) == 1  # the teacher step was taken, the language step was not
    assert torch.equal(lora_a, states[0]) and torch.isfinite(lora_a).all()
    from deltatune.freelm.model import StandardizedHead

    assert not isinstance(model.classifier.score, StandardizedHead)  # the head is folded back all the same


def test_keep_best_dev_leaves_the_best_checked_state_and_the_default_the_last():
    def run(keep_best_dev):
        model, method, _, _ = lora_freelm()
        lora_a = model.classifier.model.layers[0].self_attn.q_proj.lora_A
        states = {}
        config = FreeLMConfig(
            train_tasks=("toy-mood",),
            steps=7,
            lm_ratio=0,
            teacher_batch_size=4,
            max_length=32,
            learning_rate=3e-2,
            dev_examples_per_task=16,
            eval_every=2,
            keep_best_dev=keep_best_dev,
            quiet=True,
        )
        result = train_freelm(
            model,
            build_tokenizer(),
            [toy_data()],
            [],
            config,
            method,
            propositions={"toy-mood": TOY_PROPOSITIONS},
            callback=lambda step, signal, loss: states.update({step: lora_a.detach().clone()}),
        )
        return lora_a, states, result.dev_curve

    lora_a, states, curve = run(keep_best_dev=False)
    assert [point["step"] for point in curve] == [2, 4, 6]  # every eval_every steps, as before
    assert torch.equal(lora_a, states[7])
    lora_a, states, curve = run(keep_best_dev=True)
    assert [point["step"] for point in curve] == [2, 4, 6, 7]  # the final state is checked too
    accuracies = [point["toy-mood"]["accuracy"] for point in curve]
    best = curve[accuracies.index(max(accuracies))]["step"]  # the first of equals
    assert torch.equal(lora_a, states[best]) and (best == 7 or not torch.equal(lora_a, states[7]))
    with pytest.raises(DeltatuneError, match="keep_best_dev needs eval_every"):
        FreeLMConfig(keep_best_dev=True)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("tensorboard") is None, reason="the logging extra is not installed"
)
def test_freelm_reports_its_steps_and_dev_checks_to_tensorboard(tmp_path):
    from test_loggers import scalars

    model, method, _, _ = lora_freelm()
    config = FreeLMConfig(
        train_tasks=("toy-mood",),
        steps=4,
        lm_ratio=1,
        teacher_batch_size=4,
        lm_batch_size=1,
        lm_sequence_length=8,
        max_length=32,
        dev_examples_per_task=8,
        eval_every=2,
        quiet=True,
        report_to=("tensorboard",),
        log_dir=str(tmp_path),
    )
    result = train_freelm(
        model,
        build_tokenizer(),
        [toy_data()],
        LANGUAGE_TEXTS,
        config,
        method,
        propositions={"toy-mood": TOY_PROPOSITIONS},
    )
    written = scalars(tmp_path)
    assert [(step, pytest.approx(value, rel=1e-6)) for step, value in written["train/loss"]] == [
        (entry["step"], entry["loss"]) for entry in result.history
    ]
    assert [value for _, value in written["train/learning_rate"]] == pytest.approx(
        [entry["learning_rate"] for entry in result.history], rel=1e-6
    )
    assert written["dev/toy-mood/accuracy"] == [
        (point["step"], pytest.approx(point["toy-mood"]["accuracy"])) for point in result.dev_curve
    ]


def test_full_training_moves_every_decoder_weight_and_the_teacher_head():
    causal = tiny_causal_lm()
    method = build_method("full", {})
    model, names, _, _ = prepare_freelm_model(causal, build_tokenizer(), method)
    assert names == {n for n, _ in model.classifier.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.classifier.named_parameters()}
    config = FreeLMConfig(
        train_tasks=("toy-mood",),
        steps=4,
        lm_ratio=1,
        teacher_batch_size=4,
        lm_batch_size=2,
        lm_sequence_length=8,
        max_length=32,
        learning_rate=1e-3,
        warmup_ratio=0,
        quiet=True,
    )
    train_freelm(
        model,
        build_tokenizer(),
        [toy_data()],
        LANGUAGE_TEXTS,
        config,
        method,
        propositions={"toy-mood": TOY_PROPOSITIONS},
    )
    moved = {n for n, p in model.classifier.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(before)  # every layer, the embeddings (tied to the LM head) and the teacher head


def test_head_transform_centres_and_standardises_and_folds_into_a_plain_head():
    from deltatune.freelm.model import StandardizedHead, fold_head, head_transform, standardize_head

    generator = torch.Generator().manual_seed(0)
    common = torch.zeros(32)
    common[[3, 7]] = torch.tensor([40.0, -25.0])  # a few huge shared dimensions, as in real decoder states
    states = common + torch.randn(200, 32, generator=generator) * torch.linspace(0.1, 2.0, 32)
    transformed = states @ head_transform(states).T  # the features the head's weight V sees
    assert transformed.mean(0).abs().max() < 1e-3
    torch.testing.assert_close(transformed.std(0), torch.ones(32), atol=1e-3, rtol=0)

    model = build_freelm_model(tiny_causal_lm())
    tokens = build_tokenizer()(["the movie is good", "a dog"], padding=True, return_tensors="pt")
    standardize_head(model, torch.randn(50, 32, generator=generator))
    assert isinstance(model.classifier.score, StandardizedHead)
    assert torch.equal(model.teacher_logits(tokens["input_ids"], tokens["attention_mask"]), torch.zeros(2, 2))
    with torch.no_grad():
        model.classifier.score.weight.normal_(generator=generator)
    before = model.teacher_logits(tokens["input_ids"], tokens["attention_mask"])
    fold_head(model)
    assert type(model.classifier.score) is torch.nn.Linear and model.classifier.score.weight.requires_grad
    torch.testing.assert_close(model.teacher_logits(tokens["input_ids"], tokens["attention_mask"]), before)


def test_training_leaves_a_plain_linear_teacher_head():
    model, method, _, _ = lora_freelm()
    config = FreeLMConfig(
        train_tasks=("toy-mood",), steps=2, lm_ratio=0, teacher_batch_size=4, max_length=32, quiet=True
    )
    train_freelm(
        model, build_tokenizer(), [toy_data()], [], config, method, propositions={"toy-mood": TOY_PROPOSITIONS}
    )
    assert type(model.classifier.score) is torch.nn.Linear
    assert torch.count_nonzero(model.classifier.score.weight) > 0  # trained from its zero start


def test_evaluation_intervals_come_from_the_paired_bootstrap():
    from deltatune.compare.stats import paired_bootstrap
    from deltatune.freelm.evaluation import add_intervals

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 80)
    freelm = np.where(rng.random(80) < 0.8, labels, 1 - labels)
    zero_shot = np.where(rng.random(80) < 0.55, labels, 1 - labels)
    report = {
        "tasks": {
            "toy": {
                "metric": "accuracy",
                "labels": labels.tolist(),
                "systems": {
                    "freelm": {"predictions": freelm.tolist()},
                    "zero-shot": {"predictions": zero_shot.tolist()},
                },
            }
        }
    }
    systems = add_intervals(report, samples=300)["tasks"]["toy"]["systems"]
    low, high = systems["freelm"]["interval"]
    assert low < (freelm == labels).mean() < high
    expected = paired_bootstrap([freelm], [zero_shot], labels, "accuracy", 300)
    assert systems["freelm"]["minus_zero-shot"] == {
        "difference": expected.difference,
        "interval": [expected.low, expected.high],
    }
    for metric, values in (("mcc", freelm), ("pearson", freelm + rng.normal(0, 0.1, 80))):
        report["tasks"]["toy"].update(metric=metric)
        report["tasks"]["toy"]["systems"]["freelm"]["predictions"] = values.tolist()
        low, high = add_intervals(report, samples=300)["tasks"]["toy"]["systems"]["freelm"]["interval"]
        from deltatune.metrics import METRICS

        assert low < METRICS[metric](values, labels) < high


# ----------------------------------------------------------------------------------------------- zero-shot


def test_zero_shot_picks_the_proposition_the_head_scores_highest():
    model = build_freelm_model(tiny_causal_lm())
    with torch.no_grad():
        model.classifier.score.weight.normal_(std=1.0)  # a random but decisive head
    tokenizer = build_tokenizer()
    rows = [("the movie is good",), ("a sad dog eats food",), ("the man plays piano",), ("very very bad",)]
    scores = proposition_scores(model, tokenizer, TOY_PROPOSITIONS, rows, max_length=32)
    assert scores.shape == (4, 2)
    for index, row in enumerate(rows):
        by_hand = np.zeros(2)
        for template in range(3):
            for candidate in range(2):  # one proposition at a time, no padding
                encoded = tokenizer([TOY_PROPOSITIONS.proposition(row, candidate, template)], return_tensors="pt")
                with torch.no_grad():
                    logits = model.teacher_logits(encoded["input_ids"], encoded["attention_mask"])[0]
                by_hand[candidate] += float(logits[1] - logits[0]) / 3
        np.testing.assert_allclose(scores[index], by_hand, rtol=0, atol=1e-5)
        assert predictions_from_scores(TOY_TASK, TOY_PROPOSITIONS, scores)[index] == by_hand.argmax()
    one_template = proposition_scores(model, tokenizer, TOY_PROPOSITIONS, rows, [2], max_length=32)
    assert not np.allclose(one_template, scores)


def test_binned_regression_predicts_the_expected_score():
    task = TaskSpec(
        "toy-similarity", ("text",), score_range=(0.0, 6.0), metric="pearson", metrics=("pearson", "spearman")
    )
    bins = equal_bins(0.0, 6.0, ("low", "medium", "high"))
    propositions = TaskPropositions(
        "toy-similarity",
        ("text",),
        (PropositionTemplate("{text} {answer}", bins.names),) * 3,
        "{text}",
        (" low", " medium", " high"),
        bins,
    )
    scores = np.log(np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]]))
    np.testing.assert_allclose(predictions_from_scores(task, propositions, scores), [1.6, 4.4, 3.0], atol=1e-9)
    metrics = task_metrics(task, propositions, scores, [0.5, 5.5, 2.9])
    assert metrics["bin_accuracy"] == 1.0 and metrics["pearson"] > 0.95


# ----------------------------------------------------------------------------------------------- baselines


@torch.no_grad()
def log_likelihood(causal, tokenizer, context, continuation):
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context_ids + continuation_ids])
    log_probs = torch.log_softmax(causal(input_ids=ids).logits[0, :-1].float(), dim=-1)
    positions = range(len(context_ids) - 1, len(context_ids) + len(continuation_ids) - 1)
    return float(np.mean([float(log_probs[p, ids[0, p + 1]]) for p in positions]))


@pytest.mark.parametrize("verbalisers", [(" sad", " happy"), (" very sad", " happy")])
def test_verbaliser_scores_are_the_answers_likelihood_with_and_without_demonstrations(verbalisers):
    causal = tiny_causal_lm()
    tokenizer = build_tokenizer()
    propositions = TaskPropositions(
        "toy-mood", ("text",), TOY_PROPOSITIONS.templates, "{text} so the man is", verbalisers
    )
    rows = [("the movie is good",), ("a dog eats food and sings a song",), ("bad",)]
    prefix = "the movie is great so the man is happy\n\nthe film was awful so the man is sad\n\n"
    for demonstrations in ("", prefix):
        scores = verbaliser_scores(causal, tokenizer, propositions, rows, prefix=demonstrations, batch_size=2)
        for index, row in enumerate(rows):
            for candidate, verbaliser in enumerate(verbalisers):
                context = demonstrations + propositions.filled_prompt(row)
                expected = log_likelihood(causal, tokenizer, context, verbaliser)
                assert scores[index, candidate] == pytest.approx(expected, abs=1e-4)


def test_demonstrations_cover_the_labels_and_are_solved():
    data = toy_data(20)
    train = data.splits["train"]
    chosen = choose_demonstrations(TOY_PROPOSITIONS, train, 4, seed=3)
    assert len(chosen) == 4 and sorted(train.labels[i] for i in chosen) == [0, 0, 1, 1]
    assert chosen == choose_demonstrations(TOY_PROPOSITIONS, train, 4, seed=3)
    prefix = demonstration_prefix(build_tokenizer(), TOY_PROPOSITIONS, train, chosen)
    shots = prefix.strip().split("\n\n")
    assert len(shots) == 4
    for shot, index in zip(shots, chosen, strict=True):
        answer = TOY_PROPOSITIONS.verbalisers[train.labels[index]]
        assert shot == TOY_PROPOSITIONS.filled_prompt(train.texts[index]) + answer


# ----------------------------------------------------------------------------------------------- run, delta, CLI


def fake_task_data(name, source="auto"):
    """Small made-up data under a catalog task's spec, so runs need no mirror."""
    task = TASKS[name]
    rng = random.Random(len(name))
    if task.is_regression:
        pairs = [(" ".join(rng.sample(POSITIVE + NEGATIVE, 3)), " ".join(rng.sample(POSITIVE, 2))) for _ in range(30)]
        split = Split(pairs, [rng.uniform(*task.score_range) for _ in pairs])
    else:
        rows = make_sentiment_rows(30, seed=len(name))
        labels = [1 if row["label"] == "positive" else 0 for row in rows]
        if len(task.text_fields) == 2:
            texts = [(row["text"], "the man is happy") for row in rows]
        else:
            texts = [(row["text"],) for row in rows]
        split = Split(texts, [label % task.num_labels for label in labels])
    return TaskData(task, {"train": split, "dev": split, "test": split})


def fake_corpus(name="wikitext-2"):
    return {"train": LANGUAGE_TEXTS, "validation": LANGUAGE_TEXTS[:10], "test": LANGUAGE_TEXTS[:10]}


@pytest.fixture
def offline_data(monkeypatch):
    import deltatune.sources.data as data

    monkeypatch.setattr(data, "load_task_data", fake_task_data)
    monkeypatch.setattr(data, "load_text_corpus", fake_corpus)


@pytest.fixture
def tiny_causal_dir(tmp_path):
    path = tmp_path / "tiny-causal-llama"
    tiny_causal_lm(seed=5).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


SMALL_RUN = dict(
    train_tasks=("rotten-tomatoes", "sms-spam"),
    steps=6,
    lm_ratio=1,
    teacher_batch_size=4,
    lm_batch_size=2,
    lm_sequence_length=8,
    max_length=48,
    max_examples_per_task=10,
    dev_examples_per_task=6,
    perplexity_blocks=2,
    quiet=True,
)


def test_run_saves_an_ordinary_delta_that_reloads_with_identical_scores(tmp_path, tiny_causal_dir, offline_data):
    import deltatune
    from deltatune.delta import read_manifest

    out = tmp_path / "freelm-run"
    record = run_freelm_training(str(tiny_causal_dir), FreeLMConfig(**SMALL_RUN), out=out)
    assert (out / "delta.safetensors").is_file() and (out / "run.json").is_file()
    manifest = read_manifest(out)
    assert manifest.method == "lora" and manifest.task.name == "freelm-propositions" and manifest.is_freelm
    assert manifest.freelm["training"]["teacher_steps"] == 3
    assert set(manifest.freelm["seen_task_dev_metrics"]) == {"rotten-tomatoes", "sms-spam"}
    assert record["trainable_params"] < 0.2 * record["total_params"]

    model, tokenizer, _, _ = load_freelm(out)
    base = tiny_causal_lm(seed=5).model.state_dict()
    loaded = {
        name.replace(".base_layer", ""): tensor
        for name, tensor in model.backbone.state_dict().items()
        if "lora_" not in name
    }
    assert loaded.keys() == base.keys()
    for name, tensor in base.items():  # the decoder's own weights are the base's: only LoRA and the head trained
        assert torch.equal(loaded[name], tensor), name
    proposition = "the movie is good so the man is happy"
    encoded = tokenizer([proposition], return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(model.teacher_logits(encoded["input_ids"], encoded["attention_mask"]), -1)[0]
    tuned = deltatune.load(out)  # the generic loader: a 2-label proposition classifier
    (prediction,) = tuned.predict(proposition, precision="fp32")  # as the teacher logits above
    assert prediction["probabilities"]["true"] == pytest.approx(float(expected[1]), abs=1e-5)


def test_cli_trains_and_evaluates_with_baselines(tmp_path, tiny_causal_dir, offline_data, capsys):
    from deltatune.cli import main

    out = tmp_path / "cli-run"
    flags = [
        "--train-tasks",
        "rotten-tomatoes,sms-spam",
        "--steps",
        "4",
        "--teacher-batch-size",
        "4",
        "--lm-batch-size",
        "1",
        "--lm-sequence-length",
        "8",
        "--max-length",
        "48",
        "--max-examples-per-task",
        "8",
        "--dev-examples-per-task",
        "4",
        "--perplexity-blocks",
        "1",
        "--quiet",
    ]
    assert main(["freelm", "train", "--model", str(tiny_causal_dir), "--out", str(out), *flags, "--method.r", "2"]) == 0
    assert "saved to" in capsys.readouterr().out
    assert (
        main(
            [
                "freelm",
                "eval",
                str(out),
                "--tasks",
                "disaster-tweets,stsb",
                "--max-examples",
                "6",
                "--k",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "FreeLM" in table and "zero-shot" in table and "2-shot" in table
    assert "pearson *" in table and "bin_accuracy" in table and "f1 *" in table
    report = json.loads((out / "zero_shot_eval.json").read_text())
    for task in ("disaster-tweets", "stsb"):
        assert set(report["tasks"][task]["systems"]) == {"freelm", "zero-shot", "k-shot"}
        assert report["tasks"][task]["num_examples"] == 6


def test_cli_collects_every_argument_problem(tmp_path, capsys):
    from deltatune.cli import main

    code = main(
        [
            "freelm",
            "train",
            "--train-tasks",
            "snli,spam-ham",
            "--lm-ratio",
            "-1",
            "--method",
            "lroa",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    error = capsys.readouterr().err
    assert code == 2
    assert "lm_ratio=-1.0" in error and "Unknown method 'lroa'" in error and "Unknown task 'spam-ham'" in error


def test_cli_reads_the_loop_options_freelm_gained():
    from deltatune.cli import build_parser
    from deltatune.freelm.command import freelm_config_from

    for _ in range(2):  # a public function is called twice
        args = build_parser().parse_args(
            [
                "freelm",
                "train",
                "--report-to",
                "tensorboard,mlflow",
                "--log-dir",
                "logs",
                "--keep-best-dev",
                "--eval-every",
                "5",
            ]
        )
        config = freelm_config_from(args)
        assert (config.report_to, config.log_dir, config.keep_best_dev, config.eval_every) == (
            ("tensorboard", "mlflow"),
            "logs",
            True,
            5,
        )
    with pytest.raises(DeltatuneError, match="keep_best_dev needs eval_every"):
        freelm_config_from(build_parser().parse_args(["freelm", "train", "--keep-best-dev"]))


def test_dev_evaluation_never_scores_the_examples_the_run_chose_its_checkpoint_on(
    tmp_path, tiny_causal_dir, offline_data
):
    from deltatune.freelm.evaluation import evaluate_freelm, selection_examples
    from deltatune.sources.data import load_task_data

    out = tmp_path / "kept-best"
    run_freelm_training(str(tiny_causal_dir), FreeLMConfig(**SMALL_RUN, eval_every=3, keep_best_dev=True), out=out)
    data = load_task_data("rotten-tomatoes")
    config = json.loads((out / "deltatune.json").read_text())["freelm"]["config"]
    held = selection_examples(config, data, "dev")
    assert len(held) == SMALL_RUN["dev_examples_per_task"]
    dev = data.split("dev")
    report = evaluate_freelm(
        out, ["rotten-tomatoes"], baselines=("zero-shot",), max_examples=None, split="dev", quiet=True
    )
    task = report["tasks"]["rotten-tomatoes"]
    assert task["selection_examples_left_out"] == len(held)
    assert task["num_examples"] == len(dev) - len(held)
    test = evaluate_freelm(
        out, ["rotten-tomatoes"], baselines=("zero-shot",), max_examples=None, split="test", quiet=True
    )
    assert test["tasks"]["rotten-tomatoes"]["selection_examples_left_out"] == 0
    assert test["tasks"]["rotten-tomatoes"]["num_examples"] == len(data.split("test"))
    # a run that kept its last state chose nothing on dev: nothing is left out
    assert selection_examples({**config, "keep_best_dev": False}, data, "dev") == set()
