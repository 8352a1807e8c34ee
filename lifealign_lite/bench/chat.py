"""``bench chat``: chat latency with an adapter merged, unmerged, on a 4-bit base and on llama.cpp, each in its own
process (``harness.py``), plus the CLI's cold start (``lifealign-lite chat --prompt`` from process start to first byte)."""

from __future__ import annotations

import os
import re
import shlex
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import BenchError
from .harness import (CHAT_MODES, GEN_PROMPT, bench_recipe, cli_command, greedy_generate, help_seconds, machine_info, mb, median, parse_variants, rate,
                      ratio, round_or_none, run_child)


CHAT_PROMPTS = (
    "What is a good way to learn a new language?",
    "Give me three tips for sleeping better.",
    "How do I make a simple tomato sauce?",
    "Why do leaves change colour in autumn?",
)


def make_random_adapter(home: Path, folder: Path, model_spec: str = "default", r: int = 16, seed: int = 0, scale: float = 0.01) -> Path:
    """A non-zero LoRA (r=16 on q_proj/v_proj) saved as a PEFT folder, standing in for a trained memory."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lifealign_lite.model import load_base
    from lifealign_lite.system import quiet

    base = load_base(model_spec, home, "none")
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    gen = torch.Generator().manual_seed(seed)
    with quiet():
        model = get_peft_model(base.model, cfg, adapter_name="bench")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(str(folder), selected_adapters=["bench"])
    out = Path(folder) / "bench" if (Path(folder) / "bench" / "adapter_config.json").is_file() else Path(folder)
    return out


def bank_domain(bank: Path, domain: str | None) -> str:
    """The bank memory to time: ``domain`` if given, else the first domain, else the core."""
    from lifealign_lite.memory.bank import Bank

    state = Bank(bank).load()
    if domain:
        return domain
    if state.domains:
        return sorted(state.domains)[0]
    if state.core_dir():
        return "core"
    raise BenchError(f"{bank}: the bank holds no adapter yet; align a domain first or leave out --bank")


def one_chat(options: dict, mode: str) -> dict:
    """First-token time and tokens/s of ChatSession.ask with each memory merged, unmerged, on a 4-bit base or on llama.cpp.

    Every memory (each domain and the core of ``--bank``, else the random adapter) answers ``repeats`` timed
    prompts after one untimed one; ``switch_ms`` is the median time to make a memory active from another (or
    from base). In ``merged`` and ``llama.cpp`` modes the same prompts also go through plain transformers
    ``generate`` of the base alone in fp32 (a second copy of it, greedy, exactly ``new_tokens`` tokens),
    interleaved with the answers so both see the same machine load: the anchor. ``llama.cpp`` mode adds a second
    anchor, plain greedy decoding of the base GGUF in llama.cpp (no adapter, no penalty, exactly ``new_tokens``).
    """
    from lifealign_lite.session import BASE

    home = Path(options["home"])
    t = time.perf_counter()
    session, memories = (_llama_session if mode == "llama.cpp" else _torch_session)(options, mode, home)
    load_s = time.perf_counter() - t
    anchors = {}
    if mode in ("merged", "llama.cpp"):
        from lifealign_lite.model import load_base
        from lifealign_lite.system import one_torch_thread

        if mode == "llama.cpp":  # as chat's routing embedder beside llama.cpp: torch's own pool would throttle llama.cpp's threads
            one_torch_thread(session.threads)
        plain = load_base(options.get("model") or "default", home, "none")
        anchors["transformers"] = lambda prompt, n: greedy_generate(plain.model.eval(), plain.tokenizer, prompt, n)
    if mode == "llama.cpp":
        anchors["llama_cpp"] = lambda prompt, n: llama_greedy(session, prompt, n)
    for generate in anchors.values():
        generate(GEN_PROMPT, 4)  # warm-up, as the untimed first answer
    prompts = list(CHAT_PROMPTS)
    per_memory, anchor_rates, first_ask = {}, {name: [] for name in anchors}, None
    for memory in memories:
        session.domain = memory
        turns = []
        for i in range(1 + max(1, options["repeats"])):
            turn = session.ask(prompts[i % len(prompts)], max_new_tokens=options["new_tokens"], keep_history=False)
            decode = rate(max(turn.tokens - 1, 0), turn.seconds - turn.first_token_s, 2)
            turns.append({"first_token_s": round(turn.first_token_s, 3), "tokens": turn.tokens, "seconds": round(turn.seconds, 2),
                          "tokens_per_s": rate(turn.tokens, turn.seconds, 2), "decode_tokens_per_s": decode})
            if i > 0:
                for name, generate in anchors.items():
                    anchor_rates[name].append(rate(*generate(prompts[i % len(prompts)], options["new_tokens"]), 2))
        first_ask = first_ask or turns[0]
        timed = turns[1:]  # the first ask also merges the adapter (and warms up)
        per_memory[memory] = {"first_token_s": round(statistics.median(x["first_token_s"] for x in timed), 3),
                              "tokens_per_s": median([x["tokens_per_s"] for x in timed]),
                              "decode_tokens_per_s": median([x["decode_tokens_per_s"] for x in timed]), "turns": timed}
    switches = []
    for memory in memories * 3:
        session.activate(next((m for m in memories if m != memory), BASE))
        t = time.perf_counter()
        session.activate(memory)
        switches.append((time.perf_counter() - t) * 1e3)
    slowest = min(per_memory, key=lambda m: per_memory[m]["tokens_per_s"] or 0.0)
    return {
        "ok": True, "mode": mode, "quant": "nf4" if mode == "nf4" else "none", "merged": mode != "unmerged", "memory": options.get("domain") or "random adapter",
        "load_s": round(load_s, 2),
        "first_ask": first_ask,
        "slowest_memory": slowest,
        **{k: per_memory[slowest][k] for k in ("first_token_s", "tokens_per_s", "decode_tokens_per_s", "turns")},
        "memories": {m: {k: v for k, v in r.items() if k != "turns"} for m, r in per_memory.items()},
        "switch_ms": round(statistics.median(switches), 2),
        "engine": session.engine,
        "llama_threads": session.threads if mode == "llama.cpp" else None,  # system.llama_threads unless --threads
        "transformers_tokens_per_s": None,
        "transformers_threads": _torch_threads() if anchors else None,  # 1 beside more than one llama.cpp thread (system.one_torch_thread)
        **{f"{name}_tokens_per_s": median(rates) for name, rates in anchor_rates.items()},
        "footprint_mb": mb(session.model.get_memory_footprint()) if hasattr(session.model, "get_memory_footprint") else None,
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _torch_session(options: dict, mode: str, home: Path):
    """The transformers ChatSession of ``mode`` (merged, unmerged, nf4) and the memories to time."""
    from peft import PeftModel

    from lifealign_lite.chat import ChatSession, open_session
    from lifealign_lite.memory.adapter import read_adapter
    from lifealign_lite.model import load_base
    from lifealign_lite.system import quiet

    quant = "nf4" if mode == "nf4" else "none"
    merge = mode != "unmerged"
    if options.get("bank"):
        session = open_session(Path(options["bank"]), home, bench_recipe(options, quant=quant), domain=options["domain"], merge=merge)
        return session, session.available()[:-1]  # every domain and the core, not base
    base = load_base(options.get("model") or "default", home, quant)
    direct = merge and quant == "none"  # as open_session: the direct fp32 merge (without it, activate merged nothing)
    session = ChatSession(model=base.model.eval(), tokenizer=base.tokenizer, state=None, domain="bench", threshold=0.0,
                          embedder_factory=lambda: None, merge=merge, direct=direct)
    if direct:
        session.updates = {"bench": read_adapter(Path(options["adapter"]))[0]}
    else:
        with quiet():
            session.model = PeftModel.from_pretrained(base.model, options["adapter"], adapter_name="bench").eval()
    return session, ["bench"]


def _llama_session(options: dict, mode: str, home: Path):
    """The llama.cpp session (the bank's adapters, else the random adapter as ``bench``) and the memories to time."""
    from lifealign_lite.xllama import open_xllama_base, open_xllama_session

    n_threads = int(options["threads"]) if options.get("threads") else None
    if options.get("bank"):
        session = open_xllama_session(Path(options["bank"]), home, bench_recipe(options), domain=options["domain"], threads=n_threads)
        return session, session.available()[:-1]
    session = open_xllama_base(options.get("model") or "default", home, {"bench": Path(options["adapter"])}, n_threads)
    session.domain = "bench"
    return session, ["bench"]


def llama_greedy(session, prompt: str, new_tokens: int) -> tuple[int, float]:
    """Plain greedy decoding in llama.cpp of exactly ``new_tokens`` tokens: the base GGUF on the session's own server
    (same build, same threads), no adapter, no penalty, the end token ignored: (tokens, seconds)."""
    text = session.server.render([{"role": "user", "content": prompt}])
    usage: dict = {}
    t = time.perf_counter()
    for _ in session.stream(text, "base", new_tokens, plain=True, usage=usage):
        pass
    return int(usage.get("completion_tokens") or new_tokens), time.perf_counter() - t


def cold_start(home: Path, bank: Path, domain: str, prompt: str, new_tokens: int, timeout: float, threads: int | None = None,
               model: str = "default") -> dict:
    """Time ``lifealign-lite chat --prompt`` from process start to first answer byte and to exit."""
    cmd = cli_command() + ["chat", "--prompt", prompt, "--domain", domain, "--bank", str(bank), "--max-new-tokens", str(new_tokens)]
    cmd += [] if model == "default" else ["--model", model]
    env = dict(os.environ, LIFEALIGN_HOME=str(home), PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = None
    try:
        chunk = proc.stdout.read(1)
        if chunk:
            first = time.perf_counter() - t0
        rest, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "command": cmd}
    total = time.perf_counter() - t0
    answer = (chunk + rest).decode(errors="replace").strip()
    ok = proc.returncode == 0
    engine = re.search(r"engine: (\S+)", err.decode(errors="replace"))
    res = {"ok": ok, "domain": domain, "engine": engine.group(1) if engine else None, "first_output_s": round_or_none(first),
           "total_s": round(total, 2), "answer_chars": len(answer), "command": shlex.join(cmd)}
    if not ok:
        res["error"] = f"exit code {proc.returncode}: {err.decode(errors='replace')[-1500:]}"
    return res


def bench_chat(home: Path, bank: Path | None = None, domain: str | None = None, model: str = "default", new_tokens: int = 64,
               repeats: int = 3, cold_repeats: int = 2, prompt: str = CHAT_PROMPTS[0], modes: str | Sequence[str] | None = None,
               threads: int | None = None, timeout: float = 1800, log: Callable[[str], None] | None = None, verbose: bool = False) -> dict:
    """Chat latency with an adapter merged, unmerged, on a 4-bit base and on llama.cpp, plus the CLI's cold start.

    The top-level figures are those of the engine ``chat`` uses by default here (``settings.engine``): the
    ``llama.cpp`` mode where its binding imports (xllamacpp by default) and the model has a GGUF, else ``merged``; the
    ``llama_cpp_*`` keys are the llama.cpp mode's, ``llama_cpp_tokens_per_s`` its plain llama.cpp anchor (the base
    GGUF without adapter or penalty on the same xllamacpp build and threads).
    By default every mode runs, llama.cpp only where it is the default engine.
    """
    from lifealign_lite.engines import engine_for
    from lifealign_lite.llama_gguf import LLAMA_CPP

    log = log or (lambda s: None)
    names = parse_variants(modes, CHAT_MODES)
    with tempfile.TemporaryDirectory(prefix="lifealign-bench-chat-") as tmp:
        options: dict[str, Any] = {"home": str(home), "model": model, "new_tokens": new_tokens, "repeats": repeats, "threads": threads,
                                   "batch_size": 2, "max_length": 256, "lr": 5e-5, "seed": 0}
        if bank:
            options.update(bank=str(bank), domain=bank_domain(Path(bank), domain))
            memory = f"bank {bank}, memory {options['domain']}"
        else:
            log("creating a random LoRA adapter (r=16, q_proj/v_proj) ...")
            options["adapter"] = str(make_random_adapter(home, Path(tmp) / "adapter", model))
            memory = "random non-zero LoRA r=16 on q_proj,v_proj"
        engine = engine_for("auto", Path(bank) if bank else None, bench_recipe(options))
        if not modes and engine != LLAMA_CPP:
            names.remove(LLAMA_CPP)
        results = {}
        for mode in names:
            log(f"chat {mode} in its own process ...")
            results[mode] = run_child(f"chat-{mode}", options, timeout, log, verbose) | {"mode": mode}
        cold_domain = options.get("domain")
        cold = []
        if not bank and cold_repeats > 0:
            log("cold start skipped: `lifealign-lite chat` needs a bank (pass --bank)")
        for i in range(max(0, cold_repeats) if bank else 0):
            log(f"cold start {i + 1}/{cold_repeats}: lifealign-lite chat --prompt ... --domain {cold_domain}")
            cold.append(cold_start(home, Path(bank), cold_domain, prompt, new_tokens, timeout, threads, model))
    ok = [c for c in cold if c.get("ok")]
    merged, unmerged, llama = results.get("merged", {}), results.get("unmerged", {}), results.get(LLAMA_CPP, {})
    figures = LLAMA_CPP if engine == LLAMA_CPP and llama.get("ok") else "merged"
    ours = results.get(figures, {}) if results.get(figures, {}).get("ok") else {}
    llama = llama if llama.get("ok") else {}
    first_output = min((c["first_output_s"] for c in ok if c.get("first_output_s") is not None), default=None)
    log("timing lifealign-lite --help ...")
    return {
        "bench": "chat", "machine": machine_info(),
        "settings": {"model": model, "memory": memory, "new_tokens": new_tokens, "repeats": repeats, "threads": threads, "engine": engine,
                     "figures_from_mode": figures},
        "tokens_per_s": ours.get("tokens_per_s"),
        "transformers_tokens_per_s": ours.get("transformers_tokens_per_s"),
        "ratio_vs_transformers": ratio(ours.get("tokens_per_s"), ours.get("transformers_tokens_per_s")),
        "first_token_s": ours.get("first_token_s"),
        "switch_ms": ours.get("switch_ms"),
        "cold_start_first_token_s": first_output,
        "help_s": help_seconds(),
        "llama_cpp_tokens_per_s": llama.get("llama_cpp_tokens_per_s"),
        "ratio_vs_llama_cpp": ratio(ours.get("tokens_per_s"), llama.get("llama_cpp_tokens_per_s")),
        "llama_cpp_chat_tokens_per_s": llama.get("tokens_per_s"),
        "llama_cpp_first_token_s": llama.get("first_token_s"),
        "llama_cpp_switch_ms": llama.get("switch_ms"),
        "llama_cpp_threads": llama.get("llama_threads"),
        "llama_cpp_transformers_threads": llama.get("transformers_threads"),  # its torch anchor's threads
        "llama_cpp_ratio_vs_transformers": ratio(llama.get("tokens_per_s"), llama.get("transformers_tokens_per_s")),
        "torch_tokens_per_s": merged.get("tokens_per_s") if merged.get("ok") else None,
        "modes": results,
        "merged_vs_unmerged_tokens_per_s": ratio(merged.get("tokens_per_s"), unmerged.get("tokens_per_s")) if merged.get("ok") and unmerged.get("ok") else None,
        "cold_start": {"domain": cold_domain, "runs": cold, "best_total_s": min((c["total_s"] for c in ok), default=None),
                       "best_first_output_s": first_output},
    }


one_mode = one_chat  # what the harness runs in the child for chat-MODE
