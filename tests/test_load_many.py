"""Many deltas on one loaded base (`deltatune.load_many`): each task answers as its own delta does alone.

Run directories are made here on a tiny local base: deltas of several methods, tasks with different
label counts, a pair task, a regression task with a target scale, and a full fine-tuning delta (which
runs in forward passes of its own).
"""

import csv
import os
from pathlib import Path

import pytest
import torch

import deltatune
from conftest import delta_manifest, make_sentiment_rows, save_tiny_model_dir
from deltatune.delta import fingerprint_backbone, model_bytes, save_delta
from deltatune.errors import DeltatuneError
from deltatune.methods import build_method, prepare_model
from deltatune.sources.models import load_model_for_task
from deltatune.tasks.spec import TaskSpec

SENTIMENT = TaskSpec("sentiment", ("text",), ("negative", "positive"))
TOPIC = TaskSpec("topic", ("text",), ("music", "animals", "food"))
PAIRS = TaskSpec("pairs", ("first", "second"), ("different", "same"))
SCORES = TaskSpec("scores", ("text",), score_range=(0.0, 5.0), metric="pearson", metrics=("pearson",))
TEXTS = ["the man plays guitar", "a good movie", "not very happy dog", "the film was really great", "cat eats food"]


def write_toy_csv(path: Path, rows: int) -> dict:
    """A local sentiment CSV and the data record that trains on it."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(make_sentiment_rows(rows))
    return deltatune.data_record("toy", local={"path": str(path), "text_fields": ["text"]})


def moved_delta(model, method_name: str, options: dict | None, seed: int, scale: float = 0.1):
    """`method_name` applied to `model` with every trainable tensor moved off its start, as training would."""
    method = build_method(method_name, options or {})
    prepare_model(model, method)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return method


def make_run(
    directory: Path,
    base_dir: Path,
    method_name: str,
    task: TaskSpec,
    seed: int,
    options=None,
    data: dict | None = None,
    head: tuple[str, str] | None = None,
) -> Path:
    """A saved delta of `method_name` for `task` on the local base, every trainable tensor moved off its start;
    `head` (kind, pooling) trains one of deltatune's own heads instead of the model's."""
    from deltatune.heads import PooledTaskModel
    from deltatune.records import ManifestHead

    torch.manual_seed(seed)
    kind, pooling = head or ("auto", "auto")
    model, _ = load_model_for_task(str(base_dir), task, head=kind, pooling=pooling)
    fingerprint = fingerprint_backbone(model)
    method = moved_delta(model, method_name, options, seed)
    head = ManifestHead(
        model.head_config.kind, model.head_config.pooling, transformers_head=not isinstance(model, PooledTaskModel)
    )
    manifest = delta_manifest(
        method,
        str(base_dir),
        fingerprint,
        task,
        max_length=32,
        data=data or {},
        head=head,
        target_scale=[2.5, 1.2] if task.is_regression else None,
        metrics={"dev": {task.metric: 0.5}},
    )
    save_delta(directory, model, method, manifest)
    return directory


@pytest.fixture
def runs(tmp_path):
    base = save_tiny_model_dir(tmp_path / "base", "bert")
    specs = {
        "sentiment-lora": ("lora", SENTIMENT),
        "topic-bitfit": ("bitfit", TOPIC),
        "pairs-adapter": ("pfeiffer", PAIRS),
        "scores-ia3": ("ia3", SCORES),
        "topic-full": ("full", TOPIC),
        "sentiment-prefix": ("prefix-tuning", SENTIMENT),
    }
    options = {"prefix-tuning": {"num_virtual_tokens": 4}, "pfeiffer": {"bottleneck_size": 4}}
    return {
        name: make_run(tmp_path / name, base, method, task, seed, options.get(method))
        for seed, (name, (method, task)) in enumerate(specs.items(), start=1)
    }


def inputs_for(task: TaskSpec):
    return [(text, TEXTS[-1 - i]) if len(task.text_fields) == 2 else text for i, text in enumerate(TEXTS)]


def alone(run: Path, task: TaskSpec):
    rows = inputs_for(task)
    columns = [
        list(column) for column in zip(*[row if isinstance(row, tuple) else (row,) for row in rows], strict=True)
    ]
    return deltatune.load(run).predict(*columns, precision="fp32")


def assert_same(served: dict, single: dict):
    if "score" in single:
        assert served["score"] == pytest.approx(single["score"], abs=1e-4)
    else:
        assert served["label"] == single["label"]
        for label, probability in single["probabilities"].items():
            assert served["probabilities"][label] == pytest.approx(probability, abs=1e-5)


def test_one_base_many_tasks_each_answers_as_its_delta_alone_in_mixed_batches(runs):
    served = deltatune.load_many(list(runs.values()))
    assert list(served.tasks) == ["sentiment", "topic", "pairs", "scores", "topic-2", "sentiment-2"]
    expected = {
        name: alone(run, served.tasks[name].task) for name, run in zip(served.tasks, runs.values(), strict=True)
    }
    # one task per input, interleaved: the per-row deltas share forward passes, the full delta runs apart
    order = [(name, row) for row in range(len(TEXTS)) for name in served.tasks]
    inputs = [inputs_for(served.tasks[name].task)[row] for name, row in order]
    results = served.predict(inputs, task=[name for name, _ in order], batch_size=4, precision="fp32")
    for (name, row), result in zip(order, results, strict=True):
        assert result["task"] == name
        assert_same(result, expected[name][row])
    for name in served.tasks:  # and one task at a time
        single = served.predict(inputs_for(served.tasks[name].task), task=name, precision="fp32")
        for result, reference in zip(single, expected[name], strict=True):
            assert_same(result, reference)
    assert {task.batch_mixing for task in served.tasks.values()} == {"per-row", "grouped"}


def test_load_many_twice_and_names_given(runs):
    first = deltatune.load_many([runs["sentiment-lora"], runs["topic-bitfit"]], names=["a", "b"])
    second = deltatune.load_many([runs["topic-bitfit"]])
    assert list(first.tasks) == ["a", "b"] and list(second.tasks) == ["topic"]
    assert first.predict("a good movie", task="b", precision="fp32")[0] == second.predict(
        ["a good movie"], task="topic", precision="fp32"
    )[0] | {"task": "b"}


def test_a_full_fine_tuning_delta_reports_a_whole_model_of_memory(runs):
    served = deltatune.load_many([runs["topic-full"], runs["sentiment-lora"]])
    memory = served.memory()
    model = load_model_for_task(str(runs["topic-full"].parent / "base"), TOPIC)[0]
    whole = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    assert memory["delta_bytes"]["topic"] == whole  # every weight, the head included: a whole model
    assert memory["base_bytes"] == model_bytes(model)
    assert memory["delta_bytes"]["sentiment"] < 0.2 * whole
    assert served.tasks["topic"].resident_bytes == memory["delta_bytes"]["topic"]


def test_deltas_attach_and_detach_at_run_time(runs):
    served = deltatune.load_many([runs["sentiment-lora"]])
    before = served.predict(TEXTS, task="sentiment", precision="fp32")
    with served.serving():  # the mixed-batch state stays open across calls, and attach/detach reopen it
        served.predict(TEXTS, task="sentiment", precision="fp32")
        served.attach(runs["topic-bitfit"])
        assert [r["label"] for r in served.predict(TEXTS, task="topic", precision="fp32")] == [
            r["label"] for r in alone(runs["topic-bitfit"], TOPIC)
        ]
        served.detach("topic")
        assert served.predict(TEXTS, task="sentiment", precision="fp32") == before
    with pytest.raises(DeltatuneError, match=r"task: no task named 'topic' is served; served: 'sentiment'"):
        served.predict(TEXTS, task="topic")
    with pytest.raises(DeltatuneError, match="No task named 'topic' is served"):
        served.detach("topic")
    with pytest.raises(DeltatuneError, match="already attached"):
        served.attach(runs["topic-bitfit"], name="sentiment")


def test_bad_inputs_are_refused_naming_the_field(runs):
    served = deltatune.load_many([runs["pairs-adapter"], runs["sentiment-lora"]])
    with pytest.raises(DeltatuneError, match=r"inputs\[1\] has 1 text\(s\) but task 'pairs' takes 2 \(first, second\)"):
        served.predict([["a", "b"], "only one"], task="pairs")
    with pytest.raises(DeltatuneError, match=r"inputs\[0\]\[1\] must be a string, got int"):
        served.predict([["a", 3]], task="pairs")
    with pytest.raises(DeltatuneError, match=r"task\[1\]: no task named 'nope'"):
        served.predict(["a", "b"], task=["sentiment", "nope"])
    with pytest.raises(DeltatuneError, match=r"inputs must be a non-empty list"):
        served.predict([], task="sentiment")
    with pytest.raises(DeltatuneError, match=r"one per input \(2\)"):
        served.predict(["a", "b"], task=["sentiment"])


def test_load_many_is_validated_before_anything_loads(runs, tmp_path):
    with pytest.raises(DeltatuneError, match="takes a list of run directories, got the single path"):
        deltatune.load_many(str(runs["sentiment-lora"]))
    with pytest.raises(DeltatuneError, match="at least one run directory"):
        deltatune.load_many([])
    with pytest.raises(DeltatuneError, match="one distinct name per run directory"):
        deltatune.load_many([runs["sentiment-lora"], runs["topic-bitfit"]], names=["x", "x"])
    other_base = save_tiny_model_dir(tmp_path / "other-base", "bert", seed=5)
    stranger = make_run(tmp_path / "stranger", other_base, "lora", SENTIMENT, 9)
    with pytest.raises(DeltatuneError, match="trained on 2 different base models"):
        deltatune.load_many([runs["sentiment-lora"], stranger])
    served = deltatune.load_many([runs["sentiment-lora"]])
    with pytest.raises(DeltatuneError, match="Serve deltas of one base model together"):
        served.attach(stranger)


def test_bf16_mixed_batches_stay_close_to_fp32_and_leave_the_weights_exact(runs):
    served = deltatune.load_many([runs["sentiment-lora"], runs["topic-bitfit"], runs["topic-full"], runs["scores-ia3"]])
    names = [name for name in served.tasks for _ in TEXTS]
    inputs = TEXTS * len(served.tasks)
    weights = {name: parameter.detach().clone() for name, parameter in served.model.named_parameters()}
    exact = served.predict(inputs, task=names, precision="fp32")
    rounded = served.predict(inputs, task=names, precision="bf16")
    for fine, coarse in zip(exact, rounded, strict=True):
        if "score" in fine:
            assert coarse["score"] == pytest.approx(fine["score"], abs=0.1)
        else:
            assert max(abs(coarse["probabilities"][k] - v) for k, v in fine["probabilities"].items()) < 0.05
    assert all(torch.equal(parameter, weights[name]) for name, parameter in served.model.named_parameters())
    assert served.predict(inputs, task=names, precision="fp32") == exact


def test_deltas_of_one_pooled_head_share_a_base_and_other_heads_are_refused(tmp_path):
    """Deltas trained with a mean-pooled head (MiniLM-L6's default) load together and answer as alone."""
    base = save_tiny_model_dir(tmp_path / "base", "bert")
    mean = {"kind": ("cross-encoder", "mean")}
    pooled = {
        "sentiment-lora": make_run(tmp_path / "a", base, "lora", SENTIMENT, 1, head=mean["kind"]),
        "topic-bitfit": make_run(tmp_path / "b", base, "bitfit", TOPIC, 2, head=mean["kind"]),
    }
    served = deltatune.load_many(list(pooled.values()), names=["sentiment", "topic"])
    expected = {"sentiment": alone(pooled["sentiment-lora"], SENTIMENT), "topic": alone(pooled["topic-bitfit"], TOPIC)}
    tasks = ["sentiment", "topic", "topic", "sentiment", "topic"]  # one batch, rows of both deltas
    for row, (answer, name) in enumerate(
        zip(served.predict(inputs_for(SENTIMENT), task=tasks, precision="fp32"), tasks, strict=True)
    ):
        assert_same(answer, expected[name][row])
    native = make_run(tmp_path / "c", base, "lora", SENTIMENT, 3)
    with pytest.raises(
        DeltatuneError,
        match=r"trained with 2 different heads \(cross-encoder pooling by mean: .*; "
        r"cross-encoder pooling by native: ",
    ):
        deltatune.load_many([pooled["sentiment-lora"], native])


SIMILAR = TaskSpec("similar", ("first", "second"), score_range=(0.0, 5.0), metric="pearson", metrics=("pearson",))
NLI = TaskSpec("nli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"))


def test_bi_encoders_share_the_forward_passes_of_cross_encoders(tmp_path, monkeypatch):
    """MiniLM-L6's defaults: STS-B trains a mean-pooled bi-encoder, classification a mean-pooled cross-encoder;
    one process serves both (and bi-encoder classifiers), each text of a bi-encoder's pair a row of the shared
    forward pass."""
    base = save_tiny_model_dir(tmp_path / "base", "bert")
    bi, cross = ("bi-encoder", "mean"), ("cross-encoder", "mean")
    runs = {
        "similar": (make_run(tmp_path / "a", base, "lora", SIMILAR, 1, head=bi), SIMILAR),
        "sentiment": (make_run(tmp_path / "b", base, "bitfit", SENTIMENT, 2, head=cross), SENTIMENT),
        "similar-2": (make_run(tmp_path / "c", base, "ia3", SIMILAR, 3, head=bi), SIMILAR),
        "similar-3": (make_run(tmp_path / "d", base, "full", SIMILAR, 4, head=bi), SIMILAR),  # a pass of its own
        "pairs": (make_run(tmp_path / "e", base, "pfeiffer", PAIRS, 5, head=cross), PAIRS),
        # bi-encoder classifiers: their own linear layer over [u, v, |u-v|], 3 and 2 labels
        "nli": (make_run(tmp_path / "g", base, "lora", NLI, 7, head=bi), NLI),
        "pairs-2": (make_run(tmp_path / "h", base, "bitfit", PAIRS, 8, head=bi), PAIRS),
    }
    served = deltatune.load_many([run for run, _ in runs.values()])
    assert list(served.tasks) == list(runs)
    assert [t.describe(served.fingerprint)["head"] for t in served.tasks.values()][:2] == [
        "bi-encoder",
        "cross-encoder",
    ]
    expected = {name: alone(run, task) for name, (run, task) in runs.items()}
    order = [(name, row) for row in range(len(TEXTS)) for name in runs]
    inputs = [inputs_for(runs[name][1])[row] for name, row in order]
    for batch_size in (3, 64):  # pairs split across batches, and all in one
        results = served.predict(inputs, task=[name for name, _ in order], batch_size=batch_size, precision="fp32")
        for (name, row), result in zip(order, results, strict=True):
            assert result["task"] == name
            assert_same(result, expected[name][row])
    # the deltas differ, so equal answers are not one delta's answers repeated
    assert len({round(expected[name][0]["score"], 4) for name in ("similar", "similar-2", "similar-3")}) == 3
    assert served.tasks["nli"].pair_head is not None and served.tasks["nli"].pair_head[0].shape == (3, 3 * 32)
    # its own layer counts in what it holds, in `memory()` as in `/v1/tasks`
    assert served.memory()["delta_bytes"]["nli"] == served.tasks["nli"].resident_bytes
    # texts of very different lengths side by side: the batch runs packed (no padding through the encoder)
    import deltatune.serve.multi as multi

    packed = []
    original = multi.packed_encoder
    monkeypatch.setattr(multi, "packed_encoder", lambda *args, **kwargs: packed.append(1) or original(*args, **kwargs))
    long = " ".join(TEXTS * 3)
    rows = [("a", long), "b", (long, "c"), long, ("x y", "z")]
    names = ["similar", "sentiment", "nli", "sentiment", "pairs-2"]
    answers = served.predict(rows, task=names, precision="fp32")
    assert packed
    for row, name, answer in zip(rows, names, answers, strict=True):
        columns = [[text] for text in row] if isinstance(row, tuple) else [[row]]
        assert_same(answer, deltatune.load(runs[name][0]).predict(*columns, precision="fp32")[0])
    # bi-encoders alone: the base is loaded as theirs
    alone_served = deltatune.load_many([runs["nli"][0], runs["similar"][0], runs["similar-2"][0]])
    for name in ("similar-2", "nli"):
        for row, result in enumerate(alone_served.predict(inputs_for(runs[name][1]), task=name, precision="fp32")):
            assert_same(result, expected[name][row])
    with pytest.raises(DeltatuneError, match="needs the base loaded with a cross-encoder head pooling by mean"):
        alone_served.attach(runs["sentiment"][0])
    native = make_run(tmp_path / "f", base, "lora", SENTIMENT, 6)
    with pytest.raises(DeltatuneError, match="need different forward passes of the base"):
        deltatune.load_many([runs["similar"][0], native])


def test_batches_measure_the_rows_once(monkeypatch):
    # `Encoded.lengths` measures every row; reading it once per row made a large predict call quadratic
    from deltatune.batching import Encoded
    from deltatune.serve.multi import MultiTaskModel

    reads = []
    measure = Encoded.lengths.fget
    monkeypatch.setattr(Encoded, "lengths", property(lambda encoded: reads.append(1) or measure(encoded)))
    encoded = Encoded({"input_ids": [[1] * (1 + row % 7) for row in range(500)]}, [0] * 500)
    batches, _ = MultiTaskModel._batches(encoded, list(range(0, 500, 2)), 16, packable=True)
    assert sorted(row for batch in batches for row in batch) == list(range(0, 500, 2))
    assert len(reads) == 1


def test_a_bi_encoder_classifier_without_its_classifier_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    base = save_tiny_model_dir(tmp_path / "base", "bert")
    run = make_run(tmp_path / "nli", base, "lora", NLI, 1, head=("bi-encoder", "mean"))
    tensors = load_file(str(run / "delta.safetensors"))
    assert {"classifier.weight", "classifier.bias"} <= set(tensors)
    save_file({k: v for k, v in tensors.items() if not k.startswith("classifier.")}, str(run / "delta.safetensors"))
    with pytest.raises(DeltatuneError, match="bi-encoder classifier, but its delta.safetensors holds no classifier"):
        deltatune.load_many([run])


def test_a_session_left_open_ends_quietly_with_the_process(tmp_path):
    """`serving()` entered and never left (a script that just ends): the open session is closed at exit, before
    the modules that undo it are torn down, so nothing prints a traceback."""
    import subprocess
    import sys

    base = save_tiny_model_dir(tmp_path / "base", "bert")
    run_a = make_run(tmp_path / "a", base, "lora", SENTIMENT, 1)
    run_b = make_run(tmp_path / "b", base, "bitfit", TOPIC, 2)
    script = (
        "import deltatune\n"
        f"served = deltatune.load_many([{str(run_a)!r}, {str(run_b)!r}])\n"
        "session = served.serving()\n"
        "session.__enter__()\n"
        "print(len(served.predict(['a good movie', 'cat eats food'], task=['sentiment', 'topic'])))\n"
    )
    source = Path(deltatune.__file__).parents[1]
    finished = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(source)},
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "2"
    assert "Traceback" not in finished.stderr and "Exception ignored" not in finished.stderr, finished.stderr
