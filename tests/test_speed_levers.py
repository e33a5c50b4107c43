"""The training loop's speed levers: the lane-based dropout mask and frozen weights held in bf16."""

from contextlib import contextmanager, nullcontext

import pytest
import torch

from conftest import build_tiny_model, build_tokenizer
from deltatune import precision
from deltatune.fast_dropout import (
    ATTENTION_NAME,
    attention_forward,
    dropout_set_to,
    fast_dropout,
    keep_mask,
    masked_dropout,
)
from deltatune.precision import frozen_linear_weights_in_bf16, resolve_precision
from test_training import SENTIMENT, sentiment_splits, trained


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_the_right_fraction_and_follows_the_seed(p):
    torch.manual_seed(0)
    mask = keep_mask((1000, 1000), p)
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.002
    torch.manual_seed(0)
    assert torch.equal(keep_mask((1000, 1000), p), mask)
    assert not torch.equal(keep_mask((1000, 1000), p), mask)
    # odd sizes use a partial last draw
    assert keep_mask((3, 7), p).shape == (3, 7)


def test_masked_dropout_scales_kept_values_and_routes_gradients_through_the_mask():
    x = torch.randn(200, 300, requires_grad=True)
    y = masked_dropout(x, 0.25)
    kept = y != 0
    assert torch.allclose(y[kept], x.detach()[kept] / 0.75)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.75)
    assert masked_dropout(x, 0.25, training=False) is x and masked_dropout(x, 0.0) is x
    assert torch.equal(masked_dropout(x, 1.0), torch.zeros_like(x))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_attention_with_dropout_matches_sdpa_when_nothing_is_dropped(kind):
    """The training path (explicit softmax, mask, dropout) equals SDPA when p is too small to drop."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = build_tiny_model(kind).train()
    attention = (
        model.base_model.encoder.layer[0].attention.self if kind == "bert" else model.base_model.layers[0].self_attn
    )
    torch.manual_seed(0)
    query, key = torch.randn(2, 4, 5, 8), torch.randn(2, 4 if kind == "bert" else 2, 5, 8)
    value = torch.randn_like(key)
    padding = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    padding[1, :, :, 3:] = False
    masks = [None, padding] if kind == "bert" else [None]
    for mask in masks:
        ours, _ = attention_forward(attention, query, key, value, mask, dropout=1e-9, is_causal=kind == "llama")
        reference, _ = sdpa_attention_forward(
            attention, query, key, value, mask, dropout=0.0, is_causal=kind == "llama"
        )
        assert torch.allclose(ours, reference, atol=1e-6), (kind, mask is None)


def test_fast_dropout_swaps_in_and_restores_everything():
    model, tokenizer = build_tiny_model("bert", seed=1), build_tokenizer()
    model.config.attention_probs_dropout_prob = 0.1
    batch = tokenizer(["the dog plays", "a very sad film was not good"], padding=True, return_tensors="pt")
    reference = model(**batch).logits
    with fast_dropout(model):
        assert model.config._attn_implementation == ATTENTION_NAME
        assert torch.equal(model(**batch).logits, reference)  # eval mode: nothing dropped, SDPA used
        model.train()
        torch.manual_seed(5)
        first = model(**batch).logits
        torch.manual_seed(5)
        assert torch.equal(model(**batch).logits, first)
        assert not torch.equal(first, reference)
        model.eval()
    assert model.config._attn_implementation == "sdpa"
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.equal(model(**batch).logits, reference)


def _dropout_values(model) -> list[float]:
    values = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    values += [m.attention_dropout for m in model.modules() if isinstance(vars(m).get("attention_dropout"), float)]
    return values + [v for k, v in sorted(vars(model.config).items()) if "dropout" in k and isinstance(v, float)]


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_dropout_set_to_reaches_every_dropout_and_restores_it(kind):
    """BERT drops out through nn.Dropout modules, Llama's attention through a plain float it reads each call."""
    model, tokenizer = build_tiny_model(kind, seed=1), build_tokenizer()
    if kind == "llama":
        for layer in model.base_model.layers:
            layer.self_attn.attention_dropout = 0.3
        model.config.attention_dropout = 0.3
    before = _dropout_values(model)
    assert any(v > 0 for v in before)
    batch = tokenizer(["the dog plays", "a very sad film was not good"], padding=True, return_tensors="pt")
    reference = model(**batch).logits
    with dropout_set_to(model, 0.0):
        model.train()
        assert torch.equal(model(**batch).logits, reference)  # training mode, nothing dropped
        model.eval()
    assert _dropout_values(model) == before
    if kind == "bert":  # a sub-config, as a multimodal model holds its text model's
        from conftest import tiny_bert_config

        model.config.text_config = tiny_bert_config(hidden_dropout_prob=0.2)
    with dropout_set_to(model, 0.5):
        assert set(_dropout_values(model)) == {0.5}
        assert kind != "bert" or model.config.text_config.hidden_dropout_prob == 0.5
        model.train()
        assert not torch.equal(model(**batch).logits, reference)
        model.eval()
    assert _dropout_values(model) == before
    assert kind != "bert" or model.config.text_config.hidden_dropout_prob == 0.2


def test_training_with_dropout_zero_equals_training_a_model_built_without_dropout():
    """--dropout 0 on BERT's 0.1 trains exactly what a checkpoint configured with no dropout trains."""
    from transformers import AutoModelForSequenceClassification

    from conftest import tiny_bert_config
    from deltatune.methods import build_method, prepare_model
    from deltatune.training import TrainConfig, train

    def run(dropout_in_config: float, dropout_setting: float | None):
        torch.manual_seed(0)
        config = tiny_bert_config(hidden_dropout_prob=dropout_in_config, attention_probs_dropout_prob=dropout_in_config)
        model = AutoModelForSequenceClassification.from_config(config).eval()
        method = build_method("full")
        prepare_model(model, method)
        settings = TrainConfig(epochs=2, batch_size=16, learning_rate=3e-3, quiet=True, seed=3, dropout=dropout_setting)
        result = train(model, build_tokenizer(), SENTIMENT, *sentiment_splits(), method, settings)
        return model, result

    plain, plain_result = run(0.0, None)
    overridden, overridden_result = run(0.1, 0.0)
    default, _ = run(0.1, None)
    assert [c["metrics"] for c in overridden_result.learning_curve] == [
        c["metrics"] for c in plain_result.learning_curve
    ]
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), overridden.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(plain.parameters(), default.parameters(), strict=True))
    assert overridden.config.hidden_dropout_prob == 0.1  # the model is handed back as it came


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan")])
def test_a_dropout_outside_zero_to_one_is_refused_with_the_range(value):
    from deltatune.errors import DeltatuneError
    from deltatune.training import TrainConfig

    with pytest.raises(DeltatuneError, match=r"dropout=.* must be in \[0, 1\)"):
        TrainConfig(dropout=value)


def test_frozen_linear_weights_are_cast_for_the_block_and_restored_exactly():
    from transformers import AutoModelForCausalLM

    from conftest import tiny_llama_config

    model = AutoModelForCausalLM.from_config(tiny_llama_config(tie_word_embeddings=True))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("norm" in name)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    query = model.model.layers[0].self_attn.q_proj.weight
    with frozen_linear_weights_in_bf16(model):
        assert query.dtype == torch.bfloat16
        assert model.lm_head.weight.dtype == torch.float32  # tied to the embeddings: left alone
        assert model.model.norm.weight.dtype == torch.float32
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name


def test_bf16_training_with_frozen_weights_cast_once_matches_casting_every_step(monkeypatch):
    """Autocast casts a frozen fp32 weight the same way every forward, so casting it once changes nothing."""
    import deltatune.training as train_module

    seen_dtypes = []

    @contextmanager
    def spy(model, **options):
        with frozen_linear_weights_in_bf16(model, **options):
            seen_dtypes.append(model.base_model.encoder.layer[0].attention.self.query.weight.dtype)
            yield model

    monkeypatch.setattr(train_module, "frozen_linear_weights_in_bf16", spy)
    model, cast_once = trained("bitfit", epochs=1, precision="bf16")
    assert (
        seen_dtypes
        and set(seen_dtypes) == {torch.bfloat16}
        and model.base_model.encoder.layer[0].attention.self.query.weight.dtype == torch.float32
    )
    monkeypatch.setattr("deltatune.training.frozen_linear_weights_in_bf16", lambda model, **options: nullcontext())
    _, cast_each_step = trained("bitfit", epochs=1, precision="bf16")
    assert cast_once.precision == "bf16"
    assert [c["metrics"] for c in cast_once.learning_curve] == [c["metrics"] for c in cast_each_step.learning_curve]
    assert cast_once.best_dev_outputs.tolist() == cast_each_step.best_dev_outputs.tolist()


def test_auto_precision_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto") == "fp32" and resolve_precision("bf16") == "bf16"
    _, result = trained("bitfit", epochs=1)
    assert result.precision == "fp32"


def test_unknown_precision_is_refused_with_the_choices():
    from deltatune.errors import DeltatuneError
    from deltatune.training import TrainConfig

    with pytest.raises(DeltatuneError, match="precision='fp8' must be one of auto, fp32, bf16, fp16"):
        TrainConfig(precision="fp8")
