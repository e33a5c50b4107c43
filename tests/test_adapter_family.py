"""Compacter, Compacter++, parallel and MAM adapters, pinned to their papers' formulas.

AdapterHub's `adapters` 1.3 (which has all four) requires transformers 4.57 and cannot be installed
beside transformers 5, so these tests compute each method's output from its formula instead.
"""

import pytest
import torch

from conftest import build_tiny_model
from deltatune.errors import DeltatuneError
from deltatune.methods import build_method, delta_state, load_delta_state, prepare_model
from deltatune.methods.adapters import AdapterSite
from deltatune.methods.compacter import CompacterAdapter, PHMLinear
from deltatune.methods.parallel_adapter import ParallelAdapter
from test_lora import batch, logits


def moved(model, seed=0, scale=0.3):
    """Every trainable tensor moved off its start, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def test_a_phm_weight_is_the_sum_of_kronecker_products_of_the_shared_rule_and_low_rank_factors():
    model = moved(build_tiny_model("bert"))
    prepare_model(model, build_method("compacter", {"phm_dim": 4, "phm_rank": 2}))
    moved(model, seed=1)
    layers = [module for module in model.modules() if isinstance(module, PHMLinear)]
    assert len(layers) == 2 * 2 * 2  # down and up, two sites, two layers
    rule = layers[0]._rule.rule
    assert all(layer._rule.rule is rule for layer in layers), "one rule shared by every projection"
    for layer in layers:
        expected = sum(torch.kron(rule[i], layer.left[i] @ layer.right[i]) for i in range(4))
        torch.testing.assert_close(layer.weight(), expected, atol=1e-6, rtol=0)
        x = torch.randn(3, expected.shape[1])
        torch.testing.assert_close(layer(x), x @ expected.T + layer.bias, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_compacter_sits_where_houlsby_does_and_compacter_pp_where_pfeiffer_does(kind):
    counts = {}
    for method_name in ("compacter", "compacter-pp"):
        model = build_tiny_model(kind)
        names = prepare_model(model, build_method(method_name))
        counts[method_name] = sum(
            isinstance(part, CompacterAdapter)
            for site in model.modules()
            if isinstance(site, AdapterSite)
            for part in site.deltas.values()
        )
        assert sum(name.endswith(".rule") for name in names) == 1, "the rule is stored once per delta"
    assert counts == {"compacter": 4, "compacter-pp": 2}


def test_the_shared_rule_learns_from_every_adapter():
    model = build_tiny_model("bert", num_labels=3)
    method = build_method("compacter", {"up_projection_init_std": 0.1})
    prepare_model(model, method)
    model.train()
    torch.nn.functional.cross_entropy(model(**batch()).logits, torch.tensor([0, 1, 2])).backward()
    rule = next(parameter for name, parameter in model.named_parameters() if name.endswith(".rule"))
    assert rule.grad is not None and rule.grad.abs().sum() > 0


def test_the_adapter_width_is_rounded_up_to_a_multiple_of_phm_dim_and_phm_dim_must_divide_the_hidden_size():
    model = build_tiny_model("bert")
    prepare_model(model, build_method("compacter-pp", {"bottleneck_size": 5}))
    adapter = next(module for module in model.modules() if isinstance(module, CompacterAdapter))
    assert adapter.down.weight().shape == (8, 32)
    with pytest.raises(DeltatuneError, match=r"method.phm_dim=3 must divide the hidden size 32"):
        prepare_model(build_tiny_model("bert"), build_method("compacter", {"phm_dim": 3}))
    with pytest.raises(DeltatuneError) as error:
        build_method("compacter", {"phm_dim": 0, "phm_rank": 0, "bottleneck_size": 0})
    for expected in ("method.phm_dim=0", "method.phm_rank=0", "method.bottleneck_size=0"):
        assert expected in str(error.value)


def test_bert_parallel_adapter_adds_to_the_ffn_output_before_the_residual_layernorm():
    model = build_tiny_model("bert")
    prepare_model(model, build_method("parallel-adapter", {"bottleneck_size": 4, "scaling": 3}))
    moved(model)
    block = model.bert.encoder.layer[0]
    adapter = block.output.parallel_adapter.deltas["default"]
    assert isinstance(adapter, ParallelAdapter)
    inner, attention_output = torch.randn(2, 5, 64), torch.randn(2, 5, 32)
    branch = 3 * adapter.up(torch.relu(adapter.down(attention_output)))
    with torch.no_grad():
        expected = block.output.LayerNorm(block.output.dense(inner) + attention_output + branch)
        torch.testing.assert_close(block.output(inner, attention_output), expected, atol=1e-5, rtol=0)


def test_llama_parallel_adapter_adds_to_the_mlp_output_reading_its_input():
    model = build_tiny_model("llama")
    prepare_model(model, build_method("parallel-adapter", {"bottleneck_size": 4, "activation": "gelu"}))
    moved(model)
    mlp = model.model.layers[1].mlp
    adapter = mlp.parallel_adapter.deltas["default"]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        plain = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        expected = plain + 4 * adapter.up(torch.nn.functional.gelu(adapter.down(x)))
        torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_mam_is_prefix_tuning_plus_a_parallel_adapter(kind):
    """With its adapters' up-projections at zero, MAM gives prefix tuning's outputs with the same prefixes."""
    inputs = batch()
    mam = build_tiny_model(kind, num_labels=3)
    mam_method = build_method("mam", {"num_virtual_tokens": 4, "bottleneck_size": 4})
    prepare_model(mam, mam_method)
    moved(mam)
    saved = {name: tensor.clone() for name, tensor in delta_state(mam, mam_method).items()}
    assert any(name.endswith("prefix_tuning.prefixes") for name in saved)
    assert sum(".parallel_adapter." in name for name in saved) == 2 * 4  # two layers: down and up, weight and bias
    prefix_only = {name: tensor for name, tensor in saved.items() if ".parallel_adapter." not in name}
    prefix = build_tiny_model(kind, num_labels=3)
    prefix_method = build_method("prefix-tuning", {"num_virtual_tokens": 4})
    prepare_model(prefix, prefix_method)
    load_delta_state(prefix, prefix_method, prefix_only)
    silent = {
        name: torch.zeros_like(tensor) if ".parallel_adapter.up." in name else tensor for name, tensor in saved.items()
    }
    load_delta_state(mam, mam_method, silent)
    torch.testing.assert_close(logits(mam.eval(), inputs), logits(prefix.eval(), inputs), atol=1e-6, rtol=0)
    load_delta_state(mam, mam_method, saved)
    assert not torch.allclose(logits(mam, inputs), logits(prefix, inputs), atol=1e-4)


def test_mam_config_problems_from_both_halves_are_reported_together():
    with pytest.raises(DeltatuneError) as error:
        build_method("mam", {"num_virtual_tokens": 0, "scaling": 0, "bottleneck_size": 4, "reduction_factor": 2})
    for expected in ("method.num_virtual_tokens=0", "method.scaling=0.0", "both set the adapter width"):
        assert expected in str(error.value)
