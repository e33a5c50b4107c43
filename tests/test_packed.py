"""Mixed batches run packed through the encoder (no padding in any linear layer) answer as padded ones do.

A tiny local BERT with deltas of every position-wise method; inputs of very different lengths, so the
padded batches would hold many padding positions and the engine chooses to pack them.
"""

import pytest
import torch

import deltatune
import deltatune.serve.multi as multi
from conftest import save_tiny_model_dir
from deltatune.batching import Encoded
from deltatune.serve.multi import MultiTaskModel
from deltatune.serve.packed import packable, packable_deltas, packed_encoder
from test_load_many import SENTIMENT, SIMILAR, TOPIC, make_run

POSITION_WISE = {"lora": {}, "ia3": {}, "bitfit": {}, "layernorm": {}, "houlsby": {"bottleneck_size": 4}}
POSITION_WISE["pfeiffer"] = {"bottleneck_size": 4}
TEXTS = [
    "good",
    "the film was long and slow but the ending made up for all of it and more than that",
    "a cat",
    "not very happy with this dog food at all",
    "music and food and animals and music and food and animals and more music",
    "fine",
]


@pytest.fixture(scope="module")
def served_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    base = save_tiny_model_dir(root / "base", "bert")
    runs = {}
    for seed, (method, options) in enumerate(POSITION_WISE.items(), start=1):
        task = SENTIMENT if seed % 2 else TOPIC
        runs[method] = make_run(root / method, base, method, task, seed, options)
    runs["prompt-tuning"] = make_run(root / "prompt", base, "prompt-tuning", SENTIMENT, 9, {"num_virtual_tokens": 3})
    return base, runs


class PackedCalls:
    """Counts forward passes run packed, and lets a test turn packing off."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        original = multi.packed_encoder

        def counting(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(multi, "packed_encoder", counting)
        self.monkeypatch = monkeypatch

    def disable(self) -> None:
        self.monkeypatch.setattr(multi, "packable_deltas", lambda model, names: False)


def predict_all(engine, names):
    tasks = [names[row % len(names)] for row in range(len(TEXTS) * 2)]
    return engine.predict(TEXTS * 2, task=tasks, precision="fp32", batch_size=8)


def test_every_position_wise_method_packed_answers_as_padded(served_runs, monkeypatch):
    _, runs = served_runs
    packed_runs = [runs[method] for method in POSITION_WISE]
    engine = deltatune.load_many(packed_runs, names=list(POSITION_WISE))
    calls = PackedCalls(monkeypatch)
    packed = predict_all(engine, list(POSITION_WISE))
    assert calls.count == 2  # 12 rows in batches of 8, both packed
    calls.disable()
    padded = predict_all(engine, list(POSITION_WISE))
    assert calls.count == 2
    for got, expected in zip(packed, padded, strict=True):
        assert got["label"] == expected["label"]
        for label, probability in expected["probabilities"].items():
            assert got["probabilities"][label] == pytest.approx(probability, abs=1e-5)


def save_tiny_roberta_dir(path):
    from transformers import AutoModel, RobertaConfig

    from conftest import WORDS, build_tokenizer

    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,  # RoBERTa's positions start after the padding index
        type_vocab_size=1,
        pad_token_id=0,
    )
    AutoModel.from_config(config).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def test_roberta_deltas_packed_answer_as_padded(tmp_path, monkeypatch):
    base = save_tiny_roberta_dir(tmp_path / "roberta")
    methods = {"lora": {}, "bitfit": {}, "pfeiffer": {"bottleneck_size": 4}}
    runs = [
        make_run(tmp_path / method, base, method, SENTIMENT if seed % 2 else TOPIC, seed, options)
        for seed, (method, options) in enumerate(methods.items(), start=1)
    ]
    engine = deltatune.load_many(runs, names=list(methods))
    calls = PackedCalls(monkeypatch)
    packed = predict_all(engine, list(methods))
    assert calls.count == 2
    calls.disable()
    padded = predict_all(engine, list(methods))
    for got, expected in zip(packed, padded, strict=True):
        assert got["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)


def test_each_delta_packed_alone_answers_as_its_delta_loaded_alone(served_runs, monkeypatch):
    _, runs = served_runs
    calls = PackedCalls(monkeypatch)
    for method in POSITION_WISE:
        engine = deltatune.load_many([runs[method]], names=[method])
        answers = engine.predict(TEXTS, task=method, precision="fp32")
        alone = deltatune.load(runs[method]).predict(TEXTS, precision="fp32")
        for got, expected in zip(answers, alone, strict=True):
            for label, probability in expected["probabilities"].items():
                assert got["probabilities"][label] == pytest.approx(probability, abs=1e-5), method
    assert calls.count == len(POSITION_WISE)


def test_a_prompt_delta_in_the_call_keeps_its_batches_padded(served_runs, monkeypatch):
    _, runs = served_runs
    engine = deltatune.load_many([runs["lora"], runs["prompt-tuning"]], names=["lora", "prompt"])
    calls = PackedCalls(monkeypatch)
    tasks = ["lora", "prompt"] * (len(TEXTS) // 2)
    answers = engine.predict(TEXTS, task=tasks, precision="fp32")
    assert calls.count == 0
    assert not packable_deltas(engine.model, ["lora", "prompt"])
    assert packable_deltas(engine.model, ["lora", None])
    prompt_rows = [row for row, task in enumerate(tasks) if task == "prompt"]
    alone = deltatune.load(runs["prompt-tuning"]).predict([TEXTS[row] for row in prompt_rows], precision="fp32")
    for row, expected in zip(prompt_rows, alone, strict=True):
        assert answers[row]["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)


def test_a_decoder_is_never_packed(tmp_path):
    from deltatune.sources.models import load_model_for_task

    base = save_tiny_model_dir(tmp_path / "llama", "llama")
    model, _ = load_model_for_task(str(base), SENTIMENT)
    assert not packable(model, [None])
    bert, _ = load_model_for_task(str(save_tiny_model_dir(tmp_path / "bert", "bert")), SENTIMENT)
    assert packable(bert, [None])


def test_the_embeddings_encoder_and_attention_are_restored_even_when_the_forward_fails(served_runs):
    from deltatune.methods.state import mixed_rows

    _, runs = served_runs
    engine = deltatune.load_many([runs["lora"]], names=["lora"])
    model = engine.model
    encoder, config = model.base_model.encoder, model.base_model.config
    implementation = config._attn_implementation
    features = engine.tokenizer(["a cat", "the film was long"], padding=True, return_tensors="pt")
    encoder.layer[0].register_forward_pre_hook(_stop)
    with mixed_rows(model) as mixer:
        mixer.route(["lora", "lora"])
        with pytest.raises(RuntimeError, match="stop"):
            with packed_encoder(model, mixer, features["attention_mask"]):
                model(**features)
        assert mixer.routing is not None and mixer.routing.index.shape == (2,)  # the rows' routing again
    assert "forward" not in vars(encoder) and "forward" not in vars(model.base_model.embeddings)
    assert config._attn_implementation == implementation


def _stop(module, args):
    raise RuntimeError("stop")


def test_batches_are_packed_only_where_padding_would_cost():
    # one long row among short ones: cutting it off costs a forward pass, so the padded batch keeps it
    short_and_long = Encoded({"input_ids": [[1] * length for length in (3, 4, 5, 30, 6, 7, 3, 4)]}, [0] * 8)
    similar = Encoded({"input_ids": [[1] * length for length in (30, 31, 30, 32, 31, 30)]}, [0] * 6)
    batches, packed = MultiTaskModel._batches(short_and_long, list(range(8)), 8, packable=True)
    assert packed and batches == [[0, 6, 1, 7, 2, 4, 5, 3]]  # sorted by length, as few batches as 8 rows allow
    batches, packed = MultiTaskModel._batches(short_and_long, list(range(8)), 4, packable=True)
    assert packed and batches == [[0, 6, 1, 7], [2, 4, 5, 3]]
    assert MultiTaskModel._batches(short_and_long, list(range(8)), 8, packable=False)[1] is False
    assert MultiTaskModel._batches(similar, list(range(6)), 4, packable=True)[1] is False


def rows_keep_their_bits(width: int, inner: int) -> bool:
    """Whether this machine's bf16 matmuls give a row the same bits whatever the rows beside it (2 to 512 rows, at
    the layers' shapes and the joined low-rank ones), and its attention whatever rows of the same length share the
    call (the tiny model's 4 heads): the kernel properties batch invariance builds on; a CPU without them gets the
    test skipped, not failed."""
    generator = torch.Generator().manual_seed(0)
    counts = [*range(3, 65), 100, 128, 200, 256, 400, 512]
    shapes = [(width, width), (width, inner), (inner, width), (width, 8), (8, width), (width, 24), (24, width)]
    for fan_in, fan_out in shapes:
        weight = torch.randn(fan_out, fan_in, generator=generator).bfloat16()
        rows = torch.randn(512, fan_in, generator=generator).bfloat16()
        first = torch.nn.functional.linear(rows[:2], weight)[:1]
        if any(not torch.equal(torch.nn.functional.linear(rows[:m], weight)[:1], first) for m in counts):
            return False
    for length in (3, 9, 17):  # and attention: a row alone, or among rows of its length
        query, key, value = (torch.randn(8, 4, length, width // 4, generator=generator).bfloat16() for _ in range(3))
        alone = torch.nn.functional.scaled_dot_product_attention(query[:1], key[:1], value[:1])
        together = torch.nn.functional.scaled_dot_product_attention(query, key, value)[:1]
        if not torch.equal(alone, together):
            return False
    return True


def test_batch_invariant_answers_do_not_depend_on_the_batch(tmp_path):
    """Bi-encoder scores (a cosine of pooled fp32 states, so the slightest difference in a row's hidden states
    shows): with batch_invariant, an input scores the same to the last bit alone, in the whole call, or among
    other inputs. Without it, 3 of these 12 scores differ between alone and together on the 2-core AMD Zen 4."""
    if not rows_keep_their_bits(32, 64):
        pytest.skip("this CPU's bf16 matmuls or attention give a row different bits in different batches")
    base = save_tiny_model_dir(tmp_path / "base", "bert")
    names = list(POSITION_WISE)
    runs = [
        make_run(tmp_path / method, base, method, SIMILAR, seed, options, head=("bi-encoder", "mean"))
        for seed, (method, options) in enumerate(POSITION_WISE.items(), start=1)
    ]
    engine = deltatune.load_many(runs, names=names, batch_invariant=True)
    pairs = [(text, TEXTS[-1 - row]) for row, text in enumerate(TEXTS)]
    pairs += [(text, TEXTS[(row + 2) % len(TEXTS)]) for row, text in enumerate(TEXTS)]
    tasks = [names[row % len(names)] for row in range(len(pairs))]
    options = {"precision": "bf16", "batch_size": 16}
    together = engine.predict(pairs, task=tasks, **options)
    alone = [engine.predict([pair], task=[task], **options)[0] for pair, task in zip(pairs, tasks, strict=True)]
    # in threes, last first: each input beside other inputs (one adapter or two at a site, other lengths)
    threes = [
        engine.predict(pairs[start : start + 3], task=tasks[start : start + 3], **options) for start in (9, 6, 3, 0)
    ]
    in_threes = [answer for chunk in reversed(threes) for answer in chunk]
    assert alone == together  # every score equal to the last bit
    assert in_threes == together


def test_batch_invariant_layout_groups_rows_of_one_length_without_a_mask():
    from deltatune.serve.packed import _layout

    lengths = [3, 5, 3, 4, 5, 5]
    groups = _layout(lengths, torch.device("cpu"), exact=True)
    assert sorted((group.rows, group.width) for group in groups) == [(1, 4), (2, 3), (3, 5)]
    assert all(group.key_mask is None for group in groups)
    assert sorted(token for group in groups for token in group.tokens.tolist()) == list(range(sum(lengths)))
    padded = _layout(lengths, torch.device("cpu"))
    assert any(group.key_mask is not None and not bool(group.key_mask.all()) for group in padded)
