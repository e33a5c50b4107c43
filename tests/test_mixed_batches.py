"""Batches that mix deltas row by row: each row's output is the one its delta gives alone.

Every method that declares `batch_mixing = "per-row"` is checked on tiny BERT and Llama models, with
two deltas of the method whose shapes differ where the method allows it (ranks, prompt and prefix
lengths, bottleneck widths), rows of the base model alone in between, and heads of tasks with
different label counts.
"""

import pytest
import torch

from conftest import build_tiny_model
from deltatune.errors import DeltatuneError
from deltatune.methods import REGISTRY, activate_delta, attach_delta, build_method
from deltatune.methods.state import PER_ROW, mixed_rows
from test_load_many import moved_delta
from test_methods import KINDS, fresh_base, inputs, logits

# two deltas per method: (options of the first, options of the second)
PER_ROW_CASES = {
    "lora": ({}, {"r": 4, "alpha": 4.0, "targets": ("re:.*(query|key|q_proj|k_proj)",)}),
    "ia3": ({}, {"feedforward_targets": ()}),
    "bitfit": ({}, {}),
    "layernorm": ({}, {}),
    "houlsby": ({"bottleneck_size": 4}, {"bottleneck_size": 2}),
    "pfeiffer": ({}, {"bottleneck_size": 3, "activation": "gelu"}),
    "prompt-tuning": ({"init": "vocab"}, {"init": "vocab", "num_virtual_tokens": 5}),
    "prefix-tuning": ({"num_virtual_tokens": 8}, {"num_virtual_tokens": 3}),
}
ROWS = ["first", "second", None, "second", "first", None]
# the same rows sorted by delta, as a server routes them: sites run each delta on its slice of the batch
SORTED_ROWS = [None, None, "first", "first", "second", "second"]


def test_every_per_row_method_is_covered_here():
    declared = {name for name, entry in REGISTRY.items() if entry.method_class.batch_mixing == PER_ROW}
    assert declared == set(PER_ROW_CASES)
    assert REGISTRY["full"].method_class.batch_mixing == "grouped"  # the default for whatever does not declare


def six_rows(kind):
    """Six inputs of different lengths (padding differs per row)."""
    batch = inputs(kind)
    return {key: torch.cat([value, value.flip(0)]) for key, value in batch.items()}


def attach_trained(shared, kind, name, method, options, seed, num_labels=3):
    """A delta of `method` trained (as far as a test needs) on a base whose head has `num_labels` outputs."""
    model = build_tiny_model(kind, num_labels=num_labels, seed=0)
    method_object = moved_delta(model, method, options, seed, scale=0.05)
    tensors = {key: value.clone() for key, value in method_object.delta_state(model).items()}
    attach_delta(shared, build_method(method, options), tensors, name)
    return tensors


def alone_outputs(shared, batch, names):
    outputs = {}
    for name in names:
        activate_delta(shared, name)
        outputs[name] = logits(shared, batch)
    activate_delta(shared, None)
    return outputs


def check_rows(mixed, alone, rows):
    for row, name in enumerate(rows):
        expected = alone[name][row]
        torch.testing.assert_close(
            mixed[row, : expected.shape[-1]],
            expected,
            rtol=0,
            atol=2e-5,
            msg=lambda message, row=row, name=name: f"row {row} ({name}): {message}",
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(PER_ROW_CASES))
def test_a_mixed_batch_gives_each_row_what_its_delta_gives_alone(method, kind):
    batch = six_rows(kind)
    shared = fresh_base(kind)
    for seed, (name, options) in enumerate(zip(("first", "second"), PER_ROW_CASES[method], strict=True), start=1):
        attach_trained(shared, kind, name, method, options, seed)
    alone = alone_outputs(shared, batch, ["first", "second", None])
    assert not torch.allclose(alone["first"], alone["second"])
    with mixed_rows(shared) as mixer:
        for rows in (ROWS, SORTED_ROWS, ["second"] * 6, [None, "first"] * 3, ["first"] * 3 + [None] * 3):
            mixer.route(rows)
            check_rows(logits(shared, batch), alone, rows)
    torch.testing.assert_close(logits(shared, batch), alone[None], rtol=0, atol=0)  # no routing left behind


@pytest.mark.parametrize("sort", [False, True], ids=["rows-interleaved", "rows-sorted-by-delta"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_per_row_method_and_heads_of_every_width_in_one_batch(kind, sort):
    """One delta per method, tasks with 3, 2 and 1 (regression) outputs: one forward pass for all rows.

    Interleaved rows gather each row's tensors; rows sorted by delta (what a server sends) run on slices."""
    batch = inputs(kind)
    batch = {key: value.repeat(6, 1) for key, value in batch.items()}  # 18 rows
    shared = fresh_base(kind)
    names = []
    for seed, (method, (options, _)) in enumerate(PER_ROW_CASES.items(), start=1):
        attach_trained(shared, kind, method, method, options, seed, num_labels=(3, 2, 1)[seed % 3])
        names.append(method)
    alone = alone_outputs(shared, batch, names)
    assert {output.shape[-1] for output in alone.values()} == {1, 2, 3}
    rows = [names[(row * 5) % len(names)] for row in range(len(batch["input_ids"]))]
    with mixed_rows(shared) as mixer:
        if sort:
            rows = [rows[position] for position in mixer.grouped_order(rows)]
        routing = mixer.route(rows)
        assert (routing.segments is not None) == sort
        check_rows(logits(shared, batch), alone, rows)


def test_a_grouped_method_is_refused_in_a_mixed_batch_saying_how_it_runs():
    shared = fresh_base("bert")
    attach_trained(shared, "bert", "dense", "full", {}, 1)
    attach_trained(shared, "bert", "light", "bitfit", {}, 2)
    activate_delta(shared, "light")
    with mixed_rows(shared) as mixer:
        with pytest.raises(
            DeltatuneError,
            match=r"Delta 'dense' \(full\) cannot share a forward pass.*"
            r"batch_mixing='grouped'",
        ):
            mixer.route(["light", "dense"])
        with pytest.raises(DeltatuneError, match="No delta named 'nope'"):
            mixer.route(["nope"])
    assert shared.__dict__["_deltatune_attached"].active == "light", "the active delta is restored"


def test_a_merged_delta_must_be_unmerged_before_mixing():
    shared = fresh_base("bert")
    attach_trained(shared, "bert", "one", "lora", {}, 1)
    activate_delta(shared, "one")
    shared.__dict__["_deltatune_attached"].methods["one"].merge(shared)
    with pytest.raises(DeltatuneError, match="is merged into the base weights.*unmerge it"):
        with mixed_rows(shared):
            pass


def test_bitfit_rows_share_each_weight_and_add_their_own_bias(monkeypatch):
    """Deltas that differ only in biases run one matmul per layer: only the task heads gather weights per row
    (gathering every layer's weight per row had made a mixed batch several times slower)."""
    from deltatune.methods import state

    stacked = []
    original = state._stack_linear
    monkeypatch.setattr(
        state, "_stack_linear", lambda values, module: stacked.append(module.weight.shape) or original(values, module)
    )
    batch = six_rows("bert")
    shared = fresh_base("bert")
    for seed, name in enumerate(("first", "second"), start=1):
        attach_trained(shared, "bert", name, "bitfit", {}, seed)
    alone = alone_outputs(shared, batch, ["first", "second", None])
    with mixed_rows(shared) as mixer:
        mixer.route(ROWS)
        check_rows(logits(shared, batch), alone, ROWS)
    head = shared.classifier.weight.shape
    assert stacked == [head]
