"""The delta artifact: only the trained tensors, plus what is needed to trust and reload them.

A delta is a directory:
    delta.safetensors   the tensors the method trained (or its own compact encoding of them)
    deltatune.json      format version, method and config, base model name and weight fingerprint,
                        task spec and label names, data source, metrics, library versions

Loading rebuilds the base model, checks its fingerprint, applies the method and copies the
tensors in. Only safetensors are ever read: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods import build_method, delta_state, load_delta_state, prepare_model
from deltatune.methods.common import head_names
from deltatune.tasks.spec import TaskSpec

FORMAT_VERSION = 1
MANIFEST = "deltatune.json"
TENSORS = "delta.safetensors"


def fingerprint_backbone(model: nn.Module) -> str:
    """sha256 over the pretrained weights (names, shapes, dtypes, values), head excluded.

    The head is freshly initialised per task and travels in the delta, so it is not part of
    what a delta needs from its base.
    """
    head = head_names(model)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name in head or not isinstance(tensor, torch.Tensor):
            continue
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def model_bytes(model: nn.Module) -> int:
    """Bytes the whole model's tensors take in memory, which is what a full checkpoint stores."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def save_delta(directory: Path, model: nn.Module, method, manifest: dict) -> int:
    """Write delta.safetensors and deltatune.json into `directory`; returns the tensor file's bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in delta_state(model, method).items()}
    save_file(tensors, str(directory / TENSORS), metadata={"format": "deltatune", "method": method.name})
    size = (directory / TENSORS).stat().st_size
    manifest = {"format_version": FORMAT_VERSION, **manifest, "delta_bytes": size}
    write_json_atomic(directory / MANIFEST, manifest)
    return size


def write_json_atomic(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise DeltatuneError(f"{str(directory)!r} is not a directory. Pass the --out directory of a "
                             "`deltatune train` run.")
    path = directory / MANIFEST
    if not path.is_file():
        raise DeltatuneError(f"{directory} has no {MANIFEST}: it is not a deltatune delta (or its training "
                             "did not finish). Pass the --out directory of a finished `deltatune train` run.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DeltatuneError(f"{path} is corrupt ({error}). Re-create the delta by training again, or restore "
                             "the file from a copy.") from None
    missing = [key for key in ("format_version", "method", "method_config", "base_model", "task")
               if key not in manifest]
    if missing:
        raise DeltatuneError(f"{path} lacks the keys {', '.join(missing)}; it was not written by deltatune "
                             "or has been edited. Re-create the delta by training again.")
    if manifest["format_version"] > FORMAT_VERSION:
        raise DeltatuneError(f"{path} has format version {manifest['format_version']}, newer than this "
                             f"deltatune understands ({FORMAT_VERSION}). Upgrade deltatune.")
    return manifest


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / TENSORS
    if not path.is_file():
        raise DeltatuneError(f"{directory} has no {TENSORS}; the delta is incomplete. Re-create it by "
                             "training again, or restore the file from a copy.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise DeltatuneError(f"{path} is corrupt and cannot be read ({str(error).splitlines()[0]}). "
                             "Re-create the delta by training again, or restore the file from a copy.") from None


@dataclass
class TunedModel:
    """A base model with a delta applied: what `deltatune.load` returns."""

    model: nn.Module
    tokenizer: object
    task: TaskSpec
    method: object
    manifest: dict
    directory: Path

    def predict(self, *texts: str | list[str], batch_size: int = 64, precision: str = "auto") -> list[dict]:
        """Predict for one example (`predict("a", "b")` for a pair) or lists of them.

        `precision`: "auto" (bf16 autocast on CPUs with native bf16, else fp32), "fp32" or "bf16".

        Each result is {'label': name, 'probabilities': {name: p}} for classification, or
        {'score': value} for regression.
        """
        from deltatune.tasks.spec import Split
        from deltatune.batching import encode, predict_encoded, to_task_units
        from deltatune.heads import encodes_texts_separately

        columns = [[t] if isinstance(t, str) else list(t) for t in texts]
        if len(columns) != len(self.task.text_fields):
            raise DeltatuneError(
                f"Task {self.task.name!r} takes {len(self.task.text_fields)} text(s) per example "
                f"({', '.join(self.task.text_fields)}), got {len(columns)}.")
        if len({len(c) for c in columns}) != 1:
            raise DeltatuneError("Every text field needs the same number of examples.")
        rows = list(zip(*columns))
        dummy = [0.0 if self.task.is_regression else 0] * len(rows)
        encoded = encode(self.tokenizer, self.task, Split(rows, dummy), self.manifest.get("max_length", 128),
                         encodes_texts_separately(self.model))
        outputs = to_task_units(predict_encoded(self.model, encoded, self.task, self.tokenizer.pad_token_id or 0,
                                                batch_size, precision), self.manifest.get("target_scale"))
        if self.task.is_regression:
            return [{"score": float(o[0])} for o in outputs]
        results = []
        for row in outputs:
            probabilities = torch.softmax(torch.from_numpy(row), dim=-1).tolist()
            best = int(max(range(len(probabilities)), key=probabilities.__getitem__))
            results.append({"label": self.task.labels[best],
                            "probabilities": dict(zip(self.task.labels, probabilities))})
        return results

    def evaluate(self, split: str = "dev", batch_size: int = 64, precision: str = "auto") -> dict[str, float]:
        """Metrics on a split of the task's data, rebuilt from the source recorded in the delta."""
        from deltatune.metrics import compute_metrics
        from deltatune.run import load_data_from_record
        from deltatune.batching import encode, outputs_to_predictions, predict_encoded, to_task_units
        from deltatune.heads import encodes_texts_separately

        data = load_data_from_record(self.manifest["data"])
        encoded = encode(self.tokenizer, self.task, data.split(split), self.manifest.get("max_length", 128),
                         encodes_texts_separately(self.model))
        outputs = to_task_units(predict_encoded(self.model, encoded, self.task, self.tokenizer.pad_token_id or 0,
                                                batch_size, precision), self.manifest.get("target_scale"))
        return compute_metrics(self.task.metrics, outputs_to_predictions(outputs, self.task), encoded.labels)


def load(directory: str | Path, base: str | None = None) -> TunedModel:
    """Rebuild base + delta from a delta directory; `base` overrides where the base model comes from."""
    from deltatune.heads import LEGACY_HEAD
    from deltatune.sources.models import load_model_for_task

    directory = Path(directory)
    manifest = read_manifest(directory)
    tensors = read_tensors(directory)
    task = TaskSpec.from_dict(manifest["task"])
    base_name = base or manifest["base_model"]["name"]
    head = manifest.get("head") or LEGACY_HEAD
    model, tokenizer = load_model_for_task(base_name, task, head=head["kind"], pooling=head["pooling"])
    expected = manifest["base_model"]["fingerprint"]
    actual = fingerprint_backbone(model)
    if actual != expected:
        raise DeltatuneError(
            f"This delta was trained on base model {manifest['base_model']['name']!r} "
            f"(weights fingerprint {expected[:12]}), but {base_name!r} has fingerprint {actual[:12]}. "
            f"Load it onto {manifest['base_model']['name']!r} (pass --base to point at a copy of it).")
    method = build_method(manifest["method"], manifest["method_config"])
    prepare_model(model, method, tokenizer)
    load_delta_state(model, method, tensors)
    model.eval()
    return TunedModel(model, tokenizer, task, method, manifest, directory)
