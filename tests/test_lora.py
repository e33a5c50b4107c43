"""LoRA: pinned against PEFT's LoRA, merge/unmerge, target matching, and export to PEFT's format."""

import copy
import json

import pytest
import torch

from conftest import build_tiny_model, build_tokenizer, delta_manifest
from deltatune.delta import TunedModel, save_delta
from deltatune.errors import DeltatuneError
from deltatune.methods import build_method, delta_state, prepare_model
from deltatune.methods.common import head_names
from deltatune.methods.lora import LoRALinear
from deltatune.methods.state import parameter_index
from deltatune.peft_export import export_peft, write_peft_adapter

peft = pytest.importorskip("peft")

KINDS = ["bert", "llama"]
PEFT_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def batch():
    encoded = build_tokenizer()(
        ["the man plays guitar", "a good movie", "not very happy dog"], padding=True, return_tensors="pt"
    )
    encoded.pop("token_type_ids", None)
    return dict(encoded)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def trained_lora_model(kind, options=None, seed=0):
    """A tiny model with LoRA applied and every trainable tensor (LoRA and head) moved off its init."""
    model = build_tiny_model(kind, num_labels=3, seed=seed)
    method = build_method("lora", options or {})
    prepare_model(model, method)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval(), method


@pytest.mark.parametrize("kind", KINDS)
def test_equal_weights_give_the_same_outputs_as_peft_lora(kind):
    base = build_tiny_model(kind, num_labels=3)
    reference = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=12, target_modules=PEFT_TARGETS[kind], task_type="SEQ_CLS")
    ).eval()
    model, method = base, build_method("lora", {"r": 4, "alpha": 12})
    prepare_model(model, method)
    peft_parameters = dict(reference.named_parameters())
    canonical = parameter_index(model).canonical
    generator = torch.Generator().manual_seed(3)
    copied = 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith((".lora_A", ".lora_B")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
                peft_parameters[f"base_model.model.{canonical[name]}.default.weight"].copy_(parameter)
                copied += 1
    assert copied == 8  # two layers, two targets, A and B
    inputs = batch()
    torch.testing.assert_close(logits(model.eval(), inputs), logits(reference, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_layer_computes_w_x_plus_scaled_b_a_x(kind):
    model, _ = trained_lora_model(kind, {"r": 2, "alpha": 5})
    layer = next(m for m in model.modules() if isinstance(m, LoRALinear))
    x = torch.randn(3, 4, layer.base_layer.in_features)
    expected = x @ layer.base_layer.weight.T + (5 / 2) * x @ layer.lora_A.T @ layer.lora_B.T
    if layer.base_layer.bias is not None:
        expected = expected + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_keeps_outputs_and_unmerge_restores_the_base_weights(kind):
    model, method = trained_lora_model(kind)
    inputs = batch()
    before = logits(model, inputs)
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    method.merge(model)
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=0)
    changed = [n for n, p in model.named_parameters() if n in originals and not torch.equal(p, originals[n])]
    assert len(changed) == len(originals), "merging must fold B·A into every adapted weight"
    method.merge(model)  # merging twice is a no-op, not a double update
    torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=0)
    method.unmerge(model)
    for name, parameter in model.named_parameters():
        if name in originals:
            torch.testing.assert_close(parameter, originals[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=0)


def test_train_and_eval_do_not_merge():
    model, _ = trained_lora_model("bert")
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    weights = [layer.base_layer.weight.detach().clone() for layer in layers]
    model.train()
    model.eval()
    assert not any(layer.merged for layer in layers)
    assert all(torch.equal(layer.base_layer.weight, weight) for layer, weight in zip(layers, weights, strict=True))


def test_base_weight_is_wrapped_not_copied_and_stays_frozen():
    model = build_tiny_model("bert", num_labels=2)
    original = model.bert.encoder.layer[0].attention.self.query
    names = prepare_model(model, build_method("lora"))
    wrapper = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(wrapper, LoRALinear) and wrapper.base_layer is original
    assert not original.weight.requires_grad and not original.bias.requires_grad
    assert "bert.encoder.layer.0.attention.self.query.deltas.default.lora_A" in names
    assert not any("key" in name for name in names)


def test_no_dropout_module_unless_asked():
    model = build_tiny_model("bert")
    prepare_model(model, build_method("lora"))
    assert all(m.dropout is None for m in model.modules() if isinstance(m, LoRALinear))
    model, _ = trained_lora_model("bert", {"dropout": 0.5})
    layer = next(m for m in model.modules() if isinstance(m, LoRALinear))
    assert layer.dropout.p == 0.5
    x = torch.randn(2, 3, layer.base_layer.in_features)
    with torch.no_grad():
        evaluated = layer(x)
        layer.train()
        trained = layer(x)
    assert not torch.equal(evaluated, trained)


@pytest.mark.parametrize("kind, expected_count", [("bert", 2 * 2), ("llama", 2 * 2)])
def test_default_targets_are_query_and_value_on_both_families(kind, expected_count):
    model = build_tiny_model(kind)
    prepare_model(model, build_method("lora"))
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(names) == expected_count
    assert all(n.endswith(("query", "value", "q_proj", "v_proj")) for n in names)


def test_targets_by_suffix_and_by_regex():
    model = build_tiny_model("bert")
    prepare_model(model, build_method("lora", {"targets": "attention.output.dense"}))
    assert [n for n, m in model.named_modules() if isinstance(m, LoRALinear)] == [
        "bert.encoder.layer.0.attention.output.dense",
        "bert.encoder.layer.1.attention.output.dense",
    ]

    model = build_tiny_model("bert")
    prepare_model(model, build_method("lora", {"targets": r"re:.*layer\.1\..*(query|key)"}))
    assert [n for n, m in model.named_modules() if isinstance(m, LoRALinear)] == [
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.key",
    ]

    model = build_tiny_model("llama")  # regex characters without the prefix make a regex too
    prepare_model(model, build_method("lora", {"targets": ".*mlp.*_proj"}))
    assert len([m for m in model.modules() if isinstance(m, LoRALinear)]) == 6


def test_a_target_matching_nothing_names_the_option_and_lists_the_layers():
    with pytest.raises(
        DeltatuneError,
        match=r"method.targets=\('q_proj',\) matched no linear layer of "
        r"BertForSequenceClassification; its linear layers are named like "
        r"'bert.encoder.layer.0.attention.self.query'",
    ):
        prepare_model(build_tiny_model("bert"), build_method("lora", {"targets": "q_proj"}))
    # a typo beside a valid target is still an error: it would silently train less than asked
    with pytest.raises(DeltatuneError, match=r"'vaule' matched no linear layer"):
        prepare_model(build_tiny_model("bert"), build_method("lora", {"targets": "query,vaule"}))
    # part of a name component is not a match
    with pytest.raises(DeltatuneError, match=r"matched no linear layer"):
        prepare_model(build_tiny_model("bert"), build_method("lora", {"targets": "uery"}))


def test_the_task_head_is_never_a_target():
    model = build_tiny_model("bert")
    prepare_model(model, build_method("lora", {"targets": "re:.*"}))
    assert not isinstance(model.classifier, LoRALinear)
    assert head_names(model) == {"classifier.weight", "classifier.bias"}


def test_config_problems_are_collected_and_name_the_option():
    with pytest.raises(DeltatuneError) as error:
        build_method("lora", {"r": "0", "alpha": "-1", "dropout": "1.5", "targets": "re:(query"})
    message = str(error.value)
    for expected in ("method.r=0", "method.alpha=-1.0", "method.dropout=1.5", "'re:(query' is not a valid regex"):
        assert expected in message


def test_applying_twice_is_an_error():
    model = build_tiny_model("bert")
    method = build_method("lora")
    method.apply(model)
    with pytest.raises(DeltatuneError, match="already applied"):
        method.apply(model)


# --- export to PEFT's format ---------------------------------------------------------------------


def load_with_peft(kind, directory):
    base = build_tiny_model(kind, num_labels=3, seed=0)
    with torch.no_grad():  # the head must come from the adapter, not from the base's initialisation
        for name, parameter in base.named_parameters():
            if name in head_names(base):
                parameter.normal_()
    return peft.PeftModel.from_pretrained(base, str(directory)).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_exported_adapter_loads_in_peft_with_the_same_outputs(kind, tmp_path):
    options = {"r": 4, "alpha": 8, "targets": "re:.*(query|value|q_proj|v_proj|up_proj)"}
    model, method = trained_lora_model(kind, options)
    out = write_peft_adapter(model, method, tmp_path / "adapter", "tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8.0, "tiny")
    reloaded = load_with_peft(kind, out)
    inputs = batch()
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_export_from_a_delta_directory_and_from_a_tuned_model(kind, tmp_path):
    model, method = trained_lora_model(kind)
    manifest = delta_manifest(method, "tiny-" + kind)
    save_delta(tmp_path / "run", model, method, manifest)
    inputs = batch()
    out = export_peft(tmp_path / "run", tmp_path / "from-directory")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-" + kind
    torch.testing.assert_close(logits(load_with_peft(kind, out), inputs), logits(model, inputs), atol=1e-5, rtol=0)

    tuned = TunedModel(model, None, None, method, manifest, tmp_path / "run")
    out = export_peft(tuned, tmp_path / "from-tuned", base_model_name_or_path="org/tiny")
    torch.testing.assert_close(logits(load_with_peft(kind, out), inputs), logits(model, inputs), atol=1e-5, rtol=0)


def test_export_refuses_to_overwrite_and_refuses_methods_without_a_peft_form(tmp_path):
    model, method = trained_lora_model("bert")
    write_peft_adapter(model, method, tmp_path / "adapter")
    with pytest.raises(DeltatuneError, match="already holds a PEFT adapter"):
        write_peft_adapter(model, method, tmp_path / "adapter")
    write_peft_adapter(model, method, tmp_path / "adapter", overwrite=True)

    bitfit_model = build_tiny_model("bert")
    bitfit = build_method("bitfit")
    prepare_model(bitfit_model, bitfit)
    save_delta(tmp_path / "bitfit-run", bitfit_model, bitfit, delta_manifest(bitfit, "tiny"))
    with pytest.raises(
        DeltatuneError, match=r"'bitfit' delta cannot be exported.*deltas of dora, ia3, lora, pissa can"
    ):
        export_peft(tmp_path / "bitfit-run", tmp_path / "out")
    assert delta_state(bitfit_model, bitfit)  # (the delta itself is fine; only the PEFT form is missing)
