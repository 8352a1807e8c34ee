"""Tests for lifealign_lite.recipe: presets, YAML files, overrides, --set parsing and validation errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lifealign_lite.recipe import (
    DEFAULT_RECIPE,
    Recipe,
    RecipeError,
    list_recipes,
    load_recipe,
    parse_set_options,
    recipes_dir,
)

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
SETTINGS = settings(max_examples=50, deadline=None, database=None, derandomize=True)


def write_yaml(tmp_path: Path, data, name="my.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(RecipeError) as ei:
        load_recipe(*args, **kwargs)
    assert isinstance(ei.value, ValueError)
    return str(ei.value)


# ---------------------------------------------------------------------------
# presets


def test_the_three_presets_exist():
    assert PRESETS == ["consumer-gpu-qlora", "edge-cpu", "paper"]
    assert sorted(p.stem for p in recipes_dir().glob("*.yaml")) == PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_validates(name):
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe)
    assert recipe.name == name
    assert recipe.description.strip()
    assert recipe.validate() is recipe
    # every key of the YAML file made it into the recipe unchanged in meaning
    data = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
    for key, value in data.items():
        got = getattr(recipe, key)
        assert got == value or (isinstance(got, float) and got == pytest.approx(float(value))), key


def test_paper_preset_has_the_authors_settings():
    r = load_recipe("paper")
    assert r.beta == pytest.approx(0.1)
    assert r.focal_gamma == pytest.approx(2.0)
    assert r.tau == pytest.approx(0.9)
    assert r.projection_gamma == pytest.approx(0.5)
    assert r.lr == pytest.approx(5e-6)
    assert r.epochs == pytest.approx(3)
    assert r.target_modules == ["q_proj", "v_proj"]
    assert r.replay_ratio == pytest.approx(0.2)
    assert r.loss == "fpo"
    # their runs: effective batch 16, cosine schedule, no LoRA dropout, cut-off 2048, SFT first, the bare base as
    # the reference, the whole replay buffer in every task
    assert r.batch_size * r.grad_accum == 16 and r.lr_schedule == "cosine" and r.lora_dropout == 0.0
    assert r.max_length == 2048 and r.sft_warmup_steps > 0 and r.reference == "base" and r.replay_all


def test_non_finite_values_are_refused_from_every_source(tmp_path):
    for key, value in (("lr", "nan"), ("beta", "inf"), ("max_grad_norm", "nan"), ("epochs", "inf")):
        with pytest.raises(RecipeError, match=key):
            load_recipe("edge-cpu", {key: value})
    path = tmp_path / "r.yaml"
    path.write_text("lr: .nan\n")
    with pytest.raises(RecipeError, match="lr"):
        load_recipe(str(path))


def test_new_choice_fields_are_checked():
    for key in ("score_precision", "lr_schedule", "reference", "prefix_sharing"):
        with pytest.raises(RecipeError, match=key):
            load_recipe("edge-cpu", {key: "bogus"})
    assert load_recipe(None).score_precision == "fp32"


def test_default_recipe_is_edge_cpu():
    assert DEFAULT_RECIPE == "edge-cpu"
    assert load_recipe(None).name == "edge-cpu"
    assert load_recipe(None) == load_recipe("edge-cpu")
    edge = load_recipe("edge-cpu")
    assert edge.model == "default" and edge.quant == "auto"


def test_load_by_path(tmp_path):
    path = write_yaml(tmp_path, {"description": "mine", "lr": 1e-4, "target_modules": ["q_proj"]})
    r = load_recipe(str(path))
    assert r.name == "my"  # the file's stem
    assert r.lr == pytest.approx(1e-4)
    assert r.target_modules == ["q_proj"]
    assert r.beta == Recipe().beta  # untouched keys keep the defaults


def test_explicit_name_in_file_wins_over_stem(tmp_path):
    assert load_recipe(str(write_yaml(tmp_path, {"name": "custom"}))).name == "custom"


def test_empty_yaml_file_gives_defaults(tmp_path):
    r = load_recipe(str(write_yaml(tmp_path, "", name="empty.yaml")))
    assert dataclasses.replace(r, name=Recipe().name) == Recipe()


# ---------------------------------------------------------------------------
# overrides


def test_overrides_apply_and_none_is_ignored():
    base = load_recipe("paper")
    r = load_recipe("paper", {"lr": 1e-3, "beta": None, "max_steps": 7, "loss": "dpo", "focal_gamma": None})
    assert r.lr == pytest.approx(1e-3)
    assert r.max_steps == 7
    assert r.loss == "dpo"
    assert r.beta == base.beta
    assert r.focal_gamma == base.focal_gamma


def test_overrides_are_coerced_from_strings():
    r = load_recipe("edge-cpu", {"lr": "2e-4", "batch_size": "8", "trust_remote_code": "yes", "target_modules": "q_proj, k_proj,"})
    assert r.lr == pytest.approx(2e-4) and isinstance(r.lr, float)
    assert r.batch_size == 8 and isinstance(r.batch_size, int)
    assert r.trust_remote_code is True
    assert r.target_modules == ["q_proj", "k_proj"]


def test_int_valued_float_is_accepted_for_int_field():
    assert load_recipe("edge-cpu", {"batch_size": 8.0}).batch_size == 8


def test_overridden_values_are_validated():
    assert "tau" in error_of("edge-cpu", {"tau": 1.5})


def test_unknown_override_key_is_an_error():
    msg = error_of("edge-cpu", {"bogus_rate": 1e-3})  # (learning_rate is TRL's name for lr, accepted)
    assert "bogus_rate" in msg


@given(st.floats(min_value=1e-9, max_value=1, allow_nan=False, allow_infinity=False))
@SETTINGS
def test_lr_override_string_roundtrip(lr):
    assert load_recipe("edge-cpu", {"lr": repr(lr)}).lr == lr


# ---------------------------------------------------------------------------
# errors in YAML files


def test_unknown_yaml_key_names_key_and_suggests_close_match(tmp_path):
    path = write_yaml(tmp_path, {"lr": 1e-4, "focal_gama": 2.0})
    msg = error_of(str(path))
    assert "'focal_gama'" in msg
    assert "did you mean 'focal_gamma'" in msg
    assert str(path) in msg


def test_unknown_yaml_key_without_close_match(tmp_path):
    msg = error_of(str(write_yaml(tmp_path, {"zzzzqqq": 1})))
    assert "'zzzzqqq'" in msg
    assert "did you mean" not in msg


def test_unknown_preset_lists_known_ones():
    msg = error_of("no-such-preset")
    assert "no-such-preset" in msg
    for name in PRESETS:
        assert name in msg


def test_missing_yaml_path_is_an_error(tmp_path):
    msg = error_of(str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in msg


@pytest.mark.parametrize(
    "key, value",
    [("lr", "abc"), ("batch_size", 2.5), ("batch_size", "four"), ("trust_remote_code", "maybe"), ("epochs", [1, 2])],
)
def test_bad_type_in_yaml_names_key(tmp_path, key, value):
    msg = error_of(str(write_yaml(tmp_path, {key: value})))
    assert repr(key) in msg


def test_bad_type_in_override_names_key():
    msg = error_of("edge-cpu", {"lr": "abc"})
    assert "'lr'" in msg and "abc" in msg


def test_invalid_yaml_and_non_mapping(tmp_path):
    assert "YAML" in error_of(str(write_yaml(tmp_path, "lr: [1, 2\n", name="broken.yaml")))
    assert "mapping" in error_of(str(write_yaml(tmp_path, "- 1\n- 2\n", name="list.yaml")))


# ---------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "overrides, phrase",
    [
        ({"quant": "fp8"}, "quant"),
        ({"loss": "ipo"}, "loss"),
        ({"tau": 1.5}, "tau"),
        ({"tau": 0.0}, "tau"),
        ({"max_length": 128, "max_prompt_length": 128}, "max_prompt_length"),
        ({"max_length": 100, "max_prompt_length": 200}, "max_prompt_length"),
        ({"lr": 0.0}, "lr"),
        ({"beta": -0.1}, "beta"),
        ({"batch_size": 0}, "batch_size"),
        ({"focal_gamma": -1.0}, "focal_gamma"),
        ({"projection_gamma": 1.5}, "projection_gamma"),
        ({"replay_ratio": -0.1}, "replay_ratio"),
        ({"lora_dropout": 2.0}, "lora_dropout"),
        ({"epochs": 0, "max_steps": 0}, "epochs"),
        ({"target_modules": ""}, "target_modules"),
    ],
)
def test_validation_errors(overrides, phrase):
    assert phrase in error_of("edge-cpu", overrides)


def test_validation_boundaries_are_accepted():
    r = load_recipe("edge-cpu", {"tau": 1.0, "focal_gamma": 0.0, "projection_gamma": 0.0, "epochs": 0, "max_steps": 5,
                                 "max_length": 129, "max_prompt_length": 128})
    assert (r.tau, r.focal_gamma, r.max_steps) == (1.0, 0.0, 5)


def test_validate_on_a_constructed_recipe():
    with pytest.raises(RecipeError, match="quant"):
        Recipe(quant="fp8").validate()
    assert Recipe().validate() == Recipe()


# ---------------------------------------------------------------------------
# --set and listing


def test_parse_set_options():
    got = parse_set_options(["lr=1e-4", " beta = 0.2", "target_modules=q_proj,k_proj", "model=a=b"])
    assert got == {"lr": "1e-4", "beta": " 0.2", "target_modules": "q_proj,k_proj", "model": "a=b"}
    r = load_recipe("edge-cpu", got)
    assert r.lr == pytest.approx(1e-4) and r.beta == pytest.approx(0.2)
    assert r.target_modules == ["q_proj", "k_proj"]
    assert parse_set_options([]) == {}


@pytest.mark.parametrize("item", ["lr", "=3", " =3"])
def test_parse_set_options_needs_key_value(item):
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        parse_set_options([item])


def test_parse_set_options_unknown_key():
    with pytest.raises(RecipeError) as ei:
        parse_set_options(["focal_gama=1"])
    assert "'focal_gama'" in str(ei.value) and "focal_gamma" in str(ei.value)
    with pytest.raises(RecipeError, match="bogus"):
        parse_set_options(["lr=1", "bogus=1"])


def test_list_recipes():
    listed = list_recipes()
    assert [name for name, _ in listed] == PRESETS
    for name, desc in listed:
        assert desc.strip(), name
        assert "\n" not in desc
        assert desc == load_recipe(name).description.strip().splitlines()[0]


def test_to_dict_roundtrip():
    r = load_recipe("consumer-gpu-qlora")
    d = r.to_dict()
    assert d["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert Recipe(**d) == r
