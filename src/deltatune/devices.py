"""Which device a run computes on: `--device auto|cpu|cuda|cuda:N|mps`, resolved once to a `torch.device`.

"auto" takes a CUDA GPU when one is present, else Apple's MPS, else the CPU. Asking for a device this
machine lacks is a `DeltatuneError` naming it and the fix, never a traceback from deep inside torch.
Under several processes (`torchrun`, `accelerate launch`) "auto" and "cuda" mean each process's own GPU,
`cuda:LOCAL_RANK`, so the ranks of one machine do not share one.

The record of a run names the device and its model (`describe_device`): the CPU's model name from
/proc/cpuinfo (or the platform's processor string), or the GPU's name from torch.cuda.
"""

from __future__ import annotations

import os
import platform
import re
from functools import lru_cache

import torch

from deltatune.errors import DeltatuneError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
"""What `--device` accepts (N is a GPU index)."""

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_name(name: str) -> str | None:
    """A sentence saying what is wrong with `name` as a device name, or None when it is well formed."""
    if not isinstance(name, str) or not _DEVICE_PATTERN.match(name):
        return f"device={name!r} must be one of {', '.join(DEVICE_CHOICES)} (N a GPU index, e.g. cuda:0)"
    return None


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """The `torch.device` that `name` means on this machine; a device it lacks is a DeltatuneError."""
    problem = check_device_name(name)
    if problem:
        raise DeltatuneError(problem + ".")
    local_rank = os.environ.get("LOCAL_RANK")
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif mps_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not mps_available():
            raise DeltatuneError(
                "--device mps: this machine has no Apple MPS device (torch.backends.mps is not "
                "available). Use --device cpu, or auto to take whatever is present."
            )
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeltatuneError(
            f"--device {name}: no CUDA GPU is available here (torch {torch.__version__} "
            f"{'was built without CUDA' if torch.version.cuda is None else 'sees no GPU'}). "
            "Use --device cpu, or auto to take whatever is present."
        )
    index = int(name.split(":")[1]) if ":" in name else int(local_rank or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise DeltatuneError(
            f"--device {name}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1}). "
            "Pick one of those, or use --device cuda."
        )
    return torch.device("cuda", index)


@lru_cache(maxsize=1)
def cpu_model_name() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what the platform reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_model_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return cpu_model_name()


def describe_device(device: torch.device, precision: str) -> dict[str, object]:
    """What a run record says about where it computed: the device, its model name and the precision."""
    description: dict[str, object] = {"device": str(device), "name": device_model_name(device), "precision": precision}
    if device.type == "cuda":
        description["memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return description


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (the first parameter's device; CPU for a model without any)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def peak_device_memory_bytes(device: torch.device) -> int | None:
    """The GPU's peak allocated memory in this process (None on the CPU, where peak RSS says it)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


__all__ = [
    "DEVICE_CHOICES",
    "check_device_name",
    "resolve_device",
    "describe_device",
    "device_model_name",
    "cpu_model_name",
    "model_device",
    "peak_device_memory_bytes",
]
