"""`deltatune merge`: task arithmetic, soups, TIES and DARE on task vectors, checked against their formulas
and against PEFT's `add_weighted_adapter` at equal inputs; refusals; merged runs that load and evaluate."""

import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune
from conftest import save_tiny_model_dir
from deltatune.cli import main
from deltatune.errors import DeltatuneError
from deltatune.merge import MergeConfig, merge_runs, merge_task_vectors
from test_load_many import SENTIMENT, TEXTS, TOPIC, make_run, write_toy_csv

LAYERS = [f"bert.encoder.layer.{i}.attention.self.{target}" for i in range(2) for target in ("query", "value")]


@pytest.fixture
def base(tmp_path):
    return save_tiny_model_dir(tmp_path / "base", "bert")


def lora_update(run, module):
    tensors = load_file(str(run / "delta.safetensors"))
    config = json.loads((run / "deltatune.json").read_text())["method_config"]
    return tensors[f"{module}.lora_B"] @ tensors[f"{module}.lora_A"] * (config["alpha"] / config["r"])


def test_task_arithmetic_of_two_loras_is_the_sum_of_their_weight_updates(tmp_path, base):
    first = make_run(tmp_path / "a", base, "lora", SENTIMENT, 1)
    second = make_run(tmp_path / "b", base, "lora", SENTIMENT, 2, {"r": 4, "alpha": 12.0})
    (merged,) = merge_runs([first, second], tmp_path / "sum", MergeConfig(how="task-arithmetic"))
    for module in LAYERS:
        torch.testing.assert_close(
            lora_update(merged, module), lora_update(first, module) + lora_update(second, module), rtol=0, atol=1e-6
        )
    manifest = json.loads((merged / "deltatune.json").read_text())
    assert manifest["method_config"]["r"] == 12 and manifest["merge"]["how"] == "task-arithmetic"
    (soup,) = merge_runs([first, second], tmp_path / "soup", MergeConfig(how="linear", weights=(1.0, 3.0)))
    for module in LAYERS:
        torch.testing.assert_close(
            lora_update(soup, module),
            0.25 * lora_update(first, module) + 0.75 * lora_update(second, module),
            rtol=0,
            atol=1e-6,
        )
    heads = [load_file(str(run / "delta.safetensors"))["classifier.weight"] for run in (first, second, soup)]
    torch.testing.assert_close(heads[2], 0.25 * heads[0] + 0.75 * heads[1])  # one task: the heads are souped too
    assert deltatune.load(soup).predict("a good movie")[0]["label"] in SENTIMENT.labels


def test_ties_keeps_the_largest_entries_elects_signs_and_averages_the_agreeing_ones():
    vectors = [torch.tensor([3.0, -1.0, 0.5, -2.0]), torch.tensor([-1.0, -4.0, 0.2, 2.0])]
    merged = merge_task_vectors(vectors, [1.0, 1.0], MergeConfig(how="ties", density=0.5))
    # trimmed: [3, 0, 0, -2] and [0, -4, 0, 2]; signs: sum (3, -4, 0, 0) -> +, -, +, +
    assert merged.tolist() == [3.0, -4.0, 0.0, 2.0]
    frequency = merge_task_vectors(vectors, [1.0, 1.0], MergeConfig(how="ties", density=1.0, majority_sign="frequency"))
    assert frequency.tolist() == pytest.approx(
        [3.0, -2.5, 0.35, 2.0]
    )  # entry 0: +1 and -1 votes tie -> +, only 3 agrees
    dropped = merge_task_vectors(
        [torch.ones(10_000)], [1.0], MergeConfig(how="dare", density=0.25), torch.Generator().manual_seed(0)
    )
    assert set(dropped.unique().tolist()) == {0.0, 4.0} and abs(dropped.mean().item() - 1.0) < 0.05


def without_head(adapter):
    """PEFT merges only adapters without a trained head (modules_to_save): drop it from the export."""
    from safetensors.torch import save_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    config["modules_to_save"], config["task_type"] = None, None  # SEQ_CLS would add the head back
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file(
        {name: tensor for name, tensor in tensors.items() if "classifier" not in name},
        str(adapter / "adapter_model.safetensors"),
    )
    return adapter


def peft_merged_updates(tmp_path, runs, combination, weights, **options):
    """PEFT's add_weighted_adapter on the same LoRA deltas (exported to PEFT's format): each layer's update."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    from deltatune.peft_export import export_peft

    adapters = [without_head(export_peft(run, tmp_path / f"peft-{i}")) for i, run in enumerate(runs)]
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "base"), num_labels=2)
    model = peft.PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
    for i, adapter in enumerate(adapters[1:], start=1):
        model.load_adapter(str(adapter), adapter_name=f"a{i}")
    model.add_weighted_adapter(
        [f"a{i}" for i in range(len(runs))], list(weights), "merged", combination_type=combination, **options
    )
    modules = dict(model.named_modules())
    return {layer: modules[f"base_model.model.{layer}"].get_delta_weight("merged") for layer in LAYERS}


def test_concatenation_equals_peft_cat_at_equal_inputs(tmp_path, base):
    runs = [make_run(tmp_path / f"r{i}", base, "lora", SENTIMENT, i) for i in (1, 2)]
    (merged,) = merge_runs(runs, tmp_path / "ours", MergeConfig(how="task-arithmetic", weights=(0.7, -0.4)))
    theirs = peft_merged_updates(tmp_path, runs, "cat", (0.7, -0.4))
    for layer in LAYERS:
        torch.testing.assert_close(lora_update(merged, layer), theirs[layer], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "how, combination", [("ties", "ties_svd"), ("dare", "dare_linear_svd"), ("dare-ties", "dare_ties_svd")]
)
def test_ties_and_dare_equal_peft_at_equal_inputs_and_equal_drop_masks(tmp_path, base, monkeypatch, how, combination):
    """TIES is deterministic. DARE is random: deltatune's drop masks are recorded and PEFT is handed the
    same masks (its `torch.bernoulli` calls replay them, in the same order), so the rest of its DARE
    (rescaling, summing, sign election) is compared exactly. Full-rank SVD keeps the merged update whole."""
    runs = [make_run(tmp_path / f"r{i}", base, "lora", SENTIMENT, i) for i in (1, 2, 3)]
    weights = (0.5, 1.0, 0.8)
    recorded, real_bernoulli = [], torch.bernoulli

    def recording(probabilities, *args, **kwargs):
        mask = real_bernoulli(probabilities, *args, **kwargs)
        recorded.append(mask.clone())
        return mask

    monkeypatch.setattr(torch, "bernoulli", recording)
    (merged,) = merge_runs(runs, tmp_path / "ours", MergeConfig(how=how, weights=weights, density=0.6, rank=32, seed=3))
    replay = iter(recorded)
    monkeypatch.setattr(torch, "bernoulli", lambda probabilities, *a, **k: next(replay).to(probabilities.dtype))
    theirs = peft_merged_updates(tmp_path, runs, combination, weights, density=0.6, svd_rank=32)
    assert (len(recorded) == 3 * len(LAYERS)) == ("dare" in how)
    assert next(replay, None) is None, "PEFT drew as many masks as deltatune"
    for layer in LAYERS:
        torch.testing.assert_close(lora_update(merged, layer), theirs[layer], rtol=0, atol=2e-5)
    assert json.loads((merged / "deltatune.json").read_text())["merge"]["svd_relative_error_max"] < 1e-6


def test_tasks_merged_give_one_run_per_task_with_the_merged_body_and_its_own_head(tmp_path, base):
    sentiment = make_run(tmp_path / "s", base, "bitfit", SENTIMENT, 1)
    topic = make_run(tmp_path / "t", base, "bitfit", TOPIC, 2)
    written = merge_runs([sentiment, topic], tmp_path / "merged", MergeConfig(how="task-arithmetic"))
    assert [path.name for path in written] == ["sentiment", "topic"]
    from deltatune.sources.models import load_model_for_task

    original = dict(load_model_for_task(str(base), SENTIMENT)[0].named_parameters())
    bodies = [load_file(str(path / "delta.safetensors")) for path in written]
    sources = [load_file(str(run / "delta.safetensors")) for run in (sentiment, topic)]
    for name, value in bodies[0].items():
        if name.startswith("classifier"):
            continue
        assert torch.equal(value, bodies[1][name])
        torch.testing.assert_close(value, sources[0][name] + sources[1][name] - original[name], rtol=0, atol=1e-6)
    for body, source in zip(bodies, sources, strict=True):
        assert torch.equal(body["classifier.weight"], source["classifier.weight"])  # each task keeps its head
    assert deltatune.load(written[1]).predict(TEXTS)[0]["label"] in TOPIC.labels


def test_one_run_scaled_by_task_arithmetic_lies_between_the_base_and_the_run_with_its_own_head(tmp_path, base):
    """WiSE-FT: base + w·(run − base) for every body tensor; w = 0 is the base model, w = 1 the run."""
    from transformers import AutoModelForSequenceClassification

    run = make_run(tmp_path / "full", base, "full", SENTIMENT, 1)
    tuned = load_file(str(run / "delta.safetensors"))
    start = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=2).state_dict()
    body = [name for name in tuned if name in start and not name.startswith("classifier.")]
    assert body and all(not torch.equal(tuned[name], start[name]) for name in body)  # every tensor moved
    for weight in (0.0, 0.3, 1.0):
        (merged,) = merge_runs([run], tmp_path / f"w{weight}", MergeConfig(how="task-arithmetic", weights=(weight,)))
        tensors = load_file(str(merged / "delta.safetensors"))
        for name in body:
            torch.testing.assert_close(tensors[name], start[name] + weight * (tuned[name] - start[name]))
        assert torch.equal(tensors["classifier.weight"], tuned["classifier.weight"])  # the head as trained
        assert json.loads((merged / "deltatune.json").read_text())["merge"]["weights"] == [weight]
    assert deltatune.load(tmp_path / "w0.3").predict("a good movie")[0]["label"] in SENTIMENT.labels


def test_ia3_and_sparse_mask_merge_by_their_task_vectors(tmp_path, base):
    runs = [make_run(tmp_path / f"i{i}", base, "ia3", SENTIMENT, i) for i in (1, 2)]
    (merged,) = merge_runs(runs, tmp_path / "ia3", MergeConfig(how="task-arithmetic", weights=(0.5, 2.0)))
    tensors = [load_file(str(run / "delta.safetensors")) for run in (*runs, merged)]
    name = "bert.encoder.layer.0.attention.self.key.output_scale"
    torch.testing.assert_close(tensors[2][name], 1 + 0.5 * (tensors[0][name] - 1) + 2.0 * (tensors[1][name] - 1))
    masks = [make_run(tmp_path / f"m{i}", base, "sparse-mask", SENTIMENT, i, {"targets": ("query",)}) for i in (1, 2)]
    (dense,) = merge_runs(masks, tmp_path / "masks", MergeConfig(how="linear"))
    manifest = json.loads((dense / "deltatune.json").read_text())
    assert manifest["method"] == "full" and manifest["merge"]["from_method"] == "sparse-mask"
    single = [deltatune.load(run).model for run in masks]
    for model in single:
        model.__dict__["_deltatune_attached"].methods["default"].merge(model)
    weight = "bert.encoder.layer.0.attention.self.query.weight"
    from deltatune.methods.state import parameter_index

    expected = sum(0.5 * parameter_index(model).base[weight][1].detach() for model in single)
    torch.testing.assert_close(load_file(str(dense / "delta.safetensors"))[weight], expected)


def test_merges_that_make_no_sense_are_refused_saying_why(tmp_path, base):
    lora = make_run(tmp_path / "lora", base, "lora", SENTIMENT, 1)
    lora_keys = make_run(tmp_path / "lora-k", base, "lora", SENTIMENT, 2, {"targets": ("key",)})
    bitfit = make_run(tmp_path / "bitfit", base, "bitfit", SENTIMENT, 3)
    adapter = make_run(tmp_path / "adapter", base, "pfeiffer", SENTIMENT, 4, {"bottleneck_size": 4})
    stranger = make_run(
        tmp_path / "stranger", save_tiny_model_dir(tmp_path / "other", "bert", seed=7), "lora", SENTIMENT, 5
    )
    cases = [
        ([lora, bitfit], "different methods"),
        ([lora, stranger], "different base models"),
        ([adapter, adapter], "pfeiffer deltas are not changes of the base model's weights"),
        ([lora, lora_keys], "adapt different layers"),
    ]
    for runs, message in cases:
        with pytest.raises(DeltatuneError, match=message):
            merge_runs(runs, tmp_path / "out", MergeConfig())
    with pytest.raises(DeltatuneError, match="--how linear needs at least two run directories, got 1; one run merges"):
        merge_runs([lora], tmp_path / "out", MergeConfig(how="linear"))
    with pytest.raises(DeltatuneError, match="gives 1 weight"):
        merge_runs([lora, lora], tmp_path / "out", MergeConfig(weights=(1.0,)))
    with pytest.raises(DeltatuneError, match="--how 'soup' must be one of"):
        MergeConfig(how="soup")
    (tmp_path / "taken").mkdir()
    with pytest.raises(DeltatuneError, match="already exists"):
        merge_runs([lora, lora], tmp_path / "taken", MergeConfig())
    assert not (tmp_path / "out").exists()


def test_merge_from_the_command_line_evaluates_against_each_delta_and_eval_works_on_the_result(tmp_path, base, capsys):
    data = write_toy_csv(tmp_path / "toy.csv", 96)
    runs = [tmp_path / f"seed{seed}" for seed in (1, 2)]
    for seed, run in zip((1, 2), runs, strict=True):
        deltatune.train(
            str(base),
            data=data,
            method="lora",
            out=str(run),
            max_steps=8,
            batch_size=16,
            seed=seed,
            learning_rate=3e-2,
            quiet=True,
        )
    assert (
        main(["merge", *map(str, runs), "--how", "linear", "--out", str(tmp_path / "soup"), "--evaluate", "dev"]) == 0
    )
    printed = capsys.readouterr().out
    assert "| toy |" in printed and "merged (linear)" in printed and printed.count("own delta") == 2
    manifest = json.loads((tmp_path / "soup" / "deltatune.json").read_text())
    assert "accuracy" in manifest["metrics"]["dev"]
    assert main(["eval", str(tmp_path / "soup"), "--split", "test"]) == 0
    assert "dev accuracy" in (tmp_path / "soup" / "README.md").read_text()


def test_eval_limit_scores_the_first_examples_of_a_bi_encoder_run_as_evaluate_does(tmp_path, capsys):
    """`--eval-limit` on a bi-encoder (each text of a pair encoded alone) scores what `evaluate(limit=)` does."""
    from conftest import save_tiny_model_dir
    from test_heads import write_pairs

    base = save_tiny_model_dir(tmp_path / "bert", "bert")
    local = {"path": str(write_pairs(tmp_path / "pairs.csv", 80, 1)), "text_fields": ["a", "b"]}
    data = deltatune.data_record("pairs", local={**local, "label_field": "score", "regression": True})
    run = tmp_path / "run"
    deltatune.train(str(base), data=data, method="bitfit", out=str(run), head="bi-encoder", max_steps=2, quiet=True)
    argv = ["merge", str(run), "--weights", "0.5", "--out", str(tmp_path / "half"), "--evaluate", "dev"]
    assert main([*argv, "--eval-limit", "5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["evaluation"]
    half, own = deltatune.load(tmp_path / "half"), deltatune.load(run)
    assert rows[0]["pearson"] == half.evaluate("dev", limit=5)["pearson"] != half.evaluate("dev")["pearson"]
    assert rows[1]["pearson"] == own.evaluate("dev", limit=5)["pearson"]
    with pytest.raises(DeltatuneError, match="limit must be a positive whole number of examples or None"):
        own.evaluate("dev", limit=0)
