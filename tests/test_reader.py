"""The frozen reader on a tiny random Llama: scoring, data, the cloze task, retrieval, training, the CLI."""

import json

import numpy as np
import pytest
import torch

from conftest import build_tokenizer, tiny_llama_config
from deltatune.errors import DeltatuneError
from deltatune.reader.cloze import BLANK, ClozeConfig, detokenize, load_wikitext_cloze
from deltatune.reader.config import ReaderConfig
from deltatune.reader.data import (
    QADataset,
    QAExample,
    contains_answer,
    exact_match,
    load_qa_jsonl,
    normalize_answer,
    token_f1,
)
from deltatune.reader.model import frozen_weights_digest
from deltatune.reader.pipeline import FrozenReader, answer_questions, score_answers, train_reader
from deltatune.reader.retrieval import BM25Index
from test_freelm import one_thread  # noqa: F401 (an autouse fixture: tiny models run fastest on one thread)


def tiny_causal_lm(seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


# ------------------------------------------------------------------------------------------- scoring


def test_squad_normalisation_exact_match_and_f1():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("the cat.", ["Cat"]) == 1.0 and exact_match("a dog", ["cat", "dogs"]) == 0.0
    assert token_f1("the big cat", ["a cat sat"]) == pytest.approx(0.5)  # big cat vs cat sat: 1 of 2 each way
    assert token_f1("cat", ["dog", "the cat"]) == 1.0  # the best gold answer counts
    assert token_f1("", ["cat"]) == 0.0 and token_f1("the", ["a"]) == 1.0  # both empty after normalising
    assert contains_answer("In 1999, the band released it.", ["1999"])
    assert not contains_answer("In 19990 the band released it.", ["1999"])


# ------------------------------------------------------------------------------------------- data


def test_jsonl_reads_context_and_passages_forms(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [
        {"question": "who plays?", "context": "the man plays guitar", "answers": {"text": ["the man"]}},
        {
            "question": "what is good?",
            "passages": ["the movie is good", "the man plays guitar"],
            "answers": "the movie",
        },
        {"question": "again?", "context": "the movie is good", "answers": ["movie", "the movie"]},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    dataset = load_qa_jsonl(path)
    assert dataset.passages == ["the man plays guitar", "the movie is good"]  # deduplicated
    examples = dataset.split("test")
    assert [e.answers for e in examples] == [("the man",), ("the movie",), ("movie", "the movie")]
    assert [e.passage_id for e in examples] == [0, None, 1]  # only a single context is "the question's own"


def test_jsonl_keeps_every_new_passage_of_a_line_at_its_id(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [
        {"question": "which?", "passages": ["first text", "second text", "first text"], "answers": "first"},
        {"question": "and?", "context": "third text", "answers": "third"},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    dataset = load_qa_jsonl(path)
    assert dataset.passages == ["first text", "second text", "third text"]
    assert dataset.split("test")[1].passage_id == 2
    assert dataset.passages[dataset.split("test")[1].passage_id] == "third text"


def test_jsonl_problems_are_collected_with_line_numbers(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "context": "c"}\nnot json\n{"question": "q", "answers": "a"}\n')
    with pytest.raises(DeltatuneError, match=r"line 1: no 'answers'.*line 2: not JSON.*line 3: needs 'context'"):
        load_qa_jsonl(path)
    with pytest.raises(DeltatuneError, match="does not exist"):
        load_qa_jsonl(tmp_path / "missing.jsonl")


def test_hub_loading_reads_squad_columns_and_shares_contexts(monkeypatch):
    import datasets

    from deltatune.reader.data import load_qa_hub

    rows = {
        "id": ["a", "b", "c"],
        "question": ["who plays?", "what is good?", "who again?"],
        "context": ["the man plays guitar", "the movie is good", "the man plays guitar"],
        "answers": [
            {"text": ["the man"], "answer_start": [0]},
            {"text": ["movie"], "answer_start": [4]},
            {"text": ["man", "the man"], "answer_start": [4, 0]},
        ],
    }
    calls = []

    def fake_load(dataset_id, config=None, split=None):
        calls.append((dataset_id, config, split))
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    dataset = load_qa_hub("rajpurkar/squad", ("train", "validation"), max_examples=3)
    assert calls == [("rajpurkar/squad", None, "train"), ("rajpurkar/squad", None, "validation")]
    assert dataset.passages == ["the man plays guitar", "the movie is good"]
    assert [e.passage_id for e in dataset.split("dev")] == [0, 1, 0]
    assert dataset.split("train")[2].answers == ("man", "the man")

    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DeltatuneError, match="Could not load 'rajpurkar/squad'.*local JSONL"):
        load_qa_hub("rajpurkar/squad")


WIKI = {
    "train": [
        "= Alpha Band =",
        "The Alpha Band formed in 1990 in Red City with John Smith on guitar .",
        "= = History = =",
        "John Smith left the group in 1995 , and Red City mourned the news .",
        "In 1995 the band played Red City one last time and John Smith returned .",
    ],
    "validation": [
        "= Beta Town =",
        "Beta Town lies near Green River and was founded in 1850 by settlers .",
        "The Green River flooded Beta Town in 1850 and again in 1902 , said Mary Jones .",
    ],
    "test": [
        "= Gamma Ship =",
        "The Gamma Ship sailed from Port Royal in 1766 under Captain James Cook today .",
        "Captain James Cook later returned to Port Royal in 1771 after a long voyage home .",
    ],
}


def test_cloze_questions_blank_a_mention_found_in_another_paragraph_of_the_article():
    dataset = load_wikitext_cloze(ClozeConfig(seed=3), lines_by_split=WIKI)
    again = load_wikitext_cloze(ClozeConfig(seed=3), lines_by_split=WIKI)
    assert [e.question for e in dataset.split("test")] == [e.question for e in again.split("test")]  # seeded
    assert dataset.exclude_own_passage
    for split in ("train", "dev", "test"):
        assert dataset.split(split), split
        for example in dataset.split(split):
            (answer,) = example.answers
            own = dataset.passages[example.passage_id]
            assert BLANK in example.question and answer not in example.question
            assert example.question.replace(BLANK, answer) in own
            others = [p for i, p in enumerate(dataset.passages) if i != example.passage_id]
            assert any(answer in p for p in others)
    assert detokenize("a 1 @,@ 000 @-@ ton ship , the crew 's cat .") == "a 1,000-ton ship, the crew's cat."


def test_bm25_leaves_out_the_excluded_passage_and_ranks_overlap_first():
    passages = ["the cat sat on the mat", "dogs are loyal animals", "a cat and a mat", "the band played in 1999"]
    index = BM25Index(passages)
    ids, scores = index.retrieve(["cat mat", "band 1999"], k=2, exclude=[[0], []])
    assert ids[0, 0] == 2 and 0 not in ids[0]
    assert ids[1, 0] == 3 and scores[1, 0] > scores[1, 1]
    with pytest.raises(DeltatuneError, match="empty"):
        BM25Index([])


# ------------------------------------------------------------------------------------------- the reader


def toy_dataset() -> QADataset:
    """Questions whose answer word sits in a passage sharing the question's other words."""
    words = ["guitar", "piano", "ball", "food", "song"]
    passages, train, test = [], [], []
    for index, word in enumerate(words):
        passages.append(f"the man plays {word} now")
        passages.append(f"the dog eats {word} later")
        example = QAExample(f"what does the man play {index}", (word,), None)
        (train if index < 3 else test).append(example)
    return QADataset("toy", passages, {"train": train * 4, "test": test})


def test_training_changes_only_the_prompt_and_reranker_and_saves_and_reloads(tmp_path):
    from deltatune.reader.artifact import _publish, load_reader

    causal = tiny_causal_lm()
    before = frozen_weights_digest(causal)
    config = ReaderConfig(
        top_k=2,
        candidates=4,
        prompt_tokens=4,
        passage_tokens=8,
        steps=6,
        batch_size=2,
        reranker_steps=5,
        train_examples=8,
        answer_tokens=3,
        quiet=True,
        learning_rate=0.1,
    )
    reader = FrozenReader(causal, build_tokenizer(), config)
    dataset = toy_dataset()
    index = BM25Index(dataset.passages)
    summary = train_reader(reader, dataset, index)
    assert frozen_weights_digest(causal) == before == summary["decoder_weights_sha256"]
    assert not any(p.requires_grad for p in causal.parameters())
    assert set(reader.trained_parameters()) == {
        "prompt.vectors",
        "reranker.projection",
        "reranker.dense_weight",
        "reranker.bm25_weight",
    }
    assert len(summary["prompt_losses"]) == 6 and summary["train_questions"] == 8

    examples = dataset.split("test")
    answers, facts = answer_questions(reader, dataset, examples, index, top_k=2)
    assert len(answers) == len(examples) and 0 <= facts["answer_in_passages"] <= 1
    scores = score_answers(answers, examples)
    assert len(scores["per_question"]["f1"]) == len(examples)

    out = tmp_path / "reader"
    tensors = {n: t.detach().clone() for n, t in reader.trained_parameters().items()}
    _publish(
        out,
        tensors,
        {
            "kind": "frozen-reader",
            "model": "tiny",
            "data": "toy",
            "config": vars(config),
            "question_template": reader.question_template,
            "training": summary,
        },
    )
    reloaded = load_reader(out, tiny_causal_lm(), build_tokenizer())
    again, _ = answer_questions(reloaded, dataset, examples, index, top_k=2)
    assert again == answers
    with pytest.raises(DeltatuneError, match="weights digest"):
        load_reader(out, tiny_causal_lm(seed=1), build_tokenizer())


def test_closed_book_reads_no_passage_and_prompt_steps_lower_the_answer_loss():
    causal = tiny_causal_lm()
    config = ReaderConfig(
        top_k=0,
        rerank=False,
        prompt_tokens=4,
        steps=40,
        batch_size=4,
        train_examples=12,
        answer_tokens=2,
        quiet=True,
        learning_rate=0.3,
    )
    reader = FrozenReader(causal, build_tokenizer(), config)
    dataset = toy_dataset()
    summary = train_reader(reader, dataset, None)
    assert reader.reranker is None and reader.prompt is not None
    assert summary["prompt_loss_last_10"] < summary["prompt_loss_first_10"]
    answers, facts = answer_questions(reader, dataset, dataset.split("test"), None, top_k=0)
    assert facts == {"top_k": 0} and len(answers) == 2


def test_an_untrained_reranker_keeps_bm25s_order():
    from deltatune.reader.model import Reranker, reranker_loss

    reranker = Reranker(8, rank=4)
    generator = torch.Generator().manual_seed(0)
    bm25 = torch.rand(3, 5, generator=generator) * 10
    scores = reranker(torch.randn(3, 8, generator=generator), torch.randn(3, 5, 8, generator=generator), bm25)
    assert torch.equal(scores.argsort(dim=1), bm25.argsort(dim=1))
    positive = torch.zeros(3, 5, dtype=torch.bool)
    positive[0, 2] = positive[0, 4] = True  # rows without a positive passage do not count
    expected = -torch.logsumexp(torch.log_softmax(scores[0], 0)[[2, 4]], 0)
    torch.testing.assert_close(reranker_loss(scores, positive), expected)


def test_reader_config_collects_problems():
    with pytest.raises(DeltatuneError, match=r"top_k=-1 must be 0 or more.*steps=0 must be at least 1"):
        ReaderConfig(top_k=-1, steps=0)
    with pytest.raises(DeltatuneError, match="candidates=2 must be at least top_k=3"):
        ReaderConfig(candidates=2)


def test_cli_trains_and_evaluates_against_a_closed_book_prompt(tmp_path, capsys, monkeypatch):
    import deltatune.reader.artifact as artifact
    from deltatune.cli import main

    model_dir = tmp_path / "tiny"
    tiny_causal_lm(seed=5).save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "qa.jsonl"
    dataset = toy_dataset()
    rows = [
        {"question": e.question, "passages": dataset.passages[:4], "answers": list(e.answers)}
        for e in dataset.split("train")[:6]
    ]
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    # a JSONL file is one split; train and evaluate on it (the test asserts the plumbing, not quality)
    monkeypatch.setattr(artifact, "load_qa_data", lambda name, *a, **k: _both_splits(load_qa_jsonl(name)))
    small = [
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--prompt-tokens",
        "2",
        "--passage-tokens",
        "6",
        "--reranker-steps",
        "2",
        "--candidates",
        "3",
        "--answer-tokens",
        "2",
        "--quiet",
    ]
    assert (
        main(
            [
                "reader",
                "train",
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--top-k",
                "2",
                "--out",
                str(tmp_path / "r"),
                *small,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "reader",
                "train",
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--top-k",
                "0",
                "--no-rerank",
                "--out",
                str(tmp_path / "closed"),
                *small,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["reader", "eval", str(tmp_path / "r"), "--against", str(tmp_path / "closed"), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "closed-book" in table and "open-book" in table and "run:closed" in table and "reader -" in table
    assert "nan" not in table
    report = json.loads((tmp_path / "r" / "reader_eval.json").read_text())
    assert set(report["systems"]) == {"closed-book", "open-book", "bm25-reader", "reader", "run:closed"}
    for system in report["systems"].values():
        low, high = system["f1_interval"]
        assert low <= system["f1"] <= high
    assert main(["reader", "train", "--top-k", "-2", "--candidates", "0"]) == 2
    assert "top_k=-2" in capsys.readouterr().err


def _both_splits(dataset: QADataset) -> QADataset:
    examples = dataset.split("test")
    return QADataset(dataset.name, dataset.passages, {"train": examples, "test": examples})


def test_bootstrap_interval_covers_the_mean():
    from deltatune.reader.artifact import bootstrap_mean_interval

    values = np.array([0, 1] * 50, dtype=float)
    low, high = bootstrap_mean_interval(values)
    assert low < 0.5 < high and high - low < 0.25
    assert bootstrap_mean_interval(np.ones(10)) == (1.0, 1.0)
