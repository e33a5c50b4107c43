"""Peak memory of full fine-tuning over N CPU processes: replicated (DDP) against sharded (`--fsdp`).

    python benchmarks/fsdp_memory.py --model smollm2-135m --data runs/sentiment-800.csv --steps 3 \\
        --out docs/results/fsdp-memory.md

Each side trains the same few steps under `torchrun --nproc_per_node N` (gloo over 127.0.0.1, fp32, one
thread per process), inside a wrapper process of its own, and reports the largest peak resident memory of
any of its processes (`ru_maxrss` over the waited-for descendants: the heavier rank, rank 0, which under
`--fsdp` also gathers the whole model to save it). Memory figures do not depend on the machine's load;
the seconds do (`uptime` is printed with them).

glibc's malloc raises its mmap threshold as large blocks are freed, after which freed tensors stay in the
process's heap: FSDP's per-layer gathered weights and full-size gradients, freed after each layer, then
still count in the resident memory and the sharding saves nothing visible. Both sides run with
MALLOC_MMAP_THRESHOLD_ fixed (`--mmap-threshold`, 1 MiB by default; 0 leaves glibc's default), so blocks
over it are returned to the system when freed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def side(args, out: Path, sharded: bool) -> dict:
    """Run one side in a wrapper process and read back its children's peak memory."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(args.processes),
        "--nnodes",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "deltatune.cli",
        "train",
        "--model",
        args.model,
        "--data",
        args.data,
        "--text-fields",
        args.text_fields,
        "--method",
        "full",
        "--max-steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--eval-every",
        str(args.steps),
        "--learning-rate",
        "2e-5",
        "--precision",
        "fp32",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--seed",
        "1",
        "--out",
        str(out),
        "--overwrite",
        *(["--fsdp"] if sharded else []),
    ]
    wrapper = (
        "import json, resource, subprocess, sys, time; started = time.perf_counter(); "
        "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
        "print(json.dumps({'code': code, 'seconds': time.perf_counter() - started, "
        "'peak_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
    )
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    if args.mmap_threshold:
        environment["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    finished = subprocess.run(
        [sys.executable, "-c", wrapper, *command], capture_output=True, text=True, env=environment
    )
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise SystemExit(f"{'FSDP' if sharded else 'DDP'} side failed:\n{finished.stderr[-3000:]}")
    record = json.loads((out / "run.json").read_text())
    return {
        "peak_mib": result["peak_kib"] / 1024,
        "seconds": result["seconds"],
        "distributed": record["distributed"],
        "dev": record["dev_metrics"],
        "params": record["total_params"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="runs/sentiment-800.csv")
    parser.add_argument("--text-fields", default="text")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=1 << 20,
        help="MALLOC_MMAP_THRESHOLD_ for both sides, in bytes (0: glibc's dynamic default)",
    )
    parser.add_argument("--scratch", type=Path, default=Path("runs/fsdp-memory"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    before = uptime()
    results = {name: side(args, args.scratch / name, sharded) for name, sharded in (("ddp", False), ("fsdp", True))}
    ddp, fsdp = results["ddp"], results["fsdp"]
    lines = [
        f"# Full fine-tuning of {args.model} over {args.processes} CPU processes: replicated vs sharded",
        "",
        f"`python benchmarks/fsdp_memory.py --model {args.model} --data {args.data} --steps {args.steps} "
        f"--mmap-threshold {args.mmap_threshold}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; batch {args.batch_size}, max length "
        f"{args.max_length}, fp32, AdamW, one thread per process, MALLOC_MMAP_THRESHOLD_="
        f"{args.mmap_threshold or 'glibc default'}.",
        "",
        "| side | largest process's peak RSS | wall time (whole run) | record's `distributed` |",
        "|---|---:|---:|---|",
        *(
            f"| {name.upper()} | {r['peak_mib']:,.0f} MiB | {r['seconds']:.0f} s | `{json.dumps(r['distributed'])}` |"
            for name, r in results.items()
        ),
        "",
        f"FSDP / DDP peak memory: **{fsdp['peak_mib'] / ddp['peak_mib']:.2f}x** ({args.processes} processes, "
        f"{ddp['params']:,} parameters).",
        "",
        f"uptime before: `{before}`",
        f"uptime after: `{uptime()}`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
