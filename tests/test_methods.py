"""The conformance table: every registered method through the same checks on tiny models.

Adding a method means adding one row to CASES (its name, options, and what to expect).
"""

from dataclasses import dataclass, field

import pytest
import torch

from conftest import build_tiny_model, build_tokenizer
from deltatune.delta import fingerprint_backbone
from deltatune.methods import REGISTRY, build_method, delta_state, load_delta_state, prepare_model
from deltatune.methods.common import head_names


@dataclass(frozen=True)
class Case:
    method: str
    options: dict = field(default_factory=dict)
    identity_at_start: bool = True
    """Applying the method leaves the model's outputs unchanged before training."""
    max_delta_fraction: float = 0.1
    """The delta holds at most this fraction of the model's parameters (on these tiny models)."""


CASES = [
    Case("full", max_delta_fraction=1.0),
    Case("bitfit", max_delta_fraction=0.1),
    Case("lora", max_delta_fraction=0.1),  # r=8 on 32-wide tiny models: ~9% (0.3% on MiniLM-L6)
    Case("ia3", max_delta_fraction=0.02),
    Case("layernorm", max_delta_fraction=0.03),
    Case("freeze", {"top": 1}, max_delta_fraction=0.5),  # 1 of the tiny models' 2 layers: ~44%
    Case("sparse-mask", max_delta_fraction=0.15),  # one uint8 per 8 masked entries: ~12% of the tiny Llama's count
    Case("houlsby", {"bottleneck_size": 4}, max_delta_fraction=0.15),  # default m=64 is wider than the tiny d=32
    Case("pfeiffer", max_delta_fraction=0.05),
    Case("prompt-tuning", {"init": "vocab"}, identity_at_start=False, max_delta_fraction=0.05),  # no tokenizer for init=text
    Case("prefix-tuning", {"num_virtual_tokens": 8}, identity_at_start=False, max_delta_fraction=0.1),
    Case("input-dependent-prompt", {"init": "vocab", "num_virtual_tokens": 4, "attention_size": 8, "num_heads": 2},
         identity_at_start=False, max_delta_fraction=0.1),  # defaults (a=128) are wider than the tiny d=32
    Case("recursive-lm", {"connector_size": 8}, max_delta_fraction=0.05),  # combine=add starts at the base model
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


@pytest.fixture(params=[(case, kind) for case in CASES for kind in KINDS],
                ids=lambda p: f"{p[0].method}-{p[1]}")
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


def test_delta_reloads_into_a_fresh_base_with_identical_outputs(case_kind):
    case, kind = case_kind
    batch = inputs(kind)
    trained = fresh(kind)
    method = build_method(case.method, case.options)
    prepare_model(trained, method)
    with torch.no_grad():  # stand-in for training: move every trainable tensor
        for parameter in trained.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    assert_delta_reloads(trained, method, fresh(kind, seed=0), case, batch)


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
    from deltatune.errors import DeltatuneError

    with pytest.raises(DeltatuneError, match=r"Unknown method 'bitfti'.*bitfit.*Did you mean 'bitfit'"):
        build_method("bitfti")


# ---------------------------------------------------------------------------------------------
# The same contract with deltatune's own heads (`deltatune.heads`): a pooled cross-encoder and the
# bi-encoder, whose batch stacks both texts of each pair along the batch.

HEADS = {"bert": [("cross-encoder", "mean", 3), ("bi-encoder", "mean", 1), ("bi-encoder", "last", 3)],
         "llama": [("bi-encoder", "last", 3)]}
"""(kind, pooling, labels): a 3-class pooled cross-encoder, a similarity bi-encoder, a 3-class bi-encoder; on
Llama the one that exercises both the stacked pairs and last-token pooling."""


def fresh_with_head(kind, head_kind, pooling, num_labels, seed=0):
    from transformers import AutoModel

    from conftest import tiny_bert_config, tiny_llama_config
    from deltatune.heads import HeadConfig, build_task_model
    from deltatune.tasks.spec import TaskSpec

    torch.manual_seed(seed)
    config = tiny_bert_config() if kind == "bert" else tiny_llama_config()
    task = (TaskSpec("pairs", ("a", "b"), score_range=(0.0, 5.0), metric="pearson", metrics=("pearson",))
            if num_labels == 1 else TaskSpec("pairs", ("a", "b"), ("x", "y", "z")))
    return build_task_model(AutoModel.from_config(config), task, HeadConfig(head_kind, pooling)).eval()


def head_inputs(head_kind):
    from deltatune.batching import collate, encode
    from deltatune.tasks.spec import Split, TaskSpec

    task = TaskSpec("pairs", ("a", "b"), ("x", "y", "z"))
    split = Split([("the man plays guitar", "a man"), ("a good movie", "good film"), ("not very happy", "sad")],
                  [0, 1, 2])
    batch = collate(encode(build_tokenizer(), task, split, 32, head_kind == "bi-encoder"), [0, 1, 2], 0, False)
    batch.pop("labels")
    batch.pop("token_type_ids", None)
    return batch


@pytest.mark.parametrize("case,kind,head", [(case, kind, head) for case in CASES for kind in KINDS for head in HEADS[kind]],
                         ids=lambda p: getattr(p, "method", None) or (p if isinstance(p, str) else f"{p[0]}-{p[1]}"))
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
    loss = logits.float().pow(2).mean() if num_labels == 1 else torch.nn.functional.cross_entropy(
        logits, torch.tensor([0, 1, 2]))
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    # the delta reloads into a fresh model with the same head: identical outputs
    assert_delta_reloads(model, method, fresh_with_head(kind, head_kind, pooling, num_labels), case, batch)
