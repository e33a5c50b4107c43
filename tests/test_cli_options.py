"""The command line from typed sources: `--no-` forms, `Literal` choices and one method-option syntax."""

import argparse
import dataclasses
import inspect
import typing

import pytest

from deltatune.cli import _train_config_from, build_parser, main
from deltatune.cli_options import (
    add_config_options,
    config_from_options,
    literal_choices,
    method_options_from,
    parse_method_text,
    split_method_options,
)
from deltatune.errors import DeltatuneError


def subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for the top parser and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from subparsers(child, (*path, name))


def options(path: tuple[str, ...]) -> dict[str, argparse.Action]:
    """Option string -> action of the subcommand at `path` (e.g. ('freelm', 'train'))."""
    parser = dict(subparsers(build_parser()))[path]
    return {flag: action for action in parser._actions for flag in action.option_strings}


def test_every_boolean_option_of_every_command_has_its_no_form():
    checked = 0
    for path, parser in subparsers(build_parser()):
        for action in parser._actions:
            if action.nargs != 0 or isinstance(action, argparse._HelpAction):
                continue
            long_flags = [flag for flag in action.option_strings if flag.startswith("--")]
            assert isinstance(action, argparse.BooleanOptionalAction), (path, action.option_strings)
            for flag in long_flags:
                if not flag.startswith("--no-"):
                    assert f"--no-{flag[2:]}" in action.option_strings, (path, flag)
            checked += 1
    assert checked > 40  # train, eval, predict, compare, serve, freelm, reader, merge, results, ... all walked


def test_every_command_prints_its_help():
    for path, parser in subparsers(build_parser()):
        text = parser.format_help()  # a stray % in a field's help once broke `reader train --help`
        assert text.startswith("usage: deltatune"), path
        if path == ("reader", "train"):
            assert "warm-up over 10% of the steps" in " ".join(text.split())


@pytest.mark.parametrize(
    "path, config_path, prefix",
    [
        (("train",), "deltatune.training:TrainConfig", ""),
        (("compare",), "deltatune.training:TrainConfig", "train_"),
        (("freelm", "train"), "deltatune.freelm.config:FreeLMConfig", ""),
        (("reader", "train"), "deltatune.reader.config:ReaderConfig", ""),
        (("serve",), "deltatune.serve.settings:ServeSettings", ""),
    ],
)
def test_generated_choices_are_the_literal_of_the_config_field(path, config_path, prefix):
    import importlib

    module, name = config_path.split(":")
    config_class = getattr(importlib.import_module(module), name)
    hints = typing.get_type_hints(config_class)
    flags = options(path)
    literal_fields = 0
    for config_field in dataclasses.fields(config_class):
        flag = "--" + config_field.name.replace("_", "-")
        if flag not in flags:
            continue
        action = flags[flag]
        assert action.dest == prefix + config_field.name
        if typing.get_origin(hints[config_field.name]) is typing.Literal:
            assert tuple(action.choices) == typing.get_args(hints[config_field.name]), flag
            literal_fields += 1
        elif literal_choices(hints[config_field.name]):  # a comma list of choices (report_to): named in the help
            assert all(choice in action.help for choice in literal_choices(hints[config_field.name])), flag
    assert literal_fields >= 1


def test_hand_written_choices_are_the_literals_the_library_validates_against():
    from deltatune.analysis import RANK_KEYS, RankBy, analyze_run
    from deltatune.merge import HOWS, MajoritySign, MergeHow
    from deltatune.precision import PRECISIONS, Precision
    from deltatune.sources.data import SOURCES
    from deltatune.training import TrainConfig

    assert tuple(options(("analyze",))["--rank-by"].choices) == typing.get_args(RankBy) == tuple(RANK_KEYS)
    assert "matrix_angle" in options(("analyze",))["--rank-by"].choices
    library_default = inspect.signature(analyze_run).parameters["rank_by"].default
    assert options(("analyze",))["--rank-by"].default == library_default == "matrix_angle"
    for command in ("eval", "predict"):
        assert tuple(options((command,))["--precision"].choices) == typing.get_args(Precision) == PRECISIONS
    assert typing.get_type_hints(TrainConfig)["precision"] is Precision
    assert tuple(options(("merge",))["--how"].choices) == typing.get_args(MergeHow) == HOWS
    assert tuple(options(("merge",))["--majority-sign"].choices) == typing.get_args(MajoritySign)
    assert tuple(options(("train",))["--source"].choices) == SOURCES


def test_a_true_default_can_be_switched_off_and_help_shows_the_default(capsys):
    parser = build_parser()
    base = ["train", "--task", "stsb"]
    assert _train_config_from(parser.parse_args(base)).fast_dropout is True
    off = _train_config_from(parser.parse_args([*base, "--no-fast-dropout", "--no-bucket-by-length"]))
    assert off.fast_dropout is False and off.bucket_by_length is False
    on = _train_config_from(parser.parse_args([*base, "--gradual-unfreezing", "--quiet"]))
    assert on.gradual_unfreezing is True and on.quiet is True
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--fast-dropout, --no-fast-dropout" in text and "--bucket-by-length, --no-bucket-by-length" in text
    assert "(default: True)" in text and "{linear,constant,slanted_triangular}" in text
    assert "--overwrite, --no-overwrite" in text


def test_a_bad_choice_is_refused_by_argparse_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task", "stsb", "--schedule", "cosine"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'cosine'" in capsys.readouterr().err


def test_typed_values_are_converted_by_the_config_and_every_problem_is_reported_once():
    from deltatune.training import TrainConfig

    parser = argparse.ArgumentParser()
    add_config_options(parser, TrainConfig)
    args = parser.parse_args(["--epochs", "x", "--batch-size", "0.5", "--report-to", "tensorboard,wandb"])
    with pytest.raises(DeltatuneError) as error:
        config_from_options(TrainConfig, args)
    message = str(error.value)
    assert "--epochs='x': must be a number" in message and "--batch_size='0.5': must be a whole number" in message
    assert "--report_to='tensorboard,wandb'" in message
    built = config_from_options(TrainConfig, parser.parse_args(["--lr-search", "auto", "--report-to", "tensorboard"]))
    assert built.lr_search == "auto" and built.report_to == ("tensorboard",)


def test_a_config_checks_its_literal_fields_against_the_same_choices():
    from deltatune.freelm.config import FreeLMConfig
    from deltatune.reader.config import ReaderConfig

    with pytest.raises(DeltatuneError, match="teacher_loss='hinge' must be one of binary, contrastive, both"):
        FreeLMConfig(teacher_loss="hinge")  # type: ignore[arg-type]
    with pytest.raises(DeltatuneError, match="schedule='cosine' must be one of ratio, interactive"):
        FreeLMConfig(schedule="cosine")  # type: ignore[arg-type]
    with pytest.raises(DeltatuneError, match="precision='fp16' must be one of auto, fp32, bf16"):
        ReaderConfig(precision="fp16")  # type: ignore[arg-type]


def test_the_two_method_option_syntaxes_parse_to_the_same_options():
    rest, from_flags = split_method_options(["train", "--method.targets=query,value", "--method.r", "4", "--quiet"])
    assert rest == ["train", "--quiet"]
    from_grid = parse_method_text("lora-small=lora:targets=query,value,r=4")
    assert from_flags == from_grid["config"] == {"targets": "query,value", "r": "4"}
    assert from_grid["name"] == "lora-small" and from_grid["method"] == "lora"
    assert parse_method_text("bitfit") == "bitfit"
    assert parse_method_text("fast=full") == {"name": "fast", "method": "full"}
    with pytest.raises(DeltatuneError, match=r"--methods 'lora:=4': option '=4' needs KEY=VALUE"):
        parse_method_text("lora:=4")
    with pytest.raises(DeltatuneError, match="--method.r needs a value"):
        split_method_options(["--method.r"])
    with pytest.raises(DeltatuneError, match="option 'r' needs KEY=VALUE"):
        method_options_from(["r"], where="x", example="r=4")


def test_an_unknown_method_option_names_the_valid_ones_in_both_syntaxes(tmp_path, capsys):
    from deltatune.compare.spec import parse_spec, spec_from_flags

    assert main(["train", "--task", "stsb", "--method", "lora", "--method.rr=4", "--out", str(tmp_path / "x")]) == 2
    from_flags = capsys.readouterr().err
    with pytest.raises(DeltatuneError) as error:
        parse_spec(spec_from_flags(models=["minilm-l6"], tasks=["stsb"], methods=["lora:rr=4"]))
    for message in (from_flags, str(error.value)):
        assert "unknown key method.rr" in message and "Available: alpha" in message and "Did you mean 'r'" in message
    assert not (tmp_path / "x").exists()


def test_serve_settings_come_from_the_same_generator(monkeypatch, tmp_path):
    from deltatune.serve.command import API_KEY_VARIABLE, settings_from

    parser = build_parser()
    monkeypatch.delenv(API_KEY_VARIABLE, raising=False)
    settings = settings_from(
        parser.parse_args(
            ["serve", "run", "--port", "0", "--precision", "fp32", "--delta-root", str(tmp_path), "--allow-admin"]
        )
    )
    assert settings.port == 0 and settings.precision == "fp32" and settings.delta_root == tmp_path
    assert settings.allow_admin and settings.max_batch_size == 64
    monkeypatch.setenv(API_KEY_VARIABLE, "from-env")
    assert settings_from(parser.parse_args(["serve", "run"])).api_key == "from-env"
    assert settings_from(parser.parse_args(["serve", "run", "--api-key", "typed"])).api_key == "typed"
    with pytest.raises(DeltatuneError, match="--port='eighty': must be a whole number"):
        settings_from(parser.parse_args(["serve", "run", "--port", "eighty"]))


def test_compare_training_flags_and_switches_reach_the_spec():
    from deltatune.compare.commands import build_spec_mapping

    parser = build_parser()
    args = parser.parse_args(
        [
            "compare",
            "--tasks",
            "stsb",
            "--methods",
            "bitfit",
            "--no-fast-dropout",
            "--epochs",
            "2",
            "--no-keep-deltas",
            "--no-report",
        ]
    )
    spec = build_spec_mapping(args)
    assert spec["train"] == {"fast_dropout": False, "epochs": "2"} and spec["keep_deltas"] is False
    assert args.report is False
    assert parser.parse_args(["compare"]).report is True and parser.parse_args(["compare"]).keep_deltas is None


def test_library_lists_that_stay_hand_written_agree_with_the_literals():
    from deltatune.analysis import RankBy
    from deltatune.heads import HEAD_KINDS, POOLINGS
    from deltatune.methods.freeze import FreezeConfig
    from deltatune.training import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    assert typing.get_args(hints["head"]) == ("auto", *HEAD_KINDS)
    assert typing.get_args(hints["pooling"]) == ("auto", *POOLINGS)
    assert typing.get_args(typing.get_type_hints(FreezeConfig)["critical_metric"]) == typing.get_args(RankBy)
