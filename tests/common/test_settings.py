"""Typed per-service settings: a bad value or an unknown STRATA_<NAME>_ variable stops the
service at start, naming the variable (a misspelt knob must not silently keep the default)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.features.app import FeaturesConfig


def test_features_settings_are_read_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATA_FEATURES_COMPACT_AFTER", "8")
    monkeypatch.setenv("STRATA_FEATURES_ONLINE_STORE", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("STRATA_FEATURES_PORT", "50999")  # a per-service key every service reads
    config = FeaturesConfig()
    assert (config.compact_after, config.online_store) == (8, "redis://127.0.0.1:6379/3")


def test_an_unknown_variable_of_the_prefix_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATA_FEATURES_ONLNE_STORE", "redis://127.0.0.1:6379/3")
    with pytest.raises(ValidationError, match="STRATA_FEATURES_ONLNE_STORE"):
        FeaturesConfig()


def test_a_bad_value_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATA_FEATURES_COMPACT_AFTER", "many")
    with pytest.raises(ValidationError, match="compact_after"):
        FeaturesConfig()


def test_other_services_variables_are_not_this_ones_business(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATA_INFERENCE_WHATEVER", "1")
    FeaturesConfig()


def test_inference_settings_refuse_a_misspelt_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.inference.config import InferenceConfig
    monkeypatch.setenv("STRATA_INFERENCE_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("STRATA_INFERENCE_BATCH_PATHS", "/data/in:/data/out")
    config = InferenceConfig()
    assert (config.batching.max_batch_size, config.local_batch_paths) == (16, ("/data/in", "/data/out"))
    monkeypatch.setenv("STRATA_INFERENCE_MAX_BATCHSIZE", "16")
    with pytest.raises(ValidationError, match="STRATA_INFERENCE_MAX_BATCHSIZE"):
        InferenceConfig()


def test_registry_settings_refuse_a_misspelt_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.registry.app import RegistrySettings
    monkeypatch.setenv("STRATA_REGISTRY_PROTECTED_ALIASES", "prod, gold")
    assert RegistrySettings().domain.protected_aliases == {"prod", "gold"}
    monkeypatch.setenv("STRATA_REGISTRY_PROTECTED_ALIAS", "prod")
    with pytest.raises(ValidationError, match="STRATA_REGISTRY_PROTECTED_ALIAS"):
        RegistrySettings()
