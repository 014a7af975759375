"""Every config refuses a key it does not know, naming it; values are checked against their types."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from detect.drift import DriftConfig
from detect.ensemble import EnsembleConfig
from detect.sequence import SequenceConfig
from monitoring.monitor import MonitorConfig
from serve.settings import ServeSettings


@pytest.mark.parametrize("config", [EnsembleConfig, SequenceConfig, DriftConfig, MonitorConfig])
def test_unknown_key_is_refused_by_name(config):
    with pytest.raises(ValueError, match="hiden"):
        config.from_dict({"hiden": 32})


def test_mistyped_value_is_refused_by_name():
    with pytest.raises(ValidationError, match="hidden"):
        SequenceConfig.from_dict({"hidden": "many"})
    assert SequenceConfig.from_dict({"hidden": 32}).hidden == 32
    assert EnsembleConfig.from_dict({"lags": [1, 2]}).lags == (1, 2)  # JSON lists become the tuples it holds


def test_serve_settings_refuse_unknown_keys_and_read_the_environment(monkeypatch):
    with pytest.raises(ValidationError, match="hiden"):
        ServeSettings(hiden=1)
    monkeypatch.setenv("RAYWATCH_MAX_REPLICAS", "3")
    settings = ServeSettings.from_app_args({"min_replicas": 2, "state_dir": "elsewhere"})
    assert (settings.min_replicas, settings.max_replicas) == (2, 3)
    assert settings.autoscaling()["initial_replicas"] == 2
    with pytest.raises(ValidationError, match="ingress_replicas"):
        ServeSettings(ingress_replicas=0)
    monkeypatch.setenv("RAYWATCH_IN_INGRESS", '["ensemble"]')
    assert ServeSettings().in_ingress == ["ensemble"]
    with pytest.raises(ValidationError, match=r"in_ingress: unknown detector kind\(s\) \['esemble'\]"):
        ServeSettings(in_ingress=["esemble"])


def test_raywatch_train_set_names_the_unknown_key(capsys, data_dir):
    from cli.main import main

    assert main(["train", "--model", "lstm", "--data", str(data_dir), "--set", "hiden=32"]) == 2
    assert "['hiden']" in capsys.readouterr().err
