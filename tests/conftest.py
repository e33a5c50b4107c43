"""Tiny random models, a tokenizer and small data, all built here: no downloads, seconds on a CPU."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

WORDS = (
    "the a man woman child dog cat plays runs eats sings guitar piano ball food song "
    "happy sad good bad great awful movie film is was not very really fresh rotten "
    "spam free win call now prize hello friend meet later"
).split()


def build_tokenizer():
    """A word-level fast tokenizer over WORDS, with BERT-style special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + list(WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )


def tiny_bert_config(num_labels: int = 2, **overrides):
    from transformers import BertConfig

    settings = dict(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=0,
    )
    settings.update(overrides)
    return BertConfig(**settings)


def tiny_llama_config(num_labels: int = 2, **overrides):
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_tiny_model(kind: str = "bert", num_labels: int = 2, seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_bert_config(num_labels) if kind == "bert" else tiny_llama_config(num_labels)
    if num_labels == 1:
        config.problem_type = "regression"
    return AutoModelForSequenceClassification.from_config(config).eval()


def save_tiny_model_dir(path: Path, kind: str = "bert", num_labels: int = 2, seed: int = 0) -> Path:
    """A local model directory (config, safetensors weights, tokenizer) like a downloaded hub model."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    config = tiny_bert_config(num_labels) if kind == "bert" else tiny_llama_config(num_labels)
    AutoModel.from_config(config).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def delta_manifest(method, base_name: str, fingerprint: str = "0" * 64, task=None, **fields):
    """The manifest of a delta a test saves itself with `deltatune.delta.save_delta` (a toy sentiment task unless
    `task` is given; `fields` are further `DeltaManifest` fields)."""
    from deltatune.config import to_jsonable
    from deltatune.records import BaseModelRecord, DeltaManifest
    from deltatune.tasks.spec import TaskSpec

    return DeltaManifest(
        method=method.name,
        method_config=to_jsonable(method.config),
        base_model=BaseModelRecord(name=base_name, fingerprint=fingerprint),
        task=task or TaskSpec("toy", ("text",), ("negative", "positive")),
        **fields,
    )


def make_sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable toy task: 'good'-ish words mean positive, 'bad'-ish words negative."""
    rng = random.Random(seed)
    positive, negative = ["good", "great", "happy", "fresh"], ["bad", "awful", "sad", "rotten"]
    filler = ["the", "movie", "film", "is", "was", "very", "really", "a", "man", "dog"]
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(filler, 3) + [rng.choice(positive if label else negative)] + rng.sample(filler, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "positive" if label else "negative"})
    return rows


def write_sentiment_csv(path: Path, rows: int, seed: int = 0) -> Path:
    """make_sentiment_rows as a CSV file with a text and a label column."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(make_sentiment_rows(rows, seed))
    return path


@pytest.fixture
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def tiny_bert_dir(tmp_path):
    return save_tiny_model_dir(tmp_path / "tiny-bert", "bert")


@pytest.fixture
def tiny_llama_dir(tmp_path):
    return save_tiny_model_dir(tmp_path / "tiny-llama", "llama")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch, request):
    """Unit tests get an empty cache and no hub (no traffic leaves the machine); tests marked `mirror` share
    the real cache (fetching is slow)."""
    if "mirror" not in request.keywords:
        monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
