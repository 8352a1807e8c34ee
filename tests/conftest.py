"""Shared fixtures: a tiny offline tokenizer and Llama model, the shared data folder, and the real-model cache.

Nothing here downloads anything. The tiny tokenizer is a byte-level BPE trained in-code on a few sentences,
with ChatML special tokens and SmolLM2's chat template, so the chat-template code paths run exactly as they
do for the real default model; the tiny model is a randomly initialised 2-layer LlamaForCausalLM.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SHARED_DATA = REPO.parent / "shared" / "data"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "user assistant system",
    "How do I reset my password? Use the forgot password link on the sign-in page.",
    "I do not know. Maybe ask someone else.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Take two tablets with food, and see a doctor if the pain lasts.",
]
TINY_SEED = 1234


def build_tiny_tokenizer():
    """A byte-level BPE (every string encodes, decoding round-trips) with ChatML specials and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_base(tokenizer, seed: int = TINY_SEED):
    """A random 2-layer Llama wrapped as lifealign_lite's BaseModel; the same seed gives the same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lifealign_lite.model import BaseModel, ModelInfo

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=False,
    )
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    torch.random.set_rng_state(rng_state)
    info = ModelInfo(name="tiny-llama", fingerprint=f"tiny-{seed}", quant="none", dtype="float32", device="cpu")
    return BaseModel(model=model, tokenizer=tokenizer, info=info)


# -- helpers several test modules import (``from conftest import ...``) ----------------------------------------

def invoke_cli(args, home: Path | dict):
    """``lifealign-lite ARGS`` in-process, with LIFEALIGN_HOME=home (or ``home`` a dict: that environment) and a wide
    terminal; a clean exit (any code) is fine, an uncaught exception is a bug in the command and fails the test."""
    from typer.testing import CliRunner

    from lifealign_lite.cli.app import app

    env = {"COLUMNS": "250", **home} if isinstance(home, dict) else {"LIFEALIGN_HOME": str(home), "COLUMNS": "250"}
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), f"{args}: {result.exception!r}"
    return result


def align_examples(root: Path, home: Path, recipe, domains) -> Path:
    """A bank at ``root`` built by aligning the sample domains (examples/NAME.jsonl) in order: one version each."""
    from lifealign_lite.align import align

    for domain in domains:
        align(EXAMPLES / f"{domain}.jsonl", recipe, home, root, domain=domain)
    return root


def copy_bank(source: Path, dest: Path):
    """A private copy of a bank (hard links inside it kept, as on a real disk), for a test that changes it."""
    from lifealign_lite.memory.bank import Bank

    subprocess.run(["cp", "-a", str(source), str(dest)], check=True)
    return Bank(dest)


@contextlib.contextmanager
def reaped(proc: subprocess.Popen):
    """Whatever happens inside the block, the process is not left running: killed if need be, and waited for."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_base(tiny_tokenizer):
    """A fresh tiny model per test (attaching adapters modifies the model in place)."""
    return build_tiny_base(tiny_tokenizer)


@pytest.fixture
def tiny_base_factory(tiny_tokenizer) -> Callable[..., object]:
    """Build more tiny models with identical base weights (for resume and reload comparisons)."""
    return lambda seed=TINY_SEED: build_tiny_base(tiny_tokenizer, seed)


def require(module: str):
    """Import a module the test set-up installs (``bash scripts/setup.sh``: the test extra, the embedded models);
    a missing one fails with the way to install it, never a silent skip. Optional extras that CI does not install
    (llama-cpp-python) are skipped with their reason instead, where they are used."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"{module} is not installed ({exc}); `bash scripts/setup.sh` installs everything the tests need", pytrace=False)


def require_path(path: Path, what: str) -> Path:
    """A file or folder the tests need (../shared's data, the console script): missing fails with what to do."""
    if not Path(path).exists():
        pytest.fail(f"{what} missing: {path}; " + ("../shared must point to the shared folder (DESIGN.md, data/)" if "shared" in str(path)
                                                  else "`bash scripts/setup.sh` installs it"), pytrace=False)
    return Path(path)


def embedded_model_dir(home: Path) -> Path:
    """The embedded default model (SmolLM2, converted once into ``home``); missing fails with the way to install it."""
    from lifealign_lite.model import ModelError, default_model_dir

    try:
        return default_model_dir(home)
    except ModelError as exc:
        pytest.fail(f"embedded default model unavailable ({exc}); `bash scripts/setup.sh` installs it", pytrace=False)


@pytest.fixture
def shared_data() -> Path:
    return require_path(SHARED_DATA, "shared data folder")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """An empty LIFEALIGN_HOME, one per test module (the tiny model needs no download or conversion)."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="session")
def lifealign_home() -> Path:
    """A persistent home for the real default model, so its GGUF conversion happens once per machine."""
    home = Path(os.environ.get("LIFEALIGN_TEST_HOME") or Path.home() / ".cache" / "lifealign-lite-test")
    home.mkdir(parents=True, exist_ok=True)
    return home


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An isolated home (nothing is read from or written to the user's real one) and a wide terminal, set in this
    process and returned as the environment to pass to a command run."""
    home = tmp_path / "home"
    monkeypatch.setenv("LIFEALIGN_HOME", str(home))
    monkeypatch.setenv("COLUMNS", "200")
    return {"LIFEALIGN_HOME": str(home), "COLUMNS": "200"}


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread: on a small shared CPU, thread hand-offs cost more than the math (on this
    shared 2-core CPU, two threads made a real-model run about 6x slower whenever other processes were busy, while one
    thread costs little when it is idle)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def two_domain_bank(tmp_path_factory, lifealign_home) -> Path:
    """The sample medical (bank version 1) then support (version 2) domains aligned into one bank with the real
    model, in tiny runs (2 steps of 2 pairs, 8 pairs each), once per session. Tests copy it before changing it."""
    from lifealign_lite.recipe import load_recipe

    recipe = load_recipe("edge-cpu", {"max_steps": 2, "batch_size": 2, "max_pairs": 8})
    return align_examples(tmp_path_factory.mktemp("two-domain") / "bank", lifealign_home, recipe, ("medical", "support"))


@pytest.fixture(scope="module")
def torch_session(two_domain_bank, lifealign_home):
    """Chat's torch session on the real two-domain bank (adapters merged directly), domain medical; one per test module."""
    from lifealign_lite.chat import open_session
    from lifealign_lite.recipe import load_recipe

    return open_session(two_domain_bank, lifealign_home, load_recipe(None), domain="medical")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """The tiny model as a local model folder (safetensors + tokenizer), for the CLI's --model. Its generation
    config names no end-of-sequence token, so an answer always runs to --max-new-tokens."""
    folder = tmp_path_factory.mktemp("tiny-model")
    base = build_tiny_base(tiny_tokenizer)
    base.model.generation_config.eos_token_id = None
    base.model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def tiny_recipe(tiny_model_dir: Path, **overrides):
    """The recipe of the tiny banks: 2 steps of 2 pairs on the tiny model, routed by its own hidden states."""
    from lifealign_lite.recipe import load_recipe

    return load_recipe("edge-cpu", {"model": str(tiny_model_dir), "router": "base", "max_steps": 2, "batch_size": 2, "max_pairs": 8, **overrides})


@pytest.fixture(scope="session")
def tiny_bank(tmp_path_factory, tiny_model_dir) -> Path:
    """A bank with one domain (medical, 2 steps of 2 pairs) aligned on the tiny model, routed by its own hidden
    states (no embedding model to load): seconds, for CLI tests that need a bank but not a real model."""
    return align_examples(tmp_path_factory.mktemp("tiny-bank") / "bank", tmp_path_factory.mktemp("tiny-home"), tiny_recipe(tiny_model_dir), ("medical",))


@pytest.fixture
def tiny_bank_copy(tiny_bank, tmp_path):
    """A private copy of ``tiny_bank`` for a test that changes it."""
    return copy_bank(tiny_bank, tmp_path / "bank")


@pytest.fixture(scope="session")
def tiny_two_domain_bank(tmp_path_factory, tiny_model_dir) -> Path:
    """medical (version 1) then support (version 2) aligned on the tiny model (1 step of 2 pairs, short sequences):
    the bank the fault tests damage. Tests change a copy (``tiny_two_domain_copy``)."""
    recipe = tiny_recipe(tiny_model_dir, max_steps=1, max_pairs=4, max_length=64, max_prompt_length=32)
    return align_examples(tmp_path_factory.mktemp("tiny-two") / "bank", tmp_path_factory.mktemp("tiny-home"), recipe, ("medical", "support"))


@pytest.fixture
def tiny_two_domain_copy(tiny_two_domain_bank, tmp_path):
    """A private copy of ``tiny_two_domain_bank`` for a test that changes it."""
    return copy_bank(tiny_two_domain_bank, tmp_path / "bank")
