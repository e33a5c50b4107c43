"""The model card every run directory carries: `README.md` with Hugging Face card metadata.

The YAML front matter is what the Hugging Face hub reads (base_model, library_name, pipeline_tag,
tags, and a model-index with the metrics per split); the body says what a person needs: the task,
the method and what it costs in parameters and bytes, the metrics on dev and test where measured,
how to load and serve the delta, and the command that trains it again. It is written from the run's
manifest (`deltatune.json`) and, when there is one, its record (`run.json`), so a card can be
rewritten at any time (`write_model_card(run_dir, read_manifest(run_dir))`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from deltatune.records import DeltaManifest, RunRecord

CARD = "README.md"


def write_model_card(
    directory: str | Path, manifest: DeltaManifest, record: RunRecord | None = None, *, library: str = "deltatune"
) -> Path:
    """Write `directory/README.md` for the run described by `manifest` (and `record`); returns its path."""
    directory = Path(directory)
    path = directory / CARD
    temporary = directory / f".{CARD}.partial"
    temporary.write_text(model_card(manifest, record, directory=directory, library=library), encoding="utf-8")
    os.replace(temporary, path)
    return path


def model_card(
    manifest: DeltaManifest,
    record: RunRecord | None = None,
    *,
    directory: Path | None = None,
    library: str = "deltatune",
) -> str:
    """The card's text: front matter, then Markdown."""
    task = manifest.task
    name = directory.name if directory is not None else f"{task.name}-{manifest.method}"
    metrics = {split: values for split, values in manifest.metrics.items() if values}
    front: dict[str, object] = {
        "library_name": library,
        "pipeline_tag": "text-classification",
        "tags": ["deltatune", manifest.method, task.name] + (["merge"] if manifest.merge else []),
    }
    hub_base = _hub_base(manifest.base_model.name)
    if hub_base:
        front["base_model"] = hub_base
    if metrics:
        front["model-index"] = [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": "text-classification", "name": task.name},
                        "dataset": {"name": task.name, "type": task.name, "split": split},
                        "metrics": [
                            {"type": metric, "value": round(float(value), 6), "name": f"{split} {metric}"}
                            for metric, value in values.items()
                            if value is not None
                        ],
                    }
                    for split, values in metrics.items()
                ],
            }
        ]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {name}", ""]
    lines += _summary(manifest, library) + [""] + _cost(manifest, record, directory) + [""]
    lines += _metrics_table(metrics, task) + _usage(manifest, library, name) + _provenance(manifest, record, name)
    return "\n".join(lines).rstrip() + "\n"


def _hub_base(name: str) -> str | None:
    """The base model's hub id, when it has one (an alias's, or a hub id itself); None for a local directory."""
    from deltatune.peft_export import loadable_base_name

    loadable = loadable_base_name(name)
    return None if Path(loadable).is_absolute() else loadable


def _summary(manifest: DeltaManifest, library: str) -> list[str]:
    task = manifest.task
    base = manifest.base_model.name
    what = (
        f"labels {', '.join(task.labels)}"
        if task.labels
        else f"a score in {list(task.score_range) if task.score_range else 'the training range'}"
    )
    fields = " and ".join(task.text_fields)
    if library == "deltatune":
        intro = (
            f"A **{manifest.method}** delta for **{task.name}** ({fields} in, {what} out) over the frozen "
            f"base model `{base}`, made with [deltatune](https://pypi.org/project/deltatune/). The directory "
            "holds only the delta (`delta.safetensors`) and its manifest (`deltatune.json`, with the base "
            "model's weight fingerprint: the delta refuses to load onto another base)."
        )
    else:
        intro = (
            f"**{task.name}** ({fields} in, {what} out): `{base}` with a **{manifest.method}** delta "
            "merged into its weights, exported by deltatune as a plain transformers model."
        )
    lines = [intro]
    if manifest.merge:
        merge = manifest.merge
        lines += [
            "",
            f"Merged with `{merge['how']}` from {len(merge['sources'])} deltas "
            f"(tasks {', '.join(dict.fromkeys(merge['source_tasks']))}, weights "
            f"{', '.join(f'{weight:g}' for weight in merge['weights'])}).",
        ]
    return lines


def _cost(manifest: DeltaManifest, record: RunRecord | None, directory: Path | None) -> list[str]:
    options = ", ".join(f"{key}={value}" for key, value in manifest.method_config.items()) or "defaults"
    lines = ["| | |", "|---|---|", f"| method | `{manifest.method}` ({options}) |"]
    total = (record.total_params if record else None) or manifest.base_model.total_params
    trained = (record.trainable_params if record else None) or _stored_values(directory)
    if trained:
        share = f" ({100 * trained / total:.3f}% of {total:,})" if total else ""
        lines.append(f"| trainable parameters | {trained:,}{share} |")
    if manifest.delta_bytes:
        lines.append(f"| delta size | {manifest.delta_bytes:,} bytes |")
    return lines


def _stored_values(directory: Path | None) -> int | None:
    """How many values delta.safetensors stores (read from its header, not its data)."""
    if directory is None or not (directory / "delta.safetensors").is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(directory / "delta.safetensors"), framework="pt") as handle:
        total = 0
        for key in handle.keys():
            count = 1
            for size in handle.get_slice(key).get_shape():
                count *= size
            total += count
    return total


def _metrics_table(metrics: dict, task) -> list[str]:
    if not metrics:
        return ["No metrics recorded yet (`deltatune eval RUN_DIR --split test` measures them).", ""]
    names = list(dict.fromkeys(metric for values in metrics.values() for metric in values))
    lines = ["| split | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for split, values in metrics.items():
        lines.append(
            f"| {split} | "
            + " | ".join(f"{values[metric]:.4f}" if values.get(metric) is not None else "-" for metric in names)
            + " |"
        )
    return lines + ["", f"Primary metric: {task.metric}.", ""]


def _usage(manifest: DeltaManifest, library: str, name: str) -> list[str]:
    if library != "deltatune":
        return [
            "## Use",
            "",
            "```python",
            "from transformers import pipeline",
            f'classifier = pipeline("text-classification", model="{name}")',
            "```",
            "",
        ]
    return [
        "## Use",
        "",
        "```python",
        "import deltatune",
        f'tuned = deltatune.load("{name}")',
        f"tuned.predict({', '.join(repr('text') for _ in manifest.task.text_fields)})",
        "```",
        "",
        f"Serve it beside other deltas of the same base: `deltatune serve {name} OTHER_RUN ...`.",
        "",
    ]


def _provenance(manifest: DeltaManifest, record: RunRecord | None, name: str) -> list[str]:
    lines = ["## How it was made", ""]
    command = training_command(record, name) if record else None
    if command:
        lines += ["```", command, "```", ""]
    elif manifest.merge:
        merge = manifest.merge
        lines += ["```", f"deltatune merge {' '.join(merge['sources'])} --how {merge['how']} --out {name}", "```", ""]
    data = manifest.data or {}
    if data:
        lines.append(f"Data: {data.get('task') or data.get('path')} ({data.get('kind')}).")
    if record and record.git.commit:
        lines.append(f"deltatune commit {record.git.commit[:12]}{' (with local changes)' if record.git.dirty else ''}.")
    versions = {
        "deltatune": manifest.versions.deltatune,
        "torch": manifest.versions.torch,
        "transformers": manifest.versions.transformers,
    }
    if any(versions.values()):
        lines.append("Versions: " + ", ".join(f"{key} {value}" for key, value in versions.items() if value) + ".")
    return lines


def training_command(record: RunRecord, out: str) -> str:
    """The `deltatune train` command that trains this run again (its options that differ from the defaults)."""
    from deltatune.config import to_jsonable
    from deltatune.methods import get_method_entry
    from deltatune.training import TrainConfig

    parts = ["deltatune train", f"--model {record.model}"]
    data = record.data
    if data.get("kind") == "local":
        parts.append(f"--data {data['path']} --text-fields {','.join(data['text_fields'])}")
        if data.get("label_field", "label") != "label":
            parts.append(f"--label-field {data['label_field']}")
        if data.get("regression"):
            parts.append("--regression")
    else:
        parts.append(f"--task {record.task}")
    parts.append(f"--method {record.method}")
    defaults = to_jsonable(get_method_entry(record.method).config_class())
    for key, value in record.method_config.items():
        if defaults.get(key) != value and value is not None:
            parts.append(f"--method.{key}={','.join(map(str, value)) if isinstance(value, list) else value}")
    train_defaults = to_jsonable(TrainConfig())
    for key, value in to_jsonable(record.train_config).items():
        if key in train_defaults and train_defaults[key] != value and value is not None and value is not False:
            flag = "--" + key.replace("_", "-")
            parts.append(
                flag if value is True else f"{flag} {','.join(map(str, value)) if isinstance(value, list) else value}"
            )
    return " ".join(parts + [f"--out {out}"])


__all__ = ["CARD", "model_card", "training_command", "write_model_card"]
