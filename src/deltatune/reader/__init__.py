"""The frozen reader (Levine et al. 2022, arXiv:2204.10019): a frozen decoder answers questions by reading
passages that BM25 retrieves and a small trained re-ranker orders; a soft prompt in front of the decoder
is the only other trained part.

    from deltatune.reader import ReaderConfig, run_reader_training, evaluate_reader
    run_reader_training("smollm2-135m", "wikitext-cloze", ReaderConfig(top_k=3), out="runs/reader")
    report = evaluate_reader("runs/reader", against=("runs/reader-closed",))

Modules: `config` (ReaderConfig), `data` (QA examples, JSONL and hub loading, SQuAD scoring), `cloze`
(the offline WikiText-2 cloze task), `retrieval` (BM25), `model` (soft prompt, re-ranker, decoding),
`pipeline` (training and answering), `artifact` (run, save, load, evaluate), `command` (the
`deltatune reader` subcommands). Names are imported on first use.
"""

from importlib import import_module

_EXPORTS = {
    "ReaderConfig": "config",
    "QADataset": "data",
    "QAExample": "data",
    "exact_match": "data",
    "token_f1": "data",
    "load_qa_hub": "data",
    "load_qa_jsonl": "data",
    "ClozeConfig": "cloze",
    "load_wikitext_cloze": "cloze",
    "BM25Index": "retrieval",
    "FrozenReader": "pipeline",
    "answer_questions": "pipeline",
    "train_reader": "pipeline",
    "evaluate_reader": "artifact",
    "load_reader": "artifact",
    "run_reader_training": "artifact",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deltatune.reader' has no attribute {name!r}")
    return getattr(import_module(f"deltatune.reader.{_EXPORTS[name]}"), name)


__all__ = sorted(_EXPORTS)
