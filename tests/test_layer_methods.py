"""LayerNorm tuning, partial freezing and sparse masks: pinned to PEFT, to autograd, and to their formulas."""

import shutil
from itertools import pairwise

import numpy as np
import pytest
import torch

from conftest import build_tiny_model, build_tokenizer, delta_manifest, tiny_bert_config, tiny_llama_config
from deltatune.config import to_jsonable
from deltatune.critical_layers import resolve_critical_layers
from deltatune.errors import DeltatuneError
from deltatune.methods import build_method, delta_state, load_delta_state, prepare_model
from deltatune.methods.common import head_names
from deltatune.methods.freeze import selected_layers
from deltatune.methods.layers import layer_layout, resolve_layer_indices
from deltatune.methods.sparse_mask import (
    MaskedLinear,
    MaskScores,
    SparseMaskConfig,
    achieved_sparsity,
    masked_linears,
    pack_bits,
    project_to_sparsity,
    unpack_bits,
)
from test_analysis import make_run_dir, move_layer

KINDS = ["bert", "llama"]


def batch():
    tokenizer = build_tokenizer()
    encoded = tokenizer(
        ["the man plays guitar", "a good movie", "not very happy", "the dog eats food"],
        padding=True,
        return_tensors="pt",
    )
    encoded.pop("token_type_ids", None)
    return dict(encoded)


def deep_model(kind: str, num_layers: int = 4, num_labels: int = 3, seed: int = 0):
    """A tiny model with more layers than conftest's two, for layer selection."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = (tiny_bert_config if kind == "bert" else tiny_llama_config)(num_labels, num_hidden_layers=num_layers)
    return AutoModelForSequenceClassification.from_config(config).eval()


def perturb_trainable(model, scale=0.1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


# ---------------------------------------------------------------------------------------------
# the layer map


@pytest.mark.parametrize("kind, prefix", [("bert", "bert.encoder.layer"), ("llama", "model.layers")])
def test_layer_layout_places_every_parameter(kind, prefix):
    model = deep_model(kind, num_layers=3)
    layout = layer_layout(model)
    assert (layout.prefix, layout.num_layers) == (prefix, 3)
    for name, position in layout.position.items():
        if name.startswith(f"{prefix}."):
            assert position == int(name[len(prefix) + 1 :].split(".")[0])
        elif "embed" in name:
            assert position == -1, name
        else:  # pooler, final norm, head
            assert position == 3, name
    assert layout.head == head_names(model)


def test_layer_layout_of_gpt2_and_a_model_without_layers():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=50, n_positions=16))
    layout = layer_layout(model)
    assert (layout.prefix, layout.num_layers) == ("transformer.h", 3)
    assert layout.position["transformer.wte.weight"] == -1 and layout.position["transformer.ln_f.weight"] == 3
    with pytest.raises(DeltatuneError, match="Could not find the transformer layers of Linear"):
        layer_layout(torch.nn.Linear(2, 2))


def test_resolve_layer_indices():
    assert resolve_layer_indices("method.layers", (-1, 0, 3), 4, "M") == [0, 3]
    with pytest.raises(DeltatuneError, match=r"method.layers=\(4, -5\).*4 transformer layers.*-4..3.*\[4, -5\]"):
        resolve_layer_indices("method.layers", (4, -5), 4, "M")


# ---------------------------------------------------------------------------------------------
# LayerNorm tuning


@pytest.mark.parametrize("kind", KINDS)
def test_layernorm_trains_every_norm_and_the_head(kind):
    model = build_tiny_model(kind)
    names = prepare_model(model, build_method("layernorm"))
    if kind == "bert":  # embedding norm + 2 per block, each with gain and bias
        expected = {f"bert.embeddings.LayerNorm.{p}" for p in ("weight", "bias")} | {
            f"bert.encoder.layer.{i}.{part}LayerNorm.{p}"
            for i in range(2)
            for part in ("attention.output.", "output.")
            for p in ("weight", "bias")
        }
    else:  # RMSNorm: gains only
        expected = {
            f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")
        } | {"model.norm.weight"}
    assert names == expected | head_names(model)


def test_layernorm_targets_choose_norms_and_name_them_in_errors():
    model = build_tiny_model("llama")
    names = prepare_model(model, build_method("layernorm", {"targets": "input_layernorm"}))
    expected = {"model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"}
    assert names == expected | head_names(model)
    with pytest.raises(
        DeltatuneError,
        match=r"method.targets=\('LayerNorm',\).*input_layernorm, norm, "
        r"post_attention_layernorm",
    ):
        prepare_model(build_tiny_model("llama"), build_method("layernorm", {"targets": "LayerNorm"}))


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # PEFT's, about BERT's LayerNorm
@pytest.mark.parametrize("kind", KINDS)
def test_layernorm_matches_peft_ln_tuning(kind):
    from peft import LNTuningConfig, get_peft_model

    ours = build_tiny_model(kind)
    names = prepare_model(ours, build_method("layernorm"))
    perturb_trainable(ours)
    # PEFT knows Llama's norm names; for BERT they are given (PEFT has no default for it)
    peft_config = LNTuningConfig(task_type="SEQ_CLS", target_modules=["LayerNorm"] if kind == "bert" else None)
    theirs = get_peft_model(build_tiny_model(kind), peft_config)

    def our_name(peft_name: str) -> str:
        name = peft_name.removeprefix("base_model.model.")
        return name.replace(".ln_tuning_layers.default", "").replace(".modules_to_save.default", "")

    peft_trainable = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert {our_name(n) for n in peft_trainable} == names  # the same tensors train
    ours_by_name = dict(ours.named_parameters())
    with torch.no_grad():
        for name, parameter in peft_trainable.items():
            parameter.copy_(ours_by_name[our_name(name)])
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch()).logits, theirs(**batch()).logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# partial freezing


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "options, layers", [({}, [2, 3]), ({"top": 1}, [3]), ({"bottom": 2}, [0, 1]), ({"layers": "-1,1"}, [1, 3])]
)
def test_freeze_selects_layers_and_always_trains_the_top(kind, options, layers):
    model = deep_model(kind)
    method = build_method("freeze", options)
    names = prepare_model(model, method)
    layout = layer_layout(model)
    assert selected_layers(method.config, model) == layers
    assert names == layout.names_at(set(layers) | {layout.top})
    top = {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} if kind == "bert" else {"model.norm.weight"}
    assert top | head_names(model) <= names  # pooler / final norm train with the head
    assert not any(layout.position[n] == -1 for n in names)


def test_freeze_default_is_top_two_and_is_recorded():
    config = build_method("freeze").config
    assert config.top == 2 and to_jsonable(config)["top"] == 2
    names = prepare_model(deep_model("bert"), build_method("freeze", {"train_embeddings": "true"}))
    assert "bert.embeddings.word_embeddings.weight" in names


@pytest.mark.parametrize(
    "options, message",
    [
        ({"top": "1", "bottom": "1"}, r"exactly one of .*method.top=1, method.bottom=1"),
        ({"top": "0"}, r"method.top=0 must be at least 1"),
        ({"layers": "1,1"}, r"lists a layer twice"),
        ({"critical": "2"}, r"method.critical=2 needs method.critical_from"),
        ({"critical_from": "runs/x"}, r"only used with method.critical"),
        ({"critical": "1", "critical_from": "runs/x", "critical_layers": "0,1"}, r"leave it empty"),
    ],
)
def test_freeze_config_errors_name_the_option(options, message):
    with pytest.raises(DeltatuneError, match=message):
        build_method("freeze", options)


def test_freeze_layer_out_of_range_is_an_error_at_apply():
    with pytest.raises(DeltatuneError, match=r"method.layers=\(4,\).*4 transformer layers"):
        prepare_model(deep_model("bert"), build_method("freeze", {"layers": "4"}))
    with pytest.raises(DeltatuneError, match=r"method.top=5, but BertForSequenceClassification has only 4"):
        prepare_model(deep_model("bert"), build_method("freeze", {"top": "5"}))


# the lowest trainable block has no input that requires grad, so torch notes its hook fires on outputs
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "options, reached",
    [({"layers": "2"}, {2, 3}), ({"top": "1"}, {3}), ({"layers": "2", "train_embeddings": "true"}, {0, 1, 2, 3})],
)
def test_backward_never_runs_below_the_lowest_trainable_layer(kind, options, reached):
    """Frozen lower layers: their outputs do not require grad, and no backward hook below ever fires."""
    model = deep_model(kind, num_layers=4)
    prepare_model(model, build_method("freeze", options))
    layout = layer_layout(model)
    blocks = model.get_submodule(layout.prefix)
    output_requires_grad, backward_reached = {}, set()
    for index, block in enumerate(blocks):

        def record_output(module, args, output, index=index):
            hidden = output[0] if isinstance(output, tuple) else output
            output_requires_grad[index] = hidden.requires_grad

        def record_backward(module, grad_input, grad_output, index=index):
            backward_reached.add(index)

        block.register_forward_hook(record_output)
        block.register_full_backward_hook(record_backward)
    model.train()
    logits = model(**batch()).logits
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    lowest = min(reached)
    assert output_requires_grad == {i: i >= lowest for i in range(4)}
    assert backward_reached == reached
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == parameter.requires_grad, name


def test_freeze_critical_layers_come_from_a_full_fine_tuning_run(tmp_path, tiny_bert_dir):
    from deltatune.sources.models import load_model_for_task
    from test_analysis import TASK

    run = make_run_dir(tmp_path / "full-run", tiny_bert_dir, "full", mutate=lambda m, _: move_layer(m, 1))
    model, _ = load_model_for_task(str(tiny_bert_dir), TASK)
    method = build_method("freeze", {"critical": "1", "critical_from": str(run)})
    resolve_critical_layers(method, model)  # before apply, which never reads another run
    names = prepare_model(model, method)
    assert method.config.critical_layers == (1,)
    assert any(".layer.1." in n for n in names) and not any(".layer.0." in n for n in names)

    # the delta records the choice: it rebuilds without the reference run
    recorded = to_jsonable(method.config)
    shutil.rmtree(run)
    again = build_method("freeze", recorded)
    fresh, _ = load_model_for_task(str(tiny_bert_dir), TASK)
    assert prepare_model(fresh, again) == names

    with pytest.raises(DeltatuneError, match=r"method.critical_from=.* is not a directory"):
        resolve_critical_layers(build_method("freeze", {"critical": "1", "critical_from": str(run)}), fresh)


def test_freeze_critical_from_a_run_where_nothing_moved_is_an_error(tmp_path, tiny_bert_dir):
    from deltatune.sources.models import load_model_for_task
    from test_analysis import TASK

    run = make_run_dir(tmp_path / "still", tiny_bert_dir, "full")
    model, _ = load_model_for_task(str(tiny_bert_dir), TASK)
    with pytest.raises(DeltatuneError, match="no transformer layer moved"):
        resolve_critical_layers(build_method("freeze", {"critical": "1", "critical_from": str(run)}), model)


# ---------------------------------------------------------------------------------------------
# sparse masks


def test_pack_bits_matches_numpy_packbits_and_round_trips():
    generator = torch.Generator().manual_seed(0)
    for shape in [(3, 5), (8,), (7, 9)]:
        mask = torch.rand(shape, generator=generator) > 0.5
        packed = pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
        np.testing.assert_array_equal(packed.numpy(), np.packbits(mask.numpy().reshape(-1)))
        assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_straight_through_gradient_reaches_the_scores():
    torch.manual_seed(0)
    linear = MaskedLinear.wrap(torch.nn.Linear(4, 3))
    linear.add_part(linear, "default", MaskScores(linear.weight), "sparse-mask")
    linear.active_delta = "default"
    linear.weight.requires_grad_(False)
    with torch.no_grad():
        linear.mask_scores[0, 1] = -1.0  # one entry zeroed
    x = torch.randn(5, 4)
    y = linear(x)
    expected = x @ (linear.weight * (linear.mask_scores > 0)).T + linear.bias
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.sum().backward()
    # dL/dW_eff[i, j] = Σ_b x[b, j]; the scores get it times W, zeroed entry included
    torch.testing.assert_close(linear.mask_scores.grad, linear.weight.detach() * x.sum(0), rtol=1e-6, atol=1e-7)


def test_projection_gives_exactly_the_target_count_even_on_ties():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 10, generator=generator)
    scores = torch.randn(10, 10, generator=generator)
    order = scores.reshape(-1).argsort()
    project_to_sparsity(scores, weight, 0.13)
    assert int((scores <= 0).sum()) == 13
    assert set(torch.nonzero(scores.reshape(-1) <= 0).reshape(-1).tolist()) == set(order[:13].tolist())
    tied = torch.full((10, 10), 1.0)  # no gradient yet: the smallest |W| go first
    project_to_sparsity(tied, weight, 0.2)
    assert int((tied <= 0).sum()) == 20
    smallest = weight.reshape(-1).abs().argsort()[:20]
    assert set(torch.nonzero(tied.reshape(-1) <= 0).reshape(-1).tolist()) == set(smallest.tolist())
    negative = torch.full((4, 4), -3.0)  # sparsity 0 with scores pushed below zero: the mask stays all ones
    project_to_sparsity(negative, weight[:4, :4], 0.0)
    assert bool((negative > 0).all())


def test_sparsity_schedule_warms_up_ramps_and_holds():
    config = SparseMaskConfig(sparsity=0.04, warmup_fraction=0.1, ramp_fraction=0.4)
    values = [config.sparsity_at(step, 100) for step in range(101)]
    assert values[:11] == [0.0] * 11
    assert all(a <= b for a, b in pairwise(values))
    assert values[50:] == [0.04] * 51
    assert 0 < values[20] < 0.04
    with pytest.raises(DeltatuneError, match=r"method.sparsity=1.5.*method.warmup_fraction \+ method.ramp_fraction"):
        build_method("sparse-mask", {"sparsity": "1.5", "warmup_fraction": "0.7", "ramp_fraction": "0.7"})


def test_a_sparse_mask_is_settled_only_once_its_ramp_has_ended():
    method = build_method("sparse-mask", {"sparsity": "0.04", "warmup_fraction": "0.1", "ramp_fraction": "0.4"})
    assert [method.settled(step, 100) for step in (0, 10, 30, 49, 50, 100)] == [False] * 4 + [True] * 2
    assert build_method("lora", {}).settled(0, 100)  # every other method: any state may be kept


def test_the_best_state_keeps_an_unsettled_check_only_until_a_settled_one():
    from deltatune.training import BestState

    weight = torch.nn.Parameter(torch.zeros(2))
    best = BestState([("weight", weight)])
    outputs = np.zeros((3, 1), np.float32)

    def check(value: float, step: int, settled: bool) -> None:
        weight.data.fill_(step)
        best.offer(value, step, {"pearson": value}, outputs, settled)

    check(0.9, 10, settled=False)
    check(0.8, 20, settled=False)
    assert (best.step, best.evaluations_since, best.settled) == (10, 0, False)  # nothing counts toward stopping
    check(0.5, 50, settled=True)  # the first settled check replaces it, though it scores lower
    assert (best.step, best.value, best.settled) == (50, 0.5, True)
    check(0.4, 60, settled=True)
    check(0.99, 70, settled=False)  # never again an unsettled one
    assert (best.step, best.evaluations_since) == (50, 1)
    best.restore()
    assert weight.tolist() == [50.0, 50.0]


def train_sparse(kind: str, options: dict, steps: int = 6, seed: int = 0):
    """A few real AdamW steps with the loop's hook order: backward, step, on_step_end."""
    model = build_tiny_model(kind, num_labels=3, seed=seed)
    method = build_method("sparse-mask", options)
    prepare_model(model, method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs, labels = batch(), torch.tensor([0, 1, 2, 0])
    model.train()
    history = []
    for step in range(1, steps + 1):
        torch.nn.functional.cross_entropy(model(**inputs).logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.on_step_end(model, step, steps)
        history.append(achieved_sparsity(model))
    model.eval()
    return model, method, history


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_mask_reaches_the_target_sparsity(kind):
    model, method, history = train_sparse(
        kind, {"sparsity": "0.05", "warmup_fraction": "0.2", "ramp_fraction": "0.4"}, steps=10
    )
    assert history[:2] == [0.0, 0.0]  # warm-up: identity
    assert 0 < history[3] < 0.05
    for module in masked_linears(model).values():  # every matrix exactly round(5%) at the end
        assert int((~module.mask).sum()) == round(0.05 * module.weight.numel())
    assert history[-1] == pytest.approx(0.05, abs=1e-3)
    # the weights themselves never change
    for name, parameter in build_tiny_model(kind, num_labels=3).named_parameters():
        if name not in head_names(model):
            assert torch.equal(parameter, dict(model.named_parameters())[name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_mask_delta_is_bits_and_reloads_identically(kind, tmp_path):
    from deltatune.delta import TENSORS, save_delta

    model, method, _ = train_sparse(kind, {"sparsity": "0.1", "warmup_fraction": "0"})
    tensors = delta_state(model, method)
    masked_entries = sum(m.weight.numel() for m in masked_linears(model).values())
    head_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if n in head_names(model))
    mask_bytes = sum(t.numel() for n, t in tensors.items() if n.endswith(".mask"))
    assert all(t.dtype == torch.uint8 for n, t in tensors.items() if n.endswith(".mask"))
    assert mask_bytes == sum((m.weight.numel() + 7) // 8 for m in masked_linears(model).values())
    assert mask_bytes <= masked_entries / 8 + len(masked_linears(model))
    size = save_delta(tmp_path / "delta", model, method, delta_manifest(method, "tiny"))
    assert (tmp_path / "delta" / TENSORS).stat().st_size == size
    assert mask_bytes + head_bytes <= size <= mask_bytes + head_bytes + 4096  # plus the safetensors header

    fresh = build_tiny_model(kind, num_labels=3, seed=0)
    with torch.no_grad():
        for name, parameter in fresh.named_parameters():
            if name in head_names(fresh):
                parameter.normal_()
    reloaded = build_method("sparse-mask", {"sparsity": "0.1", "warmup_fraction": "0"})
    prepare_model(fresh, reloaded)
    load_delta_state(fresh, reloaded, tensors)
    fresh.eval()
    assert achieved_sparsity(fresh) == achieved_sparsity(model) > 0
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch()).logits, model(**batch()).logits, rtol=0, atol=0)

    other = build_method("sparse-mask", {"layers": "0"})
    other_model = build_tiny_model(kind, num_labels=3)
    prepare_model(other_model, other)
    with pytest.raises(DeltatuneError, match="does not fit the 'sparse-mask' method"):
        load_delta_state(other_model, other, tensors)


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_mask_merge_zeroes_the_weights_and_unmerge_restores_them(kind):
    model, method, _ = train_sparse(kind, {"sparsity": "0.1", "warmup_fraction": "0"})
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        masked_output = model(**batch()).logits
    method.merge(model)
    for name, module in masked_linears(model).items():
        assert bool((module.weight[~module.mask] == 0).all())
        assert torch.equal(module.weight[module.mask], original[f"{name}.weight"][module.mask])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch()).logits, masked_output, rtol=0, atol=1e-6)
    method.merge(model)  # merging twice is harmless
    method.unmerge(model)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, original[name]), name
    with torch.no_grad():
        torch.testing.assert_close(model(**batch()).logits, masked_output, rtol=0, atol=0)


def test_sparse_mask_layers_and_targets_choose_the_matrices():
    model = build_tiny_model("llama")
    method = build_method("sparse-mask", {"layers": "-1", "targets": "q_proj,v_proj"})
    names = prepare_model(model, method)
    assert set(masked_linears(model)) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert names == {
        "model.layers.1.self_attn.q_proj.deltas.default.mask_scores",
        "model.layers.1.self_attn.v_proj.deltas.default.mask_scores",
    } | head_names(model)
    with pytest.raises(DeltatuneError, match=r"method.targets=\('query',\).*named like .*q_proj"):
        prepare_model(build_tiny_model("llama"), build_method("sparse-mask", {"targets": "query"}))


def test_freeze_apply_never_reads_another_run(tmp_path, tiny_bert_dir):
    from deltatune.sources.models import load_model_for_task
    from test_analysis import TASK

    model, _ = load_model_for_task(str(tiny_bert_dir), TASK)
    method = build_method("freeze", {"critical": "1", "critical_from": str(tmp_path / "no-such-run")})
    with pytest.raises(DeltatuneError, match=r"needs its layers chosen .* before the method is applied"):
        prepare_model(model, method)


def test_sparse_mask_steps_on_a_merged_mask_are_refused_naming_the_layer_and_the_fix():
    model, method, _ = train_sparse(
        "bert", {"sparsity": "0.05", "warmup_fraction": "0.2", "ramp_fraction": "0.5"}, steps=2
    )
    method.merge(model)
    with pytest.raises(DeltatuneError, match=r"has its mask merged into the weight.*unmerge it"):
        method.on_step_end(model, 3, 6)
    method.unmerge(model)
    method.on_step_end(model, 3, 6)  # unmerged, training goes on
