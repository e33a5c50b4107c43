"""Choosing `freeze`'s critical layers: the k blocks that moved most in an earlier full fine-tuning run.

This reads another run (through `deltatune.analysis`), so it happens before the method is applied:
training calls `resolve_critical_layers` just before `prepare_model`, and the choice is recorded in
the method's config (`critical_layers`), which the run writes into the delta's manifest; a saved delta
therefore loads without the reference run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from deltatune.analysis import RANK_KEYS, RankBy, analyze_run
from deltatune.errors import DeltatuneError
from deltatune.methods.base import Method
from deltatune.methods.freeze import FreezeConfig
from deltatune.methods.layers import layer_layout


def resolve_critical_layers(method: Method, model: nn.Module) -> None:
    """Fill in `method.config.critical_layers` for a freeze method with `critical` set; anything else is left alone."""
    config = method.config
    if not isinstance(config, FreezeConfig) or config.critical is None or config.critical_layers:
        return
    assert config.critical_from is not None  # FreezeConfig demands critical_from with critical
    chosen = critical_layers(model, config.critical_from, config.critical, config.critical_metric)
    method.config = dataclasses.replace(config, critical_layers=tuple(chosen))


def critical_layers(model: nn.Module, run_dir: str, count: int, metric: RankBy) -> list[int]:
    """The `count` transformer layers that moved most in the run at `run_dir`, by `metric`."""
    if not Path(run_dir).is_dir():
        raise DeltatuneError(
            f"method.critical_from={run_dir!r} is not a directory. Point it at the --out "
            "directory of a finished full fine-tuning run on the same base model."
        )
    rows = analyze_run(run_dir, rank_by=metric)
    num_layers = layer_layout(model).num_layers
    blocks = [row for row in rows if 0 <= row["layer"] < num_layers and row["name"].startswith("layer")]
    if len(blocks) != num_layers:
        raise DeltatuneError(
            f"method.critical_from={run_dir!r} was trained on a model with {len(blocks)} "
            f"transformer layers, but this model has {num_layers}: use a run on the same base model."
        )
    if rows and rows[0].get("basis") == "unmerged":
        raise DeltatuneError(
            f"method.critical_from={run_dir!r} holds a {rows[0].get('method')!r} run, which "
            "trained tensors of its own rather than the model's weights; use a full fine-tuning run."
        )
    key = RANK_KEYS[metric]
    moved = sorted(blocks, key=lambda row: (-row[key], -row["l1_mean"], row["layer"]))
    if moved[0][key] == 0:
        raise DeltatuneError(
            f"method.critical_from={run_dir!r}: no transformer layer moved in that run, so none "
            "is more critical than another; use a full fine-tuning run."
        )
    if count > num_layers:
        raise DeltatuneError(f"method.critical={count}, but the model has only {num_layers} transformer layers.")
    return sorted(row["layer"] for row in moved[:count])


__all__ = ["critical_layers", "resolve_critical_layers"]
