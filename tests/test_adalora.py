"""AdaLoRA: pinned against PEFT's AdaLoraConfig (outputs, the orthogonality loss, the ranks pruned step by step)."""

import copy

import pytest
import torch

from conftest import build_tiny_model
from deltatune.errors import DeltatuneError
from deltatune.methods import build_method, prepare_model
from deltatune.methods.adalora import SVDLinear
from deltatune.methods.state import parameter_index
from test_lora import batch

peft = pytest.importorskip("peft")

KINDS = ["bert", "llama"]
PEFT_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
OPTIONS = {
    "init_r": 4,
    "target_r": 2,
    "alpha": 8,
    "initial_fraction": 0.2,
    "final_fraction": 0.3,
    "update_every": 2,
    "orth_reg_weight": 0.5,
}
STEPS = 10


def ours_and_peft(kind):
    base = build_tiny_model(kind, num_labels=3)
    reference = peft.get_peft_model(
        copy.deepcopy(base),
        peft.AdaLoraConfig(
            init_r=4,
            target_r=2,
            lora_alpha=8,
            total_step=STEPS,
            tinit=2,
            tfinal=3,
            deltaT=2,
            orth_reg_weight=0.5,
            target_modules=PEFT_TARGETS[kind],
            task_type="SEQ_CLS",
        ),
    )
    method = build_method("adalora", OPTIONS)
    prepare_model(base, method)
    peft_parameters = dict(reference.named_parameters())
    canonical = parameter_index(base).canonical
    generator = torch.Generator().manual_seed(4)
    pairs = []
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            module, _, leaf = canonical[name].rpartition(".")
            if leaf in ("lora_A", "lora_B", "lora_E"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
                counterpart = peft_parameters[f"base_model.model.{module}.{leaf}.default"]
                counterpart.copy_(parameter.view(counterpart.shape))
                pairs.append((parameter, counterpart))
    assert len(pairs) == 12
    return base, method, reference, pairs


@pytest.mark.parametrize("kind", KINDS)
def test_equal_weights_give_peft_outputs_and_loss_with_the_orthogonality_term(kind):
    model, method, reference, _ = ours_and_peft(kind)
    inputs, labels = batch(), torch.tensor([0, 1, 2])
    ours = model(**inputs).logits
    torch.testing.assert_close(ours, reference(**inputs).logits, atol=1e-5, rtol=0)
    regularised = torch.nn.functional.cross_entropy(ours, labels) + method.extra_loss(model)
    torch.testing.assert_close(regularised, reference(**inputs, labels=labels).loss, atol=1e-5, rtol=0)
    assert method.extra_loss(model).item() > 0.1  # random P and Q are far from orthonormal


@pytest.mark.parametrize("kind", KINDS)
def test_the_ranks_pruned_step_by_step_are_peft_rank_allocator_s(kind):
    model, method, reference, pairs = ours_and_peft(kind)
    inputs, labels = batch(), torch.tensor([0, 1, 2])
    ours_optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    peft_optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.05)
    kept_over_time = []
    for step in range(1, STEPS + 1):
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits, labels) + method.extra_loss(model)
        loss.backward()
        ours_optimizer.step()
        ours_optimizer.zero_grad(set_to_none=True)  # as the training loop does, before on_step_end
        method.on_step_end(model, step, STEPS)
        reference(**inputs, labels=labels).loss.backward()
        peft_optimizer.step()
        reference.base_model.update_and_allocate(step)
        peft_optimizer.zero_grad(set_to_none=True)
        for ours, theirs in pairs:
            if ours.ndim == 1:  # λ: the same entries pruned to zero, the same values kept
                assert torch.equal(ours == 0, theirs.view(-1) == 0), f"step {step}"
            torch.testing.assert_close(ours, theirs.view(ours.shape), atol=1e-5, rtol=0)
        kept_over_time.append(method.describe(model)["total_rank"])
    # 4 layers, from 4 each to 2 on average: pruned on even steps after step 2 (the budget: 9 at step 4, then 8),
    # the pruned λ growing back in between, and the pattern fixed from step 7 on
    assert kept_over_time[:3] == [16, 16, 16] and kept_over_time[3] == 9 and kept_over_time[5:] == [8] * 5


def test_without_gradients_nothing_is_pruned():
    model = build_tiny_model("bert", num_labels=2)
    method = build_method("adalora", {"init_r": 4, "target_r": 1})
    prepare_model(model, method)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, SVDLinear):
                layer.deltas["default"].lora_E.fill_(1.0)
    for step in range(1, 4):
        method.on_step_end(model, step, 3)
    assert method.describe(model)["total_rank"] == 16


def test_config_problems_are_collected():
    with pytest.raises(DeltatuneError) as error:
        build_method(
            "adalora",
            {
                "init_r": 4,
                "target_r": 6,
                "initial_fraction": 0.6,
                "final_fraction": 0.5,
                "update_every": 0,
                "beta1": 1.0,
            },
        )
    for expected in (
        "method.target_r=6 must be between 1 and method.init_r=4",
        "leave no steps to prune in",
        "method.update_every=0",
        "method.beta1=1.0",
    ):
        assert expected in str(error.value)


def test_the_training_loop_prunes_to_the_budget_and_adds_the_regulariser():
    from conftest import build_tokenizer
    from deltatune.training import TrainConfig, train
    from test_training import SENTIMENT, sentiment_splits

    torch.manual_seed(0)
    model = build_tiny_model("llama")
    method = build_method("adalora", {"init_r": 4, "target_r": 2, "orth_reg_weight": 1.0})
    prepare_model(model, method)
    before = method.extra_loss(model).item()
    train_split, dev_split = sentiment_splits()
    # one evaluation, at the end, so the kept state is the final, pruned one
    config = TrainConfig(max_steps=12, batch_size=16, learning_rate=1e-2, eval_every=1000, quiet=True, seed=3)
    train(model, build_tokenizer(), SENTIMENT, train_split, dev_split, method, config)
    ranks = method.describe(model)
    assert ranks["total_rank"] == 2 * 4 and set(ranks["ranks"]) == {
        f"model.layers.{i}.self_attn.{name}" for i in range(2) for name in ("q_proj", "v_proj")
    }
    assert method.extra_loss(model).item() < before
