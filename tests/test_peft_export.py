"""Export to PEFT's adapter format, loaded back with the real `peft` and `transformers` packages.

A run directory exported with `export_peft` and loaded as a user would (the base by the name the
adapter records, then `PeftModel.from_pretrained`) must give deltatune's own predictions: class
probabilities for classification, scores for regression (the target scale folded into the head).
"""

import json

import pytest
import torch

from conftest import build_tokenizer, delta_manifest, save_tiny_model_dir
from deltatune.delta import fingerprint_backbone, load, save_delta
from deltatune.errors import DeltatuneError
from deltatune.methods import build_method, prepare_model
from deltatune.peft_export import export_peft, fold_target_scale, loadable_base_name
from deltatune.sources.models import load_model_for_task
from deltatune.tasks.spec import TaskSpec

peft = pytest.importorskip("peft")

TEXTS = ["the man plays guitar", "a good movie", "not very happy dog", "the film was really great"]
SENTIMENT = TaskSpec(
    "toy-sentiment", ("text",), ("negative", "neutral", "positive"), metric="accuracy", metrics=("accuracy",)
)
SCORES = TaskSpec("toy-scores", ("text",), score_range=(0.0, 5.0), metric="pearson", metrics=("pearson",))
TARGET_SCALE = (2.7, 1.3)  # mean and std of the training scores, as deltatune.json keeps them


def run_directory(tmp_path, kind, method_name, task):
    """A saved run: `method_name` on a local tiny base, every trainable tensor moved off its start."""
    base_dir = save_tiny_model_dir(tmp_path / f"base-{kind}", kind)
    torch.manual_seed(0)
    model, _ = load_model_for_task(str(base_dir), task)
    fingerprint = fingerprint_backbone(model)
    method = build_method(method_name)
    prepare_model(model, method)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    manifest = delta_manifest(
        method,
        str(base_dir),
        fingerprint,
        task,
        max_length=32,
        target_scale=list(TARGET_SCALE) if task.is_regression else None,
    )
    save_delta(tmp_path / "run", model, method, manifest)
    return tmp_path / "run"


def peft_outputs(adapter_dir):
    """What a user gets from plain transformers + peft, given only the adapter directory."""
    from transformers import AutoModelForSequenceClassification

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(
        config["base_model_name_or_path"], num_labels=len(config["id2label"])
    )
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    encoded = build_tokenizer()(TEXTS, padding=True, return_tensors="pt")
    encoded.pop("token_type_ids", None)
    with torch.no_grad():
        return model(**encoded).logits, config


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("method_name", ["lora", "ia3"])
def test_classification_export_gives_deltatunes_probabilities_and_label_names(tmp_path, kind, method_name):
    run = run_directory(tmp_path, kind, method_name, SENTIMENT)
    logits, config = peft_outputs(export_peft(run, tmp_path / "adapter"))
    expected = [
        [row["probabilities"][label] for label in SENTIMENT.labels]
        for row in load(run).predict(TEXTS, precision="fp32")
    ]
    torch.testing.assert_close(torch.softmax(logits, dim=-1), torch.tensor(expected), rtol=0, atol=1e-4)
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert config["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}


@pytest.mark.parametrize("method_name", ["lora", "ia3"])
def test_regression_export_folds_the_target_scale_into_the_head(tmp_path, method_name):
    run = run_directory(tmp_path, "bert", method_name, SCORES)
    logits, config = peft_outputs(export_peft(run, tmp_path / "adapter"))
    expected = [row["score"] for row in load(run).predict(TEXTS, precision="fp32")]
    assert max(abs(score - TARGET_SCALE[0]) for score in expected) > 0.1, "scores far from the mean test the fold"
    torch.testing.assert_close(logits[:, 0], torch.tensor(expected), rtol=0, atol=1e-4)
    assert config["id2label"] == {"0": "score"}


@pytest.mark.parametrize("method_name", ["lora", "ia3"])
def test_regression_export_of_a_head_without_a_bias_is_refused_saying_why(tmp_path, method_name):
    run = run_directory(tmp_path, "llama", method_name, SCORES)  # Llama's `score` layer has no bias
    with pytest.raises(
        DeltatuneError,
        match=r"head layer 'score' has no bias, so PEFT cannot add the mean: "
        r"plain peft \+ transformers would predict every score 2.7 too low",
    ):
        export_peft(run, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_folding_a_scale_whose_mean_is_zero_needs_no_bias():
    head = {"score.weight": torch.tensor([[1.0, -2.0]])}
    assert torch.equal(fold_target_scale(head, (0.0, 3.0))["score.weight"], torch.tensor([[3.0, -6.0]]))
    with pytest.raises(DeltatuneError, match="Cannot tell which layer"):
        fold_target_scale({"classifier.weight": torch.ones(2, 4), "classifier.bias": torch.ones(2)}, (1.0, 2.0))


def test_the_recorded_base_is_one_a_user_can_load(tmp_path, monkeypatch):
    assert loadable_base_name("minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"
    assert loadable_base_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert loadable_base_name("org/some-model") == "org/some-model"
    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert loadable_base_name("models/mine") == str(tmp_path / "models" / "mine")
