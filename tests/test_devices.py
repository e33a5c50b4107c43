"""Devices (`--device`), data-parallel training under torchrun, and gradient checkpointing, on tiny models.

The CUDA tests run only where a GPU is present (benchmarks/gpu_check.sh runs them there); on a CPU-only
machine they are skipped with that reason.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_model, build_tokenizer, tiny_bert_config, tiny_llama_config, write_sentiment_csv
from deltatune.cli import main
from deltatune.devices import describe_device, resolve_device
from deltatune.distributed import share_of
from deltatune.errors import DeltatuneError
from deltatune.records import ProcessesRecord
from deltatune.run import data_record, run_training
from deltatune.training import TrainConfig, gradient_checkpointing

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
ROOT = Path(__file__).resolve().parents[1]


def save_dropout_free_model(path: Path) -> Path:
    """A tiny BERT without dropout, so runs that draw different dropout masks (one rank per share of a
    batch) can be compared exactly."""
    from transformers import AutoModel

    torch.manual_seed(0)
    config = tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    AutoModel.from_config(config).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def toy(tmp_path):
    model_dir = save_dropout_free_model(tmp_path / "tiny-bert")
    csv_path = write_sentiment_csv(tmp_path / "toy.csv", 96)
    return model_dir, csv_path


def test_device_names_resolve_or_are_refused_with_the_fix():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(DeltatuneError, match="must be one of auto, cpu, cuda, cuda:N, mps"):
        resolve_device("gpu")
    with pytest.raises(DeltatuneError, match="device='tpu'"):
        TrainConfig(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeltatuneError, match=r"--device cuda:1: no CUDA GPU is available here.*--device cpu"):
            resolve_device("cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU, so --device cuda is valid")
def test_cuda_on_a_machine_without_one_is_a_one_line_error(toy, tmp_path, capsys):
    model_dir, csv_path = toy
    code = main(
        [
            "train",
            "--model",
            str(model_dir),
            "--data",
            str(csv_path),
            "--text-fields",
            "text",
            "--max-steps",
            "1",
            "--quiet",
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    error = capsys.readouterr().err
    assert code == 2
    assert "--device cuda: no CUDA GPU is available here" in error and "Use --device cpu" in error
    assert "Traceback" not in error and not (tmp_path / "out").exists()


def test_device_cpu_is_bit_identical_to_a_run_without_the_flag(tmp_path):
    from conftest import save_tiny_model_dir

    model_dir = save_tiny_model_dir(tmp_path / "tiny-bert", "bert")  # with dropout: fast dropout masks too
    data = data_record(
        "toy", local={"path": str(write_sentiment_csv(tmp_path / "toy.csv", 96)), "text_fields": ["text"]}
    )
    settings = dict(max_steps=6, batch_size=16, eval_every=3, learning_rate=3e-3, quiet=True, seed=5)
    plain = run_training(str(model_dir), data, "lora", {}, TrainConfig(**settings), out=tmp_path / "plain")
    on_cpu = run_training(str(model_dir), data, "lora", {}, TrainConfig(**settings, device="cpu"), out=tmp_path / "cpu")
    first, second = (
        load_file(tmp_path / "plain" / "delta.safetensors"),
        load_file(tmp_path / "cpu" / "delta.safetensors"),
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert [point["metrics"] for point in plain.learning_curve] == [point["metrics"] for point in on_cpu.learning_curve]
    assert on_cpu.device.device == "cpu" and on_cpu.device.name
    assert on_cpu.device.precision == on_cpu.precision
    assert on_cpu.distributed == ProcessesRecord(processes=1, backend="none")


def test_fp16_is_for_cuda_only():
    from deltatune.precision import resolve_precision

    assert resolve_precision("auto", "mps") == "fp32"
    with pytest.raises(DeltatuneError, match="precision=fp16 needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")


def test_the_record_names_the_cpu_model():
    described = describe_device(torch.device("cpu"), "fp32")
    assert described["device"] == "cpu" and described["precision"] == "fp32"
    assert isinstance(described["name"], str) and described["name"]


def test_each_rank_takes_a_contiguous_share_and_the_shares_make_the_batch():
    batch = list(range(10, 21))
    shares = [share_of(batch, rank, 3) for rank in range(3)]
    assert [len(share) for share in shares] == [4, 4, 3]
    assert sum(shares, []) == batch


def checkpointing(model) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def test_gradient_checkpointing_gives_the_same_gradients():
    model = build_tiny_model("bert")
    model.config.hidden_dropout_prob = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    input_ids = torch.randint(5, 30, (4, 12))
    labels = torch.tensor([0, 1, 1, 0])

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(input_ids=input_ids).logits, labels).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    with gradient_checkpointing(model):
        assert checkpointing(model)
        checkpointed = gradients()
    assert not checkpointing(model)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_trains_through_the_cli(toy, tmp_path, capsys):
    model_dir, csv_path = toy
    code = main(
        [
            "train",
            "--model",
            str(model_dir),
            "--data",
            str(csv_path),
            "--text-fields",
            "text",
            "--method",
            "bitfit",
            "--max-steps",
            "2",
            "--batch-size",
            "8",
            "--quiet",
            "--device",
            "cpu",
            "--gradient-checkpointing",
            "--json",
        ]
    )
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert record["train_config"]["gradient_checkpointing"] is True and record["steps"] == 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_command(model_dir: Path, csv_path: Path, out: Path) -> list[str]:
    return [
        "-m",
        "deltatune.cli",
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(csv_path),
        "--text-fields",
        "text",
        "--method",
        "full",
        "--max-steps",
        "8",
        "--batch-size",
        "8",
        "--eval-every",
        "2",
        "--early-stopping-patience",
        "1",
        "--learning-rate",
        "3e-3",
        "--precision",
        "fp32",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--seed",
        "3",
        "--out",
        str(out),
    ]


def one_then_two_processes(
    toy, tmp_path: Path, launcher: list[str], extra: tuple[str, ...] | list[str] = ()
) -> tuple[subprocess.CompletedProcess, set]:
    """Train once in one process (into tmp_path/one), then under `launcher` with two (tmp_path/two, with the
    `extra` flags); returns the launched run and what it added to tmp_path."""
    model_dir, csv_path = toy
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    single = subprocess.run(
        [sys.executable, *train_command(model_dir, csv_path, tmp_path / "one")],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    before = set(tmp_path.iterdir())
    launched = subprocess.run(
        [sys.executable, "-m", *launcher, *train_command(model_dir, csv_path, tmp_path / "two"), *extra],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    return launched, set(tmp_path.iterdir()) - before


def largest_delta_difference(first: Path, second: Path) -> float:
    one, two = load_file(first / "delta.safetensors"), load_file(second / "delta.safetensors")
    assert one.keys() == two.keys()
    return max(float((one[name] - two[name]).abs().max()) for name in one)


def test_two_processes_under_torchrun_train_the_same_delta_as_one(toy, tmp_path):
    launched, added = one_then_two_processes(
        toy,
        tmp_path,
        [
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--nnodes",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
        ],
    )
    assert launched.stdout.count("saved to") == 1  # rank 0 alone speaks
    assert added == {tmp_path / "two"}  # rank 0 alone wrote, and only its run (no lock or staging left)
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert record["distributed"] == {"processes": 2, "backend": "gloo"}
    difference = largest_delta_difference(tmp_path / "one", tmp_path / "two")
    assert difference < 1e-5, difference
    single_record = json.loads((tmp_path / "one" / "run.json").read_text())
    # rank 0's early-stopping decision reached rank 1: both stopped where one process stops
    assert record["stopped_by"] == single_record["stopped_by"] == "early_stopping"
    assert record["steps"] == single_record["steps"] < 8
    assert record["examples_seen"] == single_record["examples_seen"]
    assert [point["metrics"] for point in record["learning_curve"]] == [
        point["metrics"] for point in single_record["learning_curve"]
    ]


def test_fsdp_over_two_processes_trains_and_saves_the_whole_decoder_as_one_process_does(tmp_path):
    """Full fine-tuning of a tiny Llama sharded over 2 CPU processes (FSDP2, gloo): the saved delta holds
    every tensor at full size, equal to one unsharded process's within float tolerance, and reloads to the
    metrics the sharded run recorded."""
    from transformers import AutoModel

    import deltatune

    torch.manual_seed(0)
    AutoModel.from_config(tiny_llama_config()).save_pretrained(tmp_path / "tiny-llama")
    build_tokenizer().save_pretrained(tmp_path / "tiny-llama")
    csv_path = write_sentiment_csv(tmp_path / "toy.csv", 96)
    launcher = [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--nnodes",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]
    launched, added = one_then_two_processes(
        (tmp_path / "tiny-llama", csv_path), tmp_path, launcher[1:], extra=["--fsdp"]
    )
    assert added == {tmp_path / "two"} and launched.stdout.count("saved to") == 1
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert record["distributed"] == {"processes": 2, "backend": "gloo", "fsdp": True}
    one, two = load_file(tmp_path / "one" / "delta.safetensors"), load_file(tmp_path / "two" / "delta.safetensors")
    assert {name: t.shape for name, t in one.items()} == {name: t.shape for name, t in two.items()}
    assert any("layers.1.mlp" in name for name in two)  # complete: the last layer's shards were gathered too
    assert largest_delta_difference(tmp_path / "one", tmp_path / "two") < 1e-5
    single_record = json.loads((tmp_path / "one" / "run.json").read_text())
    assert record["steps"] == single_record["steps"] and record["best_step"] == single_record["best_step"]
    reloaded = deltatune.load(tmp_path / "two").evaluate("dev", precision="fp32")
    assert reloaded["accuracy"] == pytest.approx(record["dev_metrics"]["accuracy"], abs=1e-9)


def test_fsdp_is_refused_for_a_small_delta_and_for_one_process(toy, tmp_path, capsys):
    model_dir, csv_path = toy
    command = train_command(model_dir, csv_path, tmp_path / "out")[2:] + ["--fsdp"]
    assert main(command) == 2
    assert "but this is one: start them with `torchrun --nproc_per_node N" in capsys.readouterr().err
    command[command.index("full")] = "lora"
    assert main(command) == 2
    assert "method 'lora' trains a small delta" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_accelerate_launch_trains_the_same_delta_as_one_process(toy, tmp_path):
    # --multi_gpu is accelerate's torch.distributed launcher; on a CPU-only machine deltatune takes gloo
    launched, added = one_then_two_processes(
        toy,
        tmp_path,
        [
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(free_port()),
        ],
    )
    assert added == {tmp_path / "two"}
    assert json.loads((tmp_path / "two" / "run.json").read_text())["distributed"]["processes"] == 2
    assert largest_delta_difference(tmp_path / "one", tmp_path / "two") < 1e-5


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(monkeypatch):
    from deltatune.training import _check_batch_divides

    with pytest.raises(DeltatuneError, match=r"batch_size=9 \(the global batch\) must be a multiple of processes"):
        _check_batch_divides(TrainConfig(batch_size=9), 2)
    _check_batch_divides(TrainConfig(batch_size=8, gradient_accumulation=2), 2)


@needs_cuda
def test_training_on_cuda_matches_the_cpu_and_records_the_gpu(toy, tmp_path):
    model_dir, csv_path = toy
    data = data_record("toy", local={"path": str(csv_path), "text_fields": ["text"]})
    settings = dict(max_steps=6, batch_size=16, eval_every=3, learning_rate=3e-3, quiet=True, seed=5, precision="fp32")
    on_cpu = run_training(str(model_dir), data, "lora", {}, TrainConfig(**settings, device="cpu"), out=tmp_path / "cpu")
    on_gpu = run_training(
        str(model_dir), data, "lora", {}, TrainConfig(**settings, device="cuda"), out=tmp_path / "gpu"
    )
    assert on_cpu.device.device == "cpu" and on_gpu.device.device == "cuda:0"
    assert on_gpu.device.name == torch.cuda.get_device_name(0)
    assert on_gpu.peak_device_memory_bytes > 0
    first, second = load_file(tmp_path / "cpu" / "delta.safetensors"), load_file(tmp_path / "gpu" / "delta.safetensors")
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=1e-3, atol=1e-4)
    mixed = run_training(
        str(model_dir), data, "lora", {}, TrainConfig(**{**settings, "precision": "auto"}, device="cuda")
    )
    assert mixed.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


@needs_cuda
def test_fp16_with_loss_scaling_trains_on_cuda(toy):
    model_dir, csv_path = toy
    data = data_record("toy", local={"path": str(csv_path), "text_fields": ["text"]})
    record = run_training(
        str(model_dir),
        data,
        "full",
        {},
        TrainConfig(max_steps=4, batch_size=16, quiet=True, precision="fp16", device="cuda"),
    )
    assert record.precision == "fp16" and record.steps == 4


@needs_cuda
def test_eval_and_predict_run_on_cuda(toy, tmp_path, capsys):
    model_dir, csv_path = toy
    assert (
        main(
            [
                "train",
                "--model",
                str(model_dir),
                "--data",
                str(csv_path),
                "--text-fields",
                "text",
                "--max-steps",
                "2",
                "--quiet",
                "--device",
                "cuda",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--device", "cuda", "--json"]) == 0
    on_gpu = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tmp_path / "run"), "--device", "cpu", "--precision", "fp32", "--json"]) == 0
    on_cpu = json.loads(capsys.readouterr().out)
    assert on_gpu.keys() == on_cpu.keys()
    assert main(["predict", str(tmp_path / "run"), "a good film", "--device", "cuda"]) == 0


def test_a_grid_cell_keeps_its_identity_at_the_default_device_and_names_any_other():
    from deltatune.compare.spec import train_config_for
    from deltatune.compare.spec_checks import _check_train

    problems: list[str] = []
    default = _check_train({"epochs": 1}, "", problems)
    on_gpu = _check_train({"epochs": 1, "device": "cuda", "gradient_checkpointing": True}, "", problems)
    assert not problems
    assert "device" not in default and "gradient_checkpointing" not in default  # stored grids resume
    assert on_gpu["device"] == "cuda" and on_gpu["gradient_checkpointing"] is True
    cell = {"train": on_gpu, "data_fraction": 1.0, "seed": 1, "time_budget_s": None}
    assert train_config_for(cell).device == "cuda"
