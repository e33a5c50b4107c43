"""Frozen-model methods (Levine et al. 2022): input-dependent prompt tuning and the recursive LM.

The decoder never changes: every tensor of the base model is compared before and after training.
"""

import pytest
import torch

from conftest import build_tiny_model, build_tokenizer, make_sentiment_rows, tiny_llama_config
from deltatune.errors import DeltatuneError
from deltatune.methods import build_method, delta_state, load_delta_state, prepare_model
from deltatune.tasks.spec import Split, TaskData, TaskSpec
from deltatune.training import TrainConfig, train

TEXTS = ["the man plays guitar", "a good movie", "not very happy", "the dog eats food and sings a song"]
TASK = TaskSpec("toy-sentiment", ("text",), ("negative", "positive"))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sentiment_split(count=32, seed=0) -> Split:
    rows = make_sentiment_rows(count, seed)
    return Split([(row["text"],) for row in rows], [1 if row["label"] == "positive" else 0 for row in rows])


def padded_batch(texts=TEXTS):
    encoded = build_tokenizer()(texts, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def logits_one_by_one(model, batch):
    rows = []
    for index in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][index].sum())
        rows.append(model(**{key: value[index : index + 1, :length] for key, value in batch.items()}).logits)
    return torch.cat(rows)


def adapted(kind, name, options, tokenizer=None, seed=0):
    model = build_tiny_model(kind, num_labels=2, seed=seed)
    method = build_method(name, options)
    method.tokenizer = tokenizer if tokenizer is not None else getattr(method, "tokenizer", None)
    names = prepare_model(model, method)
    return model, method, names


def randomise(model, names, scale=0.5):
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in names:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


FROZEN_CASES = [
    ("input-dependent-prompt", {"init": "vocab", "num_virtual_tokens": 4, "attention_size": 16, "num_heads": 2}),
    (
        "input-dependent-prompt",
        {"init": "text", "num_virtual_tokens": 4, "attention_size": 16, "num_heads": 2, "encoder": "TINY_BERT"},
    ),
    ("recursive-lm", {"connector_size": 16}),
    ("recursive-lm", {"connector_size": 16, "combine": "replace"}),
]


def resolve(options, tiny_bert_dir):
    return {k: (str(tiny_bert_dir) if v == "TINY_BERT" else v) for k, v in options.items()}


@pytest.mark.parametrize(
    "name, options",
    FROZEN_CASES,
    ids=lambda v: (
        v
        if isinstance(v, str)
        else "-".join(f"{k}={v}" for k, v in sorted(v.items()) if k in ("encoder", "combine", "init"))
    ),
)
def test_training_leaves_every_decoder_tensor_unchanged(name, options, tiny_bert_dir):
    model = build_tiny_model("llama", num_labels=2)
    decoder = {n: t.detach().clone() for n, t in model.state_dict().items() if not n.startswith("score.")}
    method = build_method(name, resolve(options, tiny_bert_dir))
    method.tokenizer = build_tokenizer()
    names = prepare_model(model, method)
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    train(
        model,
        build_tokenizer(),
        TASK,
        sentiment_split(),
        sentiment_split(8, seed=1),
        method,
        TrainConfig(max_steps=4, batch_size=8, eval_every=4, quiet=True, learning_rate=1e-2),
    )
    after = model.state_dict()
    for tensor_name, tensor in decoder.items():
        assert torch.equal(after[tensor_name], tensor), f"{tensor_name} changed"
    moved = {n for n, p in model.named_parameters() if n in names and not torch.equal(p, trainable_before[n])}
    assert moved and "score.weight" in moved
    assert not any(n.startswith("model.layers.") or n == "model.embed_tokens.weight" for n in names)


# ----------------------------------------------------------------------------------------------- input-dependent prompt


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_input_dependent_prompt_starts_as_plain_prompt_tuning(kind):
    batch = padded_batch()
    torch.manual_seed(11)
    plain, _, _ = adapted(kind, "prompt-tuning", {"init": "vocab", "num_virtual_tokens": 5})
    torch.manual_seed(11)
    dependent, _, _ = adapted(kind, "input-dependent-prompt", {"init": "vocab", "num_virtual_tokens": 5})
    torch.testing.assert_close(
        plain.base_model.soft_prompt.deltas.default.embeddings,
        dependent.base_model.input_dependent_prompt.deltas.default.prompt,
        rtol=0,
        atol=0,
    )
    with torch.no_grad():
        torch.testing.assert_close(dependent(**batch).logits, plain(**batch).logits, rtol=0, atol=1e-6)


def test_input_dependent_prompts_differ_per_input_and_batches_match_single_examples():
    model, _, names = adapted("llama", "input-dependent-prompt", {"init": "vocab", "num_virtual_tokens": 3})
    randomise(model, {n for n in names if "input_dependent_prompt" in n}, scale=0.3)
    generator = model.base_model.input_dependent_prompt.active_part()
    batch = padded_batch()
    with torch.no_grad():
        embeds = model.base_model.get_input_embeddings()(batch["input_ids"])
        prompts = generator(embeds, batch["attention_mask"])
        assert prompts.shape == (4, 3, 32)
        assert not torch.allclose(prompts[0], prompts[1])
        # padding must not leak into the prompt: a padded row gets the prompt it gets alone
        length = int(batch["attention_mask"][1].sum())
        alone = generator(embeds[1:2, :length], batch["attention_mask"][1:2, :length])
        torch.testing.assert_close(prompts[1:2], alone, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(**batch).logits, logits_one_by_one(model, batch), rtol=0, atol=1e-5)


def test_external_encoder_reads_the_text_is_frozen_and_stays_out_of_the_delta(tiny_bert_dir, monkeypatch):
    from deltatune.methods.input_dependent_prompt import ExternalEncoder

    options = {"encoder": str(tiny_bert_dir), "init": "vocab", "num_virtual_tokens": 4}
    model, method, names = adapted("llama", "input-dependent-prompt", options, tokenizer=build_tokenizer())
    generator = model.base_model.input_dependent_prompt.active_part()
    assert isinstance(generator.encoder, ExternalEncoder)
    assert generator.key.in_features == 32  # the tiny BERT's width (the decoder's is also 32 here)
    encoder_names = {n for n, _ in model.named_parameters() if ".encoder.model." in n}
    assert encoder_names and not encoder_names & names
    assert not any(".encoder." in n for n in delta_state(model, method))

    seen = []
    original = ExternalEncoder.forward

    def spy(self, texts):
        seen.extend(texts)
        return original(self, texts)

    monkeypatch.setattr(ExternalEncoder, "forward", spy)
    model.train()
    assert not generator.encoder.model.training, "the frozen encoder never runs dropout"
    batch = padded_batch()
    logits = model(**batch).logits
    # the decoder's tokens decoded back to text: specials, padding and unknown words ('and') dropped
    assert seen == TEXTS[:3] + ["the dog eats food sings a song"]
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()
    assert generator.output.weight.grad is not None and generator.output.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in generator.encoder.parameters())

    randomise(model, names, scale=0.1)
    model.eval()
    tensors = {n: t.clone() for n, t in delta_state(model, method).items()}
    fresh, fresh_method, _ = adapted("llama", "input-dependent-prompt", options, tokenizer=build_tokenizer())
    load_delta_state(fresh, fresh_method, tensors)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_external_encoder_without_a_decoder_tokenizer_says_how_to_fix_it(tiny_bert_dir):
    model = build_tiny_model("llama")
    method = build_method("input-dependent-prompt", {"encoder": str(tiny_bert_dir), "init": "vocab"})
    with pytest.raises(DeltatuneError, match="needs the decoder's tokenizer.*`tokenizer` attribute"):
        prepare_model(model, method)


def test_an_encoder_that_cannot_be_loaded_is_reported(tmp_path):
    method = build_method("input-dependent-prompt", {"encoder": str(tmp_path), "init": "vocab"})
    method.tokenizer = build_tokenizer()
    with pytest.raises(DeltatuneError, match="method.encoder="):
        prepare_model(build_tiny_model("llama"), method)


# ----------------------------------------------------------------------------------------------- recursive LM


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_recursive_lm_runs_the_frozen_model_twice_on_the_connectors_rewrite(kind):
    model, _, names = adapted(kind, "recursive-lm", {"connector_size": 8})
    calls = []
    model.base_model.register_forward_hook(lambda module, args, output: calls.append(1))
    batch = padded_batch()
    base = build_tiny_model(kind, num_labels=2)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits, rtol=0, atol=1e-6)
        assert len(calls) == 2, "one call of the model is two passes of the backbone"
        randomise(model, {n for n in names if ".recursion." in n}, scale=0.3)
        assert not torch.allclose(model(**batch).logits, base(**batch).logits, atol=1e-3)
        if kind == "llama":
            torch.testing.assert_close(model(**batch).logits, logits_one_by_one(model, batch), rtol=0, atol=1e-5)


def test_recursive_lm_replace_feeds_only_the_connector_output():
    model, _, _ = adapted("llama", "recursive-lm", {"connector_size": 8, "combine": "replace"})
    seen = {}
    backbone = model.base_model
    original_forward = backbone.forward

    def spy(*args, **kwargs):
        if kwargs.get("inputs_embeds") is not None:
            seen["second"] = kwargs["inputs_embeds"]
        return original_forward(*args, **kwargs)

    backbone.forward = spy
    batch = padded_batch()
    with torch.no_grad():
        model(**batch)
        embeds = backbone.get_input_embeddings()(batch["input_ids"])
    assert "second" in seen and not torch.allclose(seen["second"], embeds)


def test_frozen_method_config_errors_name_the_option():
    with pytest.raises(DeltatuneError, match=r"method.attention_size=10 must be a multiple of method.num_heads=4"):
        build_method("input-dependent-prompt", {"attention_size": "10", "num_heads": "4"})
    with pytest.raises(DeltatuneError, match=r"method.connector_size=0 must be at least 1"):
        build_method("recursive-lm", {"connector_size": "0"})
    with pytest.raises(DeltatuneError, match=r"method.combine='mix': must be one of 'add', 'replace'"):
        build_method("recursive-lm", {"combine": "mix"})


# ----------------------------------------------------------------------------------------------- multi-task via FreeLM


def test_input_dependent_prompt_trains_multi_task_through_freelm_with_the_decoder_frozen():
    from transformers import LlamaForCausalLM

    from deltatune.freelm import FreeLMConfig, train_freelm
    from deltatune.freelm.artifact import prepare_freelm_model

    torch.manual_seed(0)
    causal = LlamaForCausalLM(tiny_llama_config()).eval()
    decoder = {n: t.detach().clone() for n, t in causal.state_dict().items()}
    method = build_method(
        "input-dependent-prompt",
        {
            "init": "text",
            "num_virtual_tokens": 4,
            "attention_size": 16,
            "num_heads": 2,
            "init_text": "the man is happy",
        },
    )
    model, names, _, _ = prepare_freelm_model(causal, build_tokenizer(), method)
    before = {n: p.detach().clone() for n, p in model.classifier.named_parameters() if n in names}
    mood = TaskData(TaskSpec("mood", ("text",), ("sad", "happy")), {"train": sentiment_split(16)})
    pets = TaskData(
        TaskSpec("pets", ("text",), ("cat", "dog")),
        {"train": Split([("a cat eats",), ("a dog runs",)] * 8, [0, 1] * 8)},
    )
    config = FreeLMConfig(
        train_tasks=("mood", "pets"),
        steps=6,
        lm_ratio=1,
        teacher_batch_size=4,
        lm_batch_size=1,
        lm_sequence_length=8,
        max_length=40,
        quiet=True,
    )
    train_freelm(model, build_tokenizer(), [mood, pets], TEXTS * 3, config, method)
    for name, tensor in decoder.items():
        assert torch.equal(causal.state_dict()[name], tensor), f"{name} changed"
    moved = {n for n, p in model.classifier.named_parameters() if n in names and not torch.equal(p, before[n])}
    assert any("input_dependent_prompt" in n for n in moved) and "score.weight" in moved
