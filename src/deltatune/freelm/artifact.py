"""A FreeLM run from names to a saved delta, and loading it back.

The saved directory is an ordinary deltatune delta (delta.safetensors + deltatune.json) of the
2-label proposition classifier `freelm-propositions` on the base decoder, so `deltatune.load(DIR)`
and `deltatune predict DIR "proposition"` work on it as on any delta. Its manifest adds a
`freelm` section (configuration, training tasks, training summary, seen-task metrics,
perplexity before and after), and `run.json` holds the full record with the per-step history.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import PreTrainedModel

from deltatune.config import to_jsonable
from deltatune.critical_layers import resolve_critical_layers
from deltatune.delta import (
    MANIFEST,
    TENSORS,
    fingerprint_backbone,
    model_bytes,
    read_manifest,
    read_tensors,
    save_delta,
    write_json_atomic,
)
from deltatune.errors import DeltatuneError
from deltatune.freelm.config import FreeLMConfig
from deltatune.freelm.model import PROPOSITION_TASK, FreeLMModel, build_freelm_model
from deltatune.freelm.training import language_blocks, perplexity, seen_task_metrics, train_freelm
from deltatune.methods import build_method, load_delta_state, prepare_model
from deltatune.records import BaseModelRecord, DeltaManifest
from deltatune.run import RUN_RECORD, git_state, library_versions
from deltatune.run_directory import locked_target, staged_directory
from deltatune.training import peak_memory_bytes, seed_everything

FREELM_KIND = "freelm"
FREELM_FILES = frozenset({MANIFEST, TENSORS, RUN_RECORD})
"""Every file a FreeLM run directory holds: `--overwrite` replaces a directory only if it holds nothing else."""


class PreparedFreeLM(NamedTuple):
    model: FreeLMModel
    trainable_names: set[str]
    """Parameter names of `model.classifier` that train (the method's, the teacher head included)."""
    fingerprint: str
    """The base decoder's fingerprint, taken before the method added anything: the one `deltatune.load`
    computes on a fresh classifier."""
    base_params: int
    """Parameters of the classifier before the method (decoder + teacher head), as `deltatune train` counts."""


def prepare_freelm_model(causal_lm: PreTrainedModel, tokenizer, method) -> PreparedFreeLM:
    """FreeLM's model around `causal_lm` with `method` applied to the shared decoder; everything the
    method does not declare trainable (the LM head included) is frozen."""
    for parameter in causal_lm.parameters():
        parameter.requires_grad_(False)
    model = build_freelm_model(causal_lm)
    fingerprint = fingerprint_backbone(model.classifier)
    base_params = sum(p.numel() for p in model.classifier.parameters())
    resolve_critical_layers(method, model.classifier)
    names = prepare_model(model.classifier, method, tokenizer)  # methods that embed text get the decoder's tokenizer
    return PreparedFreeLM(model, names, fingerprint, base_params)


def run_freelm_training(
    model_name: str,
    config: FreeLMConfig | None = None,
    method_name: str = "lora",
    method_overrides: dict | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Train FreeLM on `model_name` (a causal decoder) and save it to `out`; returns the run record."""
    from deltatune.tasks import get_task

    config = config or FreeLMConfig()
    method = build_method(method_name, method_overrides or {})  # config errors before any loading
    for task in config.train_tasks:
        get_task(task)
    if out is None:
        return _train_and_save(model_name, config, method_name, method, None, overwrite)
    with locked_target(Path(out), FREELM_FILES, overwrite) as out_path:
        return _train_and_save(model_name, config, method_name, method, out_path, overwrite)


def _freelm_manifest(
    model_name: str,
    method_name: str,
    method,
    config: FreeLMConfig,
    fingerprint: str,
    total_params: int,
    seen: dict,
    summary: dict,
) -> DeltaManifest:
    """The FreeLM delta's manifest: its base, the proposition task, and the seen tasks' dev metrics."""
    from deltatune.sources.models import describe_model_source

    return DeltaManifest(
        method=method_name,
        method_config=to_jsonable(method.config),
        base_model=BaseModelRecord(
            name=model_name,
            fingerprint=fingerprint,
            source=describe_model_source(model_name),
            total_params=total_params,
        ),
        task=PROPOSITION_TASK,
        # not a catalog task: `deltatune eval` says so; `deltatune freelm eval` is the way to evaluate
        data={"kind": "catalog", "task": PROPOSITION_TASK.name, "source": "auto"},
        max_length=config.max_length,
        metrics={
            "dev": {
                f"{task}/{name}": value
                for task, metrics in seen.items()
                for name, value in metrics.items()
                if name != "num_examples"
            }
        },
        freelm=summary,
        versions=library_versions(),
    )


def _train_and_save(
    model_name: str, config: FreeLMConfig, method_name: str, method, out_path: Path | None, overwrite: bool
) -> dict:
    """Train FreeLM and, with `out_path` (locked by the caller), publish the run there; returns the record."""
    from deltatune.sources.data import load_task_data, load_text_corpus
    from deltatune.sources.models import describe_model_source, load_causal_lm

    if config.threads:
        torch.set_num_threads(config.threads)

    started = time.perf_counter()
    task_data = [load_task_data(task) for task in config.train_tasks]
    corpus = load_text_corpus(config.lm_corpus)
    seed_everything(config.seed)  # the teacher head's initialisation depends on it
    causal_lm, tokenizer = load_causal_lm(model_name)
    model, trainable_names, fingerprint, total_params = prepare_freelm_model(causal_lm, tokenizer, method)
    trainable_params = sum(p.numel() for n, p in model.classifier.named_parameters() if n in trainable_names)

    validation_blocks = language_blocks(
        tokenizer, corpus["validation"], config.lm_sequence_length, config.perplexity_blocks, seed=0
    )
    perplexity_before = perplexity(model, validation_blocks)
    result = train_freelm(model, tokenizer, task_data, corpus["train"], config, method)
    perplexity_after = perplexity(model, validation_blocks)
    evaluation_started = time.perf_counter()
    seen = seen_task_metrics(model, tokenizer, task_data, config)
    model.to("cpu")  # the delta is saved from the CPU (training may have run on a GPU)
    evaluation_time = time.perf_counter() - evaluation_started
    wall_time = time.perf_counter() - started

    summary = {
        "kind": FREELM_KIND,
        "config": to_jsonable(config),
        "train_tasks": list(config.train_tasks),
        "training": result.summary(),
        "seen_task_dev_metrics": seen,
        "perplexity": {
            "corpus": config.lm_corpus,
            "blocks": len(validation_blocks),
            "block_length": config.lm_sequence_length,
            "before": perplexity_before,
            "after": perplexity_after,
        },
    }
    record = {
        "model": model_name,
        "model_source": describe_model_source(model_name),
        "model_fingerprint": fingerprint,
        "task": PROPOSITION_TASK.name,
        "method": method_name,
        "method_config": to_jsonable(method.config),
        "trainable_params": trainable_params,
        "total_params": total_params,
        "trainable_percent": 100.0 * trainable_params / total_params,
        "full_model_bytes": model_bytes(model.classifier),
        "freelm": summary,
        "history": result.history,
        "dev_eval_time_s": evaluation_time,
        "wall_time_s": wall_time,
        "peak_memory_bytes": peak_memory_bytes(),
        "versions": asdict(library_versions()),
        "git": asdict(git_state()),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if out_path is None:
        record["delta_bytes"] = None
        return record
    manifest = _freelm_manifest(model_name, method_name, method, config, fingerprint, total_params, seen, summary)
    with staged_directory(out_path, FREELM_FILES, overwrite, what="the FreeLM run") as staging:
        record["delta_bytes"] = save_delta(staging, model.classifier, method, manifest)
        write_json_atomic(staging / RUN_RECORD, record)
    return record


def load_freelm(directory: str | Path, base: str | None = None) -> tuple[FreeLMModel, object, object, DeltaManifest]:
    """(model, tokenizer, method, manifest) of a saved FreeLM run, rebuilt on its base decoder."""
    from deltatune.sources.models import load_causal_lm

    directory = Path(directory)
    manifest = read_freelm_manifest(directory)
    causal_lm, tokenizer = load_causal_lm(base or manifest.base_model.name)
    model, method = attach_freelm_delta(causal_lm, tokenizer, directory, manifest, base_name=base)
    return model, tokenizer, method, manifest


def read_freelm_manifest(directory: str | Path) -> DeltaManifest:
    manifest = read_manifest(directory)
    if (manifest.freelm or {}).get("kind") != FREELM_KIND:
        raise DeltatuneError(
            f"{directory} is a deltatune delta but not a FreeLM one (it was trained with "
            f"`deltatune train`, method {manifest.method!r}). Pass the --out directory of a "
            "`deltatune freelm train` run."
        )
    return manifest


def attach_freelm_delta(
    causal_lm: PreTrainedModel, tokenizer, directory: str | Path, manifest: DeltaManifest, base_name: str | None = None
) -> tuple[FreeLMModel, object]:
    """Turn a loaded base decoder into the saved FreeLM model (checks the base's fingerprint first)."""
    directory = Path(directory)
    for parameter in causal_lm.parameters():
        parameter.requires_grad_(False)
    model = build_freelm_model(causal_lm)
    expected, recorded = manifest.base_model.fingerprint, manifest.base_model.name
    actual = fingerprint_backbone(model.classifier)
    if actual != expected:
        raise DeltatuneError(
            f"This FreeLM delta was trained on base model {recorded!r} (weights fingerprint "
            f"{expected[:12]}), but {base_name or recorded!r} has fingerprint {actual[:12]}. "
            f"Load it onto {recorded!r} (pass --base to point at a copy of it)."
        )
    method = build_method(manifest.method, manifest.method_config)
    prepare_model(model.classifier, method, tokenizer)
    load_delta_state(model.classifier, method, read_tensors(directory))
    model.eval()
    return model, method


__all__ = [
    "FREELM_KIND",
    "PreparedFreeLM",
    "attach_freelm_delta",
    "load_freelm",
    "prepare_freelm_model",
    "read_freelm_manifest",
    "run_freelm_training",
]
