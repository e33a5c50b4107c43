"""Export a delta in PEFT's on-disk adapter format, for the methods that have a PEFT equivalent.

The result is a directory with `adapter_config.json` and `adapter_model.safetensors` that
Hugging Face PEFT loads onto the plain base model and that then gives deltatune's outputs:

    config = json.load(open(OUT / "adapter_config.json"))
    base = AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"],
                                                              num_labels=len(config.get("id2label", [0])))
    model = peft.PeftModel.from_pretrained(base, OUT)

Each method says how its tensors map onto PEFT's (`Method.export_peft`: LoRA and (IA)³ can, the
others raise a DeltatuneError that says so). Around that, this module writes what every export
needs:
- the task head travels as PEFT's `modules_to_save` (task type SEQ_CLS), under its plain parameter
  name (`base_model.model.classifier.weight`), which is how PEFT itself saves it;
- a regression delta predicts standardised scores that deltatune maps back with the training
  targets' mean and std (`target_scale` in deltatune.json); the export folds them into the head's
  output layer (W·std, b·std + mean), so PEFT's raw output is deltatune's score. A head without a
  bias (Llama's `score`) cannot hold the mean: such an export is refused, saying why;
- label names as `id2label` / `label2id` (PEFT ignores keys it does not know, with a warning);
- `base_model_name_or_path` a user can load: the hub id of a deltatune alias ('minilm-l6' ->
  'sentence-transformers/all-MiniLM-L6-v2'), a local directory as an absolute path, a hub id as is.
Nothing here imports PEFT: the format is plain JSON and safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from deltatune.delta import TunedModel, read_manifest, read_tensors, write_json_atomic
from deltatune.errors import DeltatuneError
from deltatune.heads import foreign_head
from deltatune.methods import Method, build_method

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT prefixes every name of the wrapped model with this when it saves an adapter
_PEFT_PREFIX = "base_model.model."


def export_peft(
    source: str | Path | TunedModel,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the delta `source` (a run/delta directory or a loaded TunedModel) as a PEFT adapter in `out_dir`.

    A directory is converted from its files alone, without loading the base model. The adapter
    config records `base_model_name_or_path` (default: where the delta's base model can be loaded
    from, see the module docstring). Returns `out_dir`.
    """
    if isinstance(source, TunedModel):
        manifest, method = source.manifest, source.method
        tensors = method.delta_state(source.model)
    else:
        manifest = read_manifest(Path(source))
        method = build_method(manifest.method, manifest.method_config)
        tensors = read_tensors(Path(source))
    problem = foreign_head(
        manifest,
        getattr(source, "directory", source),
        "PEFT (it loads the adapter onto transformers' own AutoModelForSequenceClassification)",
    )
    if problem is not None:
        raise DeltatuneError(problem)
    return _write_adapter(
        method,
        tensors,
        Path(out_dir),
        base_model_name_or_path or loadable_base_name(manifest.base_model.name),
        overwrite,
        manifest.task.labels,
        manifest.target_scale,
    )


def write_peft_adapter(
    model: nn.Module,
    method: Method,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
    *,
    overwrite: bool = False,
    labels: tuple[str, ...] = (),
    target_scale: tuple[float, float] | None = None,
) -> Path:
    """Write `model`'s delta under `method` (applied to it) as a PEFT adapter in `out_dir`.

    `labels` are the class names (none for regression); `target_scale` the regression targets'
    (mean, std) that deltatune maps the model's output back with.
    """
    return _write_adapter(
        method,
        method.delta_state(model),
        Path(out_dir),
        base_model_name_or_path,
        overwrite,
        tuple(labels),
        target_scale,
    )


def loadable_base_name(name: str) -> str:
    """The name PEFT and transformers can load a deltatune base model by."""
    from deltatune.sources.models import MODEL_ALIASES

    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name].hub_id
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def _write_adapter(
    method: Method,
    tensors: dict[str, torch.Tensor],
    out_dir: Path,
    base_model_name_or_path: str | None,
    overwrite: bool,
    labels: tuple[str, ...],
    target_scale,
) -> Path:
    adapter = method.export_peft(tensors)
    if not adapter.config.get("target_modules"):
        raise DeltatuneError(
            f"The {method.name!r} delta holds no {method.name} tensors, only "
            f"{sorted(tensors)[:5]}: it is incomplete. Re-create it by training again."
        )
    head = fold_target_scale(adapter.rest, target_scale) if target_scale else adapter.rest
    config = {
        **adapter.config,
        "task_type": "SEQ_CLS",
        # PEFT adds 'classifier' and 'score' for SEQ_CLS by itself; listing the head modules found
        # covers heads with other names too
        "modules_to_save": sorted({name.rpartition(".")[0] for name in head}),
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "revision": None,
    }
    names = labels or (("score",) if target_scale else ())  # a regression head's one output, as deltatune names it
    if names:
        config["id2label"] = {str(index): label for index, label in enumerate(names)}
        config["label2id"] = {label: index for index, label in enumerate(names)}

    existing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if (out_dir / name).exists()]
    if existing and not overwrite:
        raise DeltatuneError(
            f"{out_dir} already holds a PEFT adapter ({', '.join(existing)}). Choose another "
            "directory, or pass --overwrite to replace it."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_tensors = {_PEFT_PREFIX + name: tensor for name, tensor in {**adapter.tensors, **head}.items()}
    partial = out_dir / f".{ADAPTER_WEIGHTS}.partial"
    save_file(
        {name: t.detach().contiguous().cpu() for name, t in peft_tensors.items()},
        str(partial),
        metadata={"format": "pt"},
    )
    os.replace(partial, out_dir / ADAPTER_WEIGHTS)
    write_json_atomic(out_dir / ADAPTER_CONFIG, config)
    return out_dir


def fold_target_scale(head: dict[str, torch.Tensor], target_scale) -> dict[str, torch.Tensor]:
    """The head with score = output · std + mean folded into its one-output layer: W·std, b·std + mean."""
    mean, std = (float(value) for value in target_scale)
    outputs = sorted(
        name.removesuffix(".weight")
        for name, tensor in head.items()
        if name.endswith(".weight") and tensor.ndim == 2 and tensor.shape[0] == 1
    )
    if len(outputs) != 1:
        raise DeltatuneError(
            f"Cannot tell which layer of the regression head {sorted(head)} gives the score "
            f"(expected one weight with one output row, found {outputs or 'none'}), so the "
            "target scale cannot be folded into it for PEFT."
        )
    layer = outputs[0]
    folded = dict(head)
    weight = head[f"{layer}.weight"]
    folded[f"{layer}.weight"] = (weight.double() * std).to(weight.dtype)
    bias = head.get(f"{layer}.bias")
    if bias is not None:
        folded[f"{layer}.bias"] = (bias.double() * std + mean).to(bias.dtype)
    elif mean != 0:
        raise DeltatuneError(
            f"This regression delta's scores are the model's output times {std:g} plus {mean:g} (the training "
            f"targets' std and mean), but its head layer {layer!r} has no bias, so PEFT cannot add the mean: "
            f"plain peft + transformers would predict every score {mean:g} too low. Use the deltatune delta "
            "itself (deltatune.load), or a model whose head has a bias (the BERT family's does)."
        )
    return folded


__all__ = ["export_peft", "fold_target_scale", "loadable_base_name", "write_peft_adapter"]
