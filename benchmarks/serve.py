"""Serving many deltas from one base: throughput, memory, PEFT's mixed-adapter batches, and a live load test.

    python benchmarks/serve.py --runs runs/serve-bench --train-steps 60 --requests 2048 --batch-size 64 \\
        --rounds 3 --load-seconds 60 --clients 32 --out docs/results/serve.md

Sixteen deltas over MiniLM-L6 (4 LoRA, 4 BitFit, 4 (IA)3, 4 Pfeiffer adapters), each trained briefly on
one of four single-text offline tasks (rotten-tomatoes, sms-spam, trec, disaster-tweets) with its own
seed (kept in --runs and reused when already there). Requests are dev texts of those tasks, each sent
to one of the 16 deltas uniformly at random. Measured, in one process with alternating rounds
(medians, ratios taken within each round):

- the 16 deltas served by `deltatune.load_many` on the mixed requests, against one single-task
  `TunedModel` (a LoRA delta) on the same texts at the same batch size: once with each `predict` call
  opening and closing the mixed-batch state, once with it kept open by `serving()` as the server does;
  and again batch by batch (`--paired-rounds`): the requests sorted by length and cut into batches, the
  single-task model and the 16 deltas kept open taking turns on each batch, so that both see the same
  moment of the VM's speed (whole-workload rounds seconds apart move by 10-20% on a shared VM);
- 16 LoRA deltas in deltatune against PEFT's mixed-adapter batches (`adapter_names=` per row) with the
  same 16 LoRAs (the 4 trained LoRAs under 4 names each), on the same inputs at the same batch size
  (deltatune in its own padding-aware batches, PEFT in length-sorted ones), both in fp32 and both in bf16
  (deltatune's bf16; PEFT's model cast to bf16). Beside them the base model alone on PEFT's batches (its
  adapters disabled), fp32: what any mixed-adapter side costs at least on those batches, so its ratio to
  PEFT bounds the ratio a side can reach there. PEFT's adapters carry no heads (PEFT cannot merge
  different heads into one batch), so its side computes the base model's head: the same work, other numbers.
  Once more in fp32 on what a server sees, one call per batch-size slice of the requests in arrival order,
  on both sides (deltatune kept open as the server runs it; where padding would cost it packs the batch);
- resident memory (RSS after loading and one prediction, each in a fresh process): the 16 deltas on one
  base, one single-task TunedModel, and 16 separately loaded TunedModels;
- a load test of the live server (`deltatune serve` in its own process on 127.0.0.1): `--clients`
  threads sending requests for `--load-seconds` (bounded in time and count, it stops by itself), a
  delta attached a third of the way in and detached at two thirds; every answer is compared with the
  offline prediction for the same task and text. Its rate is set against the offline mixed rate of the
  rounds above and against the same rate measured just before and just after the test (the VM's speed
  drifts over minutes; the rounds end minutes before the test starts). `--precision` sets the server's
  precision and its offline reference's (default auto: bf16 on CPUs with native bf16); `--live-only` runs
  only the live test and the offline rates around it. Then the live server and offline `predict` in turns
  (`--live-windows` windows of `--window-seconds` of load, each between two offline passes), so that each
  live rate is set against offline rates measured seconds, not minutes, around it.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

TASKS = ("rotten-tomatoes", "sms-spam", "trec", "disaster-tweets")
KEPT_OPEN = "deltatune, 16 deltas of 4 methods, mixed, kept open (`serving()`, as the server runs)"
AS_SERVED = (
    "deltatune, 16 deltas of 4 methods, kept open, one call per batch-size slice of the requests in arrival "
    "order (what a server sees: no sorting across batches)"
)
METHODS = ("lora", "bitfit", "ia3", "pfeiffer")
BASE_ALONE = "the base model alone on PEFT's batches (its adapters disabled), fp32"
SINGLE = "one single-task TunedModel (LoRA)"
PAIRED_MIXED = "deltatune, 16 deltas of 4 methods, mixed, kept open"
LORAS_ARRIVING = "deltatune, 16 LoRAs mixed, fp32, kept open, one call per batch-size slice in arrival order"
PEFT_ARRIVING = "PEFT, 16 LoRAs mixed (adapter_names), fp32, the same slices in arrival order"


# ------------------------------------------------------------------------------------- set-up


def prepare_runs(args) -> dict[str, Path]:
    """The 16 deltas: name -> run directory (trained now when missing)."""
    import deltatune

    runs = {}
    for method_index, method in enumerate(METHODS):
        for task_index, task in enumerate(TASKS):
            name = f"{task}-{method}"
            directory = args.runs / name
            if not (directory / "deltatune.json").is_file():
                print(f"training {name} ({args.train_steps} steps)", flush=True)
                # the model's own [CLS] head, which PEFT's side rebuilds (MiniLM-L6's default pools by mean)
                deltatune.train(
                    args.model,
                    task=task,
                    method=method,
                    out=str(directory),
                    max_steps=args.train_steps,
                    batch_size=16,
                    seed=100 + 4 * method_index + task_index,
                    quiet=True,
                    head="cross-encoder",
                    pooling="cls",
                )
            runs[name] = directory
    return runs


def request_pool(args, runs: dict[str, Path]) -> tuple[list[str], list[str]]:
    """`--requests` (text, delta) pairs: a delta drawn uniformly, a dev text of its task."""
    from deltatune.sources.data import load_task_data

    texts = {task: [row[0] for row in load_task_data(task).split("dev").texts[: args.texts_per_task]] for task in TASKS}
    rng = random.Random(args.seed)
    names = [rng.choice(list(runs)) for _ in range(args.requests)]
    return [rng.choice(texts[name.rsplit("-", 1)[0]]) for name in names], names


def peft_model(args, lora_runs: list[Path], copies: int):
    """The base with the LoRA deltas as PEFT adapters (heads left out), each under `copies` names."""
    import peft
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    from deltatune.peft_export import export_peft
    from deltatune.sources.models import resolve_model

    adapters = []
    for run in lora_runs:
        directory = args.runs / "peft" / run.name
        if not (directory / "adapter_config.json").is_file():
            export_peft(run, directory)
            config = json.loads((directory / "adapter_config.json").read_text())
            config["modules_to_save"], config["task_type"] = None, None
            (directory / "adapter_config.json").write_text(json.dumps(config))
            tensors = load_file(str(directory / "adapter_model.safetensors"))
            save_file(
                {k: v for k, v in tensors.items() if "classifier" not in k},
                str(directory / "adapter_model.safetensors"),
            )
        adapters.append(directory)
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model(args.model), num_labels=2)
    names = [f"{run.name}-{copy}" for copy in range(copies) for run in lora_runs]
    model = peft.PeftModel.from_pretrained(base, str(adapters[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[names.index(name) % len(adapters)]), adapter_name=name)
    return model.eval(), names


# --------------------------------------------------------------------------------- throughput


def mixed_loras(lora_runs: list[Path], copies: int, batch_invariant: bool = True):
    """The LoRA deltas on one base, each under `copies` names (16 deltas from 4 trained LoRAs)."""
    import deltatune

    return deltatune.load_many(
        [run for _ in range(copies) for run in lora_runs],
        names=[f"{run.name}-{copy}" for copy in range(copies) for run in lora_runs],
        batch_invariant=batch_invariant,
    )


def lora_requests(args, texts: list[str], peft_names: list[str]) -> list[str]:
    """The LoRA delta each request goes to (the same draw in every script that compares with PEFT)."""
    rng = random.Random(args.seed + 1)
    return [rng.choice(peft_names) for _ in texts]


def arrival_batches(count: int, batch_size: int) -> list[list[int]]:
    """Consecutive slices of `batch_size` requests in arrival order: what a server's batches hold."""
    return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]


def run_peft(model, encoded, pad_token_id: int, lora_names: list[str], batches, adapters: bool = True) -> list:
    """PEFT's mixed-adapter inference over `batches` (each row with its `lora_names` adapter), or its base
    layers alone on the same batches."""
    import torch

    from deltatune.batching import collate

    outputs = []
    with torch.no_grad():
        for batch in batches:
            features = collate(encoded, batch, pad_token_id, False)
            features.pop("labels")
            if adapters:
                outputs.append(model(**features, adapter_names=[lora_names[i] for i in batch]).logits)
            else:
                with model.disable_adapter():  # the base layers alone, on the same batches
                    outputs.append(model(**features).logits)
    return outputs


def alternate_rounds(sides: dict, rounds: int, count: int) -> dict[str, list[float]]:
    """Each side once to warm up, then `rounds` rounds of every side in turn: inputs per second per round."""
    for run in sides.values():
        run()
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, run in sides.items():
            gc.collect()
            started = time.perf_counter()
            run()
            rates[name].append(count / (time.perf_counter() - started))
    return rates


def paired_batches(sides: dict, batches: list[list[int]], rounds: int) -> dict[str, list[float]]:
    """Two sides on the same batches, taking turns batch by batch (which goes first alternates): each side's
    inputs per second per round. A side's whole-workload round lasts seconds, over which this VM's speed moves
    by 10-20%; batch by batch both sides run within a fraction of a second of each other on every batch."""
    for batch in batches:  # warm up: every batch shape once
        for run in sides.values():
            run(batch)
    count = sum(len(batch) for batch in batches)
    rates: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for _ in range(rounds):
        spent = dict.fromkeys(names, 0.0)
        for number, batch in enumerate(batches):
            for name in names if number % 2 else names[::-1]:
                started = time.perf_counter()
                sides[name](batch)
                spent[name] += time.perf_counter() - started
        for name in names:
            rates[name].append(count / spent[name])
    return rates


def throughput(args, runs: dict[str, Path], texts: list[str], names: list[str]) -> dict:
    import torch

    import deltatune
    from deltatune.batching import encode, length_bucketed_batches
    from deltatune.tasks.spec import Split

    invariant = {"batch_invariant": args.batch_invariant}
    shared = deltatune.load_many(list(runs.values()), names=list(runs), **invariant)
    single = deltatune.load(runs[f"{TASKS[0]}-lora"])
    lora_runs = [runs[f"{task}-lora"] for task in TASKS]
    copies = 4
    loras = mixed_loras(lora_runs, copies, **invariant)
    peft, peft_names = peft_model(args, lora_runs, copies)
    lora_names = lora_requests(args, texts, peft_names)

    encoded = encode(single.tokenizer, single.task, Split([(t,) for t in texts], [0] * len(texts)), 128)
    peft_batches = length_bucketed_batches(encoded.lengths, args.batch_size, None)
    peft_bf16, _ = peft_model(args, lora_runs, copies)
    peft_bf16 = peft_bf16.to(torch.bfloat16)  # what a PEFT user does for bf16 inference: the model in bf16
    arriving = arrival_batches(len(texts), args.batch_size)
    pad_token_id = single.tokenizer.pad_token_id or 0

    # the same 16 deltas as the server holds them: the mixed-batch state (routing plans, bf16 weight copies)
    # kept open across calls by `serving()`, where a plain `predict` call opens and closes it each time
    kept = deltatune.load_many(list(runs.values()), names=list(runs), **invariant)
    kept_open = kept.serving()
    kept_open.__enter__()
    loras_kept = mixed_loras(lora_runs, copies, **invariant)  # the 16 LoRAs as a server holds them, for arrival order
    loras_open = loras_kept.serving()
    loras_open.__enter__()
    sides = {
        "deltatune, 16 deltas of 4 methods, mixed": lambda: shared.predict(
            texts, task=names, batch_size=args.batch_size
        ),
        KEPT_OPEN: lambda: kept.predict(texts, task=names, batch_size=args.batch_size),
        AS_SERVED: lambda: [
            kept.predict(
                texts[start : start + args.batch_size],
                task=names[start : start + args.batch_size],
                batch_size=args.batch_size,
            )
            for start in range(0, len(texts), args.batch_size)
        ],
        SINGLE: lambda: single.predict(texts, batch_size=args.batch_size),
        "deltatune, 16 LoRAs mixed, fp32": lambda: loras.predict(
            texts, task=lora_names, batch_size=args.batch_size, precision="fp32"
        ),
        "PEFT, 16 LoRAs mixed (adapter_names), fp32": lambda: run_peft(
            peft, encoded, pad_token_id, lora_names, peft_batches
        ),
        BASE_ALONE: lambda: run_peft(peft, encoded, pad_token_id, lora_names, peft_batches, adapters=False),
        "deltatune, 16 LoRAs mixed, bf16": lambda: loras.predict(
            texts, task=lora_names, batch_size=args.batch_size, precision="bf16"
        ),
        "PEFT, 16 LoRAs mixed (adapter_names), bf16 weights": lambda: run_peft(
            peft_bf16, encoded, pad_token_id, lora_names, peft_batches
        ),
        LORAS_ARRIVING: lambda: [
            loras_kept.predict(
                [texts[i] for i in batch],
                task=[lora_names[i] for i in batch],
                batch_size=args.batch_size,
                precision="fp32",
            )
            for batch in arriving
        ],
        PEFT_ARRIVING: lambda: run_peft(peft, encoded, pad_token_id, lora_names, arriving),
    }
    rates = alternate_rounds(sides, args.rounds, len(texts))
    # the 0.9x comparison again, batch by batch: the requests sorted by length and cut into batches, each
    # batch run by the single-task model and by the 16 deltas (kept open, as the server runs them) in turn
    by_length = sorted(range(len(texts)), key=lambda row: encoded.lengths[row])
    sorted_batches = [by_length[start : start + args.batch_size] for start in range(0, len(texts), args.batch_size)]
    paired = paired_batches(
        {
            SINGLE: lambda batch: single.predict([texts[i] for i in batch], batch_size=args.batch_size),
            PAIRED_MIXED: lambda batch: kept.predict(
                [texts[i] for i in batch], task=[names[i] for i in batch], batch_size=args.batch_size
            ),
        },
        sorted_batches,
        args.paired_rounds,
    )
    kept_open.__exit__(None, None, None)
    loras_open.__exit__(None, None, None)
    return {
        "rates": rates,
        "paired": paired,
        "offline": statistics.median(rates["deltatune, 16 deltas of 4 methods, mixed"]),
        "threads": torch.get_num_threads(),
        "memory": shared.memory(),
    }


# ------------------------------------------------------------------------------------- memory


def measure_memory(kind: str, args, runs: dict[str, Path]) -> int:
    """Resident bytes of this process after loading `kind` and one prediction (run in a fresh process)."""
    import deltatune

    texts = ["a fine film", "call now to win a prize"] * 32
    if kind == "shared":
        served = deltatune.load_many(list(runs.values()), names=list(runs), batch_invariant=args.batch_invariant)
        served.predict(texts, task=[list(runs)[i % len(runs)] for i in range(len(texts))])
        keep = [served]
    else:
        chosen = list(runs.values()) if kind == "separate" else [runs[f"{TASKS[0]}-lora"]]
        keep = [deltatune.load(run) for run in chosen]
        for tuned in keep:
            tuned.predict(texts)
    gc.collect()
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def memory(args) -> dict[str, int]:
    values = {}
    for kind in ("single", "shared", "separate"):
        output = subprocess.run(
            [
                sys.executable,
                __file__,
                "--measure-memory",
                kind,
                "--runs",
                str(args.runs),
                "--model",
                args.model,
                "--batch-invariant" if args.batch_invariant else "--no-batch-invariant",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        values[kind] = json.loads(output.stdout.strip().splitlines()[-1])["rss"]
    return values


# ---------------------------------------------------------------------------------- load test


def post(port: int, method: str, path: str, body=None, timeout: float = 60.0, connection=None):
    """One request; on a new connection, closed after it, unless a kept-alive `connection` is given."""
    own = connection is None
    if own:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(
            method,
            path,
            body=json.dumps(body) if body is not None else None,
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        if own:
            connection.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(args, runs: dict[str, Path]) -> tuple[subprocess.Popen, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "deltatune.cli",
        "serve",
        *map(str, runs.values()),
        "--port",
        str(port),
        "--allow-admin",
        "--delta-root",
        str(args.runs),
        "--max-batch-size",
        str(args.batch_size),
        "--max-queue",
        "4096",
        "--log-level",
        "warning",
        "--precision",
        args.precision,
        "--batch-invariant" if args.batch_invariant else "--no-batch-invariant",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if post(port, "GET", "/health")[0] == 200:
                return process, port
        except OSError:
            time.sleep(0.5)
        if process.poll() is not None:
            raise RuntimeError(process.stderr.read().decode())
    process.kill()
    raise RuntimeError("the server did not start within 300 s")


def served_names(port: int, runs: dict[str, Path]) -> dict[str, str]:
    """The server's name for each run: it names each delta by its task, made unique, in the order given."""
    listed = post(port, "GET", "/v1/tasks")[1]["tasks"]
    return {name: entry["name"] for name, entry in zip(runs, listed, strict=True)}


def random_request(
    rng: random.Random, count: int, texts: list[str], names: list[str], server_name: dict[str, str]
) -> tuple[list[int], list[dict]]:
    """`count` requests drawn from the pool: their positions in it, and the body that asks for them."""
    picks = [rng.randrange(len(texts)) for _ in range(count)]
    return picks, [{"task": server_name[names[i]], "input": texts[i]} for i in picks]


def load_test(args, runs: dict[str, Path], texts: list[str], names: list[str], offline: list[dict]) -> dict:
    """`--clients` threads for `--load-seconds`, each sending `--inputs-per-request` inputs per request."""
    process, port = start_server(args, runs)
    server_name = served_names(port, runs)
    stats = {
        "latencies": [],
        "ok_inputs": 0,
        "rejected_503": 0,
        "errors": [],
        "same_label": 0,
        "identical": 0,
        "compared": 0,
        "max_probability_difference": 0.0,
        "requests": 0,
    }
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + args.load_seconds

    def client(number: int) -> None:
        rng = random.Random(number)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # kept alive, as clients do
        while time.monotonic() < deadline and stats["requests"] < args.max_requests:
            picks, body = random_request(rng, args.inputs_per_request, texts, names, server_name)
            sent = time.perf_counter()
            try:
                status, answer = post(port, "POST", "/v1/predict", body, connection=connection)
            except (OSError, http.client.HTTPException) as error:
                status, answer = None, str(error)
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            latency = time.perf_counter() - sent
            with lock:
                stats["requests"] += 1
                if status == 200:
                    stats["latencies"].append(latency)
                    stats["ok_inputs"] += len(picks)
                    for i, got in zip(picks, answer["predictions"], strict=True):
                        stats["compared"] += 1
                        stats["same_label"] += got["label"] == offline[i]["label"]
                        stats["identical"] += got["probabilities"] == offline[i]["probabilities"]
                        difference = max(
                            abs(got["probabilities"][k] - v) for k, v in offline[i]["probabilities"].items()
                        )
                        stats["max_probability_difference"] = max(stats["max_probability_difference"], difference)
                elif status == 503:
                    stats["rejected_503"] += 1
                else:
                    stats["errors"].append((status, str(answer)[:200]))

    admin = {}

    def administer() -> None:
        time.sleep(args.load_seconds / 3)
        extra = runs[f"{TASKS[1]}-bitfit"].name
        admin["attach"] = post(port, "POST", "/v1/tasks", {"path": extra, "name": "attached-live"})[0]
        answers = [
            post(port, "POST", "/v1/predict", {"task": "attached-live", "inputs": ["win a prize now"]})[0]
            for _ in range(5)
        ]
        admin["requests_to_attached"] = answers
        time.sleep(max(0.0, started + 2 * args.load_seconds / 3 - time.monotonic()))
        admin["detach"] = post(port, "DELETE", "/v1/tasks/attached-live")[0]

    threads = [threading.Thread(target=client, args=(number,)) for number in range(args.clients)]
    threads.append(threading.Thread(target=administer))
    batches_before = post(port, "GET", "/health")[1]["batches"]
    server_cpu, client_cpu = cpu_seconds(process.pid), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    # the clients share the machine's cores with the server: how many each used says what the server had
    stats["server_cores_used"] = (cpu_seconds(process.pid) - server_cpu) / elapsed
    stats["client_cores_used"] = (time.process_time() - client_cpu) / elapsed
    stats["forward_batches"] = post(port, "GET", "/health")[1]["batches"] - batches_before
    process.send_signal(signal.SIGTERM)
    exit_code = process.wait(timeout=120)
    latencies = sorted(stats.pop("latencies"))
    return {
        **stats,
        "elapsed_s": elapsed,
        "inputs_per_s": stats["ok_inputs"] / elapsed,
        "admin": admin,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None,
        "server_exit_code": exit_code,
    }


def live_windows(args, runs: dict[str, Path], texts: list[str], names: list[str], offline_rate) -> dict:
    """The live server against offline `predict` in turns: `--live-windows` windows of `--window-seconds` of
    load (the clients of the load test, throughput only), each between two offline passes over the requests
    (`offline_rate()`, inputs per second) with the server idle. Each window's ratio is its live rate over the
    mean of the two offline rates around it: both measured within seconds, not minutes, of each other."""
    process, port = start_server(args, runs)
    server_name = served_names(port, runs)

    def drive(seconds: float) -> float:
        answered = [0] * args.clients
        deadline = time.monotonic() + seconds

        def client(number: int) -> None:
            rng = random.Random(1000 + number)
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            while time.monotonic() < deadline:
                picks, body = random_request(rng, args.inputs_per_request, texts, names, server_name)
                if post(port, "POST", "/v1/predict", body, connection=connection)[0] == 200:
                    answered[number] += len(picks)
            connection.close()

        threads = [threading.Thread(target=client, args=(number,)) for number in range(args.clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(answered) / (time.monotonic() - started)

    try:
        drive(min(5.0, args.window_seconds))  # warm-up: the server's first batches
        offline = [offline_rate()]
        live = []
        for _ in range(args.live_windows):
            live.append(drive(args.window_seconds))
            offline.append(offline_rate())
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    ratios = [rate / ((offline[k] + offline[k + 1]) / 2) for k, rate in enumerate(live)]
    return {"live": live, "offline": offline, "ratios": ratios}


# -------------------------------------------------------------------------------------- report


def report(args, results: dict) -> str:
    lines = (
        [f"Model {args.model}; the 16 deltas; load average before: {results['load_before']}.", ""]
        if args.live_only
        else offline_report(args, results)
    )
    return "\n".join(lines + live_report(args, results))


def offline_report(args, results: dict) -> list[str]:
    rates, memory_bytes = results["rates"], results["memory_rss"]
    mixed = "deltatune, 16 deltas of 4 methods, mixed"
    single = SINGLE
    ours, peft = "deltatune, 16 LoRAs mixed, fp32", "PEFT, 16 LoRAs mixed (adapter_names), fp32"

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))

    lines = [
        f"Model {args.model}; {args.requests} requests of dev texts of {', '.join(TASKS)}, each for one of 16 "
        f"deltas drawn uniformly; batch size {args.batch_size}; {args.rounds} alternating rounds; "
        f"{results['threads']} threads; load average before: {results['load_before']}.",
        "",
        "| side | inputs/s (median) | ratio |",
        "|---|---|---|",
    ]
    for name in rates:
        against = {
            mixed: (single, "vs single-task TunedModel"),
            KEPT_OPEN: (single, "vs single-task TunedModel"),
            AS_SERVED: (KEPT_OPEN, "vs the same sorted across all requests"),
            ours: (peft, "vs PEFT"),
            BASE_ALONE: (peft, "vs PEFT: what its batches cost with no adapter at all"),
            "deltatune, 16 LoRAs mixed, bf16": ("PEFT, 16 LoRAs mixed (adapter_names), bf16 weights", "vs PEFT"),
            LORAS_ARRIVING: (PEFT_ARRIVING, "vs PEFT on the same arrival-order batches"),
        }.get(name)
        text = f"{ratio(name, against[0]):.2f}x {against[1]}" if against else "1.00x"
        lines.append(f"| {name} | {statistics.median(rates[name]):.1f} | {text} |")
    paired = results.get("paired")
    if paired:
        ratios = [x / y for x, y in zip(paired[PAIRED_MIXED], paired[SINGLE], strict=True)]
        lines += [
            "",
            f"Batch by batch: the same requests sorted by length and cut into batches of {args.batch_size}; each "
            f"batch run by both sides in turn (which goes first alternates), {len(ratios)} rounds.",
            "",
            "| side | inputs/s (median) | ratio (median of rounds; lowest, highest) |",
            "|---|---|---|",
            f"| {PAIRED_MIXED} | {statistics.median(paired[PAIRED_MIXED]):.1f} | "
            f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}, {max(ratios):.3f}) vs single-task TunedModel |",
            f"| {SINGLE} | {statistics.median(paired[SINGLE]):.1f} | 1.00x |",
        ]
    mib = 2**20
    lines += [
        "",
        "| resident memory (RSS, fresh process, after one prediction) | MiB | vs one TunedModel |",
        "|---|---|---|",
    ]
    for kind, label in (
        ("single", "one single-task TunedModel"),
        ("shared", "16 deltas on one base (load_many)"),
        ("separate", "16 separately loaded TunedModels"),
    ):
        lines.append(
            f"| {label} | {memory_bytes[kind] / mib:.0f} | {memory_bytes[kind] / memory_bytes['single']:.2f}x |"
        )
    return [*lines, ""]


def live_report(args, results: dict) -> list[str]:
    load, around = results["load"], results["offline_around_load"]
    rounds = f"{load['inputs_per_s'] / results['offline']:.2f}x | " if "offline" in results else ""
    return [
        f"Live server: {args.clients} clients x {args.inputs_per_request} input(s) per request for "
        f"{args.load_seconds} s on 127.0.0.1 (server and clients share the machine's cores); precision "
        f"{args.precision}, the offline answers too"
        + (", both batch-invariant (the default)." if args.batch_invariant else ", neither batch-invariant."),
        "",
        "| requests | answered inputs/s | "
        + ("vs offline mixed (rounds above) | " if rounds else "")
        + "vs offline mixed just before / after | p50 ms | p99 ms | 503 | other errors | same label as offline | "
        "same probabilities to the last bit | max probability difference |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if rounds else ""),
        f"| {load['requests']} | {load['inputs_per_s']:.1f} | {rounds}"
        f"{load['inputs_per_s'] / around[0]:.2f}x / {load['inputs_per_s'] / around[1]:.2f}x "
        f"({around[0]:.1f} / {around[1]:.1f} inputs/s) | "
        f"{load['p50_ms']:.0f} | {load['p99_ms']:.0f} | {load['rejected_503']} | {len(load['errors'])} | "
        f"{load['same_label']}/{load['compared']} | {load['identical']}/{load['compared']} | "
        f"{load['max_probability_difference']:.2g} |",
        "",
        f"CPU cores used during the load test: server {load['server_cores_used']:.2f}, the client threads "
        f"{load['client_cores_used']:.2f} (of {os.cpu_count()}); each client keeps its connection open. The server "
        f"ran {load['forward_batches']} batches: {load['ok_inputs'] / max(1, load['forward_batches']):.1f} inputs "
        "per batch on average (the attach check's requests included).",
        "",
        f"Attach during the test: HTTP {load['admin'].get('attach')}; requests to it: "
        f"{load['admin'].get('requests_to_attached')}; detach: HTTP {load['admin'].get('detach')}; server exit "
        f"code after SIGTERM: {load['server_exit_code']}.",
        "",
        *windows_report(args, results),
        f"Produced by `python benchmarks/serve.py {' '.join(sys.argv[1:])}`.",
    ]


def windows_report(args, results: dict) -> list[str]:
    windows = results.get("live_windows")
    if not windows:
        return []
    ratios = windows["ratios"]
    return [
        f"Live and offline in turns: {len(ratios)} windows of {args.window_seconds:.0f} s of the same load (a fresh "
        "server), each between two offline passes over the requests with the server idle; a window's ratio is its "
        "live rate over the mean of the two offline rates around it.",
        "",
        "| live inputs/s per window | offline inputs/s between windows | ratios | median ratio (lowest, highest) |",
        "|---|---|---|---|",
        f"| {', '.join(f'{rate:.1f}' for rate in windows['live'])} | "
        f"{', '.join(f'{rate:.1f}' for rate in windows['offline'])} | "
        f"{', '.join(f'{ratio:.2f}' for ratio in ratios)} | "
        f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}, {max(ratios):.2f}) |",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--runs", type=Path, default=Path("runs/serve-bench"), help="where the 16 deltas are kept")
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--requests", type=int, default=2048)
    parser.add_argument("--texts-per-task", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--paired-rounds", type=int, default=5, help="rounds of the batch-by-batch mixed-against-single comparison"
    )
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument(
        "--live-windows", type=int, default=4, help="windows of live load, each between two offline passes (0: none)"
    )
    parser.add_argument("--window-seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--inputs-per-request", type=int, default=2)
    parser.add_argument("--max-requests", type=int, default=200_000, help="the load test stops after this many")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision", default="auto", help="the live test's: the server's and its offline reference answers'"
    )
    parser.add_argument(
        "--batch-invariant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="every model and the server with batch_invariant (the default; bit-identical answers)",
    )
    parser.add_argument(
        "--live-only", action="store_true", help="only the live test (and the offline rate just before and after)"
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--measure-memory", choices=("single", "shared", "separate"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    runs = prepare_runs(args)
    if args.measure_memory:
        print(json.dumps({"rss": measure_memory(args.measure_memory, args, runs)}))
        return
    results = {"load_before": " ".join(f"{value:.2f}" for value in os.getloadavg())}
    texts, names = request_pool(args, runs)
    if not args.live_only:
        results.update(throughput(args, runs, texts, names))
        results["memory_rss"] = memory(args)
    import deltatune

    # the offline mixed rate again just before and just after the live test: the VM's speed drifts by minutes,
    # so the live rate is also set against these two, measured around it, not only against the rounds above
    shared = deltatune.load_many(list(runs.values()), names=list(runs), batch_invariant=args.batch_invariant)
    options = {"precision": args.precision, "batch_size": args.batch_size}
    shared.predict(texts[: args.batch_size], task=names[: args.batch_size], **options)  # warm-up
    started = time.perf_counter()
    offline = shared.predict(texts, task=names, **options)
    bracket = [len(texts) / (time.perf_counter() - started)]
    results["load"] = load_test(args, runs, texts, names, offline)

    def offline_rate(model=shared) -> float:
        started = time.perf_counter()
        model.predict(texts, task=names, **options)
        return len(texts) / (time.perf_counter() - started)

    bracket.append(offline_rate())
    results["offline_around_load"] = bracket
    if args.live_windows:
        results["live_windows"] = live_windows(args, runs, texts, names, offline_rate)
    del shared
    gc.collect()
    results["load_after"] = " ".join(f"{value:.2f}" for value in os.getloadavg())
    text = report(args, results) + f"\nLoad average after: {results['load_after']}."
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
