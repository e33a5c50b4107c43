"""(IA)³: pinned against PEFT's IA3, merge/unmerge, default targets, and export to PEFT's format."""

import copy
import json

import pytest
import torch

from conftest import build_tiny_model, build_tokenizer
from deltatune.errors import DeltatuneError
from deltatune.methods import build_method, prepare_model
from deltatune.methods.common import head_names
from deltatune.methods.ia3 import IA3Linear
from deltatune.peft_export import write_peft_adapter

peft = pytest.importorskip("peft")

KINDS = ["bert", "llama"]
EXPECTED = {  # what the defaults adapt in layer 0, and which side each scales
    "bert": {
        "bert.encoder.layer.0.attention.self.key": "output",
        "bert.encoder.layer.0.attention.self.value": "output",
        "bert.encoder.layer.0.output.dense": "input",
    },
    "llama": {
        "model.layers.0.self_attn.k_proj": "output",
        "model.layers.0.self_attn.v_proj": "output",
        "model.layers.0.mlp.down_proj": "input",
    },
}


def batch():
    encoded = build_tokenizer()(
        ["the man plays guitar", "a good movie", "not very happy dog"], padding=True, return_tensors="pt"
    )
    encoded.pop("token_type_ids", None)
    return dict(encoded)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def ia3_layers(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, IA3Linear)}


def trained_ia3_model(kind, options=None):
    """A tiny model with (IA)³ applied and every scale and the head moved off its init."""
    model = build_tiny_model(kind, num_labels=3)
    method = build_method("ia3", options or {})
    prepare_model(model, method)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval(), method


@pytest.mark.parametrize("kind", KINDS)
def test_default_targets_scale_keys_values_and_the_ffn_down_projection_input(kind):
    model = build_tiny_model(kind)
    prepare_model(model, build_method("ia3"))
    layers = ia3_layers(model)
    assert len(layers) == 3 * 2
    layer0 = {n: ("input" if m.scale_input else "output") for n, m in layers.items() if ".0." in n}
    assert layer0 == EXPECTED[kind]
    # unlike PEFT's BERT default, the attention block's output projection is not a feed-forward target
    assert not any("attention.output" in name for name in layers)


@pytest.mark.parametrize("kind", KINDS)
def test_equal_weights_give_the_same_outputs_as_peft_ia3(kind):
    model = build_tiny_model(kind, num_labels=3)
    base_copy = copy.deepcopy(model)
    method = build_method("ia3")
    prepare_model(model, method)
    layers = ia3_layers(model)
    feedforward = [name for name, module in layers.items() if module.scale_input]
    reference = peft.get_peft_model(
        base_copy, peft.IA3Config(target_modules=list(layers), feedforward_modules=feedforward, task_type="SEQ_CLS")
    ).eval()
    peft_parameters = dict(reference.named_parameters())
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, module in layers.items():
            module.scale.copy_(1 + torch.randn(module.scale.shape, generator=generator) * 0.5)
            target = peft_parameters[f"base_model.model.{name}.ia3_l.default"]
            assert target.shape == ((1, module.scale.numel()) if module.scale_input else (module.scale.numel(), 1))
            target.copy_(module.scale.reshape(target.shape))
    inputs = batch()
    torch.testing.assert_close(logits(model.eval(), inputs), logits(reference, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_scales_multiply_the_output_or_the_input(kind):
    model, _ = trained_ia3_model(kind)
    for module in ia3_layers(model).values():
        x = torch.randn(2, 3, module.base_layer.in_features)
        expected = module.base_layer(x * module.scale) if module.scale_input else module.base_layer(x) * module.scale
        torch.testing.assert_close(module(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_keeps_outputs_and_unmerge_restores_the_base_weights(kind):
    model, method = trained_ia3_model(kind)
    with torch.no_grad():  # a zero scale cannot be divided back out: unmerge must still restore the weights
        for scale_input in (False, True):
            next(m for m in ia3_layers(model).values() if m.scale_input == scale_input).scale[0] = 0.0
    inputs = batch()
    before = logits(model, inputs)
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    method.merge(model)
    torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=0)
    method.merge(model)  # a no-op the second time
    torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=0)
    method.unmerge(model)
    for name, parameter in model.named_parameters():
        if name in originals:
            torch.testing.assert_close(parameter, originals[name], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=0)


def test_train_and_eval_do_not_merge():
    model, _ = trained_ia3_model("bert")
    model.train()
    model.eval()
    assert not any(module.merged for module in ia3_layers(model).values())


def test_custom_targets_and_no_feedforward_vectors():
    model = build_tiny_model("llama")
    prepare_model(model, build_method("ia3", {"targets": "q_proj", "feedforward_targets": ""}))
    assert sorted(ia3_layers(model)) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_a_layer_cannot_be_both_kinds_of_target():
    with pytest.raises(DeltatuneError, match="both match"):
        prepare_model(build_tiny_model("llama"), build_method("ia3", {"targets": "k_proj,down_proj"}))


def test_targets_matching_nothing_name_the_option():
    with pytest.raises(
        DeltatuneError,
        match=r"method.feedforward_targets=\('mlp',\) matched no linear layer of "
        r"LlamaForSequenceClassification.*'model.layers.0.mlp.down_proj'",
    ):
        prepare_model(build_tiny_model("llama"), build_method("ia3", {"feedforward_targets": "mlp"}))


@pytest.mark.parametrize("kind", KINDS)
def test_exported_adapter_loads_in_peft_with_the_same_outputs(kind, tmp_path):
    model, method = trained_ia3_model(kind)
    out = write_peft_adapter(model, method, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and len(config["feedforward_modules"]) == 2
    base = build_tiny_model(kind, num_labels=3)
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            if name in head_names(base):
                parameter.normal_()
    reloaded = peft.PeftModel.from_pretrained(base, str(out)).eval()
    inputs = batch()
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), atol=1e-5, rtol=0)
