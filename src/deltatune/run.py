"""One training run from names to a saved delta and its run record.

`run_training` is what `deltatune train` and `deltatune.train()` call: resolve the task data,
load the base model, apply the method, train, and write the delta and `run.json` into the output
directory. Everything is written to a temporary sibling directory and renamed into place at the
end, so a run that fails or is interrupted leaves no half-written output, and an existing run
directory is never overwritten unless asked.
"""

from __future__ import annotations

import copy
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save_file

from deltatune.config import to_jsonable
from deltatune.delta import (
    MANIFEST,
    fingerprint_backbone,
    model_bytes,
    save_delta,
    write_json_atomic,
)
from deltatune.errors import DeltatuneError
from deltatune.heads import PooledTaskModel, head_of
from deltatune.methods import build_method, prepare_model
from deltatune.tasks.spec import TaskData
from deltatune.training import TrainConfig, Trainer, TrainResult, peak_memory_bytes, prepare_data, seed_everything

RUN_RECORD = "run.json"
DEV_OUTPUTS = "dev_outputs.safetensors"
"""Per-example dev outputs of the saved (best) state and the gold labels."""
TEST_OUTPUTS = "test_outputs.safetensors"
"""Per-example test outputs of the saved state and the gold labels: what paired comparisons between runs use."""


def library_versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers

    from deltatune import __version__

    return {"deltatune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__,
            "platform": platform.platform(), "processor": platform.machine(),
            "cpu_count": str(os.cpu_count())}


def git_state() -> dict[str, object]:
    """The commit of the deltatune source tree this run used, and whether it had local changes."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                                capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def data_record(task: str, source: str = "auto", local: dict | None = None) -> dict:
    """How to load the data again later (for `deltatune eval`): a catalog task or local files."""
    if local is not None:
        return {"kind": "local", **{k: (str(v) if isinstance(v, Path) else v) for k, v in local.items()}}
    return {"kind": "catalog", "task": task, "source": source}


def load_data_from_record(record: dict) -> TaskData:
    from deltatune.sources.data import load_local_data, load_task_data

    if record["kind"] == "local":
        arguments = {k: v for k, v in record.items() if k != "kind"}
        for key in ("text_fields", "labels"):
            if arguments.get(key) is not None:
                arguments[key] = tuple(arguments[key])
        return load_local_data(**arguments)
    return load_task_data(record["task"], source=record.get("source", "auto"))


def check_output_directory(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            what = "a finished run" if (out / MANIFEST).exists() else "files"
            raise DeltatuneError(f"--out {out} already holds {what}. Choose another directory, or pass "
                                 "--overwrite to replace it (the old run is deleted only after the new one "
                                 "finishes).")


def run_training(model_name: str, data: dict, method_name: str, method_overrides: dict | None = None,
                 config: TrainConfig | None = None, out: str | Path | None = None,
                 overwrite: bool = False, say: Callable[[str], None] | None = None) -> dict:
    """Train `method_name` on `model_name` for the task `data` describes (see `data_record`).

    With `config.lr_search`, every candidate learning rate trains from the same start and the best on
    dev is kept (`deltatune.search`); `say` hears how each rung went. The kept state is evaluated on the
    test split when the task has one. Returns the run record (also written to OUT/run.json). With `out`
    None nothing is saved.
    """
    from deltatune.sources.models import describe_model_source, load_model_for_task

    config = config or TrainConfig()
    method = build_method(method_name, method_overrides or {})  # config errors before any loading
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        check_output_directory(out_path, overwrite)

    started = time.perf_counter()
    task_data = load_data_from_record(data)
    task = task_data.task
    seed_everything(config.seed)  # the head's initialisation depends on it
    model, tokenizer = load_model_for_task(model_name, task, head=config.head, pooling=config.pooling)
    base_fingerprint = fingerprint_backbone(model)
    total_params = sum(p.numel() for p in model.parameters())
    full_bytes = model_bytes(model)
    prepared = prepare_data(model, tokenizer, task, task_data.split("train"), task_data.split("dev"),
                            task_data.splits.get("test"), config)
    trainer, search = _train(model, tokenizer, task, prepared, method_name, method_overrides or {}, method,
                             config, say)
    model, method = trainer.model, trainer.method
    trainable_names = set(method.trainable_names(model))
    trainable_params = sum(p.numel() for n, p in model.named_parameters() if n in trainable_names)
    result = trainer.finish()
    wall_time = time.perf_counter() - started
    describe = getattr(method, "describe", None)

    record = {
        "model": model_name,
        "model_source": describe_model_source(model_name),
        "model_fingerprint": base_fingerprint,
        "task": task.name,
        "data": data,
        "data_fingerprint": task_data.fingerprint(),
        "data_provenance": task_data.provenance,
        "method": method_name,
        "method_config": to_jsonable(method.config),
        "method_report": describe(model) if describe is not None else {},
        "head": head_of(model).to_dict(),
        "train_config": to_jsonable(config),
        "num_train_examples": result.num_train_examples,
        "num_truncated": result.num_truncated,
        "trainable_params": trainable_params,
        "total_params": total_params,
        "trainable_percent": 100.0 * trainable_params / total_params,
        "full_model_bytes": full_bytes,
        **_outcome(result, task.metric, search),
        "wall_time_s": wall_time,
        "peak_memory_bytes": peak_memory_bytes(),
        "learning_curve": result.learning_curve,
        "versions": library_versions(),
        "git": git_state(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if out_path is None:
        record["delta_bytes"] = None
        return record
    _save(out_path, model, method, task, record, result, config)
    return record


def _train(model, tokenizer, task, prepared, method_name: str, method_overrides: dict, method,
           config: TrainConfig, say: Callable[[str], None] | None) -> tuple[Trainer, dict | None]:
    """Train at one learning rate, or search over several; returns the trainer to finish and the search record."""
    from deltatune.search import learning_rate_candidates, successive_halving

    if config.lr_search is None:
        prepare_model(model, method, tokenizer)
        trainer = Trainer(model, method, task, prepared, config)
        trainer.advance()
        return trainer, None
    rates = learning_rate_candidates(config, method)
    # every candidate starts where a single run would: the same head, then the method initialised from the
    # random state a single run's method would see
    start_state = torch.get_rng_state()
    remaining = list(rates)

    def make_trainer(rate: float) -> Trainer:
        remaining.remove(rate)
        candidate = model if not remaining else copy.deepcopy(model)  # the last one takes the original
        torch.set_rng_state(start_state)
        candidate_method = build_method(method_name, method_overrides)
        prepare_model(candidate, candidate_method, tokenizer)
        return Trainer(candidate, candidate_method, task, prepared, config, learning_rate=rate)

    search = successive_halving(make_trainer, rates, config.lr_search_rungs, task.metric, say)
    return search.trainer, search.record


def _outcome(result: TrainResult, metric: str, search: dict | None) -> dict:
    """The record's account of training: metrics on dev and test, steps, convergence, the rate, speed."""
    return {
        "dev_metrics": result.best_metrics,
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


def _save(out_path: Path, model, method, task, record: dict, result: TrainResult, config: TrainConfig) -> None:
    """Write the delta, the record and the per-example outputs into a staging directory, then rename it into place."""
    head = head_of(model)
    manifest = {
        "method": record["method"],
        "method_config": record["method_config"],
        "base_model": {"name": record["model"], "fingerprint": record["model_fingerprint"],
                       "source": record["model_source"], "total_params": record["total_params"]},
        "task": task.to_dict(),
        "data": record["data"],
        "max_length": config.max_length,
        "head": {"kind": head.kind, "pooling": head.pooling,
                 "transformers_head": not isinstance(model, PooledTaskModel)},
        "target_scale": list(result.target_scale) if result.target_scale else None,
        "metrics": {"dev": result.best_metrics, **({"test": result.test_metrics} if result.test_metrics else {})},
        "learning_rate": result.learning_rate,
        "versions": record["versions"],
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.partial-", dir=out_path.parent))
    try:
        record["delta_bytes"] = save_delta(staging, model, method, manifest)
        write_json_atomic(staging / RUN_RECORD, record)
        save_outputs(staging / DEV_OUTPUTS, result.best_dev_outputs, result.dev_labels)
        if result.test_outputs is not None:
            save_outputs(staging / TEST_OUTPUTS, result.test_outputs, result.test_labels)
        _use_default_permissions(staging)
        if out_path.exists():
            shutil.rmtree(out_path)
        os.replace(staging, out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_outputs(path: Path, outputs, labels) -> None:
    """Per-example outputs and gold labels as safetensors (what the paired statistics read)."""
    save_file({"outputs": torch.from_numpy(np.ascontiguousarray(outputs, dtype=np.float32)),
               "labels": torch.tensor(labels, dtype=torch.float32)}, str(path))


def _use_default_permissions(directory: Path) -> None:
    """Temporary directories and files are private (0700/0600); a finished run gets the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        os.chmod(path, 0o666 & ~umask)


def summarize(record: dict) -> str:
    """A few lines a person reads after a run."""
    def scores(metrics: dict) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())

    delta = record.get("delta_bytes")
    size = (f"delta {delta / 1e6:.2f} MB vs full model {record['full_model_bytes'] / 1e6:.1f} MB "
            f"({100 * delta / record['full_model_bytes']:.2f}%)" if delta else "not saved")
    truncated = sum(record["num_truncated"].values())
    head = record.get("head") or {}
    test = record.get("test_metrics")
    lines = [f"{record['method']} on {record['task']} ({record['model']}): "
             + (f"test {scores(test)} (dev {scores(record['dev_metrics'])})" if test
                else f"dev {scores(record['dev_metrics'])} (the task has no test split)"),
             f"  head {head.get('kind', '?')}, pooling {head.get('pooling', '?')}; learning rate "
             f"{record['learning_rate']:g}" + _search_summary(record.get("lr_search")),
             f"  trainable {record['trainable_params']:,} of {record['total_params']:,} params "
             f"({record['trainable_percent']:.3f}%); {size}",
             f"  {record['steps']} steps ({record['stopped_by']}), best dev at step {record['best_step']}"
             + ("" if record.get("converged", True) else
                f"; NOT CONVERGED: dev was still rising at the end (+{100 * (record.get('last_gain') or 0):.2f} "
                "points at the last evaluation); train longer (--epochs, --min-steps)"),
             f"  {record['train_time_s']:.1f} s training, {record['train_examples_per_s']:.1f} examples/s, "
             f"{record['train_real_tokens_per_s']:.0f} real tokens/s, padding efficiency "
             f"{record['padding_efficiency']:.2f}, peak memory {record['peak_memory_bytes'] / 2**30:.2f} GiB"]
    if truncated:
        lines.append(f"  {truncated} example(s) longer than max_length={record['train_config']['max_length']} "
                     "were truncated")
    return "\n".join(lines)


def _search_summary(search: dict | None) -> str:
    if not search:
        return ""
    return f", chosen on dev from {describe_search(search)}"


def describe_search(search: dict) -> str:
    """'0.0005: 0.871, 0.001: 0.883 → 0.885, ...': each candidate's rung scores on dev, in order."""
    return ", ".join(f"{c['learning_rate']:g}: " + " → ".join(f"{v:.3f}" for v in c["rung_scores"])
                     + (" (stopped)" if c["stopped_at_rung"] is not None else "") for c in search["candidates"])


__all__ = ["run_training", "summarize", "data_record", "load_data_from_record"]
