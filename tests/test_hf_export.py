"""`deltatune export --format hf`: a plain transformers model that `pipeline` loads and that predicts what
deltatune predicts; `--push-to-hub` tested up to the network calls (only those are replaced)."""

import json
from pathlib import Path

import pytest

import deltatune
from conftest import save_tiny_model_dir
from deltatune.cli import main
from deltatune.errors import DeltatuneError
from deltatune.hf_export import EXPORT_RECORD, export_hf, push_to_hub
from test_load_many import PAIRS, SCORES, SENTIMENT, TEXTS, TOPIC, make_run


def pipeline_for(directory, **options):
    from transformers import pipeline

    return pipeline("text-classification", model=str(directory), device="cpu", top_k=None, **options)


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("method", ["lora", "ia3", "bitfit", "full", "sparse-mask", "layernorm"])
def test_pipeline_on_the_export_gives_deltatunes_probabilities(tmp_path, kind, method):
    base = save_tiny_model_dir(tmp_path / "base", kind)
    run = make_run(tmp_path / "run", base, method, TOPIC, 3)
    out = export_hf(run, tmp_path / "export")
    expected = deltatune.load(run).predict(TEXTS, precision="fp32")
    answers = pipeline_for(out)(TEXTS)
    for answer, reference in zip(answers, expected, strict=True):
        got = {entry["label"]: entry["score"] for entry in answer}
        assert got.keys() == set(TOPIC.labels)
        for label, probability in reference["probabilities"].items():
            assert got[label] == pytest.approx(probability, abs=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "music", "1": "animals", "2": "food"} and config["label2id"]["food"] == 2
    assert not any(".deltas." in name or "base_layer" in name for name in _weights(out))


def _weights(directory):
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return list(handle.keys())


def test_regression_export_folds_the_scale_and_pairs_go_in_as_text_pairs(tmp_path):
    base = save_tiny_model_dir(tmp_path / "base", "bert")
    scores = make_run(tmp_path / "scores", base, "lora", SCORES, 4)
    out = export_hf(scores, tmp_path / "scores-export")
    expected = [row["score"] for row in deltatune.load(scores).predict(TEXTS, precision="fp32")]
    assert max(abs(score - 2.5) for score in expected) > 0.05, "scores off the mean test the fold"
    answers = pipeline_for(out, function_to_apply="none")(TEXTS)
    assert [answer[0]["score"] for answer in answers] == pytest.approx(expected, abs=1e-4)
    pairs = make_run(tmp_path / "pairs", base, "bitfit", PAIRS, 5)
    out = export_hf(pairs, tmp_path / "pairs-export")
    rows = [(text, TEXTS[-1 - i]) for i, text in enumerate(TEXTS)]
    expected = deltatune.load(pairs).predict([a for a, _ in rows], [b for _, b in rows], precision="fp32")
    answers = pipeline_for(out)([{"text": a, "text_pair": b} for a, b in rows])
    for answer, reference in zip(answers, expected, strict=True):
        assert {e["label"]: e["score"] for e in answer}[reference["label"]] == pytest.approx(
            reference["probabilities"][reference["label"]], abs=1e-5
        )


def test_methods_that_add_modules_are_refused_and_nothing_is_written(tmp_path):
    base = save_tiny_model_dir(tmp_path / "base", "bert")
    run = make_run(tmp_path / "run", base, "pfeiffer", SENTIMENT, 1, {"bottleneck_size": 4})
    with pytest.raises(DeltatuneError, match=r"'pfeiffer' delta adds modules.*--format peft"):
        export_hf(run, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    lora = make_run(tmp_path / "lora", base, "lora", SENTIMENT, 2)
    with pytest.raises(DeltatuneError, match="already exists"):
        export_hf(lora, tmp_path / "mine")
    with pytest.raises(DeltatuneError, match="not a deltatune export"):
        export_hf(lora, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    first = export_hf(lora, tmp_path / "export")
    assert export_hf(lora, first, overwrite=True) == first and (first / EXPORT_RECORD).is_file()


def test_the_export_carries_a_model_card_for_the_hub(tmp_path):
    import yaml

    base = save_tiny_model_dir(tmp_path / "base", "bert")
    out = export_hf(make_run(tmp_path / "run", base, "lora", SENTIMENT, 1), tmp_path / "export")
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["library_name"] == "transformers" and "deltatune" in front["tags"]
    assert 'pipeline("text-classification"' in text


def test_push_to_hub_uploads_the_export_through_huggingface_hub(tmp_path, monkeypatch):
    """Everything runs for real up to HfApi's two network calls, which record what they were asked."""
    from huggingface_hub import HfApi

    base = save_tiny_model_dir(tmp_path / "base", "bert")
    run = make_run(tmp_path / "run", base, "lora", SENTIMENT, 1)
    calls = []

    def create_repo(self, repo_id, **options):
        calls.append(("create_repo", repo_id, options, self.token))

    def upload_folder(self, *, repo_id, folder_path, **options):
        calls.append(("upload_folder", repo_id, sorted(path.name for path in Path(folder_path).iterdir()), options))
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert (
        main(
            [
                "export",
                str(run),
                "--format",
                "hf",
                "--out",
                str(tmp_path / "export"),
                "--push-to-hub",
                "someone/sentiment",
                "--hub-token",
                "hf_test",
                "--private",
            ]
        )
        == 0
    )
    (create, repo, options, token), (upload, uploaded_repo, files, upload_options) = calls
    assert (create, repo, token, options["private"], options["exist_ok"]) == (
        "create_repo",
        "someone/sentiment",
        "hf_test",
        True,
        True,
    )
    assert (upload, uploaded_repo, upload_options["repo_type"]) == ("upload_folder", "someone/sentiment", "model")
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", EXPORT_RECORD} <= set(files)
    with pytest.raises(DeltatuneError, match="must be a hub repository id 'owner/name'"):
        push_to_hub(tmp_path / "export", "no-owner")
    with pytest.raises(DeltatuneError, match="has neither config.json nor adapter_config.json"):
        push_to_hub(tmp_path, "someone/x")


def test_peft_export_still_works_from_the_command_line(tmp_path):
    base = save_tiny_model_dir(tmp_path / "base", "bert")
    run = make_run(tmp_path / "run", base, "lora", SENTIMENT, 1)
    assert main(["export", str(run), "--out", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not list((tmp_path / "adapter").glob("*.bin")), "safetensors only, no pickle"
