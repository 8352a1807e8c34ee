"""Shared helpers (system.py): matplotlib is optional, and without it plots are skipped with a note instead of failing."""

from __future__ import annotations

import sys

from lifealign_lite import system
from lifealign_lite.recipe import GROUPS, Recipe, describe
from lifealign_lite.train import plot_history


def test_without_matplotlib_no_plot_is_drawn_and_nothing_fails(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert system.pyplot() is None
    assert plot_history([{"step": 1, "loss": 0.7, "acc": 0.5}], tmp_path / "training.png") is None
    assert not (tmp_path / "training.png").exists()
    assert "lifealign-lite[plot]" in system.MATPLOTLIB_MISSING


def test_with_matplotlib_the_training_plot_is_written(tmp_path):
    assert plot_history([{"step": 1, "loss": 0.7, "acc": 0.5}, {"step": 2, "loss": 0.6, "acc": 1.0}], tmp_path / "t.png") == tmp_path / "t.png"
    assert (tmp_path / "t.png").stat().st_size > 0


def test_every_recipe_field_has_a_group_and_help_and_choice_fields_list_their_default():
    for key, value in Recipe().to_dict().items():
        info = describe(key)
        assert info["group"] in GROUPS and info["help"].endswith("."), key
        if info["choices"]:
            assert value in info["choices"], key
