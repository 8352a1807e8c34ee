"""The one configuration object: a recipe, loaded from YAML and overridden by flags.

A recipe names every knob of a run (model, precision, loss, LoRA shape, consolidation).
Presets live in ``recipes/*.yaml``; ``--recipe`` takes a preset name or a path, and any
field can be overridden from the command line. Unknown keys are an error naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import MISSING, dataclass, field, fields
import importlib.util
from pathlib import Path
from typing import Any

import yaml

from .errors import LifeAlignError

QUANT_CHOICES = ("auto", "nf4", "int8", "none")
LOSS_CHOICES = ("fpo", "dpo")
DEFAULT_RECIPE = "edge-cpu"


class RecipeError(LifeAlignError, ValueError):
    """A recipe that cannot be used: unknown preset, unknown key, or a bad value."""


GROUPS = ("meta", "model", "lora", "optimisation", "loss", "memory", "baselines")


def knob(default: Any = MISSING, group: str = "", help: str = "", *, choices: tuple | None = None, default_factory: Any = MISSING,
         flag: bool = False, aliases: tuple[str, ...] = (), metavar: str | None = None):
    """A recipe field that carries its group, its help and its allowed values: ``validate`` checks the choices, and the
    CLI's flags and ``lifealign-lite recipes NAME`` take the help from here (said once).

    ``flag``: ``align`` has a command-line flag for it, ``--KEY`` with dashes (the common knobs; ``--set`` reaches every
    one), plus ``aliases``; ``metavar`` is what its help shows for the value (default: the choices, else N or X by type).
    """
    assert group in GROUPS, group
    meta = {"group": group, "help": help, "choices": choices, "flag": flag, "aliases": aliases, "metavar": metavar}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def describe(key: str) -> dict:
    """A recipe key's group, help and choices, and its command-line flag (``flag``, ``aliases``, ``metavar``)."""
    return dict(_FIELDS[key].metadata)


def flag_keys() -> list[str]:
    """The recipe keys ``align`` has a flag for (knobs marked ``flag``), in the recipe's order."""
    return [key for key, f in _FIELDS.items() if f.metadata["flag"]]


@dataclass
class Recipe:
    """Every knob of an alignment run. Field names double as YAML keys and CLI flags."""

    name: str = knob(DEFAULT_RECIPE, "meta", "Preset name.")
    description: str = knob("", "meta", "What the preset is for.")
    # model and precision
    model: str = knob("default", "model", "Local model folder or hub id; default = the embedded SmolLM2-135M-Instruct.", flag=True,
                      metavar="FOLDER|HUB_ID")
    quant: str = knob("auto", "model", "Weight precision; auto = NF4 on CUDA, fp32 on a CPU.", choices=QUANT_CHOICES, flag=True)
    trust_remote_code: bool = knob(False, "model", "Let transformers run the model repository's own code.")
    needs_cuda: bool = knob(False, "model", "The preset only makes sense on a CUDA GPU: refused at once on a machine without one.")
    autocast: str = knob("auto", "model", "bf16 autocast over fp32 weights for training on a CPU; auto = where the CPU has native bf16.", choices=("auto", "bf16", "none"))
    score_precision: str = knob("fp32", "model", "Precision of eval/bench scoring (fp32: bf16 rounding is larger than an adapter's effect).", choices=("fp32", "bf16"))
    prefix_sharing: str = knob("auto", "model", "Each pair's prompt runs once for both responses (prefix.py); off = once per response.",
                               choices=("auto", "on", "off"))
    # preference optimization (FPO; focal_gamma = 0 is DPO)
    loss: str = knob("fpo", "loss", "Preference loss.", choices=LOSS_CHOICES, flag=True)
    beta: float = knob(0.1, "loss", "DPO/FPO beta: how far the model may move from the reference.", flag=True, metavar="B")
    focal_gamma: float = knob(2.0, "loss", "FPO's focal exponent; 0 is plain DPO.", flag=True, metavar="G")
    # optimization
    lr: float = knob(5e-5, "optimisation", "Peak learning rate of AdamW.", flag=True, aliases=("--learning-rate",), metavar="RATE")
    epochs: float = knob(1.0, "optimisation", "Passes over the data (when --max-steps is 0).", flag=True)
    max_steps: int = knob(0, "optimisation", "Stop after N optimizer steps; 0 = run --epochs.", flag=True)
    batch_size: int = knob(4, "optimisation", "Pairs per optimizer step (per accumulation).", flag=True)
    grad_accum: int = knob(1, "optimisation", "Batches accumulated per optimizer step.")
    warmup_ratio: float = knob(0.1, "optimisation", "Share of the steps spent warming the learning rate up.")
    lr_schedule: str = knob("linear", "optimisation", "Learning-rate decay after warm-up (the authors use cosine).", choices=("linear", "cosine"))
    weight_decay: float = knob(0.0, "optimisation", "AdamW weight decay.")
    max_grad_norm: float = knob(1.0, "optimisation", "Gradient norm clipped to this.")
    seed: int = knob(0, "optimisation", "Seed of the data shuffle, the LoRA initialization and replay sampling.", flag=True)
    max_pairs: int = knob(0, "optimisation", "Use N pairs (seeded shuffle); 0 = all.", flag=True)
    checkpoint_every: int = knob(0, "optimisation", "Also save a checkpoint every N optimizer steps (0 = only when stopped): "
                                 "a run killed outright (SIGKILL, a lost machine) resumes from the last one.")
    # sequence lengths (prompt is truncated from the left, responses from the right)
    max_length: int = knob(256, "model", "Longest prompt + response, in tokens.")
    max_prompt_length: int = knob(128, "model", "Longest prompt, in tokens (truncated from the left; responses from the right).")
    # short-term LoRA
    lora_r: int = knob(8, "lora", "Rank of the short-term LoRA.")
    lora_alpha: int = knob(16, "lora", "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = knob(0.0, "lora", "LoRA dropout.")
    target_modules: list[str] = knob(group="lora", help="Modules the LoRA adapts.", default_factory=lambda: ["q_proj", "v_proj"])
    sft_warmup_steps: int = knob(0, "lora", "Steps of SFT on the chosen responses before FPO, as the authors do.")
    reference: str = knob("memory", "lora", "The reference model: memory = base + the frozen long-term memory; base = the bare base (the authors').", choices=("memory", "base"))
    # long-term memory (consolidation, bank, replay, routing)
    tau: float = knob(0.9, "memory", "Energy kept when denoising an update.")
    projection_gamma: float = knob(0.5, "memory", "Weight kept on the part of an update inside the history span.")
    bank_rank: int = knob(16, "memory", "Rank budget of the core and of every slot.")
    replay_ratio: float = knob(0.2, "memory", "Share of each task added to the replay buffer.")
    replay_size: int = knob(2000, "memory", "Bound on pairs in the replay buffer.")
    replay_mix: float = knob(0.2, "memory", "Replayed pairs mixed into a task, as a fraction of its pairs.")
    replay_all: bool = knob(False, "memory", "Mix the whole replay buffer into each task (the authors') instead of replay_mix of it.")
    route_quantile: float = knob(0.05, "memory", "Share of a domain's own held-out prompts whose similarity sets its novelty threshold.")
    route_threshold: float = knob(-1.0, "memory", "Below 0: each domain's calibrated threshold; 0..1: one fixed similarity below which the core answers.")
    route_gate: float = knob(0.7, "memory", "The core answers a prompt whose router gives no domain at least this probability (0: never; 0.7 chosen on the signal stream's dev splits, docs/RESULTS.md).")
    router: str = knob("minilm", "memory", "Routing embedder: minilm (packaged all-MiniLM-L6-v2) or base (the base model's hidden states).", choices=("minilm", "base"))
    slot_mode: str = knob("specialist", "memory", "specialist: slot = what slot_from says; core: slot = the new core.", choices=("specialist", "core"))
    slot_from: str = knob("base", "memory", "What a new domain's slot holds: base = a LoRA trained from the bare base against the bare base "
                          "on the domain's pairs alone; update = the domain's denoised update alone; memory = the memory it was trained "
                          "from (core) + that update.", choices=("base", "update", "memory"))
    core_from: str = knob("slot", "memory", "The core's update for a new domain: slot = the domain's slot LoRA, folded into the core by SLMC "
                          "(one run per task; docs/RESULTS.md); update = a run of its own from the core, against the core, with "
                          "replay (the paper's path: with slot_from base a new domain trains twice).", choices=("slot", "update"))
    # continual-learning baselines (bench continual's ewc and olora; off in LifeAlign's own recipes)
    ewc_lambda: float = knob(0.0, "baselines", "Online EWC: penalty on the short update weighted by earlier tasks' Fisher (kept in the bank).")
    olora_lambda: float = knob(0.0, "baselines", "O-LoRA: penalty on the short adapter's A inside earlier tasks' input subspaces.")

    def validate(self) -> "Recipe":
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise RecipeError(f"{f.name} must be a finite number, got {value}")
        for f in fields(self):
            key, allowed = f.name, f.metadata.get("choices")
            if allowed and getattr(self, key) not in allowed:
                raise RecipeError(f"{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        positive = ("beta", "batch_size", "grad_accum", "max_length", "max_prompt_length", "lora_r", "lora_alpha", "bank_rank", "max_grad_norm")
        for key in positive:
            if getattr(self, key) <= 0:
                raise RecipeError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("focal_gamma", "max_steps", "max_pairs", "checkpoint_every", "sft_warmup_steps", "epochs", "replay_size", "ewc_lambda", "olora_lambda",
                    "weight_decay"):
            if getattr(self, key) < 0:
                raise RecipeError(f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("tau", "lr"):  # a learning rate above 1 blows LoRA weights up (--lr 1e30 once committed a useless core)
            if not 0 < getattr(self, key) <= 1:
                raise RecipeError(f"{key} must be in (0, 1], got {getattr(self, key)}")
        for key in ("route_quantile", "route_gate", "projection_gamma", "replay_ratio", "replay_mix", "warmup_ratio"):
            if not 0 <= getattr(self, key) <= 1:
                raise RecipeError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if not 0 <= self.lora_dropout < 1:
            raise RecipeError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not -1 <= self.route_threshold <= 1:
            raise RecipeError(f"route_threshold must be in [-1, 1] (< 0: each domain's calibrated threshold), got {self.route_threshold}")
        if not 0 <= self.seed < 2**63:
            raise RecipeError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.max_prompt_length >= self.max_length:
            raise RecipeError("max_prompt_length must be smaller than max_length")
        if self.core_from == "slot" and (self.slot_mode, self.slot_from) != ("specialist", "base"):
            raise RecipeError(f"core_from: slot needs slot_mode: specialist and slot_from: base (the core's update is then the slot); "
                              f"set core_from: update to use slot_mode: {self.slot_mode}, slot_from: {self.slot_from}")
        if self.epochs == 0 and self.max_steps == 0:
            raise RecipeError("set epochs or max_steps above 0")
        if not self.target_modules or not all(self.target_modules):
            raise RecipeError("target_modules must name at least one module, and no empty name")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in fields(Recipe)}
# The names TRL's and LLaMA-Factory's configs give the same knobs, accepted as they are.
ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "lr_schedule", "model_name_or_path": "model",
    "lora_rank": "lora_r", "lora_target": "target_modules", "pref_beta": "beta", "cutoff_len": "max_length",
    "max_samples": "max_pairs",
}


def _coerce(key: str, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, with an error naming the key."""
    default = getattr(Recipe(), key)
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool) or value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if isinstance(value, bool) or isinstance(value, dict) or (isinstance(value, list) and not isinstance(default, list)):
            raise TypeError(value)  # true is no number, and a list is no scalar
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, list):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError(value)
            return list(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise RecipeError(f"recipe key {key!r}: cannot use {value!r} as {type(default).__name__}") from None


def canonical_key(key: str) -> str:
    """A recipe key, with another tool's name for it (``learning_rate``) translated (``lr``)."""
    return ALIASES.get(key, key)


def _check_keys(keys: list[str], where: str) -> None:
    for key in keys:
        if key not in _FIELDS:
            names = {**{k: k for k in _FIELDS}, **ALIASES}  # another tool's name is a key too, so it is suggested too
            close = difflib.get_close_matches(key, list(names), n=1)
            hint = "" if not close else f" (did you mean {close[0]!r}?)" if names[close[0]] == close[0] else \
                f" (did you mean {close[0]!r}, that is {names[close[0]]!r}?)"
            raise RecipeError(f"{where}: unknown recipe key {key!r}{hint}")


def recipes_dir() -> Path:
    """The folder holding the preset YAML files shipped with the package."""
    # recipes/ is a data-only folder installed as ``lifealign_lite.recipes`` (a namespace package, so
    # importlib.resources cannot read it under an editable install); the import spec still knows where it is.
    spec = importlib.util.find_spec("lifealign_lite.recipes")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "recipes"


def list_recipes() -> list[tuple[str, str]]:
    """(name, one-line description) of every preset."""
    out = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        out.append((path.stem, str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""))
    return out


def recipe_path(name_or_path: str | None = None) -> Path:
    """The YAML file of a preset name (``edge-cpu``) or a path."""
    name_or_path = name_or_path or DEFAULT_RECIPE
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = recipes_dir() / f"{name_or_path}.yaml"
        if not path.exists():
            known = ", ".join(n for n, _ in list_recipes())
            raise RecipeError(f"unknown recipe {name_or_path!r}; known presets: {known}; or pass a path to a .yaml file")
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    return path


def load_recipe(name_or_path: str | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load a preset by name (``edge-cpu``) or a YAML file by path, then apply overrides.

    Overrides whose value is ``None`` are ignored, so CLI flags left unset keep the recipe's value. Keys may be
    given by TRL's or LLaMA-Factory's names (:data:`ALIASES`).
    """
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at byte {exc.start + 1}); re-save the recipe as UTF-8") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of key: value")
    data = {canonical_key(k): v for k, v in data.items()}
    data.setdefault("name", path.stem)
    _check_keys(list(data), str(path))
    values = {k: _coerce(k, v) for k, v in data.items()}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        key = canonical_key(key)
        _check_keys([key], "override")
        values[key] = _coerce(key, value)
    return Recipe(**values).validate()


def parse_set_options(items: list[str]) -> dict[str, Any]:
    """Parse ``--set key=value`` options into an overrides dict."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set expects KEY=VALUE, got {item!r}")
        key = canonical_key(key.strip())
        _check_keys([key], "--set")
        out[key] = value
    return out
