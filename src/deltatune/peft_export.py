"""Export a LoRA or (IA)³ delta in PEFT's on-disk adapter format.

The result is a directory with `adapter_config.json` and `adapter_model.safetensors` that
Hugging Face PEFT loads onto the plain base model and that then gives the same outputs:

    base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=N)
    model = peft.PeftModel.from_pretrained(base, OUT)

The task head travels as PEFT's `modules_to_save` (task type SEQ_CLS), stored under its plain
parameter name (`base_model.model.classifier.weight`), which is how PEFT itself saves it.
Target modules are written as full module names, so PEFT adapts exactly the layers deltatune did,
whatever suffixes or regexes chose them. Nothing here imports PEFT: the format is plain JSON and
safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from deltatune.delta import TunedModel, read_manifest, read_tensors, write_json_atomic
from deltatune.errors import DeltatuneError
from deltatune.methods import build_method, delta_state

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPORTABLE_METHODS = ("lora", "ia3")
# PEFT prefixes every name of the wrapped model with this when it saves an adapter
_PEFT_PREFIX = "base_model.model."


def export_peft(source: str | Path | TunedModel, out_dir: str | Path, *,
                base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
    """Write the delta `source` (a run/delta directory or a loaded TunedModel) as a PEFT adapter in `out_dir`.

    A directory is converted from its files alone, without loading the base model. The adapter
    config records `base_model_name_or_path` (default: the base model name in the delta's manifest,
    which for deltatune's own mirrors is a deltatune name such as 'minilm-l6', not a hub id).
    Returns `out_dir`.
    """
    if isinstance(source, TunedModel):
        _check_head(source.manifest)
        return write_peft_adapter(source.model, source.method, out_dir,
                                  base_model_name_or_path or source.manifest["base_model"]["name"], overwrite=overwrite)
    directory = Path(source)
    manifest = read_manifest(directory)
    _check_exportable(manifest["method"])
    _check_head(manifest)
    method = build_method(manifest["method"], manifest["method_config"])
    return _write_adapter(method, read_tensors(directory), Path(out_dir),
                          base_model_name_or_path or manifest["base_model"]["name"], overwrite)


def _check_head(manifest: dict) -> None:
    """PEFT rebuilds transformers' own classification head; a delta trained with another head would load wrong."""
    head = manifest.get("head") or {}
    if not head.get("transformers_head", True):
        raise DeltatuneError(
            f"This delta was trained with a {head.get('kind')} head pooling by {head.get('pooling')}, which "
            "transformers' AutoModelForSequenceClassification (what PEFT loads the adapter onto) does not have, "
            "so PEFT would give different outputs. Train with the model's native head (--head cross-encoder "
            "--pooling cls for BERT-family models, last for decoders) to export to PEFT.")


def write_peft_adapter(model: nn.Module, method, out_dir: str | Path, base_model_name_or_path: str | None = None,
                       *, overwrite: bool = False) -> Path:
    """Write `model`'s delta under `method` (LoRA or (IA)³, already applied) as a PEFT adapter in `out_dir`."""
    _check_exportable(method.name)
    return _write_adapter(method, delta_state(model, method), Path(out_dir), base_model_name_or_path, overwrite)


def _check_exportable(method_name: str) -> None:
    if method_name not in EXPORTABLE_METHODS:
        raise DeltatuneError(
            f"A {method_name!r} delta cannot be exported to PEFT's format: only deltas of the methods "
            f"{', '.join(EXPORTABLE_METHODS)} can (they have a PEFT equivalent). Use the deltatune delta "
            "directory itself, or retrain with --method lora.")


def _write_adapter(method, tensors: dict[str, torch.Tensor], out_dir: Path, base_model_name_or_path: str | None,
                   overwrite: bool) -> Path:
    if method.name == "lora":
        peft_tensors, targets, head_modules = _lora_tensors(tensors)
        config = {
            "peft_type": "LORA",
            "r": method.config.r,
            "lora_alpha": method.config.alpha,
            "lora_dropout": method.config.dropout,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
        }
    else:
        peft_tensors, targets, feedforward, head_modules = _ia3_tensors(tensors)
        config = {
            "peft_type": "IA3",
            "target_modules": targets,
            "feedforward_modules": feedforward,
            "fan_in_fan_out": False,
            "init_ia3_weights": True,
        }
    if not targets:
        raise DeltatuneError(f"The {method.name!r} delta holds no {method.name} tensors, only "
                             f"{sorted(tensors)[:5]}: it is incomplete. Re-create it by training again.")
    config.update({
        "task_type": "SEQ_CLS",
        # PEFT adds 'classifier' and 'score' for SEQ_CLS by itself; listing the head modules found
        # covers heads with other names too
        "modules_to_save": head_modules,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "revision": None,
    })

    existing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if (out_dir / name).exists()]
    if existing and not overwrite:
        raise DeltatuneError(f"{out_dir} already holds a PEFT adapter ({', '.join(existing)}). Choose another "
                             "directory, or pass --overwrite to replace it.")
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".{ADAPTER_WEIGHTS}.partial"
    save_file({name: t.detach().contiguous().cpu() for name, t in peft_tensors.items()}, str(partial),
              metadata={"format": "pt"})
    os.replace(partial, out_dir / ADAPTER_WEIGHTS)
    write_json_atomic(out_dir / ADAPTER_CONFIG, config)
    return out_dir


def _lora_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """PEFT names for LoRA tensors ('X.lora_A' -> 'base_model.model.X.lora_A.weight'), targets, head modules."""
    renamed, targets, head = {}, [], []
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            renamed[f"{_PEFT_PREFIX}{module}.{leaf}.weight"] = tensor
            targets.append(module)
        else:
            renamed[_PEFT_PREFIX + name] = tensor
            head.append(module)
    return renamed, sorted(set(targets)), sorted(set(head))


def _ia3_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str], list[str]]:
    """PEFT names and shapes for (IA)³ vectors: an output scale is (out, 1), an input scale (1, in)."""
    renamed, targets, feedforward, head = {}, [], [], []
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "output_scale":
            renamed[f"{_PEFT_PREFIX}{module}.ia3_l"] = tensor.reshape(-1, 1)
            targets.append(module)
        elif leaf == "input_scale":
            renamed[f"{_PEFT_PREFIX}{module}.ia3_l"] = tensor.reshape(1, -1)
            targets.append(module)
            feedforward.append(module)
        else:
            renamed[_PEFT_PREFIX + name] = tensor
            head.append(module)
    return renamed, sorted(set(targets)), sorted(set(feedforward)), sorted(set(head))


__all__ = ["export_peft", "write_peft_adapter", "EXPORTABLE_METHODS"]
