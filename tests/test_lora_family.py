"""The LoRA family beside LoRA: rsLoRA and LoRA+ (options of lora), DoRA and PiSSA, pinned against PEFT."""

import copy

import pytest
import torch

from conftest import build_tiny_model
from deltatune.errors import DeltatuneError
from deltatune.methods import OptimizerSettings, build_method, delta_state, prepare_model
from deltatune.methods.dora import DoRALinear
from deltatune.methods.lora import LoRALinear
from deltatune.methods.pissa import PiSSALinear
from deltatune.methods.state import parameter_index
from test_lora import batch, logits

peft = pytest.importorskip("peft")

KINDS = ["bert", "llama"]
PEFT_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
PEFT_NAMES = {
    "lora_A": "lora_A.default.weight",
    "lora_B": "lora_B.default.weight",
    "magnitude": "lora_magnitude_vector.default.weight",
}


def ours_and_peft(kind, method_name, options, **peft_options):
    """Our method and PEFT's LoRA with `peft_options` on two copies of one tiny base."""
    base = build_tiny_model(kind, num_labels=3)
    reference = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(target_modules=PEFT_TARGETS[kind], task_type="SEQ_CLS", **peft_options)
    )
    method = build_method(method_name, options)
    prepare_model(base, method)
    return base, method, reference


def move_equally(model, reference, scale=0.2, seed=3):
    """Add the same noise to each of our trained adapter tensors and to PEFT's counterpart; how many."""
    peft_parameters = dict(reference.named_parameters())
    canonical = parameter_index(model).canonical
    generator = torch.Generator().manual_seed(seed)
    moved = 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            module, _, leaf = canonical[name].rpartition(".")
            if leaf in PEFT_NAMES and parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
                peft_parameters[f"base_model.model.{module}.{PEFT_NAMES[leaf]}"].copy_(parameter)
                moved += 1
    return moved


@pytest.mark.parametrize("kind", KINDS)
def test_rslora_equals_peft_use_rslora_at_equal_weights(kind):
    model, _, reference = ours_and_peft(
        kind, "lora", {"r": 4, "alpha": 12, "use_rslora": "true"}, r=4, lora_alpha=12, use_rslora=True
    )
    assert move_equally(model, reference) == 8
    layer = next(m for m in model.modules() if isinstance(m, LoRALinear))
    assert layer.scaling == pytest.approx(12 / 2)  # alpha / sqrt(r), not alpha / r = 3
    torch.testing.assert_close(logits(model.eval(), batch()), logits(reference.eval(), batch()), atol=1e-5, rtol=0)


def test_rslora_is_exported_to_peft_with_its_flag():
    model, method, _ = ours_and_peft("bert", "lora", {"use_rslora": True}, use_rslora=True)
    assert method.export_peft(delta_state(model, method)).config["use_rslora"] is True


def peft_learning_rates(reference, ratio, weight_decay):
    """Canonical name -> (lr, weight decay) as PEFT's create_loraplus_optimizer groups them."""
    from peft.optimizers import create_loraplus_optimizer

    optimizer = create_loraplus_optimizer(
        reference, torch.optim.AdamW, lr=0.1, loraplus_lr_ratio=ratio, loraplus_weight_decay=weight_decay
    )
    names = {id(parameter): name for name, parameter in reference.named_parameters()}
    rates = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            name = names[id(parameter)].removeprefix("base_model.model.")
            for wrapper in (".modules_to_save.default", ".default.weight"):
                name = name.replace(wrapper, "")
            rates[name] = (group["lr"], group["weight_decay"])
    return rates


@pytest.mark.parametrize("kind", KINDS)
def test_loraplus_learning_rates_equal_peft_create_loraplus_optimizer(kind):
    model, method, reference = ours_and_peft(kind, "lora", {"r": 4, "loraplus_lr_ratio": 16}, r=4)
    canonical = parameter_index(model).canonical
    named = {id(parameter): canonical[name] for name, parameter in model.named_parameters()}
    ours = {
        named[id(parameter)]: (group["lr"], group["weight_decay"])
        for group in method.param_groups(model, 0.1, OptimizerSettings(weight_decay=0.01))
        for parameter in group["params"]
    }
    expected = peft_learning_rates(reference, 16, 0.01)
    assert ours == expected
    assert {rate for rate, _ in ours.values()} == {0.1, 1.6}  # A and the head's weight at lr, B and vectors at 16x


def test_loraplus_ratio_composes_with_layer_lr_decay():
    model = build_tiny_model("llama", num_labels=3)
    method = build_method("lora", {"loraplus_lr_ratio": 4})
    prepare_model(model, method)
    rates = {
        name: group["lr"]
        for group in method.param_groups(model, 1.0, OptimizerSettings(layer_lr_decay=0.5))
        for name, parameter in model.named_parameters()
        for member in group["params"]
        if member is parameter
    }
    assert rates["model.layers.0.self_attn.q_proj.deltas.default.lora_B"] == pytest.approx(4 * 0.5**2)
    assert rates["model.layers.0.self_attn.q_proj.deltas.default.lora_A"] == pytest.approx(0.5**2)
    assert rates["model.layers.1.self_attn.q_proj.deltas.default.lora_B"] == pytest.approx(4 * 0.5)


def test_loraplus_ratio_must_be_positive():
    with pytest.raises(DeltatuneError, match=r"method.loraplus_lr_ratio=0.0 must be positive"):
        build_method("lora", {"loraplus_lr_ratio": 0})


@pytest.mark.parametrize("kind", KINDS)
def test_dora_equals_peft_use_dora_in_outputs_and_gradients(kind):
    model, _, reference = ours_and_peft(kind, "dora", {"r": 4, "alpha": 8}, r=4, lora_alpha=8, use_dora=True)
    inputs = batch()
    torch.testing.assert_close(logits(model.eval(), inputs), logits(reference.eval(), inputs), atol=1e-6, rtol=0)
    assert move_equally(model, reference) == 12  # A, B and the magnitude of four layers
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), atol=1e-5, rtol=0)
    # the norm is a constant in the backward pass (DoRA's section 4.3), in PEFT as here: equal gradients
    labels = torch.tensor([0, 1, 2])
    for network in (model, reference):
        torch.nn.functional.cross_entropy(network(**inputs).logits, labels).backward()
    peft_parameters = dict(reference.named_parameters())
    canonical = parameter_index(model).canonical
    for name, parameter in model.named_parameters():
        module, _, leaf = canonical[name].rpartition(".")
        if leaf in PEFT_NAMES:
            torch.testing.assert_close(
                parameter.grad,
                peft_parameters[f"base_model.model.{module}.{PEFT_NAMES[leaf]}"].grad,
                atol=1e-5,
                rtol=1e-4,
            )


def test_dora_layer_computes_the_magnitude_times_the_normalised_direction():
    model, _, _ = ours_and_peft("bert", "dora", {"r": 2, "alpha": 4}, r=2)
    layer = next(m for m in model.modules() if isinstance(m, DoRALinear))
    update = layer.deltas["default"]
    with torch.no_grad():
        update.lora_B.normal_()
        update.magnitude.uniform_(0.5, 2.0)
    x = torch.randn(3, layer.in_features)
    directed = layer.base_layer.weight + 2 * update.lora_B @ update.lora_A
    expected_weight = update.magnitude[:, None] * directed / directed.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ expected_weight.T + layer.base_layer.bias, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kind, method_name", [("bert", "dora"), ("llama", "dora"), ("bert", "pissa"), ("llama", "pissa")]
)
def test_a_delta_exported_to_peft_format_loads_in_peft_with_deltatunes_outputs(tmp_path, kind, method_name):
    from deltatune.delta import load
    from deltatune.peft_export import export_peft
    from test_peft_export import SENTIMENT, TEXTS, peft_outputs, run_directory

    run = run_directory(tmp_path, kind, method_name, SENTIMENT)
    logits, config = peft_outputs(export_peft(run, tmp_path / "adapter"))
    assert (config["use_dora"], config["r"]) == ((True, 8) if method_name == "dora" else (False, 16))
    expected = [
        [row["probabilities"][label] for label in SENTIMENT.labels]
        for row in load(run).predict(TEXTS, precision="fp32")
    ]
    torch.testing.assert_close(torch.softmax(logits, dim=-1), torch.tensor(expected), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_pissa_starts_where_peft_pissa_starts_and_equals_it_at_equal_weights(kind):
    model, _, reference = ours_and_peft(
        kind, "pissa", {"r": 4, "alpha": 8}, r=4, lora_alpha=8, init_lora_weights="pissa"
    )
    peft_parameters = dict(reference.named_parameters())
    canonical = parameter_index(model).canonical
    for name, parameter in model.named_parameters():
        module, _, leaf = canonical[name].rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            torch.testing.assert_close(
                parameter, peft_parameters[f"base_model.model.{module}.{PEFT_NAMES[leaf]}"], atol=1e-6, rtol=0
            )
    inputs = batch()
    torch.testing.assert_close(logits(model.eval(), inputs), logits(reference.eval(), inputs), atol=1e-5, rtol=0)
    assert move_equally(model, reference, scale=0.1) == 8
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), atol=1e-5, rtol=0)


def test_pissa_merged_weight_is_peft_residual_plus_the_trained_update():
    model, method, reference = ours_and_peft(
        "bert", "pissa", {"r": 4, "alpha": 8}, r=4, lora_alpha=8, init_lora_weights="pissa"
    )
    move_equally(model, reference, scale=0.1)
    method.merge(model)
    merged = reference.merge_and_unload()
    ours = dict(model.named_parameters())
    for name, parameter in merged.named_parameters():
        if name.endswith(("query.weight", "value.weight")):
            layer = name.removesuffix(".weight")
            torch.testing.assert_close(ours[f"{layer}.base_layer.weight"], parameter, atol=1e-5, rtol=0)


def test_pissa_trains_only_the_pair_and_saves_the_starting_pair_too():
    model = build_tiny_model("llama", num_labels=2)
    method = build_method("pissa", {"r": 2})
    names = prepare_model(model, method)
    assert not any(name.endswith((".initial_A", ".initial_B")) for name in names)
    saved = delta_state(model, method)
    layer = "model.layers.0.self_attn.q_proj"
    assert {f"{layer}.lora_A", f"{layer}.lora_B", f"{layer}.initial_A", f"{layer}.initial_B"} <= saved.keys()
    assert torch.equal(saved[f"{layer}.lora_A"], saved[f"{layer}.initial_A"])
    weight = model.model.layers[0].self_attn.q_proj
    assert isinstance(weight, PiSSALinear)
    # the starting pair is W's best rank-2 part, scaled: s · B₀ A₀ = U₂ S₂ V₂ᵀ
    left, values, right = torch.linalg.svd(weight.base_layer.weight.detach())
    principal = left[:, :2] @ torch.diag(values[:2]) @ right[:2]
    part = weight.deltas["default"]
    torch.testing.assert_close(part.scaling * part.initial_B @ part.initial_A, principal, atol=1e-5, rtol=0)
