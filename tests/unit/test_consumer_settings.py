"""ConsumerSettings: a Consumer takes its settings as one dataclass, as the relay does, and the
keyword arguments the README uses keep working, overriding the settings' field of the same name."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from zeroloss import Consumer, ConsumerSettings, RelaySettings
from zeroloss.consumer.settings import ConsumerOptions
from zeroloss.errors import ConfigError

# A subscription opens on the first fetch, so making a Consumer here connects to nothing.
SOURCE = "redis://127.0.0.1:1/0"


def test_the_keyword_arguments_are_exactly_the_settings_fields() -> None:
    fields = {f.name: f.type for f in dataclasses.fields(ConsumerSettings)}
    assert list(typing.get_type_hints(ConsumerOptions)) == list(fields)


def test_settings_and_keyword_arguments_build_the_same_consumer() -> None:
    by_settings = Consumer(SOURCE, "g", ["t"], None, ConsumerSettings(max_attempts=3, batch_size=7, poll_s=0.5))
    by_keywords = Consumer(SOURCE, group="g", topics=["t"], inbox=None, max_attempts=3, batch_size=7, poll_s=0.5)
    assert by_settings.settings == by_keywords.settings
    assert by_settings.max_attempts == by_keywords.max_attempts == 3
    assert Consumer(SOURCE, "g", ["t"], None).settings == ConsumerSettings()  # the defaults of old


def test_a_keyword_argument_overrides_the_settings_field() -> None:
    consumer = Consumer(SOURCE, "g", ["t"], None, ConsumerSettings(max_attempts=3, batch_size=7), max_attempts=9)
    assert consumer.max_attempts == 9
    assert consumer.settings == ConsumerSettings(max_attempts=9, batch_size=7)


def test_bad_settings_are_refused_whichever_way_they_come() -> None:
    with pytest.raises(ConfigError, match="max_attempts must be at least 1, got 0"):
        Consumer(SOURCE, "g", ["t"], None, ConsumerSettings(max_attempts=0))
    with pytest.raises(ConfigError, match="transaction_batch must be at least 1, got 0"):
        Consumer(SOURCE, "g", ["t"], None, transaction_batch=0)
    with pytest.raises(TypeError, match="max_attempt"):
        Consumer(SOURCE, "g", ["t"], None, max_attempt=3)  # type: ignore[call-arg]


def test_settings_are_frozen_like_the_relays() -> None:
    for settings in (ConsumerSettings(), RelaySettings()):
        with pytest.raises(dataclasses.FrozenInstanceError):
            settings.max_attempts = 1  # type: ignore[misc]
