"""Chat on llama.cpp (lifealign_lite/llamacpp.py): the engine choice, and the session on the real default model.

The engine-choice tests run everywhere (CI has no llama-cpp-python: ``auto`` falls back to torch there). The
session tests need llama-cpp-python and skip with a reason without it; they use the two-domain bank of the real
default model (conftest.py, built once per session) and a fresh home, so every adapter is exported once here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from lifealign_lite.llamacpp import LLAMA_CPP, TORCH, engine_for, llama_cpp_importable
from lifealign_lite.model import ModelError
from lifealign_lite.recipe import load_recipe

needs_llama_cpp = pytest.mark.skipif(not llama_cpp_importable(), reason="llama-cpp-python is not installed (optional extra 'llamacpp')")
PROMPTS = [
    "I have a mild headache. Can I take ibuprofen?",
    "I forgot my password and the reset email never arrived. How do I get back into my account?",
    "What should I eat before a long run?",
    "My order arrived damaged. What can I do?",
    "Is it safe to take two different cold medicines together?",
]
TOKENS = 12


# -- the engine choice (no llama.cpp needed) -------------------------------------------------------------------

def test_auto_falls_back_to_torch_without_llama_cpp_and_explicit_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what an environment without the package sees
    assert not llama_cpp_importable()
    recipe = load_recipe(None)
    assert engine_for("auto", None, recipe) == TORCH
    with pytest.raises(ModelError, match="pip install llama-cpp-python"):
        engine_for(LLAMA_CPP, None, recipe)


def test_a_model_without_gguf_chats_on_torch_and_refuses_llama_cpp(tiny_bank, tiny_model_dir):
    recipe = load_recipe("edge-cpu", {"model": str(tiny_model_dir)})
    assert engine_for("auto", tiny_bank, recipe) == TORCH
    with pytest.raises(ModelError, match="has no GGUF here"):
        engine_for(LLAMA_CPP, tiny_bank, recipe)
    with pytest.raises(Exception, match="unknown engine 'vllm'"):
        engine_for("vllm", tiny_bank, recipe)


def test_torch_only_settings_keep_torch(monkeypatch):
    """--unmerged and a bitsandbytes precision exist only on torch, whatever is installed."""
    recipe = load_recipe(None)
    assert engine_for("auto", None, recipe, unmerged=True) == TORCH
    assert engine_for("auto", None, load_recipe(None, {"quant": "nf4"})) == TORCH
    with pytest.raises(ModelError, match="--unmerged"):
        engine_for(LLAMA_CPP, None, recipe, unmerged=True)
    assert engine_for("torch", None, recipe) == TORCH


# -- the session on the real default model (llama-cpp-python) --------------------------------------------------

@pytest.fixture(scope="module")
def gguf_home(tmp_path_factory) -> Path:
    """A fresh home: the adapters are exported into its cache by the first session."""
    return tmp_path_factory.mktemp("gguf-home")


@pytest.fixture(scope="module")
def exports(two_domain_bank, gguf_home) -> list[str]:
    """The notes of the first session's opening (one export per memory), and that session closed again."""
    from lifealign_lite.llamacpp import open_chat

    notes: list[str] = []
    open_chat(two_domain_bank, gguf_home, load_recipe(None), domain="medical", note=notes.append)
    return notes


@pytest.fixture(scope="module")
def session(two_domain_bank, gguf_home, exports):
    from lifealign_lite.llamacpp import open_chat

    return open_chat(two_domain_bank, gguf_home, load_recipe(None), domain="medical")


@pytest.fixture(scope="module")
def torch_session(two_domain_bank, lifealign_home):
    from lifealign_lite.chat import open_session

    return open_session(two_domain_bank, lifealign_home, load_recipe(None), domain="medical", merge=True)


def next_logits_llama(session, memory: str, ids: list[int]) -> np.ndarray:
    import llama_cpp

    session.activate(memory)
    session._forget()
    session.model.eval(ids)
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(session.model.ctx, -1), shape=(session.model.n_vocab(),)).copy()


@needs_llama_cpp
@pytest.mark.integration
def test_answers_with_a_memory(session):
    assert session.engine == LLAMA_CPP and session.available() == ["medical", "support", "core", "base"]
    session.history = []
    pieces: list[str] = []
    turn = session.ask(PROMPTS[0], on_token=pieces.append, max_new_tokens=TOKENS)
    assert turn.text.strip() and turn.text == "".join(pieces).strip() and turn.memory == "medical" and turn.route is None
    assert session.active == "medical" and 0 < turn.tokens <= TOKENS + 2 and turn.first_token_s > 0
    assert session.history[-1] == {"role": "assistant", "content": turn.text}


@needs_llama_cpp
@pytest.mark.integration
def test_each_memory_changes_the_logits_and_a_switch_back_answers_the_same(session):
    """The adapters are applied (each memory's logits differ from base's) and a switch clears what the previous
    one computed: the greedy answer with medical is the same before and after answering with support and base."""
    ids = session.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True)
    base = next_logits_llama(session, "base", ids)
    for memory in ("medical", "support", "core"):
        assert np.abs(next_logits_llama(session, memory, ids) - base).max() > 1e-3, memory
    session.set_domain("medical")
    first = session.ask(PROMPTS[0], max_new_tokens=TOKENS, keep_history=False).text
    for other in ("support", "base"):
        session.set_domain(other)
        session.ask(PROMPTS[0], max_new_tokens=TOKENS, keep_history=False)
    session.set_domain("medical")
    assert session.ask(PROMPTS[0], max_new_tokens=TOKENS, keep_history=False).text == first


@needs_llama_cpp
@pytest.mark.integration
def test_prompt_token_ids_equal_the_transformers_path(session, torch_session):
    conversation = [{"role": "user", "content": "Hi! <b>Two</b> questions: é, 東京?"}, {"role": "assistant", "content": "Sure."},
                    {"role": "user", "content": PROMPTS[1]}]
    for messages in (conversation, [{"role": "system", "content": "Be brief."}, *conversation]):
        want = torch_session.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert session.tokenizer.apply_chat_template(messages, add_generation_prompt=True) == list(want)
    assert session.tokenizer("plain text, continued")["input_ids"] == torch_session.tokenizer("plain text, continued")["input_ids"]


@needs_llama_cpp
@pytest.mark.integration
def test_next_token_agrees_with_the_torch_session(session, torch_session):
    """Top-1 next token of llama.cpp (Q4_1 base + GGUF adapter) against chat's torch session (the same weights
    de-quantized, the adapter merged in fp32), per memory, on five prompts."""
    import torch

    for memory in ("medical", "support", "core", "base"):
        torch_session.activate(memory)
        agree = 0
        for prompt in PROMPTS:
            ids = session.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            with torch.no_grad():
                want = torch_session.model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
            agree += int(np.argmax(next_logits_llama(session, memory, ids)) == np.argmax(want))
        assert agree >= len(PROMPTS) - 1, f"{memory}: top-1 agrees on {agree} of {len(PROMPTS)} prompts"


@needs_llama_cpp
@pytest.mark.integration
def test_adapters_are_exported_once_and_reused(two_domain_bank, gguf_home, exports, session):
    from lifealign_lite.llamacpp import CACHE, open_chat

    assert sum("exporting" in n for n in exports) == 3  # medical, support, core
    files = sorted((gguf_home / CACHE).glob("*.gguf"))
    assert sorted(session.adapter_files.values()) == files and len(files) == 3
    stamps = [f.stat().st_mtime_ns for f in files]
    notes: list[str] = []
    again = open_chat(two_domain_bank, gguf_home, load_recipe(None), domain="support", note=notes.append)
    assert not notes and sorted(again.adapter_files.values()) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps


@needs_llama_cpp
@pytest.mark.integration
def test_ctrl_c_returns_the_partial_answer_and_the_next_answer_is_whole(session):
    session.set_domain("medical")
    session.history = []
    whole = session.ask(PROMPTS[2], max_new_tokens=TOKENS, keep_history=False).text
    seen: list[str] = []

    def on_token(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 3:
            raise KeyboardInterrupt

    session.history = []
    turn = session.ask(PROMPTS[2], on_token=on_token, max_new_tokens=TOKENS)
    assert turn.interrupted and turn.text == "".join(seen).strip() and session.history[-1]["content"] == turn.text
    session.history = []
    assert session.ask(PROMPTS[2], max_new_tokens=TOKENS, keep_history=False).text == whole


@needs_llama_cpp
@pytest.mark.integration
def test_the_server_engine_answers_on_llama_cpp(session, two_domain_bank):
    """serve's Engine runs unchanged on the llama.cpp session: a chat request with a memory, and a text completion."""
    import threading

    from lifealign_lite.serve import Engine, Job

    engine = Engine(session, two_domain_bank, log=lambda s: None)
    for prompt in ([{"role": "user", "content": PROMPTS[1]}], "The capital of France is"):
        events: list[tuple] = []
        engine.run(Job(prompt=prompt, model="support", max_tokens=6), events.append, threading.Event())
        done = events[-1][1]
        assert events[0][0] == "start" and events[-1][0] == "done" and done.memory == "support"
        assert done.text == "".join(e[1] for e in events if e[0] == "text") and 0 < done.tokens <= 6 and done.prompt_tokens >= 5
    events = []
    engine.run(Job(prompt="Once upon a time", model="base", max_tokens=8, temperature=0.8, seed=3), events.append, threading.Event())
    events_again: list[tuple] = []
    engine.run(Job(prompt="Once upon a time", model="base", max_tokens=8, temperature=0.8, seed=3), events_again.append, threading.Event())
    assert events[-1][1].text == events_again[-1][1].text  # a seeded sample repeats


def test_threads_follow_omp_num_threads_else_the_idle_cpus(monkeypatch):
    from lifealign_lite.llamacpp import threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    cpus = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert threads() == cpus  # idle: every CPU
    monkeypatch.setattr(os, "getloadavg", lambda: (cpus + 5.0, 0.0, 0.0))
    assert threads() == 1  # busier than the CPUs: one thread, never zero
