"""Prompt tuning and prefix tuning: PEFT parity, right-padded batches, init, deltas and limits."""

import copy

import pytest
import torch

from conftest import build_tiny_model, build_tokenizer, delta_manifest, make_sentiment_rows, save_tiny_model_dir
from deltatune.delta import read_tensors, save_delta
from deltatune.errors import DeltatuneError
from deltatune.methods import build_method, delta_state, load_delta_state, prepare_model
from deltatune.methods.common import head_names
from deltatune.tasks.spec import Split, TaskSpec
from deltatune.training import TrainConfig, train

peft = pytest.importorskip("peft")

KINDS = ["bert", "llama"]
TEXTS = ["the man plays guitar", "a good movie", "not very happy", "the dog eats food and sings a song"]
NUM_TOKENS = 5


def padded_batch(texts=TEXTS):
    """Right-padded, as the training loop builds batches."""
    encoded = build_tokenizer()(texts, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def example_alone(batch, index):
    length = int(batch["attention_mask"][index].sum())
    return {key: value[index : index + 1, :length] for key, value in batch.items()}


def logits_one_by_one(model, batch):
    return torch.cat([model(**example_alone(batch, i)).logits for i in range(batch["input_ids"].shape[0])])


def with_token_type_ids(batch):
    """Pair-style segment ids: real tokens from position 3 on form the second segment."""
    second = (torch.arange(batch["input_ids"].shape[1]) >= 3).long()
    return {**batch, "token_type_ids": second * batch["attention_mask"]}


def adapted(kind, name, **options):
    model = build_tiny_model(kind, num_labels=3)
    method = build_method(name, options)
    prepare_model(model, method)
    return model.eval(), method


def randomise(model, names):
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in names:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


# ---------------------------------------------------------------------------------------------- prompt tuning


def peft_prompt_model(kind, prompt):
    model = build_tiny_model(kind, num_labels=3)
    wrapped = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=NUM_TOKENS))
    with torch.no_grad():
        wrapped.prompt_encoder["default"].embedding.weight.copy_(prompt)
    return wrapped.eval()


def test_prompt_tuning_matches_peft_on_bert_with_padding_and_segments():
    ours, _ = adapted("bert", "prompt-tuning", num_virtual_tokens=NUM_TOKENS, init="vocab")
    randomise(ours, {"bert.soft_prompt.deltas.default.embeddings"})
    reference = peft_prompt_model("bert", ours.bert.soft_prompt.deltas.default.embeddings)
    for batch in (padded_batch(), with_token_type_ids(padded_batch())):
        with torch.no_grad():
            torch.testing.assert_close(ours(**batch).logits, reference(**batch).logits, atol=1e-5, rtol=0)


def test_prompt_tuning_matches_peft_on_llama_example_by_example():
    """PEFT gives Llama inputs_embeds only, so its head pools the last position: right only without padding.

    Ours pools the last real token, so our padded batch must equal PEFT on each example alone.
    """
    ours, _ = adapted("llama", "prompt-tuning", num_virtual_tokens=NUM_TOKENS, init="vocab")
    randomise(ours, {"model.soft_prompt.deltas.default.embeddings"})
    reference = peft_prompt_model("llama", ours.model.soft_prompt.deltas.default.embeddings)
    batch = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, logits_one_by_one(reference, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["prompt-tuning", "prefix-tuning"])
def test_right_padded_batch_gives_each_example_its_own_logits(kind, name):
    options = {"init": "vocab"} if name == "prompt-tuning" else {}
    model, _ = adapted(kind, name, num_virtual_tokens=NUM_TOKENS, **options)
    batch = padded_batch()
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding to test anything"
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, logits_one_by_one(model, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_tuning_trains_only_the_prompt_and_head(kind):
    model, method = adapted(kind, "prompt-tuning", num_virtual_tokens=NUM_TOKENS, init="vocab")
    names = method.trainable_names(model)
    assert names == {f"{'bert' if kind == 'bert' else 'model'}.soft_prompt.deltas.default.embeddings"} | head_names(
        model
    )
    model(**padded_batch()).logits.sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == names


def test_text_init_embeds_the_text_repeated_to_the_prompt_length():
    method = build_method("prompt-tuning", {"num_virtual_tokens": 7, "init_text": "good movie"})
    method.tokenizer = build_tokenizer()
    model = build_tiny_model("bert", num_labels=3)
    prepare_model(model, method)
    token_ids = build_tokenizer()("good movie", add_special_tokens=False)["input_ids"]
    expected = model.bert.embeddings.word_embeddings.weight[(token_ids * 4)[:7]]
    torch.testing.assert_close(model.bert.soft_prompt.deltas.default.embeddings, expected, rtol=0, atol=0)


def test_text_init_finds_the_tokenizer_saved_with_the_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    directory = save_tiny_model_dir(tmp_path / "tiny", "llama", num_labels=2)
    model = AutoModelForSequenceClassification.from_pretrained(directory)
    prepare_model(model, build_method("prompt-tuning", {"num_virtual_tokens": 3, "init_text": "happy dog"}))
    token_ids = build_tokenizer()("happy dog", add_special_tokens=False)["input_ids"]
    expected = model.model.embed_tokens.weight[(token_ids * 2)[:3]]
    torch.testing.assert_close(model.model.soft_prompt.deltas.default.embeddings, expected, rtol=0, atol=0)


def test_text_init_without_a_tokenizer_says_what_to_do():
    with pytest.raises(DeltatuneError, match="method.init=vocab"):
        prepare_model(build_tiny_model("bert"), build_method("prompt-tuning"))


def test_vocab_and_random_init():
    model, _ = adapted("bert", "prompt-tuning", num_virtual_tokens=NUM_TOKENS, init="vocab")
    vocabulary = model.bert.embeddings.word_embeddings.weight
    for row in model.bert.soft_prompt.deltas.default.embeddings:
        assert (vocabulary == row).all(dim=1).any()
    model, _ = adapted("bert", "prompt-tuning", num_virtual_tokens=200, init="random")
    spread = model.bert.soft_prompt.deltas.default.embeddings.std() / model.bert.embeddings.word_embeddings.weight.std()
    assert 0.8 < spread < 1.2


def test_prompt_tuning_config_problems_are_collected():
    with pytest.raises(DeltatuneError) as error:
        build_method("prompt-tuning", {"num_virtual_tokens": 0, "init_text": "  "})
    assert "method.num_virtual_tokens=0" in str(error.value) and "method.init_text" in str(error.value)


# ---------------------------------------------------------------------------------------------- prefix tuning


def peft_prefix_model(kind, ours, projection):
    """PEFT's prefix tuning holding our prefix (or our MLP and embedding), head equal by construction."""
    model = build_tiny_model(kind, num_labels=3)
    config = peft.PrefixTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=NUM_TOKENS, prefix_projection=projection, encoder_hidden_size=16
    )
    wrapped = peft.get_peft_model(model, config)
    encoder = wrapped.prompt_encoder["default"]
    prefix = ours.base_model.prefix_tuning.active_part()
    with torch.no_grad():
        if projection:
            encoder.embedding.weight.copy_(prefix.embedding)
            for index in (0, 2):
                encoder.transform[index].weight.copy_(prefix.mlp[index].weight)
                encoder.transform[index].bias.copy_(prefix.mlp[index].bias)
        else:  # ours (layers, key/value, L, width) -> PEFT's (L, layers · key/value · width)
            encoder.embedding.weight.copy_(prefix.prefixes.permute(2, 0, 1, 3).reshape(NUM_TOKENS, -1))
    return wrapped.eval()


def peft_prefix_logits(wrapped, batch):
    """PEFT's SEQ_CLS prefix forward.

    peft 0.21 refuses models whose forward has no `past_key_values` parameter, and transformers 5
    renamed it `cache` (the old name still works through a deprecation shim), so on this pair PEFT
    raises for BERT and Llama alike. Then do what its `_prefix_tuning_forward` does past that check,
    with PEFT's own prefix cache from `get_prompt`.
    """
    try:
        return wrapped(**batch).logits
    except ValueError as error:
        if "does not support past key values" not in str(error):
            raise
    base = wrapped.base_model
    batch_size = batch["input_ids"].shape[0]
    mask = torch.cat([torch.ones(batch_size, NUM_TOKENS, dtype=torch.long), batch["attention_mask"]], dim=1)
    cache = wrapped.get_prompt(batch_size)
    if hasattr(base, "score"):  # Llama: the task model takes the cache itself
        return base(input_ids=batch["input_ids"], attention_mask=mask, cache=cache).logits
    outputs = base.bert(
        input_ids=batch["input_ids"], attention_mask=mask, cache=cache, token_type_ids=batch.get("token_type_ids")
    )
    return base.classifier(base.dropout(outputs.pooler_output))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_matches_peft(kind, projection):
    ours, method = adapted(
        kind, "prefix-tuning", num_virtual_tokens=NUM_TOKENS, reparameterize=projection, mlp_hidden_size=16
    )
    randomise(ours, method.trainable_names(ours) - head_names(ours))
    reference = peft_prefix_model(kind, ours, projection)
    batch = padded_batch() if kind == "bert" else padded_batch(TEXTS[:2])  # Llama: same length, no padding
    batches = [batch, with_token_type_ids(batch)] if kind == "bert" else [batch]
    with torch.no_grad():
        for inputs in batches:
            torch.testing.assert_close(ours(**inputs).logits, peft_prefix_logits(reference, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_reparameterised_prefix_is_saved_as_plain_prefixes_and_reloads_exactly(kind, tmp_path):
    batch = padded_batch()
    trained, method = adapted(kind, "prefix-tuning", reparameterize=True, mlp_hidden_size=64)
    trainable = method.trainable_names(trained)
    assert any(".mlp." in n for n in trainable)
    randomise(trained, trainable)
    with torch.no_grad():
        expected = trained(**batch).logits

    save_delta(tmp_path, trained, method, delta_manifest(method, "tiny"))
    tensors = read_tensors(tmp_path)
    backbone = "bert" if kind == "bert" else "model"
    assert set(tensors) == {f"{backbone}.prefix_tuning.prefixes"} | head_names(trained)
    stored = sum(t.numel() for t in tensors.values())
    assert stored < sum(p.numel() for n, p in trained.named_parameters() if n in trainable)

    base = build_tiny_model(kind, num_labels=3)
    reloaded = build_method("prefix-tuning", {"reparameterize": True, "mlp_hidden_size": 64})
    prepare_model(base, reloaded)
    load_delta_state(base, reloaded, tensors)
    base.eval()
    prefix = base.base_model.prefix_tuning.active_part()
    assert not prefix.reparameterized and not hasattr(prefix, "embedding")
    assert reloaded.trainable_names(base) == {f"{backbone}.prefix_tuning.deltas.default.prefixes"} | head_names(base)
    with torch.no_grad():
        torch.testing.assert_close(base(**batch).logits, expected, rtol=0, atol=0)


def test_reparameterised_training_reaches_the_mlp_and_embedding():
    model, method = adapted("llama", "prefix-tuning", reparameterize=True, mlp_hidden_size=16)
    model.train()
    model(**padded_batch()).logits.sum().backward()
    with_gradient = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_gradient == method.trainable_names(model)


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_shapes_follow_the_key_value_width(kind):
    model, _ = adapted(kind, "prefix-tuning", num_virtual_tokens=NUM_TOKENS)
    # tiny BERT: 4 heads over 32 dims; tiny Llama: 2 key/value heads of width 8 (grouped-query attention)
    width = 32 if kind == "bert" else 2 * 8
    assert tuple(model.base_model.prefix_tuning.deltas.default.prefixes.shape) == (2, 2, NUM_TOKENS, width)


def test_loading_a_delta_with_another_prefix_length_is_an_error():
    trained, method = adapted("bert", "prefix-tuning", num_virtual_tokens=4)
    tensors = delta_state(trained, method)
    base, other = adapted("bert", "prefix-tuning", num_virtual_tokens=6)
    with pytest.raises(DeltatuneError, match="num_virtual_tokens=6"):
        load_delta_state(base, other, tensors)
    with pytest.raises(DeltatuneError, match="missing tensors"):
        load_delta_state(base, other, {k: v for k, v in tensors.items() if "classifier" not in k})


def test_prefix_tuning_config_problems_are_collected():
    with pytest.raises(DeltatuneError) as error:
        build_method("prefix-tuning", {"num_virtual_tokens": 0, "mlp_hidden_size": 0})
    assert "method.num_virtual_tokens=0" in str(error.value) and "method.mlp_hidden_size=0" in str(error.value)


# ---------------------------------------------------------------------------------------------- both


@pytest.mark.parametrize("name", ["prompt-tuning", "prefix-tuning"])
def test_virtual_tokens_count_against_bert_position_limit(name):
    options = {"init": "vocab"} if name == "prompt-tuning" else {}
    model, _ = adapted("bert", name, num_virtual_tokens=60, **options)  # tiny BERT has 64 positions
    fits = {"input_ids": torch.full((1, 4), 7), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    model(**fits)
    too_long = {"input_ids": torch.full((1, 5), 7), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with pytest.raises(DeltatuneError, match="--max-length=4"):
        model(**too_long)


@pytest.mark.parametrize("name", ["prompt-tuning", "prefix-tuning"])
def test_a_deep_copy_runs_its_own_virtual_tokens(name):
    options = {"init": "vocab"} if name == "prompt-tuning" else {}
    model, method = adapted("llama", name, num_virtual_tokens=NUM_TOKENS, **options)
    duplicate = copy.deepcopy(model)
    batch = padded_batch()
    with torch.no_grad():
        original = model(**batch).logits.clone()
        torch.testing.assert_close(duplicate(**batch).logits, original, rtol=0, atol=0)
        randomise(duplicate, method.trainable_names(duplicate) - head_names(duplicate))
        assert not torch.allclose(duplicate(**batch).logits, original)
        torch.testing.assert_close(model(**batch).logits, original, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["prompt-tuning", "prefix-tuning"])
def test_the_training_loop_runs_unchanged(kind, name):
    """The loop calls model(input_ids=, attention_mask=) on right-padded batches and knows nothing else."""
    task = TaskSpec("toy-sentiment", ("text",), ("negative", "positive"), metric="accuracy", metrics=("accuracy",))

    def split(rows):
        return Split([(r["text"],) for r in rows], [1 if r["label"] == "positive" else 0 for r in rows])

    torch.manual_seed(0)
    model = build_tiny_model(kind)
    method = build_method(name, {"init": "vocab"} if name == "prompt-tuning" else {})
    names = prepare_model(model, method)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(
        model,
        build_tokenizer(),
        task,
        split(make_sentiment_rows(24, seed=1)),
        split(make_sentiment_rows(8, seed=2)),
        method,
        TrainConfig(max_steps=3, batch_size=8, eval_every=3, quiet=True, seed=3),
    )
    assert result.steps == 3 and "accuracy" in result.best_metrics
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= names


def test_default_learning_rates():
    assert build_method("prompt-tuning").default_learning_rate == 3e-2
    assert build_method("prefix-tuning").default_learning_rate == 1e-2
