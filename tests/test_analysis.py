"""The layer-distance report: distances pinned to hand computations, and whole runs analysed end to end."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tiny_model, delta_manifest
from deltatune.analysis import (
    analyze_run,
    angle_degrees,
    comparison_basis,
    format_report,
    layer_distances,
    match_parameters,
)
from deltatune.delta import fingerprint_backbone, save_delta
from deltatune.errors import DeltatuneError
from deltatune.methods import Method, build_method, prepare_model
from deltatune.tasks.spec import TaskSpec

TASK = TaskSpec("toy", ("text",), ("negative", "positive"))


def make_run_dir(out: Path, model_dir: Path, method_name: str, options: dict | None = None, mutate=None) -> Path:
    """A delta directory like `deltatune train --out` writes, for a model loaded from `model_dir`.

    `mutate(model, method)` stands in for training.
    """
    from deltatune.sources.models import load_model_for_task

    torch.manual_seed(0)
    model, _ = load_model_for_task(str(model_dir), TASK)
    fingerprint = fingerprint_backbone(model)
    method = build_method(method_name, options or {})
    prepare_model(model, method)
    if mutate is not None:
        with torch.no_grad():
            mutate(model, method)
    manifest = delta_manifest(method, str(model_dir), fingerprint, TASK)
    save_delta(out, model, method, manifest)
    return out


def move_layer(model, index: int, scale: float = 0.1, seed: int = 0) -> None:
    """Add noise to every parameter of one transformer layer (and nothing else)."""
    from deltatune.methods.layers import layer_layout

    generator = torch.Generator().manual_seed(seed)
    layout = layer_layout(model)
    for name, parameter in model.named_parameters():
        if layout.position[name] == index:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def test_angle_is_the_arccos_of_the_cosine_and_stays_accurate_for_tiny_angles():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(50, generator=generator, dtype=torch.float64)
    b = torch.randn(50, generator=generator, dtype=torch.float64)
    cosine = float(a.numpy() @ b.numpy() / (np.linalg.norm(a.numpy()) * np.linalg.norm(b.numpy())))
    assert angle_degrees(a, b) == pytest.approx(math.degrees(math.acos(cosine)), abs=1e-9)
    assert angle_degrees(a, a) == 0.0
    assert angle_degrees(a, -a) == pytest.approx(180.0)
    assert angle_degrees(a, 4 * a) == 0.0  # a direction, not a length
    # two orthogonal unit vectors 1e-9 rad apart: arccos(cos) cannot resolve it in float64
    x, y = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    x[0], y[0], y[1] = 1.0, math.cos(1e-9), math.sin(1e-9)
    assert angle_degrees(x, y) == pytest.approx(math.degrees(1e-9), rel=1e-6)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_layer_distances_find_the_layer_that_moved(kind):
    pretrained, finetuned = build_tiny_model(kind), build_tiny_model(kind)
    with torch.no_grad():
        move_layer(finetuned, 1)
    rows = layer_distances(pretrained, finetuned)
    by_layer = {row["layer"]: row for row in rows}
    assert [row["layer"] for row in rows] == [-1, 0, 1, 2]  # embeddings, two blocks, top (final norm / pooler)
    assert [row["name"] for row in rows] == ["embeddings", "layer 0", "layer 1", "top"]
    assert by_layer[1]["rank"] == 1 and by_layer[1]["angle_deg"] > 0 and by_layer[1]["changed_fraction"] == 1.0
    for layer in (-1, 0, 2):
        assert by_layer[layer]["l1"] == 0 and by_layer[layer]["angle_deg"] == 0
    # the task head is not reported: it is random in both
    head_params = sum(p.numel() for n, p in pretrained.named_parameters() if n.startswith(("classifier", "score")))
    total = sum(p.numel() for p in pretrained.parameters())
    assert sum(row["num_params"] for row in rows) == total - head_params


def test_layer_distance_values_match_a_hand_computation():
    pretrained, finetuned = build_tiny_model("bert"), build_tiny_model("bert")
    query = "bert.encoder.layer.0.attention.self.query.weight"
    with torch.no_grad():
        dict(finetuned.named_parameters())[query].mul_(1.5).add_(0.01)
    row = next(r for r in layer_distances(pretrained, finetuned) if r["layer"] == 0)
    before = {n: p.detach().double().numpy() for n, p in pretrained.named_parameters() if ".layer.0." in n}
    after = {n: p.detach().double().numpy() for n, p in finetuned.named_parameters() if ".layer.0." in n}
    l1 = sum(np.abs(after[n] - before[n]).sum() for n in before)
    assert row["l1"] == pytest.approx(l1, rel=1e-12)
    assert row["l1_mean"] == pytest.approx(l1 / sum(v.size for v in before.values()), rel=1e-12)
    flat_before = np.concatenate([v.ravel() for v in before.values()])
    flat_after = np.concatenate([v.ravel() for v in after.values()])
    cosine = flat_before @ flat_after / (np.linalg.norm(flat_before) * np.linalg.norm(flat_after))
    assert row["angle_deg"] == pytest.approx(math.degrees(math.acos(cosine)), rel=1e-6)
    a, b = before[query].ravel(), after[query].ravel()
    query_angle = math.degrees(math.acos(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    assert row["num_matrices"] == 6  # query, key, value, attention output, intermediate, output
    assert row["mean_matrix_angle_deg"] == pytest.approx(query_angle / 6, rel=1e-6)


def test_rank_by_matrix_angle_ignores_large_norm_gains_that_dominate_the_whole_layer_angle():
    pretrained, finetuned = build_tiny_model("llama"), build_tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # layer 0: only a norm gain moved (gains ~1 dwarf the ~0.02 weights)
        finetuned.model.layers[0].input_layernorm.weight.add_(torch.randn(32, generator=generator) * 0.3)
        finetuned.model.layers[1].self_attn.q_proj.weight.add_(torch.randn(32, 32, generator=generator) * 0.02)
    by_matrix = {r["layer"]: r["rank"] for r in layer_distances(pretrained, finetuned)}
    by_whole = {r["layer"]: r["rank"] for r in layer_distances(pretrained, finetuned, rank_by="angle")}
    assert (by_matrix[1], by_matrix[0]) == (1, 2)
    assert (by_whole[0], by_whole[1]) == (1, 2)


def test_rank_by_l1_mean_and_bad_rank_by():
    pretrained, finetuned = build_tiny_model("llama"), build_tiny_model("llama")
    with torch.no_grad():
        move_layer(finetuned, 0, scale=0.5)
        move_layer(finetuned, 1, scale=0.01)
    rows = layer_distances(pretrained, finetuned, rank_by="l1_mean")
    assert [r["rank"] for r in rows if r["layer"] in (0, 1)] == [1, 2]
    with pytest.raises(DeltatuneError, match="rank_by='cosine'"):
        layer_distances(pretrained, finetuned, rank_by="cosine")


def test_a_model_that_is_not_a_fine_tuned_version_is_an_error():
    with pytest.raises(DeltatuneError, match="lacks"):
        layer_distances(build_tiny_model("bert"), build_tiny_model("llama"))


def test_wrapped_weights_are_matched_by_dropping_one_name_segment():
    class Wrapped(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.base_layer = linear

    pretrained, finetuned = build_tiny_model("bert"), build_tiny_model("bert")
    parent = finetuned.bert.encoder.layer[0].attention.self
    parent.query = Wrapped(parent.query)
    matched = match_parameters(pretrained, finetuned)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert matched[name] is not None and torch.equal(matched[name], dict(pretrained.named_parameters())[name])
    assert len(matched) == len(dict(pretrained.named_parameters()))


def test_comparison_basis():
    class AddsItsOwnTensors(Method):
        def trainable_names(self, model):
            return {"prompt.embedding"}

    model = build_tiny_model("bert")
    names = {n for n, _ in model.named_parameters()}
    assert comparison_basis(model, build_method("layernorm"), names) == "weights"
    assert comparison_basis(model, build_method("full"), names) == "weights"
    assert comparison_basis(model, AddsItsOwnTensors(None), names) == "unmerged"
    masked = build_tiny_model("bert")
    method = build_method("sparse-mask")
    prepare_model(masked, method)
    assert comparison_basis(masked, method, names) == "merged"


def test_format_report_is_a_plain_table_with_every_row():
    pretrained, finetuned = build_tiny_model("bert"), build_tiny_model("bert")
    with torch.no_grad():
        move_layer(finetuned, 0)
    rows = layer_distances(pretrained, finetuned)
    for row in rows:
        row.update(basis="weights", method="full")
    text = format_report(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["layer", "params", "L1"]
    for name in ("embeddings", "layer 0", "layer 1", "top"):
        assert any(line.startswith(name) for line in lines), name
    assert "full: the method trains backbone weights in place" in text
    assert format_report([]) == "(no layers)"


def test_analyze_run_of_a_full_fine_tuning_delta(tmp_path, tiny_bert_dir):
    run = make_run_dir(tmp_path / "run", tiny_bert_dir, "full", mutate=lambda model, _: move_layer(model, 1))
    rows = analyze_run(run)
    by_layer = {row["layer"]: row for row in rows}
    assert by_layer[1]["rank"] == 1 and by_layer[1]["changed_fraction"] == 1.0
    assert by_layer[0]["angle_deg"] == 0 and by_layer[-1]["angle_deg"] == 0
    assert {row["basis"] for row in rows} == {"weights"} and {row["method"] for row in rows} == {"full"}
    assert "layer 1" in format_report(rows)


def test_analyze_run_of_a_layernorm_delta_moves_only_norms(tmp_path, tiny_llama_dir):
    def move_norms(model, method):
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1)

    rows = analyze_run(make_run_dir(tmp_path / "run", tiny_llama_dir, "layernorm", mutate=move_norms))
    by_layer = {row["layer"]: row for row in rows}
    # a Llama block: 7 matrices untouched; its two RMSNorm gains (2·32 of its parameters) moved
    assert by_layer[0]["changed_fraction"] == pytest.approx(64 / by_layer[0]["num_params"])
    assert by_layer[0]["mean_matrix_angle_deg"] == 0
    assert by_layer[-1]["l1"] == 0  # Llama has no embedding norm
    assert by_layer[2]["l1"] == pytest.approx(0.1 * 32)  # the final norm


def test_analyze_run_of_a_sparse_mask_delta_compares_the_merged_weights(tmp_path, tiny_bert_dir):
    def train_masks(model, method):
        for name, parameter in model.named_parameters():
            if name.endswith("mask_scores"):
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
        method.on_step_end(model, 10, 10)  # the end of training: exactly the target sparsity

    run = make_run_dir(
        tmp_path / "run", tiny_bert_dir, "sparse-mask", {"sparsity": 0.1, "layers": "1"}, mutate=train_masks
    )
    rows = analyze_run(run)
    by_layer = {row["layer"]: row for row in rows}
    assert {row["basis"] for row in rows} == {"merged"}
    assert by_layer[0]["l1"] == 0
    # layer 1: 10% of each Linear weight zeroed (biases and norms untouched); 8192 masked entries in all
    assert by_layer[1]["changed_fraction"] * by_layer[1]["num_params"] == pytest.approx(
        round(0.1 * 1024) * 4 + round(0.1 * 2048) * 2
    )
