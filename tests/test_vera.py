"""VeRA: pinned against PEFT's VeraConfig; the shared matrices are drawn again, bit for bit, from the seed."""

import copy

import pytest
import torch

from conftest import build_tiny_model
from deltatune.errors import DeltatuneError
from deltatune.methods import build_method, delta_state, load_delta_state, prepare_model
from deltatune.methods.state import parameter_index
from deltatune.methods.vera import VeRALinear, draw_projections
from test_lora import batch, logits

peft = pytest.importorskip("peft")

KINDS = ["bert", "llama"]
PEFT_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("kind", KINDS)
def test_equal_seed_and_vectors_give_peft_vera_outputs(kind):
    base = build_tiny_model(kind, num_labels=3)
    reference = peft.get_peft_model(
        copy.deepcopy(base),
        peft.VeraConfig(
            r=8, target_modules=PEFT_TARGETS[kind], projection_prng_key=5, d_initial=0.3, task_type="SEQ_CLS"
        ),
    ).eval()
    model, method = base, build_method("vera", {"r": 8, "projection_seed": 5, "d_initial": 0.3})
    prepare_model(model, method)
    inputs = batch()
    torch.testing.assert_close(logits(model.eval(), inputs), logits(reference, inputs), atol=0, rtol=0)
    peft_tensors = {**dict(reference.named_parameters()), **dict(reference.named_buffers())}
    layer = next(m for m in model.modules() if isinstance(m, VeRALinear))
    projections = layer.deltas["default"]._projections
    # PEFT keeps one copy per layer of the same shared matrices
    shared = next(name for name in peft_tensors if name.endswith("vera_A.default"))
    assert torch.equal(projections.projection_A, peft_tensors[shared])
    assert torch.equal(projections.projection_B, peft_tensors[shared.replace("vera_A", "vera_B")])
    canonical = parameter_index(model).canonical
    generator = torch.Generator().manual_seed(2)
    moved = 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            module, _, leaf = canonical[name].rpartition(".")
            if leaf in ("lambda_b", "lambda_d"):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
                peft_tensors[f"base_model.model.{module}.vera_{leaf}.default"].copy_(parameter)
                moved += 1
    assert moved == 8
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), atol=1e-5, rtol=0)


def test_the_generator_gives_the_numbers_saved_deltas_were_trained_with():
    """A saved VeRA delta holds only the vectors: it reloads identically only while this holds."""
    projection_A, projection_B = draw_projections(4, 6, 5, seed=0)
    torch.testing.assert_close(
        projection_A[0, :3], torch.tensor([-0.0074868202, 0.5364435911, -0.8230451345]), atol=1e-9, rtol=0
    )
    torch.testing.assert_close(
        projection_B[:3, 0], torch.tensor([-0.1974084973, -0.7710233927, -0.7938547134]), atol=1e-9, rtol=0
    )
    again_A, again_B = draw_projections(4, 6, 5, seed=0)
    assert torch.equal(again_A, projection_A) and torch.equal(again_B, projection_B)
    assert not torch.equal(draw_projections(4, 6, 5, seed=7)[0], projection_A)


def test_the_delta_holds_only_the_vectors_and_the_head_and_reloads_under_its_seed():
    inputs = batch()
    model = build_tiny_model("llama", num_labels=2)
    method = build_method("vera", {"r": 4, "projection_seed": 11})
    prepare_model(model, method)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3)
    saved = delta_state(model, method)
    assert {name.rpartition(".")[2] for name in saved} == {"lambda_b", "lambda_d", "weight"}
    # the head is model.score.weight; every other tensor is one vector per adapted layer
    fresh = build_tiny_model("llama", num_labels=2)
    reloaded = build_method("vera", {"r": 4, "projection_seed": 11})
    prepare_model(fresh, reloaded)
    load_delta_state(fresh, reloaded, saved)
    torch.testing.assert_close(logits(fresh.eval(), inputs), logits(model.eval(), inputs), atol=0, rtol=0)
    other_seed = build_tiny_model("llama", num_labels=2)
    mismatched = build_method("vera", {"r": 4, "projection_seed": 12})
    prepare_model(other_seed, mismatched)
    load_delta_state(other_seed, mismatched, saved)
    assert not torch.equal(logits(other_seed.eval(), inputs), logits(model, inputs))


def test_config_problems_are_collected():
    """Range problems are collected together; a value that is not a finite number is refused before them."""
    with pytest.raises(DeltatuneError) as error:
        build_method("vera", {"r": 0, "dropout": 1, "d_initial": 0.1})
    for expected in ("method.r=0", "method.dropout=1.0"):
        assert expected in str(error.value)
    with pytest.raises(DeltatuneError, match="method.d_initial=nan: must be a finite number"):
        build_method("vera", {"d_initial": float("nan")})
