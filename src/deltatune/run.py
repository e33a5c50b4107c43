"""One training run from names to a saved delta and its run record.

`run_training` is what `deltatune train` and `deltatune.train()` call: resolve the task data,
load the base model, apply the method, train, and write the delta and `run.json` into the output
directory. Everything is written to a temporary sibling directory and renamed into place at the
end, so a run that fails or is interrupted leaves no half-written output, and an existing run
directory is never overwritten unless asked.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

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
from deltatune.methods import build_method, prepare_model
from deltatune.model_card import write_model_card
from deltatune.tasks.spec import TaskData
from deltatune.training import TrainConfig, peak_memory_bytes, seed_everything, train

RUN_RECORD = "run.json"
DEV_OUTPUTS = "dev_outputs.safetensors"
"""Per-example dev outputs of the saved (best) state and the gold labels, for paired comparisons."""


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
                 overwrite: bool = False) -> dict:
    """Train `method_name` on `model_name` for the task `data` describes (see `data_record`).

    Returns the run record (also written to OUT/run.json). With `out` None nothing is saved.
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
    model, tokenizer = load_model_for_task(model_name, task)
    base_fingerprint = fingerprint_backbone(model)
    total_params = sum(p.numel() for p in model.parameters())
    full_bytes = model_bytes(model)
    trainable_names = prepare_model(model, method, tokenizer)
    trainable_params = sum(p.numel() for n, p in model.named_parameters() if n in trainable_names)

    result = train(model, tokenizer, task, task_data.split("train"), task_data.split("dev"), method, config)
    wall_time = time.perf_counter() - started

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
        "method_report": method.describe(model),
        "train_config": to_jsonable(config),
        "num_train_examples": result.num_train_examples,
        "num_truncated": result.num_truncated,
        "trainable_params": trainable_params,
        "total_params": total_params,
        "trainable_percent": 100.0 * trainable_params / total_params,
        "full_model_bytes": full_bytes,
        "dev_metrics": result.best_metrics,
        "primary_metric": task.metric,
        "best_step": result.best_step,
        "steps": result.steps,
        "stopped_by": result.stopped_by,
        "examples_seen": result.examples_seen,
        "train_time_s": result.train_time_s,
        "eval_time_s": result.eval_time_s,
        "wall_time_s": wall_time,
        "train_examples_per_s": result.examples_per_s,
        "train_real_tokens_per_s": result.real_tokens_per_s,
        "padding_efficiency": result.padding_efficiency,
        "precision": result.precision,
        "peak_memory_bytes": peak_memory_bytes(),
        "learning_curve": result.learning_curve,
        "versions": library_versions(),
        "git": git_state(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if out_path is None:
        record["delta_bytes"] = None
        return record

    manifest = {
        "method": method_name,
        "method_config": record["method_config"],
        "base_model": {"name": model_name, "fingerprint": base_fingerprint, "source": record["model_source"],
                       "total_params": total_params},
        "task": task.to_dict(),
        "data": data,
        "max_length": config.max_length,
        "target_scale": list(result.target_scale) if result.target_scale else None,
        "metrics": {"dev": result.best_metrics},
        "versions": record["versions"],
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.partial-", dir=out_path.parent))
    try:
        record["delta_bytes"] = save_delta(staging, model, method, manifest)
        write_json_atomic(staging / RUN_RECORD, record)
        write_model_card(staging, {**manifest, "delta_bytes": record["delta_bytes"]}, record)
        save_file({"outputs": torch.from_numpy(np.ascontiguousarray(result.best_dev_outputs, dtype=np.float32)),
                   "labels": torch.tensor(result.dev_labels, dtype=torch.float32)}, str(staging / DEV_OUTPUTS))
        _use_default_permissions(staging)
        if out_path.exists():
            shutil.rmtree(out_path)
        os.replace(staging, out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def _use_default_permissions(directory: Path) -> None:
    """Temporary directories and files are private (0700/0600); a finished run gets the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        os.chmod(path, 0o666 & ~umask)


def summarize(record: dict) -> str:
    """A few lines a person reads after a run."""
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in record["dev_metrics"].items())
    delta = record.get("delta_bytes")
    size = (f"delta {delta / 1e6:.2f} MB vs full model {record['full_model_bytes'] / 1e6:.1f} MB "
            f"({100 * delta / record['full_model_bytes']:.2f}%)" if delta else "not saved")
    truncated = sum(record["num_truncated"].values())
    lines = [
        f"{record['method']} on {record['task']} ({record['model']}): dev {metrics}",
        f"  trainable {record['trainable_params']:,} of {record['total_params']:,} params "
        f"({record['trainable_percent']:.3f}%); {size}",
        f"  {record['steps']} steps ({record['stopped_by']}), {record['train_time_s']:.1f} s training, "
        f"{record['train_examples_per_s']:.1f} examples/s, {record['train_real_tokens_per_s']:.0f} real tokens/s, "
        f"padding efficiency {record['padding_efficiency']:.2f}, peak memory "
        f"{record['peak_memory_bytes'] / 2**30:.2f} GiB",
    ]
    if truncated:
        lines.append(f"  {truncated} example(s) longer than max_length={record['train_config']['max_length']} "
                     "were truncated")
    return "\n".join(lines)


__all__ = ["run_training", "summarize", "data_record", "load_data_from_record"]
