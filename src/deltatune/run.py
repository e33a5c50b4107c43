"""One training run from names to a saved delta and its run record.

`run_training` is what `deltatune train` and `deltatune.train()` call: resolve the task data,
load the base model, apply the method, train, and write the delta and `run.json` into the output
directory. Everything is written to a temporary sibling directory and renamed into place at the
end, so a run that fails or is interrupted leaves no half-written output; an existing run
directory is replaced only when asked, and nothing else ever is (see `deltatune.run_directory`).
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from deltatune.config import to_jsonable
from deltatune.critical_layers import resolve_critical_layers
from deltatune.delta import (
    MANIFEST,
    TENSORS,
    fingerprint_backbone,
    model_bytes,
    save_delta,
    write_json_atomic,
)
from deltatune.devices import describe_device, peak_device_memory_bytes, resolve_device
from deltatune.distributed import ProcessGroup, gather_full_state, process_group
from deltatune.errors import DeltatuneError
from deltatune.heads import PooledTaskModel, head_of
from deltatune.methods import build_method, prepare_model
from deltatune.model_card import CARD, write_model_card
from deltatune.records import (
    BaseModelRecord,
    DeltaManifest,
    DeviceRecord,
    GitState,
    ManifestHead,
    ProcessesRecord,
    RunRecord,
    Versions,
)
from deltatune.run_directory import check_output_directory as _check_output_directory
from deltatune.run_directory import locked_target, staged_directory
from deltatune.sources.models import position_limit
from deltatune.sources.records import (  # noqa: F401  (data records lived here; `deltatune.run` still offers them)
    LOCAL_DATA_KEYS,
    RUN_RECORD,
    check_data_unchanged,
    data_record,
    load_data_from_record,
)
from deltatune.training import TrainConfig, Trainer, TrainResult, peak_memory_bytes, prepare_data, seed_everything

logger = logging.getLogger(__name__)

DEV_OUTPUTS = "dev_outputs.safetensors"
"""Per-example dev outputs of the saved (best) state and the gold labels."""
TEST_OUTPUTS = "test_outputs.safetensors"
"""Per-example test outputs of the saved state and the gold labels: what paired comparisons between runs use."""
RUN_FILES = frozenset({MANIFEST, TENSORS, RUN_RECORD, DEV_OUTPUTS, TEST_OUTPUTS, CARD})
"""Every file a run directory may hold: `--overwrite` replaces a directory only if it holds nothing else.
A new file written into run directories must be added here."""


def library_versions() -> Versions:
    import numpy
    import torch
    import transformers

    from deltatune.version import __version__

    return Versions(
        deltatune=__version__,
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        numpy=numpy.__version__,
        platform=platform.platform(),
        processor=platform.machine(),
        cpu_count=str(os.cpu_count()),
    )


def git_state() -> GitState:
    """The commit of the deltatune source tree this run used, and whether it had local changes."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return GitState()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return GitState(commit=commit.stdout.strip(), dirty=bool(status.stdout.strip()))
    except (OSError, subprocess.SubprocessError):
        return GitState()


def check_output_directory(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, is not a deltatune run directory, or holds a run and overwrite is off."""
    _check_output_directory(Path(out), overwrite, RUN_FILES)


def run_training(
    model_name: str,
    data: dict,
    method_name: str,
    method_overrides: dict | None = None,
    config: TrainConfig | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    say: Callable[[str], None] | None = None,
) -> RunRecord | None:
    """Train `method_name` on `model_name` for the task `data` describes (see `data_record`).

    Under several processes (`torchrun`, `accelerate launch`) every rank trains its share of each batch and
    rank 0 alone evaluates, writes OUT and returns the record; the other ranks return None.

    With `config.lr_search`, every candidate learning rate trains from the same start and the best on
    dev is kept (`deltatune.search`); `say` hears how each rung went. The kept state is evaluated on the
    test split when the task has one. Returns the run record (also written to OUT/run.json). With `out`
    None nothing is saved. While it runs, OUT is locked against other deltatune processes (`.OUT.lock` beside it).
    """
    config = config or TrainConfig()
    method = build_method(method_name, method_overrides or {})  # config errors before any loading
    group = process_group(resolve_device(config.device))
    if group.distributed:
        _check_distributed_run(group, config, out, overwrite)
    if out is None or not group.is_main:  # only rank 0 writes, and takes the lock
        return _train_and_save(
            model_name, data, method_name, method_overrides or {}, method, config, None, overwrite, say
        )
    with locked_target(Path(out), RUN_FILES, overwrite) as out_path:
        return _train_and_save(
            model_name, data, method_name, method_overrides or {}, method, config, out_path, overwrite, say
        )


def _train_and_save(
    model_name: str,
    data: dict,
    method_name: str,
    method_overrides: dict,
    method,
    config: TrainConfig,
    out_path: Path | None,
    overwrite: bool,
    say: Callable[[str], None] | None,
) -> RunRecord | None:
    from deltatune.sources.models import describe_model_source, load_model_for_task, recorded_model_name

    started = time.perf_counter()
    task_data = load_data_from_record(data)
    task = task_data.task
    seed_everything(config.seed)  # the head's initialisation depends on it
    model, tokenizer = load_model_for_task(model_name, task, head=config.head, pooling=config.pooling)
    requested_max_length = config.max_length
    config = _fit_max_length(config, position_limit(model, tokenizer), model_name)
    base_fingerprint = fingerprint_backbone(model)
    total_params = sum(p.numel() for p in model.parameters())
    full_bytes = model_bytes(model)
    prepared = prepare_data(
        model, tokenizer, task, task_data.split("train"), task_data.split("dev"), task_data.splits.get("test"), config
    )
    trainer, search = _train(model, tokenizer, task, prepared, method_name, method_overrides, method, config, say)
    model, method = trainer.model, trainer.method
    with trainer.closed_on_error():
        trainable_names = set(method.trainable_names(model))
        if config.regime == "surgical":  # only the chosen block (and the head) trained
            trainable_names &= {n for n, p in model.named_parameters() if p.requires_grad}
        trainable_params = sum(p.numel() for n, p in model.named_parameters() if n in trainable_names)
        result = trainer.finish()
        model, method = _unsharded(trainer, model_name, task, config, method_overrides, tokenizer)
    if not trainer.group.is_main:
        return None
    model.to("cpu")  # the delta is saved, and the model handed back, on the CPU
    if result.diverged is not None and not result.best_metrics:
        raise DeltatuneError(f"{result.diverged}. No dev evaluation came before it, so nothing was saved.")
    wall_time = time.perf_counter() - started
    stored_model = recorded_model_name(model_name)

    record = RunRecord(
        model=stored_model,
        model_source=describe_model_source(model_name),
        model_fingerprint=base_fingerprint,
        task=task.name,
        data=data,
        data_fingerprint=task_data.fingerprint(),
        data_provenance=task_data.provenance,
        method=method_name,
        method_config=to_jsonable(method.config),
        method_report=method.describe(model),
        regime_report=trainer.regime_report,
        head=head_of(model),
        train_config=config,
        num_train_examples=result.num_train_examples,
        num_truncated=result.num_truncated,
        trainable_params=trainable_params,
        total_params=total_params,
        trainable_percent=100.0 * trainable_params / total_params,
        full_model_bytes=full_bytes,
        **_outcome(result, task.metric, search),
        wall_time_s=wall_time,
        **_where_it_ran(trainer, result.precision),
        learning_curve=result.learning_curve,
        versions=library_versions(),
        git=git_state(),
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        model_as_given=model_name if stored_model != model_name else None,
        max_length_requested=requested_max_length if requested_max_length != config.max_length else None,
        diverged=result.diverged,
    )
    if out_path is not None:
        record = _save_run(out_path, overwrite, record, model, method, task, result, model_name)
    _raise_if_diverged(result, record, out_path)
    return record


def _save_run(
    out_path: Path, overwrite: bool, record: RunRecord, model, method, task, result: TrainResult, model_name: str
) -> RunRecord:
    """Publish the run directory (delta, manifest, record, model card, outputs); returns the record with the
    delta's size."""
    manifest = _manifest(record, model, task, result, model_name)
    with staged_directory(out_path, RUN_FILES, overwrite) as staging:
        delta_bytes = save_delta(staging, model, method, manifest)
        record = replace(record, delta_bytes=delta_bytes)
        write_json_atomic(staging / RUN_RECORD, record.to_json())
        write_model_card(staging, replace(manifest, delta_bytes=delta_bytes), record)
        save_outputs(staging / DEV_OUTPUTS, result.best_dev_outputs, result.dev_labels)
        if result.test_outputs is not None:
            save_outputs(staging / TEST_OUTPUTS, result.test_outputs, result.test_labels)
    return record


def _where_it_ran(trainer: Trainer, precision: str) -> dict:
    """The record's account of the machine: peak memory, the device, its model and the processes."""
    device, group = describe_device(trainer.device, precision), trainer.group
    memory = device.get("memory_bytes")
    return {
        "peak_memory_bytes": peak_memory_bytes(),
        "device": DeviceRecord(
            device=str(device["device"]),
            name=str(device["name"]),
            precision=precision,
            memory_bytes=memory if isinstance(memory, int) else None,
        ),
        "peak_device_memory_bytes": peak_device_memory_bytes(trainer.device),
        "distributed": ProcessesRecord(
            processes=group.world_size, backend=group.backend or "none", fsdp=True if trainer.sharded else None
        ),
    }


def _unsharded(trainer: Trainer, model_name: str, task, config: TrainConfig, method_overrides: dict, tokenizer):
    """The trained model and method, whole: as they are, unless FSDP sharded them (`--fsdp`); then every rank
    sends its shards and rank 0 gathers them onto its CPU, into a fresh copy of the base with the method
    applied anew (a sharded model cannot be unwrapped). Every rank must call it."""
    from deltatune.sources.models import load_model_for_task

    model, method = trainer.model, trainer.method
    state = gather_full_state(model) if trainer.sharded else {}
    if not state:  # not sharded, or not rank 0
        return model, method
    whole, _ = load_model_for_task(model_name, task, head=config.head, pooling=config.pooling)
    fresh = build_method(method.name, method_overrides)
    prepare_model(whole, fresh, tokenizer)
    whole.load_state_dict(state)
    return whole.eval(), fresh


def _manifest(record: RunRecord, model, task, result: TrainResult, model_name: str) -> DeltaManifest:
    """The delta directory's manifest: what rebuilds base + delta and checks the data, from the record."""
    head = head_of(model)
    return DeltaManifest(
        method=record.method,
        method_config=record.method_config,
        base_model=BaseModelRecord(
            name=record.model,
            fingerprint=str(record.model_fingerprint),
            source=record.model_source,
            total_params=record.total_params,
            given=record.model_as_given,
        ),
        task=task,
        data=record.data,
        data_fingerprint=record.data_fingerprint,
        data_files=record.data_provenance.get("files") or {},
        max_length=record.train_config.max_length,
        target_scale=list(result.target_scale) if result.target_scale else None,
        head=ManifestHead(
            kind=head.kind, pooling=head.pooling, transformers_head=not isinstance(model, PooledTaskModel)
        ),
        metrics={"dev": record.dev_metrics, **({"test": result.test_metrics} if result.test_metrics else {})},
        learning_rate=result.learning_rate,
        versions=record.versions,
    )


def _check_distributed_run(group: ProcessGroup, config: TrainConfig, out: str | Path | None, overwrite: bool) -> None:
    """Several processes: refuse what they cannot do, and let rank 0 check OUT before any rank trains (a
    refusal there ends every rank instead of leaving the others waiting for it)."""
    if config.lr_search is not None:
        raise DeltatuneError(
            f"--lr-search under {group.world_size} processes is not supported (its candidates "
            "take turns in one process): search in one process, then train the chosen "
            "--learning-rate under torchrun / accelerate launch."
        )
    problem = None
    if group.is_main and out is not None:
        try:
            check_output_directory(Path(out), overwrite)
        except DeltatuneError as error:
            problem = error
    if not group.all_agree(problem is None, resolve_device(config.device)):
        if problem is not None:
            raise problem
        raise DeltatuneError(f"rank 0 refused --out {out} (its error says why); rank {group.rank} stops with it.")


def save_outputs(path: Path, outputs, labels) -> None:
    """Per-example outputs and gold labels as safetensors (what the paired statistics read)."""
    save_file(
        {
            "outputs": torch.from_numpy(np.ascontiguousarray(outputs, dtype=np.float32)),
            "labels": torch.tensor(labels, dtype=torch.float32),
        },
        str(path),
    )


def _train(
    model,
    tokenizer,
    task,
    prepared,
    method_name: str,
    method_overrides: dict,
    method,
    config: TrainConfig,
    say: Callable[[str], None] | None,
) -> tuple[Trainer, dict | None]:
    """Train at one learning rate, or search over several; returns the trainer to finish and the search record."""
    from deltatune.regime_runs import regime_trainer
    from deltatune.regimes import check_regime_method
    from deltatune.search import learning_rate_candidates, successive_halving

    check_regime_method(method, config)
    if config.lr_search is None:
        resolve_critical_layers(method, model)
        prepare_model(model, method, tokenizer)
        trainer = regime_trainer(model, method, task, prepared, config)
        with trainer.closed_on_error():
            trainer.advance()
        return trainer, None
    rates = learning_rate_candidates(config, method)
    # every candidate starts where a single run would: the same head, then the method initialised from the
    # random state a single run's method would see
    start_state = torch.get_rng_state()
    remaining = list(rates)

    def make_trainer(rate: float) -> Trainer:
        if rate in remaining:
            remaining.remove(rate)
        # the last candidate takes the original, unless rates past the range may still need a fresh copy
        candidate = model if not remaining and not config.lr_search_extend else copy.deepcopy(model)
        torch.set_rng_state(start_state)
        candidate_method = build_method(method_name, method_overrides)
        resolve_critical_layers(candidate_method, candidate)
        prepare_model(candidate, candidate_method, tokenizer)
        return Trainer(candidate, candidate_method, task, prepared, config, learning_rate=rate)

    search = successive_halving(
        make_trainer, rates, config.lr_search_rungs, task.metric, say, extend=config.lr_search_extend
    )
    return search.trainer, search.record


def _outcome(result: TrainResult, metric: str, search: dict | None) -> dict:
    """The record's account of training: metrics on dev and test, steps, convergence, the rate, speed."""
    return {
        # every evaluation NaN (a constant regressor's correlation): report the last one rather than nothing
        "dev_metrics": result.best_metrics or (result.learning_curve[-1]["metrics"] if result.learning_curve else {}),
        "test_metrics": result.test_metrics,
        "evaluation_split": "test" if result.test_metrics is not None else "dev",
        "primary_metric": metric,
        "learning_rate": result.learning_rate,
        "lr_search": search,
        "best_step": result.best_step,
        "steps": result.steps,
        "planned_steps": result.planned_steps,
        "stopped_by": result.stopped_by,
        "converged": result.converged,
        "last_gain": result.last_gain,
        "examples_seen": result.examples_seen,
        "train_time_s": result.train_time_s,
        "eval_time_s": result.eval_time_s,
        "train_examples_per_s": result.examples_per_s,
        "train_real_tokens_per_s": result.real_tokens_per_s,
        "padding_efficiency": result.padding_efficiency,
        "precision": result.precision,
    }


def _fit_max_length(config: TrainConfig, limit: int | None, model_name: str) -> TrainConfig:
    """max_length capped at what the model can take, saying so: longer inputs would crash it at prediction."""
    if limit is None or config.max_length <= limit:
        return config
    # the default fits every real model; only an explicit setting is worth a warning (the record says both)
    level = logging.INFO if config.max_length == TrainConfig.max_length else logging.WARNING
    logger.log(
        level,
        "max_length=%d is more than %s can take (%d positions): using max_length=%d.",
        config.max_length,
        model_name,
        limit,
        limit,
    )
    return replace(config, max_length=limit)


def _raise_if_diverged(result, record: RunRecord, out_path: Path | None) -> None:
    if result.diverged is None:
        return
    metric = record.primary_metric
    kept = (
        f"The best dev state before it (step {result.best_step}, dev {metric} "
        f"{result.best_metrics.get(metric, float('nan')):.4f}) "
    )
    kept += f"was saved to {out_path} (stopped_by 'diverged')" if out_path is not None else "was not saved (no --out)"
    raise DeltatuneError(f"{result.diverged}. {kept}.")


def summarize(record: RunRecord) -> str:
    """A few lines a person reads after a run."""

    def scores(metrics: dict) -> str:
        return (
            ", ".join(f"{k} {v:.4f}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in metrics.items())
            or "(no dev evaluation)"
        )

    delta, full = record.delta_bytes, record.full_model_bytes
    size = (
        f"delta {delta / 1e6:.2f} MB vs full model {full / 1e6:.1f} MB ({100 * delta / full:.2f}%)"
        if delta
        else "not saved"
    )
    truncated = sum(record.num_truncated.values())
    head, test = record.head, record.test_metrics
    lines = [
        f"{record.method} on {record.task} ({record.display_model}): "
        + (
            f"test {scores(test)} (dev {scores(record.dev_metrics)})"
            if test
            else f"dev {scores(record.dev_metrics)} (the task has no test split)"
        ),
        f"  head {head.kind if head else '?'}, pooling {head.pooling if head else '?'}; learning rate "
        f"{record.learning_rate:g}" + _search_summary(record.lr_search),
        f"  trainable {record.trainable_params:,} of {record.total_params:,} params "
        f"({record.trainable_percent:.3f}%); {size}",
        f"  {record.steps} steps ({record.stopped_by}), best dev at step {record.best_step}"
        + (
            ""
            if record.converged
            else f"; NOT CONVERGED: dev was still rising at the end (+{100 * (record.last_gain or 0):.2f} "
            "points at the last evaluation); train longer (--epochs, --min-steps)"
        ),
        f"  {record.train_time_s:.1f} s training, {record.train_examples_per_s or 0:.1f} examples/s, "
        f"{record.train_real_tokens_per_s or 0:.0f} real tokens/s, padding efficiency "
        f"{record.padding_efficiency or 0:.2f}, peak memory {(record.peak_memory_bytes or 0) / 2**30:.2f} GiB",
    ]
    device, processes = record.device, record.distributed
    if device:
        lines.append(
            f"  on {device.device} ({device.name}) at {device.precision}"
            + (
                f", {processes.processes} processes ({processes.backend})"
                if processes and processes.processes > 1
                else ""
            )
        )
    if truncated:
        lines.append(f"  {truncated} example(s) longer than max_length={record.train_config.max_length} were truncated")
    return "\n".join(lines)


def _search_summary(search: dict | None) -> str:
    if not search:
        return ""
    from deltatune.search import edge_note

    note = edge_note(search)
    return f", chosen on dev from {describe_search(search)}" + (f"\n  NOTE: {note}" if note else "")


def describe_search(search: dict) -> str:
    """'0.0005: 0.871, 0.001: 0.883 → 0.885, ...': each candidate's rung scores on dev, in order."""
    return ", ".join(
        f"{c['learning_rate']:g}: "
        + (
            f"{c['best_dev']:.3f} (past the range)"
            if c.get("extension") and c["best_dev"] is not None
            else " → ".join(f"{v:.3f}" for v in c["rung_scores"])
        )
        + (" (stopped)" if c["stopped_at_rung"] is not None else "")
        for c in search["candidates"]
    )


__all__ = ["run_training", "summarize", "data_record", "load_data_from_record"]
