"""How far fine-tuning moved each layer from the pretrained weights.

Radiya-Dixit & Wang 2020 ("How fine can fine-tuning be?", arXiv:2004.14129) measure, per layer of
BERT, how far the fine-tuned weights are from the pretrained ones, and find that the distance varies
a lot from layer to layer: fine-tuning only the layers that move most ("critical" layers, see the
`freeze` method's `critical` option) loses little. Two distances per layer:

    L1 distance      Σ |W_ft − W_pre| over the layer's parameters, and that sum divided by their count
    angular distance the angle between the flattened pretrained and fine-tuned weights,
                     arccos(<a, b> / (|a| |b|)), in DEGREES; computed as 2·atan2(|â − b̂|, |â + b̂|)
                     (â = a / |a|), which equals the arccos but stays accurate for the tiny angles
                     fine-tuning produces, where arccos of a cosine near 1 loses most digits.

The paper reports the angle per weight matrix; a layer here gets both the mean of its matrices'
angles and the angle of the whole layer (all its parameters concatenated). Rows are ranked by how
far the layer moved (rank 1 = moved most), by default by the mean matrix angle: the whole-layer
angle is dominated by whichever tensors have the largest norm (norm gains near 1 outweigh small
random-looking weights), while the per-matrix angle is scale-free per matrix.

Rows cover the embeddings, every transformer layer, and the "top" (final norm, BERT's pooler). The
task head is left out: it is freshly initialised, so its distance from the pretrained model's
(equally random) head means nothing.

Which weights are compared depends on the method of the run (the `basis` of each row):
    weights    the method trains backbone tensors in place (full, bitfit, layernorm, freeze): the
               distances are exactly how far they moved
    merged     the method adds its own tensors but can fold them into the weights (merge): the
               merged weights are compared
    unmerged   the method adds tensors it cannot fold in (e.g. prompt tuning, adapters): those are
               not reflected; only backbone tensors it also trains in place (if any, e.g. the norms
               some adapter variants tune) moved, everything else is at distance zero
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base import Method
from deltatune.methods.layers import describe_position, layer_layout

RankBy = Literal["matrix_angle", "angle", "l1_mean"]
RANK_KEYS = {"matrix_angle": "mean_matrix_angle_deg", "angle": "angle_deg", "l1_mean": "l1_mean"}
"""What `rank_by` ranks on: the mean angle of the layer's weight matrices (the paper's per-matrix
measure, the default), the angle of the whole layer, or the mean absolute change per parameter."""

BASIS_NOTES = {
    "weights": "the method trains backbone weights in place: distances are exactly how far they moved",
    "merged": "the method's tensors were merged into the weights before comparing",
    "unmerged": (
        "the method adds tensors it cannot merge into the weights: they are not reflected here; "
        "only the backbone tensors it trains in place, if any (e.g. norms), moved"
    ),
}


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    """The angle between two tensors flattened to vectors, in degrees (0 when equal)."""
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    norm_a, norm_b = a.norm(), b.norm()
    if norm_a == 0 or norm_b == 0:
        return 0.0 if torch.equal(a, b) else 90.0
    unit_a, unit_b = a / norm_a, b / norm_b
    return math.degrees(2.0 * math.atan2(float((unit_a - unit_b).norm()), float((unit_a + unit_b).norm())))


def match_parameters(pretrained: nn.Module, finetuned: nn.Module) -> dict[str, torch.Tensor]:
    """For each pretrained parameter name, the fine-tuned tensor that stands in its place.

    Same name and shape first. A method that wraps a module may rename its weight by one extra path
    segment (e.g. 'query.base_layer.weight' for 'query.weight'); such names are matched by dropping
    one segment when that gives exactly one pretrained name of the same shape.
    """
    base = dict(pretrained.named_parameters())
    tuned = dict(finetuned.named_parameters())
    matched = {
        name: tuned[name].detach()
        for name, parameter in base.items()
        if name in tuned and tuned[name].shape == parameter.shape
    }
    for name, tensor in tuned.items():
        if name in base:
            continue
        parts = name.split(".")
        dropped_one = {".".join(parts[:i] + parts[i + 1 :]) for i in range(len(parts) - 1)}
        candidates = [c for c in dropped_one if c in base and c not in matched and base[c].shape == tensor.shape]
        if len(candidates) == 1:
            matched[candidates[0]] = tensor.detach()
    return matched


def layer_distances(pretrained: nn.Module, finetuned: nn.Module, rank_by: RankBy = "matrix_angle") -> list[dict]:
    """Per layer (embeddings, each transformer layer, top): how far `finetuned` is from `pretrained`.

    Each row: layer (position: -1 embeddings, 0..L-1, L top), name, num_params, num_matrices, l1,
    l1_mean, angle_deg (whole layer), mean_matrix_angle_deg, changed_fraction (entries that differ
    at all), rank (1 = moved most by `rank_by`, see RANK_KEYS). Rows come in layer order; the task head is excluded.
    """
    if rank_by not in RANK_KEYS:
        raise DeltatuneError(f"rank_by={rank_by!r}: choose one of {', '.join(map(repr, RANK_KEYS))}.")
    layout = layer_layout(pretrained)
    base = dict(pretrained.named_parameters())
    tuned = match_parameters(pretrained, finetuned)
    missing = [n for n in base if n not in tuned and n not in layout.head]
    if missing:
        raise DeltatuneError(
            f"The fine-tuned model lacks {len(missing)} of the pretrained parameters (e.g. {missing[0]!r}): "
            "it is not a fine-tuned version of this pretrained model."
        )
    rows: list[dict[str, Any]] = []
    for position in range(-1, layout.num_layers + 1):
        names = [n for n in base if layout.position[n] == position and n not in layout.head]
        if not names:
            continue
        before = [base[n].detach().double() for n in names]
        after = [tuned[n].double() for n in names]
        differences = [(b - a) for a, b in zip(before, after, strict=True)]
        num_params = sum(t.numel() for t in before)
        l1 = float(sum(d.abs().sum() for d in differences))
        changed = int(sum((d != 0).sum() for d in differences))
        matrix_angles = [angle_degrees(a, b) for a, b in zip(before, after, strict=True) if a.ndim >= 2]
        rows.append(
            {
                "layer": position,
                "name": describe_position(position, layout.num_layers),
                "num_params": num_params,
                "num_matrices": len(matrix_angles),
                "l1": l1,
                "l1_mean": l1 / num_params,
                "angle_deg": angle_degrees(
                    torch.cat([t.reshape(-1) for t in before]), torch.cat([t.reshape(-1) for t in after])
                ),
                "mean_matrix_angle_deg": sum(matrix_angles) / len(matrix_angles) if matrix_angles else 0.0,
                "changed_fraction": changed / num_params,
            }
        )
    key = RANK_KEYS[rank_by]
    for rank, row in enumerate(sorted(rows, key=lambda r: (-r[key], -r["l1_mean"], r["layer"])), start=1):
        row["rank"] = rank
    return rows


def comparison_basis(model: nn.Module, method: Method, pretrained_names: set[str]) -> str:
    """'weights', 'merged' or 'unmerged': what comparing this method's model to the base measures."""
    if method.mergeable:
        return "merged"
    from deltatune.methods.common import head_names

    trained = set(method.trainable_names(model)) - head_names(model)
    return "weights" if trained <= pretrained_names else "unmerged"


def analyze_run(run_dir: str | Path, base: str | None = None, rank_by: RankBy = "matrix_angle") -> list[dict]:
    """The layer-distance report of a `deltatune train` output directory.

    Rebuilds the fine-tuned model from the delta (merging it into the weights when the method can),
    loads the pretrained model it was trained from (`base` overrides where it comes from, as for
    `deltatune.load`), and compares them with `layer_distances`. Every row also carries `basis`
    (see the module docstring) and `method`.
    """
    from deltatune.delta import load
    from deltatune.heads import head_of
    from deltatune.sources.models import load_model_for_task

    tuned = load(run_dir, base=base)
    head = head_of(tuned.model)  # the same head, so both models have the same parameters
    pretrained, _ = load_model_for_task(
        base or tuned.manifest.base_model.name, tuned.task, head=head.kind, pooling=head.pooling
    )
    basis = comparison_basis(tuned.model, tuned.method, {n for n, _ in pretrained.named_parameters()})
    if basis == "merged":
        tuned.method.merge(tuned.model)
    rows = layer_distances(pretrained, tuned.model, rank_by)
    for row in rows:
        row["basis"] = basis
        row["method"] = tuned.manifest.method
    return rows


def format_report(rows: list[dict]) -> str:
    """A plain-text table of `layer_distances` / `analyze_run` rows, with a note on what was compared."""
    if not rows:
        return "(no layers)"
    header = ("layer", "params", "L1", "L1/param", "angle°", "mean matrix angle°", "changed", "rank")
    lines = [
        (
            row["name"],
            f"{row['num_params']:,}",
            f"{row['l1']:.4g}",
            f"{row['l1_mean']:.3e}",
            f"{row['angle_deg']:.4f}",
            f"{row['mean_matrix_angle_deg']:.4f}" if row["num_matrices"] else "-",
            f"{100 * row['changed_fraction']:.2f}%",
            str(row["rank"]) if row["l1"] else "-",
        )
        for row in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def render(cells) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))])

    text = [render(header), render(["-" * w for w in widths]), *(render(line) for line in lines)]
    basis = rows[0].get("basis")
    if basis:
        method = rows[0].get("method", "the method")
        text.append("")
        text.append(f"{method}: {BASIS_NOTES[basis]}.")
    text.append(
        "Angles in degrees; rank 1 = moved most ('-': did not move). The task head is not shown (it starts random)."
    )
    return "\n".join(text)
