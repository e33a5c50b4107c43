"""The run record and the delta manifest are typed records: what is written reads back equal, records and
manifests from earlier deltatune versions still load, and newer or damaged files are refused saying which
file, what is wrong and what to do."""

import dataclasses
import json
import shutil

import pytest

import deltatune
from conftest import save_tiny_model_dir
from deltatune.delta import read_manifest
from deltatune.errors import DeltatuneError
from deltatune.model_card import model_card, training_command
from deltatune.records import (
    RECORD_VERSION,
    DeltaManifest,
    GitState,
    RunRecord,
    read_run_record,
)
from deltatune.run import summarize
from test_load_many import write_toy_csv

# keys that records written before `schema_version` existed may lack (each was added by a later release)
KEYS_ADDED_LATER = (
    "head",
    "device",
    "peak_device_memory_bytes",
    "distributed",
    "planned_steps",
    "precision",
    "train_real_tokens_per_s",
    "padding_efficiency",
    "last_gain",
    "lr_search",
    "method_report",
    "evaluation_split",
    "test_metrics",
    "data_provenance",
    "git",
    "versions",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny trained run: (the record `train` returned, its run directory)."""
    root = tmp_path_factory.mktemp("records")
    base = save_tiny_model_dir(root / "base", "bert")
    data = write_toy_csv(root / "toy.csv", 96)
    record = deltatune.train(
        str(base),
        data=data,
        method="lora",
        out=str(root / "run"),
        max_steps=4,
        batch_size=16,
        learning_rate=1e-2,
        quiet=True,
        seed=3,
        precision="fp32",
    )
    return record, root / "run"


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the trained run directory a test may edit."""
    return shutil.copytree(trained[1], tmp_path / "run")


def edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_written_record_reads_back_equal_and_holds_exactly_its_fields(trained):
    record, run = trained
    assert isinstance(record, RunRecord) and record.schema_version == RECORD_VERSION
    assert read_run_record(run) == record == RunRecord.from_json(run / "run.json")
    written = json.loads((run / "run.json").read_text())
    fields = {field.name for field in dataclasses.fields(RunRecord)}
    left_out = {name for name in RunRecord.OMITTED_WHEN_NONE if getattr(record, name) is None}
    assert set(written) == fields - left_out
    assert written["schema_version"] == RECORD_VERSION and written == record.to_json()
    assert "model_as_given" not in written and "diverged" not in written  # written only when they say something
    assert written["train_config"]["max_length"] == record.train_config.max_length
    assert written["head"]["kind"] == record.head.kind and isinstance(record.git, GitState)


def test_a_written_manifest_reads_back_equal(trained):
    record, run = trained
    manifest = read_manifest(run)
    assert isinstance(manifest, DeltaManifest) and manifest == DeltaManifest.from_json(run / "deltatune.json")
    written = json.loads((run / "deltatune.json").read_text())
    assert written == manifest.to_json()
    assert written["format_version"] == 1 and "schema_version" not in written  # format_version is its version
    assert manifest.base_model.fingerprint == record.model_fingerprint and manifest.delta_bytes == record.delta_bytes
    assert manifest.task.name == record.task and manifest.metrics["dev"] == record.dev_metrics
    assert manifest.head is not None and manifest.resolved_head == manifest.head


def test_a_record_from_before_schema_versions_still_loads(run_copy):
    def make_old(data):
        del data["schema_version"]
        for key in KEYS_ADDED_LATER:
            data.pop(key, None)
        data["a_key_a_later_release_dropped"] = 1

    edit_json(run_copy / "run.json", make_old)
    old = read_run_record(run_copy)
    assert old.schema_version == RECORD_VERSION  # read as version 1, held as the current version
    assert old.head is None and old.device is None and old.planned_steps is None and old.method_report == {}
    assert old.versions.torch is None and old.git.commit is None
    text = summarize(old)
    assert "lora on toy" in text and "head ?" in text
    assert "--method lora" in training_command(old, "again")
    # the same keys under the current version are a damaged record: a current record holds every key
    edit_json(run_copy / "run.json", lambda data: data.update(schema_version=RECORD_VERSION))
    with pytest.raises(DeltatuneError, match="it lacks the key head"):
        read_run_record(run_copy)


def test_a_manifest_from_before_heads_and_data_fingerprints_still_loads_and_evaluates(run_copy, trained):
    def make_old(data):
        for key in ("head", "data_fingerprint", "data_files", "learning_rate", "versions", "delta_bytes"):
            del data[key]

    edit_json(run_copy / "deltatune.json", make_old)
    manifest = read_manifest(run_copy)
    assert manifest.head is None and manifest.data_fingerprint is None
    # the data fingerprint of an old delta is in its run.json
    assert manifest.recorded_data(run_copy)[0] == trained[0].data_fingerprint
    card = model_card(manifest, read_run_record(run_copy), directory=run_copy)
    assert "lora" in card and "Versions:" not in card


def test_a_manifest_without_data_files_loads_and_evaluates(run_copy, trained):
    edit_json(run_copy / "deltatune.json", lambda data: data.pop("data_files"))
    tuned = deltatune.load(run_copy)
    assert tuned.manifest.data_files is None
    assert tuned.evaluate("dev", precision="fp32") == pytest.approx(trained[0].dev_metrics, abs=1e-6)


@pytest.mark.parametrize(
    ("file", "change", "expected"),
    [
        (
            "run.json",
            lambda data: data.update(schema_version=RECORD_VERSION + 1),
            f"has schema_version {RECORD_VERSION + 1}, newer than this deltatune understands .{RECORD_VERSION}.: a newer "
            "deltatune wrote it. Upgrade deltatune",
        ),
        (
            "deltatune.json",
            lambda data: data.update(format_version=2),
            "has format_version 2, newer than this deltatune understands .1.*Upgrade deltatune",
        ),
        ("run.json", lambda data: data.update(schema_version="2"), "schema_version '2' is not a positive whole number"),
        ("run.json", lambda data: data.pop("steps"), r"is damaged \(it lacks the key steps\).*Train the run again"),
        (
            "run.json",
            lambda data: data.update(steps="many", dev_metrics=[]),
            r"is damaged \(dev_metrics is list \[\], not an object; steps is str 'many', not a whole number\)",
        ),
        ("run.json", lambda data: data["device"].update(name=3), "device.name is int 3, not text"),
        ("run.json", lambda data: data.update(extra=1), "it has keys this deltatune does not know: extra"),
        ("run.json", lambda data: data["train_config"].update(batch_size=0), "train_config is not a valid training"),
        (
            "deltatune.json",
            lambda data: data.update(task="toy"),
            r"is damaged \(its task is str 'toy', not a task spec\)",
        ),
        ("deltatune.json", lambda data: data.pop("format_version"), "lacks the key format_version"),
        ("deltatune.json", lambda data: data["base_model"].pop("fingerprint"), "lacks the key base_model.fingerprint"),
    ],
)
def test_newer_or_damaged_files_are_refused_naming_the_file_and_the_fix(run_copy, file, change, expected):
    edit_json(run_copy / file, change)
    read = read_run_record if file == "run.json" else read_manifest
    with pytest.raises(DeltatuneError, match=expected) as caught:
        read(run_copy)
    assert str(run_copy / file) in str(caught.value)
    with pytest.raises(DeltatuneError):  # called twice: nothing about a failed read sticks
        read(run_copy)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_a_file_that_is_not_a_json_object_is_refused(run_copy, content):
    (run_copy / "run.json").write_text(content)
    (run_copy / "deltatune.json").write_text(content)
    with pytest.raises(DeltatuneError, match="run.json (is corrupt|holds a JSON list)"):
        read_run_record(run_copy)
    with pytest.raises(DeltatuneError, match="deltatune.json (is corrupt|holds a JSON list).*Re-create the delta"):
        deltatune.load(run_copy)


def test_a_record_with_non_finite_numbers_is_still_strict_json_and_reads_back(trained, tmp_path):
    record = dataclasses.replace(trained[0], last_gain=float("nan"), dev_metrics={"accuracy": float("inf")})
    from deltatune.delta import write_json_atomic

    write_json_atomic(tmp_path / "run.json", record.to_json())
    text = (tmp_path / "run.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    again = read_run_record(tmp_path)
    assert again.last_gain is None and again.dev_metrics == {"accuracy": None}
    assert set(again.non_finite_values) == {"last_gain", "dev_metrics.accuracy"}


def test_the_processes_say_fsdp_only_when_the_model_was_sharded(trained, tmp_path):
    from deltatune.delta import write_json_atomic
    from deltatune.records import ProcessesRecord

    assert trained[0].to_json()["distributed"] == {"processes": 1, "backend": "none"}
    sharded = dataclasses.replace(trained[0], distributed=ProcessesRecord(processes=2, backend="gloo", fsdp=True))
    write_json_atomic(tmp_path / "run.json", sharded.to_json())
    assert json.loads((tmp_path / "run.json").read_text())["distributed"] == {
        "processes": 2,
        "backend": "gloo",
        "fsdp": True,
    }
    assert read_run_record(tmp_path) == sharded
