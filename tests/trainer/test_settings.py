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


def test_optimizer_auto_is_sgd_for_the_cnns_and_adamw_for_the_vits_each_with_its_own_defaults():
    base = TrainSettings.from_section(defaults()["train"])
    assert (base.optimizer, base.lr, base.weight_decay) == ("auto", None, None)
    assert (base.optimizer_name, base.peak_lr, base.decay) == ("sgd", 0.1, 5e-4)
    vit = dataclasses.replace(base, arch="vit-b/2")
    assert (vit.optimizer_name, vit.peak_lr, vit.decay, vit.adam_betas) == ("adamw", 1e-3, 0.05, (0.9, 0.999))
    assert (dataclasses.replace(vit, optimizer="sgd").peak_lr, dataclasses.replace(base, optimizer="adamw").decay) \
        == (0.1, 0.05)
    explicit = dataclasses.replace(vit, lr=3e-4, weight_decay=0.1, adam_beta2=0.95)
    assert (explicit.peak_lr, explicit.decay, explicit.adam_betas) == (3e-4, 0.1, (0.9, 0.95))
    assert "0.1 for sgd, 0.001 for adamw" in SCHEMA["train"]["lr"].help
    assert "0.0005 for sgd, 0.05 for adamw" in SCHEMA["train"]["weight_decay"].help
    assert "adamw for vit-s/2, vit-s/4, vit-b/2, vit-b/4" in SCHEMA["train"]["optimizer"].help


def test_an_sgd_runs_identity_is_the_one_it_had_before_the_optimizer_keys():
    """Runs trained before train.optimizer existed (tests/pipeline/test_old_workspace.py holds one) record lr and
    weight decay as numbers and no optimizer keys; an AdamW run records its optimizer and betas."""
    base = TrainSettings.from_section(defaults()["train"])
    old = {k: v for k, v in base.as_dict().items() if k not in ("optimizer", "adam_beta1", "adam_beta2")}
    assert base.identity_dict() == {**old, "lr": 0.1, "weight_decay": 5e-4}
    assert dataclasses.replace(base, lr=0.1, optimizer="sgd", adam_beta1=0.5).identity_dict() == base.identity_dict()
    adamw = dataclasses.replace(base, optimizer="adamw")
    assert adamw.identity_dict() == {**old, "lr": 1e-3, "weight_decay": 0.05, "optimizer": "adamw",
                                     "adam_beta1": 0.9, "adam_beta2": 0.999}
    vit = dataclasses.replace(base, arch="vit-s/2")
    assert vit.identity_dict() == dataclasses.replace(vit, optimizer="adamw", lr=1e-3).identity_dict()
    assert dataclasses.replace(vit, adam_beta1=0.8).identity_dict() != vit.identity_dict()


def test_a_slash_in_the_architecture_becomes_a_dash_in_the_run_name():
    s = dataclasses.replace(TrainSettings.from_section(defaults()["train"]), arch="vit-b/2")
    assert run_name(s) == "vit-b-2-dra-0" and run_name(s, "p") == "p-vit-b-2-dra-0"
