"""TrainSettings is the `train` section of pipeline.yaml, key for key: a key added to one and not the other fails
here, and the dict a run's identity records is the section itself."""
from __future__ import annotations

import dataclasses
import pickle

import pytest

from pipeline.config import SCHEMA, defaults, load_config
from trainer.settings import TrainSettings, dra_on, run_name


def test_every_schema_key_is_a_field_and_every_field_a_schema_key():
    fields = [f.name for f in dataclasses.fields(TrainSettings)]
    schema = list(SCHEMA["train"])
    assert sorted(set(schema) - set(fields)) == [], "train keys without a TrainSettings field"
    assert sorted(set(fields) - set(schema)) == [], "TrainSettings fields without a train key"
    assert fields == schema                                  # the same order: as_dict() is the section itself


def test_as_dict_round_trips_the_defaults():
    section = defaults()["train"]
    settings = TrainSettings.from_section(section)
    assert settings.as_dict() == section
    assert list(settings.as_dict()) == list(section)
    assert TrainSettings.from_section(settings.as_dict()) == settings


def test_as_dict_is_the_resolved_section_of_a_config():
    cfg = load_config(None, {"train.dra_lambda": 0.5, "train.arch": "resnet18", "train.flip": True})
    assert TrainSettings.from_section(cfg.train).as_dict() == dict(cfg.train)


def test_a_missing_or_unknown_key_is_refused():
    section = defaults()["train"]
    with pytest.raises(TypeError):
        TrainSettings.from_section({k: v for k, v in section.items() if k != "seed"})
    with pytest.raises(TypeError):
        TrainSettings.from_section({**section, "speed": 2})


def test_settings_are_frozen_and_picklable():
    settings = TrainSettings.from_section(defaults()["train"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 3
    assert pickle.loads(pickle.dumps(settings)) == settings     # Ray ships the Job to every worker


def test_dra_is_on_only_when_asked_for_with_a_positive_lambda():
    base = TrainSettings.from_section(defaults()["train"])
    assert base.dra_on and dra_on(True, 0.1)
    assert not dataclasses.replace(base, dra=False).dra_on
    assert not dataclasses.replace(base, dra_lambda=0.0).dra_on
    assert not dra_on(None, 0.5) and not dra_on(True, 0)


def test_run_names():
    s = TrainSettings.from_section(load_config(None, {"train.seed": 4}).train)
    assert run_name(s) == "small-cnn-dra-4"
    assert run_name(s, "v2") == "v2-small-cnn-dra-4"
    assert run_name(dataclasses.replace(s, dra_lambda=0.0)) == "small-cnn-nodra-4"
    assert run_name(dataclasses.replace(s, dra=False), identity_key="0123abcd") == "small-cnn-nodra-s4-0123abcd"
