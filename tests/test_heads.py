"""Heads: pooling, cross- and bi-encoders on tiny models; saved and reloaded with the delta; the bi-encoder's
untrained output is the embedding-cosine baseline."""

import csv
import json
import math
import random

import numpy as np
import pytest
import torch

from deltatune.batching import collate, encode
from deltatune.errors import DeltatuneError
from deltatune.heads import PooledTaskModel, declared_pooling, head_of, pool, resolve_head
from deltatune.sources.models import load_model_for_task
from deltatune.tasks.spec import Split, TaskSpec

SIMILARITY = TaskSpec(
    "toy-similarity", ("a", "b"), score_range=(0.0, 5.0), metric="pearson", metrics=("pearson", "spearman")
)
PAIRS = TaskSpec("toy-pairs", ("a", "b"), ("different", "same"), metric="accuracy", metrics=("accuracy",))
SINGLE = TaskSpec("toy-single", ("text",), ("negative", "positive"), metric="accuracy", metrics=("accuracy",))


def test_pooling_reads_the_first_the_mean_of_the_real_or_the_last_real_token():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])
    assert torch.equal(pool(hidden, mask, "last"), torch.stack([hidden[0, 2], hidden[1, 1]]))
    assert torch.allclose(pool(hidden, mask, "mean"), torch.stack([hidden[0, :3].mean(0), hidden[1, :2].mean(0)]))


def chosen(*arguments):
    head = resolve_head(*arguments)
    return head.kind, head.pooling


def test_defaults_follow_the_checkpoint_then_the_model_family(tiny_bert_dir, tiny_llama_dir):
    from transformers import AutoConfig

    bert, llama = AutoConfig.from_pretrained(tiny_bert_dir), AutoConfig.from_pretrained(tiny_llama_dir)
    assert chosen("auto", "auto", SIMILARITY, bert, tiny_bert_dir) == ("cross-encoder", "cls")
    assert chosen("auto", "auto", SINGLE, llama, tiny_llama_dir) == ("cross-encoder", "last")
    # a sentence-embedding checkpoint declares its pooling: a bi-encoder for similarity, its pooling everywhere
    (tiny_bert_dir / "1_Pooling").mkdir()
    (tiny_bert_dir / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert declared_pooling(tiny_bert_dir) == "mean"
    assert chosen("auto", "auto", SIMILARITY, bert, tiny_bert_dir) == ("bi-encoder", "mean")
    assert chosen("auto", "auto", PAIRS, bert, tiny_bert_dir) == ("cross-encoder", "mean")
    assert "checkpoint" in resolve_head("auto", "auto", PAIRS, bert, tiny_bert_dir).reason
    with pytest.raises(DeltatuneError, match="head=bi-encoder encodes the two texts.*toy-single"):
        resolve_head("bi-encoder", "mean", SINGLE, bert, tiny_bert_dir)
    with pytest.raises(DeltatuneError, match="pooling='max' must be one of auto, cls, mean, last"):
        resolve_head("auto", "max", SINGLE, bert, None)


def pair_batch(tokenizer, task, separately):
    split = Split(
        [("the man plays guitar", "a man plays"), ("good movie", "the dog eats food"), ("happy", "sad song")],
        [1.0, 2.0, 3.0] if task.is_regression else [1, 0, 0],
    )
    return collate(
        encode(tokenizer, task, split, 32, separately), [0, 1, 2], tokenizer.pad_token_id, task.is_regression
    )


@pytest.mark.parametrize(
    "kind,pooling,task,width",
    [
        ("cross-encoder", "cls", SIMILARITY, 1),
        ("cross-encoder", "mean", PAIRS, 2),
        ("cross-encoder", "last", SIMILARITY, 1),
        ("bi-encoder", "mean", SIMILARITY, 1),
        ("bi-encoder", "cls", PAIRS, 2),
    ],
)
def test_each_head_gives_one_output_row_per_example(tiny_bert_dir, kind, pooling, task, width):
    torch.manual_seed(0)
    model, tokenizer = load_model_for_task(str(tiny_bert_dir), task, head=kind, pooling=pooling)
    assert (head_of(model).kind, head_of(model).pooling) == (kind, pooling)
    native = kind == "cross-encoder" and pooling == "cls"
    assert isinstance(model, PooledTaskModel) != native  # BERT's own head reads [CLS]
    batch = pair_batch(tokenizer, task, kind == "bi-encoder")
    labels = batch.pop("labels")
    assert batch["input_ids"].shape[0] == (6 if kind == "bi-encoder" else 3)  # a bi-encoder stacks the texts
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    assert logits.shape == (len(labels), width)
    if kind == "bi-encoder" and task.is_regression:  # a cosine, and no weights of its own
        assert logits.abs().max() <= 1 + 1e-6 and not hasattr(model, "classifier")
    if isinstance(model, PooledTaskModel) and pooling != "cls":
        assert model.base_model.pooler is None  # not read, so not trained or saved


def write_pairs(path, count, seed):
    rng = random.Random(seed)
    words = ["good", "bad", "happy", "sad", "dog", "cat", "movie", "song"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["a", "b", "score"])
        writer.writeheader()
        for _ in range(count):
            a, b = rng.choice(words), rng.choice(words)
            writer.writerow({"a": f"the {a}", "b": f"a {b}", "score": 5.0 if a == b else rng.choice([0.0, 1.0, 2.0])})
    return path


@pytest.mark.parametrize("kind,pooling", [("bi-encoder", "mean"), ("cross-encoder", "mean")])
def test_head_is_saved_and_reloaded_with_the_delta(tmp_path, tiny_bert_dir, kind, pooling):
    from safetensors.numpy import load_file

    import deltatune
    from deltatune.run import load_data_from_record

    data = deltatune.data_record(
        "pairs",
        local={
            "path": str(write_pairs(tmp_path / "pairs.csv", 200, 0)),
            "text_fields": ["a", "b"],
            "label_field": "score",
            "regression": True,
        },
    )
    record = deltatune.train(
        str(tiny_bert_dir),
        data=data,
        method="lora",
        out=str(tmp_path / "run"),
        head=kind,
        pooling=pooling,
        max_steps=6,
        batch_size=16,
        learning_rate=3e-3,
        quiet=True,
        precision="fp32",
    )
    assert record.head.kind == kind and record.head.pooling == pooling
    manifest = json.loads((tmp_path / "run" / "deltatune.json").read_text())
    assert manifest["head"] == {"kind": kind, "pooling": pooling, "transformers_head": False}
    tuned = deltatune.load(tmp_path / "run")
    assert isinstance(tuned.model, PooledTaskModel) and tuned.model.head_config.kind == kind
    # the reloaded delta scores the test split exactly as the trained model did
    saved = load_file(str(tmp_path / "run" / "test_outputs.safetensors"))
    test = load_data_from_record(data).split("test")
    predicted = tuned.predict([a for a, _ in test.texts], [b for _, b in test.texts], precision="fp32")
    np.testing.assert_allclose([p["score"] for p in predicted], saved["outputs"][:, 0], atol=1e-5)
    assert tuned.evaluate("test", precision="fp32")["pearson"] == pytest.approx(
        record.test_metrics["pearson"], abs=1e-6
    )


def test_peft_export_refuses_a_head_peft_cannot_rebuild(tmp_path, tiny_bert_dir):
    import deltatune
    from deltatune.peft_export import export_peft

    data = deltatune.data_record(
        "pairs",
        local={
            "path": str(write_pairs(tmp_path / "pairs.csv", 60, 1)),
            "text_fields": ["a", "b"],
            "label_field": "score",
            "regression": True,
        },
    )
    deltatune.train(
        str(tiny_bert_dir),
        data=data,
        method="lora",
        out=str(tmp_path / "run"),
        head="bi-encoder",
        max_steps=1,
        quiet=True,
    )
    with pytest.raises(DeltatuneError, match="bi-encoder head.*PEFT"):
        export_peft(tmp_path / "run", tmp_path / "peft")


def test_untrained_bi_encoder_is_the_embedding_cosine_baseline(tmp_path, tiny_bert_dir):
    import deltatune
    from deltatune.baselines import run_baseline
    from deltatune.batching import predict_encoded, to_task_units
    from deltatune.heads import target_scale
    from deltatune.methods import build_method, prepare_model
    from deltatune.run import load_data_from_record

    data = load_data_from_record(
        deltatune.data_record(
            "pairs",
            local={
                "path": str(write_pairs(tmp_path / "pairs.csv", 100, 2)),
                "text_fields": ["a", "b"],
                "label_field": "score",
                "regression": True,
            },
        )
    )
    baseline = run_baseline("embedding-cosine", str(tiny_bert_dir), data)
    torch.manual_seed(5)
    model, tokenizer = load_model_for_task(str(tiny_bert_dir), data.task, head="bi-encoder", pooling="mean")
    prepare_model(model, build_method("lora"))  # LoRA starts at the base model: step 0 changes nothing
    dev = encode(tokenizer, data.task, data.split("dev"), 64, texts_separately=True)
    outputs = to_task_units(
        predict_encoded(model, dev, data.task, tokenizer.pad_token_id, 64, "fp32"), target_scale(model, data.task, [])
    )
    np.testing.assert_allclose(outputs, baseline.outputs["dev"], atol=1e-6)
    low, high = data.task.score_range
    assert ((baseline.outputs["dev"] - low) / (high - low)).max() <= 1 + 1e-6
    assert baseline.metrics["dev"]["pearson"] != 0 and set(baseline.metrics) == {"dev", "test"}


def test_prompting_baselines_score_with_a_decoder_and_refuse_an_encoder(tmp_path, tiny_bert_dir):
    from transformers import AutoModelForCausalLM

    from conftest import build_tokenizer, make_sentiment_rows, tiny_llama_config
    from deltatune.baselines import run_baseline
    from deltatune.run import data_record, load_data_from_record

    torch.manual_seed(0)
    decoder = tmp_path / "tiny-decoder"
    AutoModelForCausalLM.from_config(tiny_llama_config()).save_pretrained(decoder)
    build_tokenizer().save_pretrained(decoder)
    with open(tmp_path / "toy.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(make_sentiment_rows(60))
    data = load_data_from_record(data_record("toy", local={"path": str(tmp_path / "toy.csv"), "text_fields": ["text"]}))
    zero = run_baseline("zero-shot", str(decoder), data)
    few = run_baseline("few-shot", str(decoder), data, seed=1, shots=2)
    for result in (zero, few):
        assert result.outputs["test"].shape == (len(data.split("test")), 2) and set(result.metrics) == {"dev", "test"}
        assert 0 <= result.metrics["test"]["accuracy"] <= 1
    assert few.details["shots"] == 2 and not np.array_equal(few.outputs["dev"], zero.outputs["dev"])
    with pytest.raises(DeltatuneError, match="need a decoder.*is an encoder"):
        run_baseline("zero-shot", str(tiny_bert_dir), data)
    with pytest.raises(DeltatuneError, match="embedding-cosine scores sentence pairs"):
        run_baseline("embedding-cosine", str(tiny_bert_dir), data)


def test_a_bi_encoder_given_pairs_encoded_together_is_a_clear_error(tmp_path, tiny_bert_dir):
    from deltatune.batching import predict_encoded

    model, tokenizer = load_model_for_task(str(tiny_bert_dir), SIMILARITY, head="bi-encoder", pooling="mean")
    split = Split([("a good film", "a fine film"), ("a dog", "the man")], [1.0, 2.0])
    together = encode(tokenizer, SIMILARITY, split, 32)
    with pytest.raises(DeltatuneError, match="encodes the texts of a pair separately"):
        predict_encoded(model, together, SIMILARITY, tokenizer.pad_token_id or 0)
    apart = encode(tokenizer, SIMILARITY, split, 32, texts_separately=True)
    assert predict_encoded(model, apart, SIMILARITY, tokenizer.pad_token_id or 0).shape == (2, 1)


def test_cosent_penalises_each_pair_scored_the_wrong_way_round():
    from deltatune.training import cosent_loss, fit_line

    labels = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    right = cosent_loss(torch.tensor([0.9, 0.1, 0.3], dtype=torch.float64), labels)
    # the pairs (0, 1) and (0, 2) are ordered; the tie (1, 2) is not a pair
    expected = math.log(1 + math.exp(20 * (0.1 - 0.9)) + math.exp(20 * (0.3 - 0.9)))
    assert right.item() == pytest.approx(expected, rel=1e-5)
    wrong = cosent_loss(torch.tensor([0.1, 0.9, 0.3], dtype=torch.float64), labels)
    assert wrong.item() == pytest.approx(math.log(1 + math.exp(16) + math.exp(4)), rel=1e-5)
    assert cosent_loss(torch.tensor([0.2, 0.7]), torch.tensor([0.5, 0.5])).item() == 0.0  # no ordered pair
    assert fit_line(np.array([0.0, 1.0, 2.0]), np.array([1.0, 3.0, 5.0])) == pytest.approx((1.0, 2.0))
    assert fit_line(np.array([0.4, 0.4]), np.array([1.0, 3.0])) == (2.0, 0.0)


def test_a_cosent_run_maps_its_cosines_onto_the_score_range_by_a_line_fitted_on_training_data(tmp_path, tiny_bert_dir):
    import deltatune
    from deltatune.run import load_data_from_record

    local = {
        "path": str(write_pairs(tmp_path / "pairs.csv", 120, 3)),
        "text_fields": ["a", "b"],
        "label_field": "score",
        "regression": True,
    }
    data = deltatune.data_record("pairs", local=local)
    settings = dict(data=data, method="lora", regression_loss="cosent", batch_size=16, quiet=True, precision="fp32")
    record = deltatune.train(
        str(tiny_bert_dir), out=str(tmp_path / "run"), head="bi-encoder", max_steps=6, learning_rate=1e-2, **settings
    )
    low, high = load_data_from_record(data).task.score_range
    tuned = deltatune.load(tmp_path / "run")
    offset, factor = tuned.manifest.target_scale
    assert (offset, factor) != (low, high - low) and record.dev_metrics["pearson"] > -1  # refitted
    # the saved delta predicts through the fitted line: its outputs on the training pairs fit their scores
    train = load_data_from_record(data).split("train")
    answers = tuned.predict([a for a, _ in train.texts], [b for _, b in train.texts], precision="fp32")
    predicted = np.array([answer["score"] for answer in answers])
    gold = np.asarray(train.labels, dtype=float)
    raw = (predicted - offset) / factor
    # a least-squares line: its outputs average the gold scores, and miss them by less than the plain cosine
    # mapping (or any other line) does
    assert predicted.mean() == pytest.approx(gold.mean(), abs=1e-2)
    plain = low + (high - low) * raw
    assert ((predicted - gold) ** 2).sum() <= ((plain - gold) ** 2).sum()
    assert ((predicted - gold) ** 2).sum() <= ((gold.mean() + 0.5 * (predicted - gold.mean()) - gold) ** 2).sum()
    with pytest.raises(DeltatuneError, match="regression_loss=cosent ranks the cosine similarities"):
        deltatune.train(str(tiny_bert_dir), out=str(tmp_path / "cross"), head="cross-encoder", max_steps=1, **settings)
