"""What `deltatune serve` is told: where to listen, how to batch, and what guards the API.

Kept apart from the FastAPI application (`deltatune.serve.app`) so the command line can describe and
check these settings without importing FastAPI.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from deltatune.devices import check_device_name
from deltatune.errors import DeltatuneError
from deltatune.precision import PRECISIONS, Precision


@dataclass(frozen=True)
class ServeSettings:
    """How `deltatune serve` listens, batches and guards."""

    host: str = "127.0.0.1"
    """Address to bind. Anything but a loopback address needs api_key or insecure."""
    port: int = 8000
    """TCP port (0: any free port)."""
    api_key: str | None = None
    """Bearer token every request except /health and the docs must carry (Authorization: Bearer KEY)."""
    insecure: bool = False
    """Allow a non-loopback host without an api_key (anyone who can reach it can use it)."""
    allow_admin: bool = False
    """Enable POST /v1/tasks and DELETE /v1/tasks/{name} (attach and detach deltas at run time)."""
    delta_root: Path | None = None
    """With allow_admin: the only directory (and below) deltas may be attached from."""
    max_batch_size: int = 64
    """Most rows in one forward pass; requests arriving together are batched up to it."""
    batch_wait_ms: float = 20.0
    """How long a batch waits for more requests to share its forward pass, counted from the later of its first
    request's arrival and the end of the previous forward (so the requests that the previous batch's answers
    bring back can join the ones that queued during it). A full batch goes at once."""
    max_queue: int = 1024
    """Most rows waiting; a request that would exceed it gets 503 with Retry-After."""
    request_timeout_s: float = 30.0
    """A request not answered within this gets 504."""
    max_body_bytes: int = 1_000_000
    """Largest request body (413 above it)."""
    max_inputs: int = 256
    """Most inputs in one request."""
    max_text_chars: int = 10_000
    """Longest text in characters (longer inputs are refused rather than silently truncated twice)."""
    precision: Precision = "auto"
    """Prediction precision: auto (bf16 on CPUs with native bf16 and on GPUs that support it), fp32, bf16 or
    fp16 (CUDA only)."""
    batch_invariant: bool = True
    """Keep each answer from depending on the requests it happens to share a forward pass with: batches of
    position-wise deltas on a BERT or RoBERTa base always run packed, each text attending among texts of its own
    length alone. In bf16 on a CPU whose matmuls are row-invariant, answers then equal offline predict
    (load_many, which does the same by default) bit for bit. Off: a few percent faster on requests of mixed
    lengths, answers equal to floating-point rounding."""
    device: str = "auto"
    """Where the model computes: auto (a CUDA GPU when present, else Apple MPS, else the CPU), cpu, cuda,
    cuda:N or mps."""

    def __post_init__(self) -> None:
        problems = []
        if not is_loopback(self.host) and not self.api_key and not self.insecure:
            problems.append(
                f"--host {self.host} is not a loopback address: anyone who can reach it could use the "
                "server. Pass --api-key KEY (clients send 'Authorization: Bearer KEY'), or --insecure "
                "if the network is trusted"
            )
        if self.allow_admin and self.delta_root is None:
            problems.append("--allow-admin needs --delta-root DIR: deltas may only be attached from inside it")
        if self.delta_root is not None and not Path(self.delta_root).is_dir():
            problems.append(f"--delta-root {self.delta_root} is not a directory")
        for name in ("max_batch_size", "max_queue", "max_body_bytes", "max_inputs", "max_text_chars"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')}={getattr(self, name)} must be at least 1")
        if self.batch_wait_ms < 0 or self.request_timeout_s <= 0:
            problems.append("--batch-wait-ms must be >= 0 and --request-timeout-s > 0")
        if self.precision not in PRECISIONS:
            problems.append(f"--precision {self.precision!r} must be one of {', '.join(PRECISIONS)}")
        device_problem = check_device_name(self.device)
        if device_problem:
            problems.append(f"--{device_problem}")
        if not 0 <= self.port < 65536:
            problems.append(f"--port {self.port} must be between 0 and 65535")
        if problems:
            raise DeltatuneError("; ".join(problems) + ".")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


__all__ = ["ServeSettings", "is_loopback"]
