"""Houlsby and Pfeiffer adapters: placement, the bottleneck formula, init, options and errors."""

import copy

import pytest
import torch

from conftest import build_tiny_model, build_tokenizer, tiny_bert_config
from deltatune.config import to_jsonable
from deltatune.errors import DeltatuneError
from deltatune.methods import build_method, prepare_model
from deltatune.methods.adapters import BottleneckAdapter, bottleneck_size
from deltatune.methods.common import head_names

KINDS = ["bert", "llama"]
HIDDEN = 32  # the tiny models' width


def batch():
    encoded = build_tokenizer()(
        ["the man plays guitar", "a good movie", "not very happy"], padding=True, return_tensors="pt"
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def adapted(kind, name, **options):
    model = build_tiny_model(kind, num_labels=3)
    method = build_method(name, options)
    names = prepare_model(model, method)
    return model, method, names


def randomise_adapters(model, scale=0.3):
    """Move every adapter off the identity, so a test can see where it acts."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BottleneckAdapter):
                for parameter in module.parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def adapter_paths(model):
    """Where the adapters sit (their sites' names), one per site and delta."""
    return sorted(
        n.removesuffix(".deltas.default") for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)
    )


@pytest.mark.parametrize(
    "kind, name, expected",
    [
        (
            "bert",
            "houlsby",
            ["bert.encoder.layer.{i}.attention.output.adapter", "bert.encoder.layer.{i}.output.adapter"],
        ),
        ("bert", "pfeiffer", ["bert.encoder.layer.{i}.output.adapter"]),
        ("llama", "houlsby", ["model.layers.{i}.mlp.adapter", "model.layers.{i}.self_attn.adapter"]),
        ("llama", "pfeiffer", ["model.layers.{i}.mlp.adapter"]),
    ],
)
def test_adapters_sit_at_the_papers_sites_in_every_layer(kind, name, expected):
    model, _, _ = adapted(kind, name)
    assert adapter_paths(model) == sorted(path.format(i=i) for i in range(2) for path in expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "swish"])
def test_output_is_unchanged_at_step_zero_for_every_activation(kind, name, activation):
    inputs = batch()
    model = build_tiny_model(kind, num_labels=3)
    with torch.no_grad():
        before = model(**inputs).logits
    prepare_model(model, build_method(name, {"activation": activation}))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=1e-6)


def test_near_identity_init_moves_the_output_only_a_little():
    inputs = batch()
    model = build_tiny_model("bert", num_labels=3)
    with torch.no_grad():
        before = model(**inputs).logits
    prepare_model(model, build_method("houlsby", {"up_projection_init_std": 1e-3}))
    with torch.no_grad():
        difference = (model(**inputs).logits - before).abs().max()
    assert 0 < difference < 1e-2


def test_bert_adapter_acts_after_the_sublayer_projection_before_residual_and_layernorm():
    model, _, _ = adapted("bert", "houlsby")
    randomise_adapters(model)
    layer = model.bert.encoder.layer[0]
    hidden, residual = torch.randn(2, 5, HIDDEN), torch.randn(2, 5, HIDDEN)
    with torch.no_grad():  # eval mode: the dropout between projection and adapter is the identity
        block = layer.attention.output
        projected = torch.nn.functional.linear(hidden, block.dense.weight, block.dense.bias)
        adapter = block.adapter.active_part()
        expected = block.LayerNorm(projected + adapter.up(adapter.activation(adapter.down(projected))) + residual)
        torch.testing.assert_close(block(hidden, residual), expected)

        block = layer.output
        intermediate = torch.randn(2, 5, 64)
        projected = torch.nn.functional.linear(intermediate, block.dense.weight, block.dense.bias)
        adapter = block.adapter.active_part()
        expected = block.LayerNorm(projected + adapter.up(adapter.activation(adapter.down(projected))) + residual)
        torch.testing.assert_close(block(intermediate, residual), expected)


def test_llama_adapter_acts_on_o_proj_and_down_proj_outputs():
    model, _, _ = adapted("llama", "houlsby")
    randomise_adapters(model)
    layer = model.model.layers[0]
    with torch.no_grad():
        for projection, adapter, width in (
            (layer.self_attn.o_proj, layer.self_attn.adapter.active_part(), HIDDEN),
            (layer.mlp.down_proj, layer.mlp.adapter.active_part(), 64),
        ):
            x = torch.randn(2, 5, width)
            plain = torch.nn.functional.linear(x, projection.weight)
            torch.testing.assert_close(projection(x), plain + adapter.up(adapter.activation(adapter.down(plain))))


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_parameter_count_follows_the_formula(kind):
    for name, per_layer, bottleneck in (("houlsby", 2, 64), ("pfeiffer", 1, HIDDEN // 16)):
        model, _, _ = adapted(kind, name)
        count = sum(p.numel() for n, p in model.named_parameters() if ".adapter." in n)
        assert count == per_layer * 2 * (2 * HIDDEN * bottleneck + HIDDEN + bottleneck), name


@pytest.mark.parametrize("kind", KINDS)
def test_houlsby_trains_layernorms_and_pfeiffer_does_not(kind):
    _, _, houlsby = adapted(kind, "houlsby")
    _, _, pfeiffer = adapted(kind, "pfeiffer")
    norm_names = {n for n in houlsby if "norm" in n.lower()}
    # BERT: embeddings + two per layer, weight and bias; Llama: two RMSNorm scales per layer + the final one
    assert len(norm_names) == (2 * (1 + 2 * 2) if kind == "bert" else 2 * 2 + 1)
    assert not {n for n in pfeiffer if "norm" in n.lower()}
    _, _, houlsby_without = adapted(kind, "houlsby", train_layernorm=False)
    _, _, pfeiffer_with = adapted(kind, "pfeiffer", train_layernorm=True)
    assert houlsby_without == houlsby - norm_names
    assert {n for n in pfeiffer_with if "norm" in n.lower()} == norm_names


@pytest.mark.parametrize("kind", KINDS)
def test_trainable_set_is_adapters_norms_and_head(kind):
    model, _, names = adapted(kind, "houlsby")
    assert head_names(model) <= names
    assert all(".adapter." in n or "norm" in n.lower() or n in head_names(model) for n in names)


def test_bottleneck_size_and_reduction_factor_resolve_the_width():
    assert build_method("houlsby").config.bottleneck_size == 64
    assert build_method("pfeiffer").config.reduction_factor == 16
    method = build_method("houlsby", {"reduction_factor": "8"})  # as typed on the command line
    assert method.config.bottleneck_size is None and bottleneck_size(method.config, 384) == 48
    assert bottleneck_size(build_method("pfeiffer", {"bottleneck_size": 10}).config, 384) == 10
    assert bottleneck_size(build_method("pfeiffer", {"reduction_factor": 1000}).config, 384) == 1


@pytest.mark.parametrize("name", ["houlsby", "pfeiffer"])
def test_resolved_config_round_trips_through_the_manifest(name):
    method = build_method(name)
    again = build_method(name, to_jsonable(method.config))
    assert again.config == method.config


def test_config_problems_are_collected_and_name_the_options():
    with pytest.raises(DeltatuneError) as error:
        build_method("houlsby", {"bottleneck_size": 0, "reduction_factor": -2, "up_projection_init_std": -1})
    message = str(error.value)
    for fragment in (
        "method.bottleneck_size=0",
        "method.reduction_factor=-2",
        "give only one of them",
        "method.up_projection_init_std=-1",
    ):
        assert fragment in message
    with pytest.raises(DeltatuneError, match="activation"):
        build_method("pfeiffer", {"activation": "sigmoid"})


def test_unsupported_layer_layout_is_an_error_that_names_the_model():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    model = DistilBertForSequenceClassification(config)
    with pytest.raises(DeltatuneError, match="DistilBertModel has neither"):
        prepare_model(model, build_method("houlsby"))


def test_a_deep_copy_runs_its_own_adapters():
    inputs = batch()
    model, _, _ = adapted("bert", "houlsby")
    randomise_adapters(model)
    duplicate = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(duplicate(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
        original = model(**inputs).logits.clone()
        for module in duplicate.modules():
            if isinstance(module, BottleneckAdapter):
                module.up.weight.zero_()
                module.up.bias.zero_()
        assert not torch.allclose(duplicate(**inputs).logits, original)
        torch.testing.assert_close(model(**inputs).logits, original, rtol=0, atol=0)


def test_adapters_cannot_be_merged():
    for name in ("houlsby", "pfeiffer"):
        model, method, _ = adapted("bert", name)
        assert not method.mergeable
        with pytest.raises(DeltatuneError, match=f"'{name}' method cannot be merged"):
            method.merge(model)


def test_default_learning_rate():
    assert build_method("houlsby").default_learning_rate == build_method("pfeiffer").default_learning_rate == 1e-3


def test_real_model_shapes_give_the_documented_costs():
    """MiniLM-L6 shapes (d=384, 6 layers): houlsby m=64 and pfeiffer m=24 adapter counts."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_bert_config(2, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=64)
    for name, per_layer, bottleneck in (("houlsby", 2, 64), ("pfeiffer", 1, 24)):
        model = AutoModelForSequenceClassification.from_config(config)
        prepare_model(model, build_method(name))
        count = sum(p.numel() for n, p in model.named_parameters() if ".adapter." in n)
        assert count == per_layer * 6 * (2 * 384 * bottleneck + 384 + bottleneck)


def test_bert_adapter_comes_after_the_dropout_as_in_the_papers_code():
    model, _, _ = adapted("bert", "houlsby")
    randomise_adapters(model)
    block = model.bert.encoder.layer[0].output
    block.train()
    block.dropout.p = 1.0  # the projection's output is dropped entirely: only the adapter's own term is left
    intermediate, residual = torch.randn(2, 5, 64), torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        zeros = torch.zeros(2, 5, HIDDEN)
        torch.testing.assert_close(
            block(intermediate, residual), block.LayerNorm(block.adapter.active_part()(zeros) + residual)
        )
