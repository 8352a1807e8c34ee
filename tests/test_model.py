"""Tests for model.py's ModelInfo: what a loaded base says about itself, in run summaries and to the bank."""

from __future__ import annotations

import json

import pytest

from lifealign_lite.model import ModelInfo, load_base

# the keys of a run summary's "model" (summary.json), in their order: a stored format
SUMMARY_KEYS = ["name", "bf16_autocast", "fingerprint", "quant", "dtype", "device"]


def test_info_is_typed_and_its_json_form_keeps_the_summary_keys(tiny_model_dir, tmp_path):
    base = load_base(str(tiny_model_dir), tmp_path, "none", device="cpu", autocast_setting="none")
    info = base.info
    assert isinstance(info, ModelInfo)
    assert (info.quant, info.dtype, info.device, info.bf16_autocast) == ("none", "float32", "cpu", False)
    assert info.name == str(tiny_model_dir) and len(info.fingerprint) == 16
    as_json = json.loads(json.dumps(info.to_dict()))
    assert list(as_json) == SUMMARY_KEYS and as_json["fingerprint"] == info.fingerprint
    assert info.identity() == {"name": info.name, "fingerprint": info.fingerprint}  # what a bank's manifest records


def test_forced_bf16_autocast_applies_to_a_full_precision_cpu_model_only(tiny_model_dir, tmp_path):
    assert load_base(str(tiny_model_dir), tmp_path, "none", device="cpu", autocast_setting="bf16").info.bf16_autocast is True
    assert ModelInfo(name="m", fingerprint="f").bf16_autocast is False  # the default


def test_info_needs_a_name_and_a_fingerprint():
    with pytest.raises(TypeError):
        ModelInfo(name="m")  # no fingerprint: the bank could not check the base
