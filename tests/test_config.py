from dataclasses import dataclass

import pytest

from deltatune.config import build_config, field_help
from deltatune.errors import DeltatuneError
from deltatune.training import TrainConfig


@dataclass(frozen=True)
class Example:
    rank: int = 8
    """The rank."""
    targets: tuple[str, ...] = ("query",)
    dropout: float | None = None
    enabled: bool = True


def test_strings_are_converted_to_field_types():
    config = build_config(Example, {"rank": "4", "targets": "query, value", "dropout": "0.1", "enabled": "false"})
    assert config == Example(rank=4, targets=("query", "value"), dropout=0.1, enabled=False)
    assert build_config(Example, {"dropout": "none"}).dropout is None


def test_every_problem_is_reported_at_once_with_the_key_as_typed():
    with pytest.raises(DeltatuneError) as error:
        build_config(Example, {"rnak": "4", "dropout": "lots", "enabled": "maybe"}, prefix="method.")
    message = str(error.value)
    assert "method.rnak" in message and "Did you mean 'rank'" in message
    assert "method.dropout='lots'" in message and "method.enabled='maybe'" in message


def test_help_comes_from_the_string_after_each_field():
    assert field_help(Example)["rank"] == "The rank."
    assert "Wall-clock" in field_help(TrainConfig)["time_budget_s"]


def test_train_config_validation_collects_problems():
    with pytest.raises(DeltatuneError) as error:
        TrainConfig(batch_size=30, gradient_accumulation=4, data_fraction=1.5)
    assert "batch_size=30" in str(error.value) and "data_fraction=1.5" in str(error.value)
