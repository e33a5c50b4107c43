"""`deltatune serve` over real HTTP: a real uvicorn on a free 127.0.0.1 port, real sockets, stdlib client.

Mixed-task batches answer as each delta does alone; every bad input gets its 4xx naming the field;
admin endpoints are off by default and confined to --delta-root; a bearer key guards everything but
/health; the queue is bounded (503 + Retry-After) and requests have deadlines (504); a non-loopback
bind is refused without a key; SIGTERM lets the request in flight finish, then the process exits.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import deltatune
from conftest import save_tiny_model_dir
from deltatune.cli import main
from deltatune.errors import DeltatuneError
from test_load_many import PAIRS, SCORES, SENTIMENT, SIMILAR, TEXTS, TOPIC, make_run

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from deltatune.serve.app import create_app  # noqa: E402
from deltatune.serve.settings import ServeSettings  # noqa: E402


@pytest.fixture
def runs(tmp_path):
    base = save_tiny_model_dir(tmp_path / "root" / "base", "bert")
    specs = {
        "sentiment": ("lora", SENTIMENT),
        "pairs": ("pfeiffer", PAIRS),
        "scores": ("ia3", SCORES),
        "topic": ("full", TOPIC),
    }
    return {
        name: make_run(
            tmp_path / "root" / name, base, method, task, seed, {"bottleneck_size": 4} if method == "pfeiffer" else None
        )
        for seed, (name, (method, task)) in enumerate(specs.items(), 1)
    }


class Server:
    """A real uvicorn serving `create_app(...)` on a free loopback port, in a thread of the test process."""

    def __init__(self, engine, **settings):
        self.settings = ServeSettings(**settings)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(create_app(engine, self.settings), log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    def call(self, method, path, body=None, headers=None, raw=None):
        return request(self.port, method, path, body, headers, raw)


def request(port, method, path, body=None, headers=None, raw=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    connection.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = data.decode(errors="replace")
    return response.status, parsed, dict(response.getheaders())


def expected_rows(runs, name, task, rows):
    columns = [
        list(column)
        for column in zip(*[row if isinstance(row, (list, tuple)) else (row,) for row in rows], strict=True)
    ]
    return deltatune.load(runs[name]).predict(*columns, precision="fp32")


def close_to(answer, reference):
    if "score" in reference:
        return answer["score"] == pytest.approx(reference["score"], abs=1e-4)
    return answer["label"] == reference["label"] and all(
        answer["probabilities"][k] == pytest.approx(v, abs=1e-5) for k, v in reference["probabilities"].items()
    )


def test_mixed_tasks_over_http_answer_as_each_delta_alone_and_share_forward_passes(runs):
    engine = deltatune.load_many(list(runs.values()))
    pair_rows = [[text, TEXTS[-1 - i]] for i, text in enumerate(TEXTS)]
    expected = {
        "sentiment": expected_rows(runs, "sentiment", SENTIMENT, TEXTS),
        "pairs": expected_rows(runs, "pairs", PAIRS, pair_rows),
        "scores": expected_rows(runs, "scores", SCORES, TEXTS),
        "topic": expected_rows(runs, "topic", TOPIC, TEXTS),
    }
    inputs = {"sentiment": TEXTS, "pairs": pair_rows, "scores": TEXTS, "topic": TEXTS}
    with Server(engine, precision="fp32", batch_wait_ms=300) as server:
        status, body, _ = server.call("POST", "/v1/predict", {"task": "pairs", "inputs": pair_rows})
        assert status == 200 and all(
            close_to(a, e) for a, e in zip(body["predictions"], expected["pairs"], strict=True)
        )
        items = [{"task": name, "input": inputs[name][row]} for row in range(len(TEXTS)) for name in inputs]
        status, body, _ = server.call("POST", "/v1/predict", items)
        assert status == 200
        for item, answer in zip(items, body["predictions"], strict=True):
            assert answer["task"] == item["task"]
            assert close_to(answer, expected[item["task"]][inputs[item["task"]].index(item["input"])])
        before = server.call("GET", "/health")[1]["batches"]
        with ThreadPoolExecutor(12) as pool:  # concurrent clients, different tasks: batched together
            answers = list(
                pool.map(
                    lambda k: server.call(
                        "POST",
                        "/v1/predict",
                        {"task": list(inputs)[k % 4], "inputs": [inputs[list(inputs)[k % 4]][k % 5]]},
                    ),
                    range(12),
                )
            )
        assert all(status == 200 for status, _, _ in answers)
        for k, (_, body, _) in enumerate(answers):
            assert close_to(body["predictions"][0], expected[list(inputs)[k % 4]][k % 5])
        assert server.call("GET", "/health")[1]["batches"] - before < 12, "requests arriving together share passes"
        status, body, _ = server.call("GET", "/v1/tasks")
        described = {task["name"]: task for task in body["tasks"]}
        assert status == 200 and set(described) == set(runs)
        assert (
            described["pairs"]["text_fields"] == ["first", "second"] and described["topic"]["batch_mixing"] == "grouped"
        )
        assert described["scores"]["regression"] and described["sentiment"]["labels"] == ["negative", "positive"]
        assert described["topic"]["resident_bytes"] > 10 * described["sentiment"]["resident_bytes"]
        assert {task["base_fingerprint"] for task in body["tasks"]} == {engine.fingerprint}
        assert server.call("GET", "/docs")[0] == 200
        assert "/v1/predict" in server.call("GET", "/openapi.json")[1]["paths"]


def test_a_bi_encoder_is_served_beside_cross_encoders_of_its_pooling(tmp_path):
    """MiniLM-L6's defaults over HTTP: a mean-pooled bi-encoder for a score task beside a mean-pooled classifier,
    and a bi-encoder classifier (its own layer over [u, v, |u-v|])."""
    base = save_tiny_model_dir(tmp_path / "base", "bert")
    runs = {
        "similar": make_run(tmp_path / "similar", base, "lora", SIMILAR, 1, head=("bi-encoder", "mean")),
        "sentiment": make_run(tmp_path / "sentiment", base, "bitfit", SENTIMENT, 2, head=("cross-encoder", "mean")),
        "pairs": make_run(tmp_path / "pairs", base, "ia3", PAIRS, 3, head=("bi-encoder", "mean")),
    }
    pair_rows = [[text, TEXTS[-1 - i]] for i, text in enumerate(TEXTS)]
    expected = {
        "similar": expected_rows(runs, "similar", SIMILAR, pair_rows),
        "sentiment": expected_rows(runs, "sentiment", SENTIMENT, TEXTS),
        "pairs": expected_rows(runs, "pairs", PAIRS, pair_rows),
    }
    inputs = {"similar": pair_rows, "sentiment": TEXTS, "pairs": pair_rows}
    with Server(deltatune.load_many(list(runs.values())), precision="fp32") as server:
        items = [{"task": name, "input": inputs[name][row]} for row in range(len(TEXTS)) for name in inputs]
        status, body, _ = server.call("POST", "/v1/predict", items)
        assert status == 200
        for item, answer in zip(items, body["predictions"], strict=True):
            assert close_to(answer, expected[item["task"]][inputs[item["task"]].index(item["input"])])
        described = {task["name"]: task for task in server.call("GET", "/v1/tasks")[1]["tasks"]}
        assert [described[name]["head"] for name in runs] == ["bi-encoder", "cross-encoder", "bi-encoder"]
        status, body, _ = server.call("POST", "/v1/predict", {"task": "similar", "inputs": ["one text"]})
        assert status == 422 and "inputs[0] has 1 text(s) but task 'similar' takes 2" in body["detail"]


BAD = [  # body (or raw bytes), status, message start
    ({"task": "nope", "inputs": ["a"]}, 404, 'task: no task named "nope" is served'),
    (
        {"task": "pairs", "inputs": ["only one text"]},
        422,
        r"inputs[0] has 1 text(s) but task 'pairs' takes 2 (first, second)",
    ),
    ({"task": "pairs", "inputs": [["a", 3]]}, 422, "inputs[0][1] must be a string, got int"),
    (
        {"task": "sentiment", "inputs": [None]},
        422,
        "inputs[0] must be a text or a list of 1 texts (text), got NoneType",
    ),
    ({"task": "sentiment", "inputs": []}, 422, "inputs: required, a non-empty list"),
    ({"task": "sentiment"}, 422, "inputs: required"),
    ({"inputs": ["a"]}, 422, "task: required"),
    ({"task": "sentiment", "inputs": ["a"], "precision": "bf16"}, 422, "precision: unknown field"),
    ([], 422, "body: an empty list"),
    ([{"task": "sentiment", "input": "a"}, {"task": "x", "input": "b"}], 404, '[1].task: no task named "x"'),
    ([{"task": "sentiment"}], 422, "[0]: must be an object with exactly 'task' and 'input'"),
    ({"task": "sentiment", "inputs": ["a"] * 5}, 413, "inputs: 5 inputs, more than the limit of 4 per request"),
    ({"task": "sentiment", "inputs": ["x" * 101]}, 413, "inputs[0][0]: 101 characters, more than the limit of 100"),
    ("a string", 422, "body: expected an object"),
    (b"{not json", 400, "body: not valid JSON"),
    (
        b'{"task": "sentiment", "inputs": ["' + b"a" * 3000 + b'"]}',
        413,
        "body: 3037 bytes, more than the limit of 2000",
    ),
]


def test_every_bad_input_gets_its_status_and_a_message_naming_the_field(runs):
    engine = deltatune.load_many([runs["sentiment"], runs["pairs"]])
    with Server(engine, max_inputs=4, max_text_chars=100, max_body_bytes=2000) as server:
        for body, status, message in BAD:
            raw = body if isinstance(body, bytes) else None
            got, answer, _ = server.call("POST", "/v1/predict", None if raw else body, raw=raw)
            assert (got, answer["detail"][: len(message)]) == (status, message), body
        # a path is just text: nothing is read from it
        status, answer, _ = server.call("POST", "/v1/predict", {"task": "sentiment", "inputs": ["/etc/passwd"]})
        assert status == 200 and answer["predictions"][0]["label"] in SENTIMENT.labels
        assert server.call("GET", "/health")[0] == 200, "no bad request brought the server down"


def test_admin_is_off_by_default_and_confined_to_the_delta_root(runs, tmp_path):
    engine = deltatune.load_many([runs["sentiment"]])
    with Server(engine) as server:
        for method, path, body in (
            ("POST", "/v1/tasks", {"path": str(runs["pairs"])}),
            ("DELETE", "/v1/tasks/sentiment", None),
        ):
            status, answer, _ = server.call(method, path, body)
            assert status == 403 and answer["detail"].startswith("admin: attaching and detaching deltas is off")
    outside = make_run(tmp_path / "outside", runs["sentiment"].parent / "base", "lora", SENTIMENT, 7)
    with Server(engine, allow_admin=True, delta_root=runs["sentiment"].parent) as server:
        status, answer, _ = server.call("POST", "/v1/tasks", {"path": str(outside)})
        assert status == 403 and answer["detail"].startswith("path: ") and "outside --delta-root" in answer["detail"]
        status, answer, _ = server.call("POST", "/v1/tasks", {"path": "../outside"})
        assert status == 403
        status, answer, _ = server.call("POST", "/v1/tasks", {"path": "pairs", "name": "pairs-live"})
        assert status == 201 and answer["name"] == "pairs-live" and answer["method"] == "pfeiffer"
        status, answer, _ = server.call(
            "POST", "/v1/predict", {"task": "pairs-live", "inputs": [["a good movie", "cat"]]}
        )
        assert status == 200
        status, answer, _ = server.call("POST", "/v1/tasks", {"path": "base"})
        assert status == 422 and "path: " in answer["detail"] and "deltatune.json" in answer["detail"]
        assert server.call("DELETE", "/v1/tasks/pairs-live")[0] == 200
        assert server.call("POST", "/v1/predict", {"task": "pairs-live", "inputs": [["a", "b"]]})[0] == 404
        assert server.call("DELETE", "/v1/tasks/pairs-live")[0] == 404


def test_a_bearer_key_guards_everything_but_health(runs):
    engine = deltatune.load_many([runs["sentiment"]])
    with Server(engine, api_key="s3cret") as server:
        body = {"task": "sentiment", "inputs": ["a good movie"]}
        status, answer, headers = server.call("POST", "/v1/predict", body)
        assert (
            status == 401 and answer["detail"].startswith("authorization:") and headers["www-authenticate"] == "Bearer"
        )
        assert server.call("POST", "/v1/predict", body, {"Authorization": "Bearer wrong"})[0] == 401
        assert server.call("GET", "/v1/tasks")[0] == 401
        assert server.call("POST", "/v1/predict", body, {"Authorization": "Bearer s3cret"})[0] == 200
        assert server.call("GET", "/health")[0] == 200


def slowed(engine, seconds):
    """The engine with each forward batch taking `seconds` longer (a busy model)."""
    original = engine.predict

    def predict(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    engine.predict = predict
    return engine


def test_a_full_queue_answers_503_with_retry_after_and_late_requests_504(runs):
    engine = slowed(deltatune.load_many([runs["sentiment"]]), 0.5)
    with Server(engine, max_queue=4, batch_wait_ms=0, max_batch_size=2) as server:
        body = {"task": "sentiment", "inputs": ["a good movie", "the film"]}
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: server.call("POST", "/v1/predict", body), range(6)))
        statuses = sorted(status for status, _, _ in answers)
        assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
        for status, answer, headers in answers:
            if status == 503:
                assert headers["retry-after"] == "1" and answer["detail"].startswith("queue: ")
    with Server(engine, request_timeout_s=0.2) as server:
        status, answer, _ = server.call("POST", "/v1/predict", {"task": "sentiment", "inputs": ["a"]})
        assert status == 504 and answer["detail"].startswith("request: not answered within 0.2 s")
        assert server.call("GET", "/health")[0] == 200


def test_a_non_loopback_bind_is_refused_without_a_key(runs, capsys):
    with pytest.raises(DeltatuneError, match=r"--host 0.0.0.0 is not a loopback address.*--api-key KEY.*--insecure"):
        ServeSettings(host="0.0.0.0")
    assert ServeSettings(host="0.0.0.0", api_key="k").host == "0.0.0.0"
    assert ServeSettings(host="0.0.0.0", insecure=True).insecure
    assert ServeSettings(host="::1").host == "::1" and ServeSettings(host="localhost").host == "localhost"
    with pytest.raises(DeltatuneError, match="--allow-admin needs --delta-root"):
        ServeSettings(allow_admin=True)
    assert main(["serve", str(runs["sentiment"]), "--host", "192.0.2.1"]) == 2  # refused before any loading
    assert "is not a loopback address" in capsys.readouterr().err


SLOW_SERVER = """
import sys, time
from deltatune.serve.multi import MultiTaskModel
original = MultiTaskModel.predict
def predict(self, *args, **kwargs):
    time.sleep(1.5)
    return original(self, *args, **kwargs)
MultiTaskModel.predict = predict
from deltatune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_lets_the_request_in_flight_finish_then_exits(runs, tmp_path, stop):
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_SERVER,
            "serve",
            str(runs["sentiment"]),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal, not a background job
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if request(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read().decode()
            time.sleep(0.2)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(
                request, port, "POST", "/v1/predict", {"task": "sentiment", "inputs": ["a good movie"]}
            )
            time.sleep(0.5)  # the request is being answered (the model takes 1.5 s)
            process.send_signal(stop)
            status, body, _ = answer.result(timeout=60)
        assert status == 200 and body["predictions"][0]["label"] in SENTIMENT.labels
        # uvicorn re-raises the signal once it has shut down, so a supervisor sees why the process ended; a
        # re-raised SIGINT is the command line's KeyboardInterrupt: exit status 130
        assert process.wait(timeout=60) in (0, -signal.SIGTERM if stop == signal.SIGTERM else 130), (
            process.stdout.read().decode()
        )
        if stop == signal.SIGINT:
            assert "stopped (Ctrl-C); the requests in flight were answered" in process.stdout.read().decode()
        with pytest.raises(OSError):
            request(port, "GET", "/health")
    finally:
        if process.poll() is None:
            process.kill()
