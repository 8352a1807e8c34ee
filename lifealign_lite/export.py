"""Export a bank entry: as a PEFT adapter folder, merged into a full model folder transformers loads, or as GGUF
for llama.cpp (a LoRA adapter file, or a whole model with the entry merged in: :mod:`.gguf_export`).

Merging happens in the base's full precision (never into 4-bit weights), and every merged export is checked
against the model it came from: both must give the same next-token logits on a probe prompt. A GGUF export is
checked structurally against the base GGUF as it is written; :func:`gguf_parity` compares it with the PEFT model
in llama.cpp itself (llama-cpp-python, an optional extra).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import InputError
from .memory.adapter import BankError, adapter_rank, read_adapter
from .memory.bank import Bank
from .memory.router import CORE
from .model import DEFAULT_MODEL, DEFAULT_MODEL_NAME, embedded_gguf_path, load_base, resolve_model_path
from .system import quiet

PROBE = [{"role": "user", "content": "In one sentence, what should I do if I feel unwell?"}]


def entry_dir(bank: Bank, name: str) -> Path:
    state = bank.load()
    if name == CORE:
        if not state.core_dir():
            raise BankError(f"{bank.root}: the bank has no core yet; align a domain first")
        return state.core_dir()
    return state.slot_dir(name)


FORMATS = ("peft", "merged", "gguf", "gguf-merged")


def base_gguf(base_spec: str, explicit: Path | None = None) -> Path:
    """The base model's GGUF: ``explicit`` when given, else the embedded file of the default model (a clear error
    for any other base, which has no GGUF of its own here)."""
    if explicit is not None:
        if not Path(explicit).is_file():
            raise BankError(f"{explicit}: no such GGUF file (--base-gguf)")
        return Path(explicit)
    if base_spec in (DEFAULT_MODEL, DEFAULT_MODEL_NAME):
        return embedded_gguf_path()
    raise BankError(f"the bank's base {base_spec!r} has no GGUF here: convert it with llama.cpp's convert_hf_to_gguf.py "
                    "and pass it with --base-gguf FILE")


def export_gguf(bank_dir: Path, name: str, out: Path, fmt: str, base_gguf_path: Path | None = None, outtype: str = "f16") -> dict:
    """Write ``name`` as a llama.cpp LoRA adapter (``gguf``) or a whole merged model (``gguf-merged``) file ``out``."""
    from .gguf_export import read_base, write_merged_gguf

    out = Path(out)
    if out.exists():
        raise BankError(f"{out}: exists; choose a new file name")
    bank = Bank(bank_dir)
    if out.resolve().is_relative_to(bank.root.resolve()):
        raise BankError(f"{out}: inside the bank {bank.root}, whose files must not change; choose a file outside it")
    src = entry_dir(bank, name)
    base_path = base_gguf(bank.manifest()["base"]["name"], base_gguf_path)
    if fmt == "gguf":
        return adapter_gguf(src, base_path, out, f"lifealign-lite {name}") | {"llama_cpp": f"llama-cli -m {base_path} --lora {out} -cnv"}
    return write_merged_gguf(_gguf_update(src), read_base(base_path), out, outtype) | {"llama_cpp": f"llama-cli -m {out} -cnv"}


def adapter_gguf(src: Path, base_path: Path, out: Path, label: str) -> dict:
    """Write the adapter folder ``src`` (a bank entry) as a llama.cpp LoRA adapter file ``out`` for the base GGUF
    ``base_path``, checked structurally against it (``export --format gguf``; chat on llama.cpp caches these)."""
    from .gguf_export import check_adapter_file, read_base, write_adapter_gguf

    update = _gguf_update(src)
    base = read_base(base_path)
    result = write_adapter_gguf(update, base, out, label)
    problems = check_adapter_file(out, base)
    if problems:
        out.unlink()
        raise BankError(f"{out}: the written adapter fails the structural check ({problems[0]}); nothing was kept")
    return result


def _gguf_update(src: Path) -> dict:
    """The entry's weight updates, refusing a LoRA on the embeddings (llama.cpp adapters cannot hold one)."""
    with open(src / "adapter_model.safetensors", "rb") as fh:  # PEFT names embedding LoRAs lora_embedding_A / _B
        header = fh.read(8 + int.from_bytes(fh.read(8), "little"))
    if b"lora_embedding" in header:
        raise BankError(f"{src}: a LoRA on the embeddings cannot be exported as a llama.cpp adapter; use --format peft or merged")
    return read_adapter(src)[0]


def export_entry(bank_dir: Path, name: str, out: Path, fmt: str, home: Path, recipe, base_gguf_path: Path | None = None, outtype: str = "f16") -> dict:
    """Write ``name`` (a domain or ``core``) to ``out`` as ``peft``, ``merged``, ``gguf`` or ``gguf-merged``;
    returns what was checked.

    A PEFT export names the base model's folder (the converted embedded model in the model cache, a local folder)
    or hub id as ``base_model_name_or_path`` and carries the tokenizer, so ``AutoPeftModelForCausalLM`` loads it
    offline as it is.
    """
    out = Path(out)
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; use {', '.join(FORMATS)}")
    if fmt.startswith("gguf"):
        return export_gguf(bank_dir, name, out, fmt, base_gguf_path, outtype)
    if out.exists() and not out.is_dir():
        raise BankError(f"{out}: exists and is not a folder; choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise BankError(f"{out}: exists and is not empty; choose a new folder")
    bank = Bank(bank_dir)
    if out.resolve().is_relative_to(bank.root.resolve()):
        raise BankError(f"{out}: inside the bank {bank.root}, whose files must not change; choose a folder outside it")
    src = entry_dir(bank, name)  # the version is verified when it is opened, so nothing damaged is copied
    base_spec = bank.manifest()["base"]["name"]  # the model the bank was built on
    if fmt == "peft":
        return export_peft(src, out, resolve_model_path(base_spec, home))
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = load_base(base_spec, home, "none", trust_remote_code=recipe.trust_remote_code)
    bank.check_base(base.info.identity())
    probe = base.tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with quiet(), torch.no_grad():  # no third-party warnings or progress bars around our one line
        peft_model = PeftModel.from_pretrained(base.model, str(src)).eval()
        expected = peft_model(**probe).logits[0, -1]
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
        base.tokenizer.save_pretrained(out)
        reloaded = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
        got = reloaded(**probe).logits[0, -1]
    diff = float((got - expected).abs().max())
    if diff > 1e-3 or got.argmax() != expected.argmax():
        raise BankError(f"{out}: the merged export answers differently from the bank entry (max logit difference {diff:.2e})")
    return {"format": "merged", "out": str(out), "max_logit_diff": diff}


def export_peft(src: Path, out: Path, base_path: str) -> dict:
    """Copy the adapter folder, point its config at ``base_path`` and add the base's tokenizer."""
    from transformers import AutoTokenizer

    # copyfile, not copy2: the exported files get the user's usual mode (0644 under umask 022), not the bank's
    shutil.copytree(src, out, dirs_exist_ok=True, copy_function=shutil.copyfile)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_path
    config_path.write_text(json.dumps(config, indent=2))
    AutoTokenizer.from_pretrained(base_path).save_pretrained(out)
    return {"format": "peft", "out": str(out), "base": base_path}


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def export_all(bank_dir: Path, out: Path, home: Path, recipe) -> dict:
    """Every domain and the core as PEFT folders named after them in ``out``, and the vLLM command that serves them."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BankError(f"{out}: exists and is not an empty folder; choose a new folder")
    state = Bank(bank_dir).load()
    names = sorted(state.domains) + ([CORE] if state.core_dir() else [])
    if not names:
        raise BankError(f"{bank_dir}: no domains aligned yet; nothing to export")
    results = [export_entry(bank_dir, name, out / name, "peft", home, recipe) for name in names]
    # the largest rank any exported module has (entries keep their own rank, at most bank_rank), rounded up to a value vLLM takes
    largest = max((adapter_rank(out / name) or state.meta.get("bank_rank", 8)) for name in names)
    rank = next((r for r in VLLM_LORA_RANKS if r >= largest), VLLM_LORA_RANKS[-1])
    modules = " ".join(f"{name}={out / name}" for name in names)
    command = f"vllm serve {results[0]['base']} --enable-lora --lora-modules {modules} --max-lora-rank {rank}"
    return {"format": "peft", "out": str(out), "names": names, "vllm": command}


def parity_prompt_ids(tokenizer, prompts: Path, n: int, max_prompt_tokens: int = 256) -> list[list[int]]:
    """The chat-templated prompt token ids of ``n`` pairs of ``prompts`` (a seeded sample), each cut to its last
    ``max_prompt_tokens``: the prompts every parity figure is measured on."""
    from .data import load_pairs

    pairs = load_pairs(prompts, max_pairs=n, seed=0)
    return [tokenizer.apply_chat_template(p.prompt, add_generation_prompt=True, return_dict=True)["input_ids"][-max_prompt_tokens:] for p in pairs]


def transformers_logprobs(model, ids: list[list[int]]) -> list:
    """Next-token log-probabilities (float64 numpy) of a transformers model after each prompt."""
    import torch

    with quiet(), torch.no_grad():
        return [torch.log_softmax(model(input_ids=torch.tensor([t])).logits[0, -1].double(), -1).numpy() for t in ids]


def llama_cpp():
    """llama-cpp-python's ``Llama``, or a clear error where it is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise BankError("the parity check needs llama-cpp-python: `python -m pip install 'lifealign-lite[gguf]'` "
                        "(it compiles llama.cpp; the GGUF file was written and checked structurally)") from None
    return Llama


def llama_logprobs(model_path: Path, lora: Path | None, ids: list[list[int]]) -> list:
    """Next-token log-probabilities (float64 numpy) after each prompt of a GGUF model in llama.cpp, with a GGUF LoRA
    adapter applied when ``lora`` is given."""
    import numpy as np

    from .system import llama_threads

    Llama = llama_cpp()
    n = llama_threads()
    with quiet():
        llm = Llama(model_path=str(model_path), lora_path=str(lora) if lora else None, n_ctx=max(map(len, ids)) + 8,
                    n_threads=n, n_threads_batch=n, logits_all=True, verbose=False)  # without logits_all, llama-cpp-python 0.3.36 leaves scores at zero
    out = []
    for toks in ids:
        llm.reset()
        llm.eval(toks)
        logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        out.append(logits - np.logaddexp.reduce(logits))
    del llm
    return out


def compare_logprobs(want: list, got: list) -> dict:
    """Top-1 agreement of ``got`` with ``want``; the largest absolute log-prob difference over each prompt's 10 most
    likely tokens (``want``'s); and for every disagreement, how far ``got``'s top-1 token lies below ``want``'s top-1
    in ``want`` (nats, largest first): a flip between two near-equal tokens is rounding, a flip over a wide gap a fault."""
    import numpy as np

    top = [int(np.argmax(x) == np.argmax(y)) for x, y in zip(want, got)]
    diffs = [float(np.abs(x[idx] - y[idx]).max()) for x, y in zip(want, got) for idx in [np.argsort(x)[-10:]]]
    gaps = sorted((float(x.max() - x[np.argmax(y)]) for x, y in zip(want, got) if np.argmax(x) != np.argmax(y)), reverse=True)
    return {"top1_agreement": sum(top) / len(top), "max_abs_logprob_diff": max(diffs), "mean_max_abs_logprob_diff": sum(diffs) / len(diffs),
            "disagreement_gaps": gaps}


def gguf_parity(bank_dir: Path, name: str, gguf_file: Path, prompts: Path, n: int, home: Path, recipe,
                base_gguf_path: Path | None = None, max_prompt_tokens: int = 256) -> dict:
    """Next-token log-probabilities of the GGUF export in llama.cpp against the PEFT model (transformers) on the
    prompts of ``n`` pairs of ``prompts`` (:func:`compare_logprobs`). ``gguf_file`` is an adapter (applied to the
    base GGUF) or a merged model, told apart by its ``general.type``. The same figures for the bare base (base GGUF
    against the transformers base) separate what the GGUF's quantization costs from what the export costs, and the
    share of prompts whose top-1 token the memory changes shows the comparison is not trivial.
    """
    import gguf
    import numpy as np
    from peft import PeftModel

    llama_cpp()  # before loading anything
    bank = Bank(bank_dir)
    src = entry_dir(bank, name)
    base_path = base_gguf(bank.manifest()["base"]["name"], base_gguf_path)
    kind = str(gguf.GGUFReader(gguf_file).fields["general.type"].contents())
    base = load_base(bank.manifest()["base"]["name"], home, "none", trust_remote_code=recipe.trust_remote_code)
    bank.check_base(base.info.identity())
    ids = parity_prompt_ids(base.tokenizer, prompts, n, max_prompt_tokens)
    with quiet():
        peft_model = PeftModel.from_pretrained(base.model, str(src)).eval()
    want = transformers_logprobs(peft_model, ids)
    with peft_model.disable_adapter():
        bare = transformers_logprobs(peft_model, ids)
    got = llama_logprobs(gguf_file, None, ids) if kind == "model" else llama_logprobs(base_path, gguf_file, ids)
    return {"entry": name, "gguf": str(gguf_file), "kind": kind, "base_gguf": str(base_path), "prompts": len(ids),
            "export": compare_logprobs(want, got), "base_only": compare_logprobs(bare, llama_logprobs(base_path, None, ids)),
            "memory_changes_top1": sum(int(np.argmax(x) != np.argmax(y)) for x, y in zip(want, bare)) / len(ids)}
