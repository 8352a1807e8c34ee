"""Tests for the GGUF export (lifealign_lite.gguf_export, `memory export --format gguf|gguf-merged`).

The structural checks run on a tiny base GGUF written here from the tiny Llama's weights (q and k rows permuted
as llama.cpp's converter does) and on the real embedded SmolLM2 GGUF's metadata; the llama.cpp parity check runs
only where llama-cpp-python is installed (an optional extra) and is marked slow (it loads the real model).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from lifealign_lite.gguf_export import (
    GGUFExportError,
    _rope_rows,
    check_adapter_file,
    read_base,
    write_adapter_gguf,
    write_merged_gguf,
)
from lifealign_lite.memory.adapter import read_adapter
from lifealign_lite.memory.consolidate import LowRank

from conftest import invoke_cli as invoke
from conftest import require

gguf = require("gguf")


def write_base_gguf(model_dir: Path, out: Path, arch: str = "llama", drop: str | None = None) -> Path:
    """The tiny model as a base GGUF (f32): llama.cpp's tensor names, q/k rows permuted for its rotary embedding."""
    config = json.loads((model_dir / "config.json").read_text())
    weights = load_file(str(model_dir / "model.safetensors"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_embedding_length(config["hidden_size"])
    for key, w in weights.items():
        name = names.get_name(key, try_suffixes=(".weight",))
        if name is None or name == drop:
            continue
        w = w.float().numpy()
        if ".q_proj." in key or ".k_proj." in key:
            w = _rope_rows(w, config["num_attention_heads"] if ".q_proj." in key else config["num_key_value_heads"])
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    return write_base_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    text = (result.stderr or result.output).strip()
    lines = text.splitlines()
    if len(lines) > 1 and lines[0].startswith("export: ") and lines[0].endswith(" ..."):
        text = "\n".join(lines[1:])  # export's status line said what it was starting; then the error, in one line
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    return text


def tensors_of(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(path).tensors}


def test_adapter_gguf_passes_structure_and_reproduces_each_update(tiny_bank_copy, tiny_gguf, tiny_model_dir, tmp_path):
    bank = tiny_bank_copy
    out = tmp_path / "medical.gguf"
    result = invoke(["memory", "export", "medical", out, "--format", "gguf", "--base-gguf", tiny_gguf, "--bank", bank.root], tmp_path / "home")
    assert result.exit_code == 0, result.output
    base = read_base(tiny_gguf)
    assert check_adapter_file(out, base) == []
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.type"].contents() == "adapter" and reader.fields["adapter.type"].contents() == "lora"
    update = read_adapter(bank.load().slot_dir("medical"))[0]
    rank = max(u.rank for u in update.values())
    assert reader.fields["adapter.lora.alpha"].contents() == float(rank)  # llama.cpp's scale alpha / rank is 1
    got = tensors_of(out)
    heads = json.loads((tiny_model_dir / "config.json").read_text())["num_attention_heads"]
    assert len(got) == 2 * len(update)
    for module, u in update.items():
        layer, proj = module.split(".")[2], module.split(".")[-1]
        name = f"blk.{layer}.{'attn_q' if proj == 'q_proj' else 'attn_v'}.weight"
        delta = (got[f"{name}.lora_b"] @ got[f"{name}.lora_a"]).astype(np.float64)
        want = u.dense().double().numpy()
        want = _rope_rows(want, heads) if proj == "q_proj" else want
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(delta, want, atol=2e-3 * np.abs(want).max())  # f16 factors


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_merged_gguf_holds_base_plus_update(tiny_bank_copy, tiny_gguf, tmp_path, outtype):
    bank = tiny_bank_copy
    out = tmp_path / f"merged-{outtype}.gguf"
    result = invoke(["memory", "export", "medical", out, "--format", "gguf-merged", "--outtype", outtype, "--base-gguf", tiny_gguf,
                     "--bank", bank.root], tmp_path / "home")
    assert result.exit_code == 0, result.output
    base, merged = gguf.GGUFReader(tiny_gguf), gguf.GGUFReader(out)
    assert merged.fields["general.type"].contents() == "model" and merged.fields["llama.block_count"].contents() == 2
    adapter = tmp_path / "a.gguf"
    write_adapter_gguf(read_adapter(bank.load().slot_dir("medical"))[0], read_base(tiny_gguf), adapter, "a")
    lora = tensors_of(adapter)
    base_t = {t.name: t for t in base.tensors}
    assert sorted(t.name for t in merged.tensors) == sorted(base_t)
    for t in merged.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        want = gguf.quants.dequantize(base_t[t.name].data, base_t[t.name].tensor_type)
        if f"{t.name}.lora_a" in lora:
            want = want + lora[f"{t.name}.lora_b"] @ lora[f"{t.name}.lora_a"]
            assert not np.allclose(want, gguf.quants.dequantize(base_t[t.name].data, base_t[t.name].tensor_type))
        if w.ndim == 2:
            assert t.tensor_type.name == outtype.upper()
        np.testing.assert_allclose(w, want, atol=(2e-3 if outtype == "f16" else 2e-2) * max(1.0, np.abs(want).max()))


def test_real_embedded_gguf_maps_every_attention_and_mlp_module(tmp_path):
    """The default model's GGUF: every linear module of every block maps to a tensor of the right shape."""
    from lifealign_lite.model import embedded_gguf_path

    base = read_base(embedded_gguf_path())
    assert (base.arch, base.blocks, base.heads, base.kv_heads) == ("llama", 30, 9, 3)
    shapes = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
              "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
    g = torch.Generator().manual_seed(0)
    update = {f"model.layers.{i}.{'mlp' if p in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{p}":
              LowRank(torch.randn(s[0], 2, generator=g), torch.randn(2, s[1], generator=g)) for i in (0, 29) for p, s in shapes.items()}
    out = write_adapter_gguf(update, base, tmp_path / "a.gguf", "t")
    assert out["tensors"] == 28 and check_adapter_file(tmp_path / "a.gguf", base) == []


@pytest.mark.parametrize("module, message", [
    ("lm_head", "the output head cannot be exported"),
    ("model.embed_tokens", "the token embeddings cannot be exported"),
    ("model.layers.7.self_attn.q_proj", "has no tensor blk.7.attn_q.weight"),
    ("model.layers.0.self_attn.rotary", "no tensor of a llama GGUF corresponds"),
])
def test_unmappable_modules_are_refused(tiny_gguf, tmp_path, module, message):
    update = {module: LowRank(torch.ones(32, 1), torch.ones(1, 32))}
    with pytest.raises(GGUFExportError, match=message):
        write_adapter_gguf(update, read_base(tiny_gguf), tmp_path / "a.gguf", "t")
    assert not (tmp_path / "a.gguf").exists() and not list(tmp_path.glob(".a.gguf.*"))


def test_export_refusals_are_one_line(tiny_bank_copy, tiny_model_dir, tiny_gguf, tmp_path):
    bank = tiny_bank_copy
    home = tmp_path / "home"
    gpt2 = write_base_gguf(tiny_model_dir, tmp_path / "gpt2.gguf", arch="gpt2")
    cases = [
        (["--format", "gguf", "--base-gguf", gpt2], "architecture 'gpt2' is not one this exporter maps"),
        (["--format", "gguf"], "has no GGUF here"),  # the tiny base is no default model: no embedded GGUF
        (["--format", "gguf", "--base-gguf", tmp_path / "none.gguf"], "no such GGUF file"),
        (["--format", "gguf", "--base-gguf", tiny_model_dir / "config.json"], "not a GGUF model file"),
        (["--format", "gguf-merged", "--outtype", "q4_k", "--base-gguf", tiny_gguf], "unknown merged type 'q4_k'"),
        (["--format", "onnx"], "unknown export format 'onnx'"),
        (["--format", "peft", "--base-gguf", tiny_gguf], "--check and --base-gguf go with --format gguf"),
    ]
    for extra, message in cases:
        out = tmp_path / "out.gguf"
        line = one_line_error(invoke(["memory", "export", "medical", out, *extra, "--bank", bank.root], home))
        assert message in line, (extra, line)
        assert not out.exists()
    (tmp_path / "taken.gguf").write_text("x")
    line = one_line_error(invoke(["memory", "export", "medical", tmp_path / "taken.gguf", "--format", "gguf", "--base-gguf", tiny_gguf,
                                  "--bank", bank.root], home))
    assert "exists; choose a new file name" in line and (tmp_path / "taken.gguf").read_text() == "x"
    damaged = write_base_gguf(tiny_model_dir, tmp_path / "no-blk1.gguf", drop="blk.1.attn_q.weight")
    line = one_line_error(invoke(["memory", "export", "medical", tmp_path / "x.gguf", "--format", "gguf", "--base-gguf", damaged,
                                  "--bank", bank.root], home))
    assert "has no tensor blk.1.attn_q.weight" in line


def test_compare_logprobs_counts_flips_and_how_near_they_were():
    from lifealign_lite.export import compare_logprobs

    def logp(*p):
        return np.log(np.array(p, dtype=np.float64))

    want = [logp(0.5, 0.3, 0.2), logp(0.4, 0.35, 0.25), logp(0.1, 0.1, 0.8)]
    got = [logp(0.5, 0.3, 0.2), logp(0.3, 0.45, 0.25), logp(0.1, 0.1, 0.8)]  # the second flips between its top two
    report = compare_logprobs(want, got)
    assert report["top1_agreement"] == pytest.approx(2 / 3)
    assert report["disagreement_gaps"] == [pytest.approx(np.log(0.4 / 0.35))]
    assert report["max_abs_logprob_diff"] == pytest.approx(np.log(0.4 / 0.3))  # the largest over each prompt's tokens
    assert report["mean_max_abs_logprob_diff"] == pytest.approx(np.log(0.4 / 0.3) / 3)
    assert compare_logprobs(want, want)["disagreement_gaps"] == []


def test_parity_without_llama_cpp_says_so(tiny_bank_copy, tiny_gguf, tmp_path, monkeypatch):
    bank = tiny_bank_copy
    import sys

    if "llama_cpp" not in sys.modules:
        monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as where it is not installed
    else:
        pytest.skip("llama-cpp-python is installed here")
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n")
    result = invoke(["memory", "export", "medical", tmp_path / "m.gguf", "--format", "gguf", "--base-gguf", tiny_gguf,
                     "--check", pairs, "--bank", bank.root], tmp_path / "home")
    line = one_line_error(result)
    assert "needs llama-cpp-python" in line and (tmp_path / "m.gguf").is_file()  # the export itself was written


@pytest.mark.slow
def test_parity_in_llama_cpp_with_the_real_model(two_domain_bank, lifealign_home, shared_data, tmp_path):
    """A real bank entry in llama.cpp agrees with the PEFT model on the top-1 next token (where llama-cpp-python is installed)."""
    pytest.importorskip("llama_cpp")
    from lifealign_lite.export import export_entry, gguf_parity
    from lifealign_lite.recipe import load_recipe

    out = tmp_path / "medical.gguf"
    export_entry(two_domain_bank, "medical", out, "gguf", lifealign_home, load_recipe(None))
    report = gguf_parity(two_domain_bank, "medical", out, shared_data / "truthfulqa" / "dev.jsonl", 10, lifealign_home, load_recipe(None))
    assert report["export"]["top1_agreement"] >= 0.9, report
