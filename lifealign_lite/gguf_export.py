"""A bank entry as GGUF for llama.cpp (and Ollama): a LoRA adapter file, or a whole model with the entry merged in.

Everything is read from and named after the base model's own GGUF (the embedded SmolLM2 file for the default
model), through the ``gguf`` package:

- the adapter file holds, for every adapted weight ``blk.N.attn_q.weight``, the tensors ``blk.N.attn_q.weight.lora_a``
  (PEFT's A, ``r x d_in``) and ``.lora_b`` (B, ``d_out x r``), with ``general.type = adapter``,
  ``adapter.type = lora`` and ``adapter.lora.alpha = r`` (llama.cpp scales by alpha / r: 1, since the bank folds
  LoRA's scaling into B);
- the merged file is the base GGUF with ``W + B @ A`` in place of every adapted weight, in f16 or q8_0.

llama.cpp stores Llama's q and k projections with the rows of each head interleaved for its rotary embedding
(what its converter does to the Hugging Face weights), so B's rows of those two are permuted the same way;
the structural check (:func:`check_adapter_file`) compares every tensor with the base GGUF's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import LifeAlignError
from .files import atomic_path
from .memory.consolidate import LowRank

# architectures whose tensor layout this exporter knows: name -> whether q/k rows are permuted for rotary embedding
ARCHITECTURES = {"llama": True, "qwen2": False, "qwen3": False}
REFUSED_TENSORS = {"token_embd": "the token embeddings", "output": "the output head"}
MERGED_TYPES = ("f16", "q8_0")


class GGUFExportError(LifeAlignError, ValueError):
    """A bank entry that cannot be written as GGUF for this base model."""


@dataclass
class GGUFBase:
    """What the exporter needs to know about a base model's GGUF file."""

    path: Path
    arch: str
    blocks: int
    heads: int
    kv_heads: int
    tensors: dict[str, tuple[tuple[int, ...], str]]  # name -> (numpy shape, ggml type name)


def read_base(path: Path) -> GGUFBase:
    """Architecture, head counts and tensor shapes of a base model GGUF (a clear error for anything else)."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise GGUFExportError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
        arch = str(reader.fields["general.architecture"].contents())
    except Exception as exc:  # noqa: BLE001 - whatever does not parse is not a GGUF model
        raise GGUFExportError(f"{path}: not a GGUF model file ({type(exc).__name__}: {' '.join(str(exc).split())[:80]})") from None
    kind = reader.fields.get("general.type")
    if kind is not None and str(kind.contents()) != "model":
        raise GGUFExportError(f"{path}: a GGUF {kind.contents()}, not a base model")

    def count(key: str) -> int:
        field = reader.fields.get(f"{arch}.{key}")
        return int(field.contents()) if field is not None else 0

    tensors = {t.name: (tuple(int(n) for n in reversed(t.shape)), t.tensor_type.name) for t in reader.tensors}
    return GGUFBase(path, arch, count("block_count"), count("attention.head_count"), count("attention.head_count_kv") or count("attention.head_count"), tensors)


def map_modules(modules: list[str], base: GGUFBase, shapes: dict[str, tuple[int, int]] | None = None) -> dict[str, str]:
    """Hugging Face module name -> the base GGUF's weight tensor name, for every adapted module, or a refusal naming why."""
    import gguf

    if base.arch not in ARCHITECTURES:
        raise GGUFExportError(f"{base.path}: architecture {base.arch!r} is not one this exporter maps (it knows {', '.join(ARCHITECTURES)}); "
                              "export --format merged and convert that folder with llama.cpp's convert_hf_to_gguf.py instead")
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == base.arch)
    # as many blocks as the modules name, so a block the GGUF lacks is reported as such
    numbers = [int(part) for m in modules for part in m.split(".") if part.isdigit()]
    names = gguf.get_tensor_name_map(arch, max([base.blocks, *(n + 1 for n in numbers)]))
    out = {}
    for module in modules:
        name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if name is None:
            raise GGUFExportError(f"{module}: no tensor of a {base.arch} GGUF corresponds to this module; it cannot be exported as GGUF")
        if name.split(".")[0] in REFUSED_TENSORS:
            raise GGUFExportError(f"{module}: a LoRA on {REFUSED_TENSORS[name.split('.')[0]]} cannot be exported as a llama.cpp adapter "
                                  "(it applies LoRA to linear weights only); use --format peft or merged")
        if name not in base.tensors:
            raise GGUFExportError(f"{module}: the base GGUF {base.path.name} has no tensor {name}; is it the model the bank was built on?")
        if shapes is not None and tuple(shapes[module]) != base.tensors[name][0]:
            raise GGUFExportError(f"{module}: the update is {tuple(shapes[module])}, the base GGUF's {name} is {base.tensors[name][0]}; "
                                  "the GGUF is not the model the bank was built on")
        out[module] = name
    return out


def _rope_rows(b: np.ndarray, heads: int) -> np.ndarray:
    """Reorder the output rows of a q or k projection as llama.cpp's converter reorders the weights: within each
    head, the two rotary halves are interleaved."""
    return b.reshape(heads, 2, b.shape[0] // heads // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def gguf_factors(update: dict[str, LowRank], base: GGUFBase) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """GGUF tensor name -> (A, B) in the base GGUF's row order, every factor padded to the largest rank."""
    names = map_modules(sorted(update), base, {m: u.shape for m, u in update.items()})
    rank = max([u.rank for u in update.values()] + [1])
    out = {}
    for module, name in names.items():
        u = update[module]
        a = np.zeros((rank, u.shape[1]), dtype=np.float32)
        b = np.zeros((u.shape[0], rank), dtype=np.float32)
        a[: u.rank], b[:, : u.rank] = u.A.float().numpy(), u.B.float().numpy()
        if ARCHITECTURES[base.arch] and name.split(".")[-2] in ("attn_q", "attn_k"):
            b = _rope_rows(b, base.heads if name.split(".")[-2] == "attn_q" else base.kv_heads)
        out[name] = (a, b)
    return out


def _write_atomic(path: Path, fill) -> None:
    """Write a GGUF through a temporary file beside ``path``, renamed into place once complete."""
    import gguf  # noqa: F401 - fail on a missing package before creating anything

    with atomic_path(path) as tmp:
        writer = fill(str(tmp))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def write_adapter_gguf(update: dict[str, LowRank], base: GGUFBase, out: Path, name: str) -> dict:
    """``update`` (scaling folded into B) as a llama.cpp LoRA adapter for ``base``; f16 factors, like the bank's."""
    import gguf

    factors = gguf_factors(update, base)
    rank = next(iter(factors.values()))[0].shape[0]

    def fill(tmp: str):
        writer = gguf.GGUFWriter(tmp, base.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))  # llama.cpp scales by alpha / rank = 1
        for tensor, (a, b) in sorted(factors.items()):
            writer.add_tensor(f"{tensor}.lora_a", a.astype(np.float16))
            writer.add_tensor(f"{tensor}.lora_b", b.astype(np.float16))
        return writer

    _write_atomic(out, fill)
    return {"format": "gguf", "out": str(out), "base_gguf": str(base.path), "rank": rank, "tensors": 2 * len(factors)}


def write_merged_gguf(update: dict[str, LowRank], base: GGUFBase, out: Path, outtype: str = "f16") -> dict:
    """The base GGUF with ``W + B @ A`` in every adapted weight; 2-D weights in ``outtype`` (f16 or q8_0), norms in f32.

    The base's weights are dequantized first (never merged into quantized weights), then written in ``outtype``.
    """
    import gguf
    from gguf.quants import dequantize, quantize

    if outtype not in MERGED_TYPES:
        raise GGUFExportError(f"unknown merged type {outtype!r}; use {' or '.join(MERGED_TYPES)}")
    qtype = gguf.GGMLQuantizationType.F16 if outtype == "f16" else gguf.GGMLQuantizationType.Q8_0
    factors = gguf_factors(update, base)
    reader = gguf.GGUFReader(base.path)
    skip = {"general.architecture", "general.file_type", "general.type"}

    def fill(tmp: str):
        writer = gguf.GGUFWriter(tmp, base.arch)
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in skip:
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
        for t in reader.tensors:
            if t.name not in factors and (len(t.data.shape) == 1 or t.tensor_type == qtype):
                writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)  # norms, and weights already in outtype
                continue
            w = dequantize(t.data, t.tensor_type).astype(np.float32)
            if t.name in factors:
                a, b = factors[t.name]
                w = w + b @ a
            if qtype == gguf.GGMLQuantizationType.Q8_0 and w.shape[-1] % 32 == 0:  # q8_0 packs rows in blocks of 32
                q = quantize(w, qtype)
                writer.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=qtype)
            else:
                writer.add_tensor(t.name, w.astype(np.float16))
        return writer

    _write_atomic(out, fill)
    return {"format": f"gguf-merged ({outtype})", "out": str(out), "base_gguf": str(base.path), "merged_tensors": len(factors)}


def check_adapter_file(path: Path, base: GGUFBase) -> list[str]:
    """Problems of a GGUF LoRA adapter against its base (empty: it passes): metadata set, every tensor a pair
    ``NAME.lora_a`` / ``NAME.lora_b`` of a base weight, with shapes that multiply to that weight's."""
    import gguf

    problems = []
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    for key, want in (("general.type", "adapter"), ("adapter.type", "lora"), ("general.architecture", base.arch)):
        if meta.get(key) != want:
            problems.append(f"{key} is {meta.get(key)!r}, not {want!r}")
    if not isinstance(meta.get("adapter.lora.alpha"), float) or meta["adapter.lora.alpha"] <= 0:
        problems.append("adapter.lora.alpha missing or not positive")
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    for name, shape in shapes.items():
        stem, _, part = name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            problems.append(f"{name}: not a .lora_a or .lora_b tensor")
        elif stem not in base.tensors:
            problems.append(f"{name}: the base has no tensor {stem}")
        elif part == "lora_a":
            b = shapes.get(f"{stem}.lora_b")
            d_out, d_in = base.tensors[stem][0]
            if b is None:
                problems.append(f"{name}: no matching .lora_b")
            elif shape[1] != d_in or b[0] != d_out or shape[0] != b[1]:
                problems.append(f"{stem}: lora_a {shape} and lora_b {b} do not make the base's {base.tensors[stem][0]}")
    if not shapes:
        problems.append("no tensors")
    return problems
