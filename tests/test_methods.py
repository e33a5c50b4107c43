"""The conformance table: every registered method through the same checks on tiny models.

Adding a method means adding one row to CASES (its name, options, and what to expect).
"""

from dataclasses import dataclass, field

import pytest
import torch

from conftest import build_tiny_model, build_tokenizer, delta_manifest
from deltatune.delta import fingerprint_backbone
from deltatune.errors import DeltatuneError
from deltatune.methods import (
    REGISTRY,
    Method,
    OptimizerSettings,
    activate_delta,
    attach_delta,
    build_method,
    delta_state,
    detach_delta,
    load_delta_state,
    prepare_model,
)
from deltatune.methods.common import head_names
from deltatune.methods.layers import layer_layout
from deltatune.methods.sparse_mask import pack_bits


@dataclass(frozen=True)
class Case:
    method: str
    options: dict = field(default_factory=dict)
    identity_at_start: bool = True
    """Applying the method leaves the model's outputs unchanged before training."""
    max_delta_fraction: float = 0.1
    """The delta holds at most this fraction of the model's parameters (on these tiny models)."""
    mergeable: bool = False
    """The method offers merge/unmerge (folding its delta into the base weights)."""
    variant: str = ""
    """Tells apart several rows of one method (its options as a name)."""

    @property
    def label(self) -> str:
        return f"{self.method}-{self.variant}" if self.variant else self.method


CASES = [
    Case("full", max_delta_fraction=1.0),
    Case("bitfit", max_delta_fraction=0.1),
    Case("lora", max_delta_fraction=0.1, mergeable=True),  # r=8 on 32-wide tiny models: ~9% (0.3% on MiniLM-L6)
    Case("ia3", max_delta_fraction=0.02, mergeable=True),
    Case("layernorm", max_delta_fraction=0.03),
    Case("freeze", {"top": 1}, max_delta_fraction=0.5),  # 1 of the tiny models' 2 layers: ~44%
    Case("sparse-mask", max_delta_fraction=0.15, mergeable=True),  # one uint8 per 8 masked entries: ~12% of Llama
    Case("houlsby", {"bottleneck_size": 4}, max_delta_fraction=0.15),  # default m=64 is wider than the tiny d=32
    Case("pfeiffer", max_delta_fraction=0.05),
    Case(
        "prompt-tuning", {"init": "vocab"}, identity_at_start=False, max_delta_fraction=0.05
    ),  # no tokenizer for init=text
    Case("prefix-tuning", {"num_virtual_tokens": 8}, identity_at_start=False, max_delta_fraction=0.1),
    Case(
        "input-dependent-prompt",
        {"init": "vocab", "num_virtual_tokens": 4, "attention_size": 8, "num_heads": 2},
        identity_at_start=False,
        max_delta_fraction=0.1,
    ),  # defaults (a=128) are wider than the tiny d=32
    Case("recursive-lm", {"connector_size": 8}, max_delta_fraction=0.05),  # combine=add starts at the base model
    Case(
        "lora",
        {"use_rslora": True, "loraplus_lr_ratio": 16},
        max_delta_fraction=0.1,
        mergeable=True,
        variant="rslora-loraplus",
    ),
    Case("dora", max_delta_fraction=0.12, mergeable=True),
    Case("pissa", {"r": 4}, max_delta_fraction=0.1, mergeable=True),  # stores the starting pair too: 2x LoRA r=4
    Case("vera", {"r": 16}, max_delta_fraction=0.05, mergeable=True),  # default r=256 is far wider than d=32
    Case("adalora", {"init_r": 4, "target_r": 2}, max_delta_fraction=0.1, mergeable=True),
    Case("compacter", max_delta_fraction=0.05),
    Case("compacter-pp", max_delta_fraction=0.05),
    Case("parallel-adapter", {"bottleneck_size": 4}, max_delta_fraction=0.1),  # default m=d/2 is 16 here
    Case(
        "mam",
        {"num_virtual_tokens": 4, "mlp_hidden_size": 16, "bottleneck_size": 4},
        identity_at_start=False,
        max_delta_fraction=0.15,
    ),
    Case("promot", {"init": "vocab"}, identity_at_start=False, max_delta_fraction=1.0),  # prompt + full update
]
KINDS = ["bert", "llama"]


def test_every_registered_method_has_a_conformance_row():
    assert {case.method for case in CASES} == set(REGISTRY)


def inputs(kind):
    tokenizer = build_tokenizer()
    batch = tokenizer(["the man plays guitar", "a good movie", "not very happy"], padding=True, return_tensors="pt")
    batch.pop("token_type_ids", None)
    return dict(batch)


def fresh(kind, seed=0):
    return build_tiny_model(kind, num_labels=3, seed=seed)


@pytest.fixture(params=[(case, kind) for case in CASES for kind in KINDS], ids=lambda p: f"{p[0].label}-{p[1]}")
def case_kind(request):
    return request.param


def test_only_declared_parameters_train(case_kind):
    case, kind = case_kind
    model = fresh(kind)
    method = build_method(case.method, case.options)
    names = prepare_model(model, method)
    assert names, "a method must train something"
    assert head_names(model) <= names, "the freshly initialised task head must train"
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (name in names), name


def test_identity_at_step_zero(case_kind):
    case, kind = case_kind
    if not case.identity_at_start:
        pytest.skip(f"{case.method} does not start at identity")
    batch = inputs(kind)
    model = fresh(kind)
    with torch.no_grad():
        before = model(**batch).logits
    prepare_model(model, build_method(case.method, case.options))
    model.eval()
    with torch.no_grad():
        after = model(**batch).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_one_step_changes_only_trainable_tensors(case_kind):
    case, kind = case_kind
    model = fresh(kind)
    names = prepare_model(model, build_method(case.method, case.options))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    logits = model(**inputs(kind)).logits
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "one step changed nothing"
    assert changed <= names, sorted(changed - names)


def trained_delta(case, kind, seed=0):
    """A delta of `case` on the tiny base: every trainable tensor moved off its start, as training would."""
    model = fresh(kind)
    method = build_method(case.method, case.options)
    prepare_model(model, method)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    method.on_step_end(model, 1, 1)  # the last step's update (sparse masks reach their sparsity)
    model.eval()
    return model, method, {n: t.clone() for n, t in delta_state(model, method).items()}


def fresh_base(kind):
    """The tiny base with a head unlike the trained one's: a delta must carry its head."""
    base = fresh(kind, seed=0)
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            if name in head_names(base):
                parameter.normal_()
    return base


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_delta_reloads_into_a_fresh_base_with_identical_outputs(case_kind):
    case, kind = case_kind
    batch = inputs(kind)
    trained, _, tensors = trained_delta(case, kind)
    base = fresh_base(kind)
    reloaded_method = build_method(case.method, case.options)
    prepare_model(base, reloaded_method)
    load_delta_state(base, reloaded_method, tensors)
    base.eval()
    torch.testing.assert_close(logits(base, batch), logits(trained, batch), rtol=0, atol=0)


def delta_and_a_base_to_load_it(case, kind):
    _, _, tensors = trained_delta(case, kind)
    base = fresh_base(kind)
    method = build_method(case.method, case.options)
    prepare_model(base, method)
    return tensors, base, method


def test_a_tensor_the_method_does_not_save_is_refused_by_name(case_kind):
    case, kind = case_kind
    tensors, base, method = delta_and_a_base_to_load_it(case, kind)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    embeddings = "bert.embeddings.word_embeddings.weight" if kind == "bert" else "model.embed_tokens.weight"
    extra = {**tensors, embeddings: torch.zeros_like(dict(base.named_parameters())[embeddings])}
    if embeddings not in tensors:  # full fine-tuning saves the embeddings: for it, any foreign name will do
        with pytest.raises(DeltatuneError, match=rf"unexpected tensors '{embeddings}'"):
            load_delta_state(base, method, extra)
    foreign = {**tensors, "bert.encoder.extra.weight": torch.zeros(3)}
    with pytest.raises(DeltatuneError, match=r"unexpected tensors 'bert.encoder.extra.weight'"):
        load_delta_state(base, method, foreign)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters()), "a refused delta changed the model"


def test_a_tensor_of_another_dtype_is_refused_naming_both_dtypes(case_kind):
    case, kind = case_kind
    tensors, base, method = delta_and_a_base_to_load_it(case, kind)
    name = sorted(tensors)[0]
    saved = str(tensors[name].dtype).removeprefix("torch.")
    with pytest.raises(DeltatuneError, match=rf"'{name}' has dtype int64 but the '{case.method}' method saves {saved}"):
        load_delta_state(base, method, {**tensors, name: tensors[name].to(torch.int64)})


def test_applying_twice_is_a_clear_error(case_kind):
    case, kind = case_kind
    model = fresh(kind)
    method = build_method(case.method, case.options)
    prepare_model(model, method)
    with pytest.raises(DeltatuneError, match="already applied"):
        prepare_model(model, build_method(case.method, case.options))
    with pytest.raises(DeltatuneError, match="already applied"):
        method.apply(model, "another")
    assert delta_state(model, method)  # the first application is intact


def test_merge_where_offered_keeps_outputs_and_unmerge_restores_the_weights(case_kind):
    case, kind = case_kind
    batch = inputs(kind)
    model, method, _ = trained_delta(case, kind)
    assert method.mergeable == case.mergeable
    if not case.mergeable:
        with pytest.raises(DeltatuneError, match="cannot be merged"):
            method.merge(model)
        return
    before = logits(model, batch)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    method.merge(model)
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters()), "merging changed no weight"
    torch.testing.assert_close(logits(model, batch), before, rtol=0, atol=1e-5)
    method.unmerge(model)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, batch), before, rtol=0, atol=1e-5)


def test_optimizer_groups_honour_weight_decay_and_layer_lr_decay(case_kind):
    case, kind = case_kind
    model = fresh(kind)
    method = build_method(case.method, case.options)
    names = prepare_model(model, method)
    named = {id(p): n for n, p in model.named_parameters()}

    def per_parameter(settings):
        groups = method.param_groups(model, 0.1, settings)
        listed = [named[id(p)] for group in groups for p in group["params"]]
        assert sorted(listed) == sorted(names), "every trainable parameter in exactly one group"
        return {named[id(p)]: (group["lr"], group["weight_decay"]) for group in groups for p in group["params"]}

    plain = per_parameter(OptimizerSettings(weight_decay=0.37))
    assert 0.37 in {decay for _, decay in plain.values()} <= {0.0, 0.37}, "matrices decay by the user's weight decay"
    vectors = {n for n, p in model.named_parameters() if n in names and p.ndim < 2}
    assert all(plain[n][1] == 0.0 for n in vectors), "biases and norm scales never decay"
    assert all(decay == 0.0 for _, decay in per_parameter(OptimizerSettings(weight_decay=0.0)).values())
    decayed = per_parameter(OptimizerSettings(weight_decay=0.37, layer_lr_decay=0.5))
    layout = layer_layout(model)
    for name, (rate, decay) in decayed.items():
        depth = layout.top - layout.position[name]
        assert rate == pytest.approx(plain[name][0] * 0.5**depth) and decay == plain[name][1], name


def test_named_deltas_each_give_the_outputs_of_that_delta_alone(case_kind):
    case, kind = case_kind
    batch = inputs(kind)
    alone = {}
    saved = {}
    for name, seed in (("first", 1), ("second", 2)):
        _, _, saved[name] = trained_delta(case, kind, seed=seed)
        base = fresh_base(kind)
        method = build_method(case.method, case.options)
        prepare_model(base, method)
        load_delta_state(base, method, saved[name])
        alone[name] = logits(base.eval(), batch)
    assert not torch.equal(alone["first"], alone["second"])

    shared = fresh_base(kind)
    base_logits = logits(shared, batch)
    methods = {}
    for name in alone:
        methods[name] = build_method(case.method, case.options)
        attach_delta(shared, methods[name], saved[name], name)
    for name in ("first", "second", "first", None):
        activate_delta(shared, name)
        expected = alone[name] if name is not None else base_logits
        torch.testing.assert_close(logits(shared, batch), expected, rtol=0, atol=0)
    for name, method in methods.items():  # each delta reads back as it was saved, active or not
        state = delta_state(shared, method)
        assert state.keys() == saved[name].keys() and all(torch.equal(state[k], saved[name][k]) for k in state)


def test_delta_is_small_and_backbone_fingerprint_is_stable(case_kind):
    case, kind = case_kind
    model = fresh(kind)
    fingerprint = fingerprint_backbone(model)
    method = build_method(case.method, case.options)
    prepare_model(model, method)
    total = sum(p.numel() for p in model.parameters())
    stored = sum(t.numel() for t in delta_state(model, method).values())
    assert stored <= case.max_delta_fraction * total
    assert fingerprint_backbone(fresh(kind, seed=0)) == fingerprint
    assert fingerprint_backbone(fresh(kind, seed=1)) != fingerprint


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(DeltatuneError, match=r"Unknown method 'bitfti'.*bitfit.*Did you mean 'bitfit'"):
        build_method("bitfti")


def test_every_method_offers_learning_rate_candidates_around_its_default():
    for entry in REGISTRY.values():
        candidates = entry.method_class.learning_rate_candidates
        assert entry.method_class.default_learning_rate in candidates and len(candidates) >= 2, entry.name


def test_a_misspelt_hook_is_refused_when_the_class_is_defined():
    with pytest.raises(
        TypeError,
        match=r"Sloppy.on_step_ends is not part of the method contract.*"
        r"Did you mean 'on_step_end'",
    ):

        class Sloppy(Method):
            def on_step_ends(self, model, step, total_steps):
                pass

    with pytest.raises(TypeError, match=r"OldStyle.param_groups\(self, model, learning_rate\) does not match"):

        class OldStyle(Method):  # the hook's old, two-argument form
            def param_groups(self, model, learning_rate):
                return []

    class Tidy(Method):
        default_learning_rate = 1e-3

        def trainable_names(self, model):
            return set()

        def _helper(self):  # private helpers are free
            return None

    assert Tidy.learning_rate_candidates == (0.00033, 0.001, 0.003)


@pytest.mark.parametrize("kind", KINDS)
def test_deltas_of_every_method_share_one_base_and_each_gives_its_own_outputs(kind):
    """LoRA beside BitFit beside adapters beside a full fine-tuning delta ...: all on one base at once."""
    batch = inputs(kind)
    shared = fresh_base(kind)
    base_logits = logits(shared, batch)
    alone = {}
    # full fine-tuning last: attached first, it would keep every base weight, and hide a delta that did not
    for seed, case in enumerate(reversed(CASES), start=1):
        _, _, tensors = trained_delta(case, kind, seed=seed)
        single = fresh_base(kind)
        method = build_method(case.method, case.options)
        prepare_model(single, method)
        load_delta_state(single, method, tensors)
        alone[case.label] = logits(single.eval(), batch)
        attach_delta(shared, build_method(case.method, case.options), tensors, case.label)
    for name in [*reversed(list(alone)), None, *alone]:
        activate_delta(shared, name)
        torch.testing.assert_close(logits(shared, batch), alone[name] if name else base_logits, rtol=0, atol=0)


def test_a_second_delta_that_needs_weights_a_first_one_overwrote_in_place_is_refused():
    kind = "bert"
    _, _, bitfit = trained_delta(Case("bitfit"), kind)
    _, _, lora = trained_delta(Case("lora"), kind, seed=2)
    model = fresh_base(kind)
    method = build_method("bitfit")
    prepare_model(model, method)
    load_delta_state(model, method, bitfit)  # the single-delta path: the biases are overwritten in place
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(DeltatuneError, match=r"Cannot attach 'second'.*must hold the base model's values"):
        attach_delta(model, build_method("lora"), lora, "second")
    assert [n for n, _ in model.named_parameters()] == list(before), "a refused attach left modules behind"
    with pytest.raises(DeltatuneError, match=r"No delta named 'nope' is attached.*'default'"):
        activate_delta(model, "nope")
    with pytest.raises(DeltatuneError, match="Delta name 'a.b' is not usable"):
        attach_delta(model, build_method("lora"), lora, "a.b")


LAYER = "bert.encoder.layer.{i}"
V1_HEAD = {"classifier.weight": (3, 32), "classifier.bias": (3,)}
V1_FILES = {  # method, options -> tensor names and shapes as deltatune wrote them before deltas had names
    ("lora", ()): {
        f"{LAYER}.attention.self.{target}.lora_{part}": shape
        for target in ("query", "value")
        for part, shape in (("A", (8, 32)), ("B", (32, 8)))
    },
    ("ia3", ()): {
        f"{LAYER}.attention.self.key.output_scale": (32,),
        f"{LAYER}.attention.self.value.output_scale": (32,),
        f"{LAYER}.output.dense.input_scale": (64,),
    },
    ("pfeiffer", (("bottleneck_size", 4),)): {
        f"{LAYER}.output.adapter.{part}": shape
        for part, shape in (("down.weight", (4, 32)), ("down.bias", (4,)), ("up.weight", (32, 4)), ("up.bias", (32,)))
    },
    ("prompt-tuning", (("init", "vocab"),)): {"bert.soft_prompt.embeddings": (20, 32)},
    ("prefix-tuning", (("num_virtual_tokens", 8),)): {"bert.prefix_tuning.prefixes": (2, 2, 8, 32)},
    ("sparse-mask", (("targets", "query"),)): {f"{LAYER}.attention.self.query.mask": (128,)},
}


@pytest.mark.parametrize("method_name, options", list(V1_FILES), ids=[name for name, _ in V1_FILES])
def test_a_delta_file_written_before_named_deltas_loads_unchanged(method_name, options):
    """Format version 1: tensors named as the model named its parameters then (no delta name, no wrapper)."""
    generator = torch.Generator().manual_seed(0)
    layout = {name.format(i=i): shape for name, shape in V1_FILES[method_name, options].items() for i in range(2)}
    tensors = {
        name: (
            torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
            if name.endswith(".mask")
            else torch.randn(shape, generator=generator)
        )
        for name, shape in {**layout, **V1_HEAD}.items()
    }
    model = fresh("bert")
    method = build_method(method_name, dict(options))
    prepare_model(model, method)
    load_delta_state(model, method, tensors)
    own = {n: p for n, p in model.named_parameters() if ".deltas.default." in n}
    for name, tensor in tensors.items():
        site, _, leaf = name.rpartition(".")
        if leaf == "mask":  # stored as bits: the scores' signs are the mask
            scores = own[f"{site}.deltas.default.mask_scores"]
            assert torch.equal(pack_bits(scores > 0), tensor), name
        elif name in V1_HEAD:
            assert torch.equal(dict(model.named_parameters())[name], tensor)
        else:
            parts = [n for n in own if n.replace(".deltas.default", "") == name]
            assert len(parts) == 1 and torch.equal(own[parts[0]], tensor), name
    saved = delta_state(model, method)
    assert saved.keys() == tensors.keys() and all(torch.equal(saved[n], tensors[n]) for n in saved)


def test_a_saved_bitfit_delta_with_a_backbone_weight_added_is_refused_by_deltatune_load(tmp_path):
    """A delta file that also carries a frozen backbone weight must not overwrite it on load."""
    from safetensors.torch import load_file, save_file

    from conftest import save_tiny_model_dir
    from deltatune.delta import TENSORS, load, save_delta
    from deltatune.sources.models import load_model_for_task
    from deltatune.tasks.spec import TaskSpec

    task = TaskSpec("toy", ("text",), ("negative", "positive"))
    base_dir = save_tiny_model_dir(tmp_path / "base", "bert")
    model, _ = load_model_for_task(str(base_dir), task)
    fingerprint = fingerprint_backbone(model)
    method = build_method("bitfit")
    prepare_model(model, method)
    save_delta(tmp_path / "run", model, method, delta_manifest(method, str(base_dir), fingerprint, task))
    assert load(tmp_path / "run").predict("a good movie")  # as saved, it loads
    tensors = load_file(str(tmp_path / "run" / TENSORS))
    tensors["bert.embeddings.word_embeddings.weight"] = torch.zeros(45, 32)
    save_file(tensors, str(tmp_path / "run" / TENSORS))
    with pytest.raises(
        DeltatuneError,
        match=r"unexpected tensors 'bert.embeddings.word_embeddings.weight' \(the "
        r"'bitfit' method does not save them",
    ):
        load(tmp_path / "run")


def test_a_detached_delta_leaves_the_others_and_the_base_as_they_were():
    kind = "llama"
    batch = inputs(kind)
    shared = fresh_base(kind)
    base_logits = logits(shared, batch)
    alone = {}
    for seed, case in enumerate((Case("bitfit"), Case("lora"), Case("ia3")), start=1):
        _, _, tensors = trained_delta(case, kind, seed=seed)
        attach_delta(shared, build_method(case.method, case.options), tensors, case.method, activate=True)
        alone[case.method] = logits(shared, batch)
    with pytest.raises(DeltatuneError, match="Delta 'ia3' is active; activate another delta"):
        detach_delta(shared, "ia3")
    detach_delta(shared, "lora")
    assert not any(".deltas.lora." in name for name, _ in shared.named_parameters())
    for name in ("bitfit", "ia3", None):
        activate_delta(shared, name)
        torch.testing.assert_close(logits(shared, batch), alone[name] if name else base_logits, rtol=0, atol=0)


def test_a_delta_trained_beside_an_attached_one_starts_from_the_base_and_leaves_it_alone():
    kind = "bert"
    batch = inputs(kind)
    _, _, tensors = trained_delta(Case("lora"), kind)
    model = fresh_base(kind)
    base_logits = logits(model, batch)
    attach_delta(model, build_method("lora"), tensors, "attached", activate=True)
    attached_logits = logits(model, batch)
    method = build_method("bitfit")
    names = prepare_model(model, method, name="trained")
    torch.testing.assert_close(logits(model, batch), base_logits, rtol=0, atol=0)  # BitFit starts at the base
    assert not any(".deltas.attached." in name for name in names)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    torch.nn.functional.cross_entropy(model.train()(**batch).logits, torch.tensor([0, 1, 2])).backward()
    optimizer.step()
    trained_logits = logits(model.eval(), batch)
    for name, expected in (("attached", attached_logits), (None, base_logits), ("trained", trained_logits)):
        activate_delta(model, name)
        torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)


def assert_delta_reloads(trained, method, base, case, batch) -> None:
    """The delta of `trained`, loaded into `base` (the same backbone), gives exactly the same outputs."""
    trained.eval()
    tensors = {n: t.clone() for n, t in delta_state(trained, method).items()}
    with torch.no_grad():  # the head is re-initialised differently on the fresh model: the delta must carry it
        for name, parameter in base.named_parameters():
            if name in head_names(base):
                parameter.normal_()
    reloaded_method = build_method(case.method, case.options)
    prepare_model(base, reloaded_method)
    load_delta_state(base, reloaded_method, tensors)
    base.eval()
    with torch.no_grad():
        torch.testing.assert_close(base(**batch).logits, trained(**batch).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The same contract with deltatune's own heads (`deltatune.heads`): a pooled cross-encoder and the
# bi-encoder, whose batch stacks both texts of each pair along the batch.

HEADS = {
    "bert": [("cross-encoder", "mean", 3), ("bi-encoder", "mean", 1), ("bi-encoder", "last", 3)],
    "llama": [("bi-encoder", "last", 3)],
}
"""(kind, pooling, labels): a 3-class pooled cross-encoder, a similarity bi-encoder, a 3-class bi-encoder; on
Llama the one that exercises both the stacked pairs and last-token pooling."""


def fresh_with_head(kind, head_kind, pooling, num_labels, seed=0):
    from transformers import AutoModel

    from conftest import tiny_bert_config, tiny_llama_config
    from deltatune.heads import HeadConfig, build_task_model
    from deltatune.tasks.spec import TaskSpec

    torch.manual_seed(seed)
    config = tiny_bert_config() if kind == "bert" else tiny_llama_config()
    task = (
        TaskSpec("pairs", ("a", "b"), score_range=(0.0, 5.0), metric="pearson", metrics=("pearson",))
        if num_labels == 1
        else TaskSpec("pairs", ("a", "b"), ("x", "y", "z"))
    )
    return build_task_model(AutoModel.from_config(config), task, HeadConfig(head_kind, pooling)).eval()


def head_inputs(head_kind):
    from deltatune.batching import collate, encode
    from deltatune.tasks.spec import Split, TaskSpec

    task = TaskSpec("pairs", ("a", "b"), ("x", "y", "z"))
    split = Split(
        [("the man plays guitar", "a man"), ("a good movie", "good film"), ("not very happy", "sad")], [0, 1, 2]
    )
    batch = collate(encode(build_tokenizer(), task, split, 32, head_kind == "bi-encoder"), [0, 1, 2], 0, False)
    batch.pop("labels")
    batch.pop("token_type_ids", None)
    return batch


@pytest.mark.parametrize(
    "case,kind,head",
    [(case, kind, head) for case in CASES for kind in KINDS for head in HEADS[kind]],
    ids=lambda p: getattr(p, "method", None) or (p if isinstance(p, str) else f"{p[0]}-{p[1]}"),
)
def test_every_method_works_with_each_head(case, kind, head):
    head_kind, pooling, num_labels = head
    batch = head_inputs(head_kind)
    model = fresh_with_head(kind, head_kind, pooling, num_labels)
    with torch.no_grad():
        before = model(**batch).logits
    method = build_method(case.method, case.options)
    names = prepare_model(model, method)
    assert head_names(model) <= names
    assert all(p.requires_grad == (n in names) for n, p in model.named_parameters())
    model.eval()
    if case.identity_at_start:
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=1e-6)
    # one step moves only what the method trains
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in names}
    model.train()
    logits = model(**batch).logits
    loss = (
        logits.float().pow(2).mean()
        if num_labels == 1
        else torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2]))
    )
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    # the delta reloads into a fresh model with the same head: identical outputs
    assert_delta_reloads(model, method, fresh_with_head(kind, head_kind, pooling, num_labels), case, batch)
