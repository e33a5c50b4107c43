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
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods import Method, build_method, prepare_model
from deltatune.methods.common import head_names
from deltatune.padding import padding_id
from deltatune.records import MANIFEST_VERSION, DeltaManifest, ManifestHead
from deltatune.tasks.spec import TaskSpec

FORMAT_VERSION = MANIFEST_VERSION
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
        # an ndarray is a buffer; numpy declares that (__buffer__) only for Python 3.12 and later
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
    return digest.hexdigest()


def model_bytes(model: nn.Module) -> int:
    """Bytes the whole model's tensors take in memory, which is what a full checkpoint stores."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """`tensors` as a safetensors file whose header lists `metadata` in sorted order, so that equal tensors give
    equal bytes (safetensors writes metadata from a hash map, in an order that changes from process to process).
    """
    data = save(tensors, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the library pads its header to 8 bytes; so do we
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        handle.write(memoryview(data)[8 + length :])


def save_delta(directory: Path, model: nn.Module, method: Method, manifest: DeltaManifest) -> int:
    """Write delta.safetensors and deltatune.json into `directory`; returns the tensor file's bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in method.delta_state(model).items()}
    _refuse_non_finite(tensors)
    save_tensors(tensors, directory / TENSORS, {"format": "deltatune", "method": method.name})
    size = (directory / TENSORS).stat().st_size
    write_json_atomic(
        directory / MANIFEST, replace(manifest, format_version=FORMAT_VERSION, delta_bytes=size).to_json()
    )
    return size


def _refuse_non_finite(tensors: dict[str, torch.Tensor]) -> None:
    bad = [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise DeltatuneError(
            f"The trained tensors {shown} hold NaN or infinite values, so nothing was saved: "
            "training diverged. Train again with a lower learning rate."
        )


NON_FINITE_KEY = "non_finite_values"
"""Where a JSON file deltatune writes says which numbers were NaN or infinite (they are written as null)."""


def json_text(data, indent: int | None = 2) -> str:
    """Strict JSON (no bare NaN/Infinity, which most JSON readers reject): non-finite numbers become null,
    and a top-level object gains NON_FINITE_KEY listing where each was and what it was."""
    found: dict[str, str] = {}

    def clean(value, where: str):
        if isinstance(value, float) and not math.isfinite(value):
            found[where or "value"] = f"{value} (written as null)"
            return None
        if isinstance(value, dict):
            return {key: clean(item, f"{where}.{key}" if where else str(key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item, f"{where}[{index}]") for index, item in enumerate(value)]
        return value

    cleaned = clean(data, "")
    if found and isinstance(cleaned, dict):
        cleaned[NON_FINITE_KEY] = found
    return json.dumps(cleaned, indent=indent, ensure_ascii=False, allow_nan=False)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` as strict JSON (see `json_text`) through a temporary file, so `path` is whole or absent."""
    temporary = path.with_name(f".{path.name}.partial")
    try:
        temporary.write_text(json_text(data) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_manifest(directory: str | Path) -> DeltaManifest:
    """The manifest of a delta directory, checked (see `DeltaManifest.from_json`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DeltatuneError(
            f"{str(directory)!r} is not a directory. Pass the --out directory of a `deltatune train` run."
        )
    path = directory / MANIFEST
    if not path.is_file():
        raise DeltatuneError(
            f"{directory} has no {MANIFEST}: it is not a deltatune delta (or its training "
            "did not finish). Pass the --out directory of a finished `deltatune train` run."
        )
    return DeltaManifest.from_json(path)


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / TENSORS
    if not path.is_file():
        raise DeltatuneError(
            f"{directory} has no {TENSORS}; the delta is incomplete. Re-create it by "
            "training again, or restore the file from a copy."
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise DeltatuneError(
            f"{path} is corrupt and cannot be read ({str(error).splitlines()[0]}). "
            "Re-create the delta by training again, or restore the file from a copy."
        ) from None


@dataclass
class TunedModel:
    """A base model with a delta applied: what `deltatune.load` returns."""

    model: nn.Module
    tokenizer: object
    task: TaskSpec
    method: Method
    manifest: DeltaManifest
    directory: Path

    def predict(self, *texts: str | list[str], batch_size: int = 64, precision: str = "auto") -> list[dict]:
        """Predict for one example (`predict("a", "b")` for a pair) or lists of them.

        `precision`: "auto" (bf16 autocast on CPUs with native bf16, else fp32), "fp32" or "bf16".

        Each result is {'label': name, 'probabilities': {name: p}} for classification, or
        {'score': value} for regression.
        """
        from deltatune.batching import encode, predict_encoded, to_task_units
        from deltatune.heads import encodes_texts_separately
        from deltatune.tasks.spec import Split

        _check_run_options(batch_size, precision)
        columns = [_text_column(t, position) for position, t in enumerate(texts, 1)]
        if len(columns) != len(self.task.text_fields):
            raise DeltatuneError(
                f"Task {self.task.name!r} takes {len(self.task.text_fields)} text(s) per example "
                f"({', '.join(self.task.text_fields)}), got {len(columns)}."
            )
        if len({len(c) for c in columns}) != 1:
            raise DeltatuneError("Every text field needs the same number of examples.")
        rows = list(zip(*columns, strict=True))
        if not rows:
            return []
        dummy = [0.0 if self.task.is_regression else 0] * len(rows)
        encoded = encode(
            self.tokenizer, self.task, Split(rows, dummy), self.max_length, encodes_texts_separately(self.model)
        )
        outputs = to_task_units(
            predict_encoded(self.model, encoded, self.task, padding_id(self.tokenizer), batch_size, precision),
            self.manifest.target_scale,
        )
        self._refuse_non_finite(outputs)
        if self.task.is_regression:
            return [{"score": float(o[0])} for o in outputs]
        results = []
        for row in outputs:
            probabilities = torch.softmax(torch.from_numpy(row), dim=-1).tolist()
            best = int(max(range(len(probabilities)), key=probabilities.__getitem__))
            results.append(
                {
                    "label": self.task.labels[best],
                    "probabilities": dict(zip(self.task.labels, probabilities, strict=True)),
                }
            )
        return results

    def _refuse_non_finite(self, outputs) -> None:
        """A delta saved from a diverged run (before deltatune refused to save one) outputs NaN: say so."""
        import numpy as np

        if not np.isfinite(outputs).all():
            raise DeltatuneError(
                f"The delta in {self.directory} gives NaN or infinite outputs: its weights are not "
                "finite (it was saved from a run that diverged). Train it again with a lower "
                "learning rate."
            )

    @property
    def max_length(self) -> int:
        """The delta's max_length, capped at what the model can take (old deltas may record more)."""
        from deltatune.sources.models import position_limit

        recorded = self.manifest.max_length
        limit = position_limit(self.model, self.tokenizer)
        return min(recorded, limit) if limit else recorded

    def evaluate(
        self,
        split: str = "dev",
        batch_size: int = 64,
        precision: str = "auto",
        data_changed_ok: bool = False,
        limit: int | None = None,
    ) -> dict[str, float]:
        """Metrics on a split of the task's data, rebuilt from the source recorded in the delta.

        The data must be the ones the delta was trained on (their recorded fingerprint is checked):
        a split re-made from changed data could overlap the training rows. `data_changed_ok=True`
        evaluates anyway. `limit`: only the split's first `limit` examples.
        """
        from deltatune.batching import encode, outputs_to_predictions, predict_encoded, to_task_units
        from deltatune.heads import encodes_texts_separately
        from deltatune.metrics import compute_metrics
        from deltatune.sources.records import check_data_unchanged, load_data_from_record

        if not isinstance(split, str):
            raise DeltatuneError(f"split must be 'train', 'dev' or 'test', got {type(split).__name__} {split!r}.")
        _check_run_options(batch_size, precision)
        if not isinstance(data_changed_ok, bool):
            raise DeltatuneError(f"data_changed_ok must be True or False, got {data_changed_ok!r}.")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise DeltatuneError(f"limit must be a positive whole number of examples or None (all), got {limit!r}.")
        data = load_data_from_record(self.manifest.training_data(self.directory), run=str(self.directory))
        selected = data.split(split)
        if limit is not None:
            selected = selected.subset(range(min(limit, len(selected))))
        if not data_changed_ok:
            check_data_unchanged(data, *self.manifest.recorded_data(self.directory), run=str(self.directory))
        encoded = encode(self.tokenizer, self.task, selected, self.max_length, encodes_texts_separately(self.model))
        outputs = to_task_units(
            predict_encoded(self.model, encoded, self.task, padding_id(self.tokenizer), batch_size, precision),
            self.manifest.target_scale,
        )
        self._refuse_non_finite(outputs)
        return compute_metrics(self.task.metrics, outputs_to_predictions(outputs, self.task), encoded.labels)


def _text_column(value, position: int) -> list[str]:
    """One text field's examples: a string, or a list/tuple of strings."""
    column = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if column is None or not all(isinstance(text, str) for text in column):
        raise DeltatuneError(
            f"predict() text {position} must be a string or a list of strings, got "
            f"{type(value).__name__} {value!r:.80}."
        )
    return column


def _check_run_options(batch_size, precision) -> None:
    from deltatune.precision import PRECISIONS

    problems = []
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
    if precision not in PRECISIONS:
        problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if problems:
        raise DeltatuneError("; ".join(problems) + ".")


def _base_model_location(manifest: DeltaManifest) -> str:
    """Where the base model recorded in a manifest is; a recorded directory that is gone is an error saying so."""
    name = manifest.base_model.name
    if Path(name).is_absolute() and not Path(name).is_dir():
        given = f" (given as {manifest.base_model.given!r})" if manifest.base_model.given else ""
        raise DeltatuneError(
            f"This delta's base model was the directory {name}{given}, which no longer exists. "
            "Pass --base (base=) pointing at a copy of that model."
        )
    return name


def load_checked_base(
    manifest: DeltaManifest,
    base: str | None = None,
    fix: str = "Load it onto {name!r} (pass --base to point at a copy of it).",
    head: ManifestHead | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer): the base model a delta records (or `base`) with the delta's task head (or `head`),
    checked against the recorded weight fingerprint; `fix` ({name}: the recorded base) ends the error when they
    differ."""
    from deltatune.sources.models import load_model_for_task

    base_name = base if base is not None else _base_model_location(manifest)
    head = head or manifest.resolved_head
    model, tokenizer = load_model_for_task(base_name, manifest.task, head=head.kind, pooling=head.pooling)
    expected, actual = manifest.base_model.fingerprint, fingerprint_backbone(model)
    if actual != expected:
        raise DeltatuneError(
            f"This delta was trained on base model {manifest.base_model.name!r} (weights fingerprint {expected[:12]}), "
            f"but {base_name!r} has fingerprint {actual[:12]}. " + fix.format(name=manifest.base_model.name)
        )
    return model, tokenizer


def load(directory: str | Path, base: str | None = None) -> TunedModel:
    """Rebuild base + delta from a delta directory; `base` overrides where the base model comes from."""
    if not isinstance(directory, (str, os.PathLike)):
        raise DeltatuneError(
            f"load() takes the path of a delta directory (a `deltatune train --out`), got "
            f"{type(directory).__name__} {directory!r:.80}."
        )
    if base is not None and not isinstance(base, (str, os.PathLike)):
        raise DeltatuneError(f"base must be a model name or directory, got {type(base).__name__} {base!r:.80}.")
    directory = Path(directory)
    manifest = read_manifest(directory)
    tensors = read_tensors(directory)
    model, tokenizer = load_checked_base(manifest, None if base is None else str(base))
    method = build_method(manifest.method, manifest.method_config)
    prepare_model(model, method, tokenizer)
    method.load_delta_state(model, tensors)
    model.eval()
    return TunedModel(model, tokenizer, manifest.task, method, manifest, directory)
