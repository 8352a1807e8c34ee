"""Tests for lifealign_lite.train (and the adapter parts of lifealign_lite.model) on a tiny random Llama.

Everything runs on the CPU in a few seconds: tokenizing with the chat template and the truncation policy,
length-grouped batching, sequence log-probs against a naive full-logits computation, reference log-probs,
a short FPO run that must lower the loss, a frozen long-term memory adapter, checkpoint and resume, and
the saved adapter loading in PEFT itself.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from lifealign_lite import align as align_module
from lifealign_lite.align import AlignError, align
from lifealign_lite.data import Pair, write_pairs
from lifealign_lite.losses import fpo_loss
from lifealign_lite.model import MEMORY, SHORT, attach_adapters, reference_mode, save_adapter
from lifealign_lite.recipe import Recipe
from lifealign_lite.train import (
    Interrupted,
    Tokenized,
    _collate,
    length_grouped_batches,
    pair_logps,
    reference_logps,
    score_pairs,
    sequence_logps,
    tokenize_pairs,
    train_short_term,
)

DEVICE = "cpu"
pytestmark = pytest.mark.usefixtures("single_thread")


def msg(role: str, content: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content}]


def make_pair(q: str, good: str, bad: str) -> Pair:
    return Pair(prompt=msg("user", q), chosen=msg("assistant", good), rejected=msg("assistant", bad))


SYNTHETIC = [
    make_pair("What is the capital of France?", "Paris is the capital.", "I do not know."),
    make_pair("How do I reset my password?", "Use the forgot password link.", "Maybe ask someone else."),
    make_pair("When does water boil?", "At 100 degrees Celsius at sea level.", "The lazy dog."),
    make_pair("Is the fox quick?", "Yes, the quick brown fox jumps.", "No."),
    make_pair("What should I take for pain?", "Take two tablets with food, and see a doctor.", "Nothing, ever."),
    make_pair("Capital of France?", "Paris.", "Lyon, I think, or maybe somewhere else entirely."),
    make_pair("Where is the sign-in page?", "The link is on the sign-in page.", "I do not know."),
    make_pair("Does the dog jump?", "The fox jumps over the lazy dog.", "Ask someone else."),
    make_pair("At what level does water boil at 100 degrees?", "At sea level.", "Maybe at the capital."),
    make_pair("What link resets a password?", "The forgot password link.", "The quick brown link."),
    make_pair("Should I see a doctor?", "If the pain lasts, see a doctor.", "Never see a doctor."),
    make_pair("Who jumps over the dog?", "The quick brown fox.", "Paris."),
]


def tiny_recipe(**overrides) -> Recipe:
    values = dict(
        name="tiny", model="tiny", quant="none", lr=5e-3, beta=0.5, focal_gamma=2.0, batch_size=4, max_steps=15,
        warmup_ratio=0.0, max_length=96, max_prompt_length=48, lora_r=4, lora_alpha=8, seed=0,
    )
    values.update(overrides)
    return Recipe(**values).validate()


def short_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{SHORT}." in n}


def mean_fpo(model, items, pad_id, ref, beta=0.5, gamma=2.0) -> float:
    now = score_pairs(model, items, pad_id, DEVICE)
    return fpo_loss(now["chosen"], now["rejected"], ref["chosen"], ref["rejected"], beta=beta, gamma=gamma).losses.mean().item()


@pytest.fixture
def items(tiny_tokenizer):
    toks, stats = tokenize_pairs(SYNTHETIC, tiny_tokenizer, 96, 48)
    assert stats.truncated_prompts == stats.truncated_responses == 0
    return toks


def random_memory_adapter(base, recipe: Recipe, out_dir: Path) -> Path:
    """A long-term memory adapter with non-zero A and B, saved as a plain PEFT folder."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, target_modules=list(recipe.target_modules),
                     init_lora_weights=False, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(99)
    pm = get_peft_model(copy.deepcopy(base.model), cfg, adapter_name="mem")
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0)  # large enough to change the logits visibly
    save_adapter(pm, out_dir, "mem")
    return out_dir


def logits_of(model, ids, mask) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# ---------------------------------------------------------------------------
# tokenizing


def test_tokenize_applies_chat_template(tiny_tokenizer):
    pair = make_pair("What is the capital of France?", "Paris.", "Lyon.")
    (tok,), stats = tokenize_pairs([pair], tiny_tokenizer, 256, 128)
    assert stats.pairs == 1 and stats.truncated_prompts == 0 and stats.truncated_responses == 0
    decode = lambda ids: tiny_tokenizer.decode(ids)  # noqa: E731
    assert decode(tok.prompt) == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert decode(tok.chosen) == "Paris.<|im_end|>\n"
    assert decode(tok.rejected) == "Lyon.<|im_end|>\n"
    assert tok.prompt[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tiny_tokenizer.eos_token_id in tok.chosen
    assert tok.tokens == 2 * len(tok.prompt) + len(tok.chosen) + len(tok.rejected)


def test_tokenize_multi_turn_prompt_with_system(tiny_tokenizer):
    pair = Pair(
        prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Capital of France?"}],
        chosen=msg("assistant", "Paris."), rejected=msg("assistant", "Lyon."),
    )
    (tok,), _ = tokenize_pairs([pair], tiny_tokenizer, 256, 128)
    text = tiny_tokenizer.decode(tok.prompt)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    assert text.endswith("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_truncation_keeps_prompt_end_and_response_beginning(tiny_tokenizer):
    long_q = " ".join(["The quick brown fox jumps over the lazy dog."] * 6) + " Final question: capital of France?"
    long_a = " ".join(["Paris is the capital of France."] * 10)
    pairs = [make_pair(long_q, long_a, "No."), make_pair("Hi?", "Paris.", "Lyon.")]
    (full, _), _ = tokenize_pairs(pairs, tiny_tokenizer, 10_000, 9_999)
    max_prompt, max_len = 24, 40
    (cut, short), stats = tokenize_pairs(pairs, tiny_tokenizer, max_len, max_prompt)
    assert len(full.prompt) > max_prompt and len(full.chosen) > max_len - max_prompt  # the case really truncates

    assert stats.pairs == 2
    assert stats.truncated_prompts == 1
    assert stats.truncated_responses == 1
    # the prompt keeps its end: the question and the assistant header survive
    assert cut.prompt == full.prompt[-max_prompt:]
    assert tiny_tokenizer.decode(cut.prompt).endswith("capital of France?<|im_end|>\n<|im_start|>assistant\n")
    # responses keep their beginning, cut to what is left of max_length
    room = max_len - len(cut.prompt)
    assert cut.chosen == full.chosen[:room]
    assert cut.rejected == full.rejected[:room]  # short enough already: unchanged
    assert len(cut.prompt) + len(cut.chosen) <= max_len
    # the short pair is untouched
    assert len(short.prompt) < max_prompt and tiny_tokenizer.decode(short.chosen) == "Paris.<|im_end|>\n"


def test_truncation_counts_each_pair_once(tiny_tokenizer):
    long = " ".join(["Paris is the capital of France."] * 10)
    pairs = [make_pair(long, long, long)] * 3
    toks, stats = tokenize_pairs(pairs, tiny_tokenizer, 40, 20)
    assert (stats.pairs, stats.truncated_prompts, stats.truncated_responses) == (3, 3, 3)
    for t in toks:
        assert len(t.prompt) == 20 and len(t.chosen) == len(t.rejected) == 20


# ---------------------------------------------------------------------------
# batching


def fake_items(lengths: list[int]) -> list[Tokenized]:
    return [Tokenized(prompt=[1] * n, chosen=[2], rejected=[3]) for n in lengths]


@pytest.mark.parametrize("n, batch_size", [(1, 4), (10, 4), (12, 4), (37, 5), (700, 3)])
def test_length_grouped_batches_cover_every_index_once(n, batch_size):
    gen = torch.Generator().manual_seed(n)
    items = fake_items(torch.randint(1, 50, (n,), generator=gen).tolist())
    batches = length_grouped_batches(items, batch_size, seed=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert sum(len(b) < batch_size for b in batches) <= -(-n // (batch_size * 50))  # one short batch per chunk at most


def test_length_grouped_batches_are_deterministic_per_seed():
    items = fake_items([(i * 7) % 23 + 1 for i in range(40)])
    a = length_grouped_batches(items, 4, seed=1)
    assert a == length_grouped_batches(items, 4, seed=1)
    assert a != length_grouped_batches(items, 4, seed=2)


def test_length_grouped_batches_group_similar_lengths():
    items = fake_items(list(range(1, 41)))  # lengths all distinct, one chunk
    batches = length_grouped_batches(items, 4, seed=0)
    spans = sorted((min(items[i].tokens for i in b), max(items[i].tokens for i in b)) for b in batches)
    # within one chunk the batches are consecutive runs of the sorted lengths: their ranges never overlap
    for (_, hi), (lo, _) in zip(spans, spans[1:]):
        assert hi < lo


# ---------------------------------------------------------------------------
# log-probs


def naive_logps(model, ids, mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    sums, counts = [], []
    for b in range(ids.shape[0]):
        total, n = 0.0, 0
        for t in range(1, ids.shape[1]):
            if labels[b, t] != -100:
                total += logp[b, t - 1, labels[b, t]].item()
                n += 1
        sums.append(total)
        counts.append(n)
    return torch.tensor(sums), torch.tensor(counts)


def test_sequence_logps_matches_naive_full_logits(tiny_base, items):
    model = tiny_base.model
    pad = tiny_base.tokenizer.pad_token_id
    seqs = [(t.prompt, t.chosen) for t in items[:4]] + [(t.prompt, t.rejected) for t in items[:4]]
    ids, mask, labels = _collate(seqs, pad, DEVICE)
    assert (mask == 0).any()  # the batch really is padded
    with torch.no_grad():
        sums, counts = sequence_logps(model, ids, mask, labels)
        want_sums, want_counts = naive_logps(model, ids, mask, labels)
    assert counts.tolist() == want_counts.tolist() == [len(r) for _, r in seqs]
    assert torch.allclose(sums, want_sums, atol=1e-4, rtol=1e-5)
    assert (sums < 0).all()


def test_sequence_logps_is_independent_of_batch_padding(tiny_base, items):
    model, pad = tiny_base.model, tiny_base.tokenizer.pad_token_id
    with torch.no_grad():
        c, r, cn, rn = pair_logps(model, items[:6], pad, DEVICE)
        for i in range(6):
            c1, r1, cn1, rn1 = pair_logps(model, [items[i]], pad, DEVICE)
            assert torch.allclose(c[i], c1[0], atol=1e-4) and torch.allclose(r[i], r1[0], atol=1e-4)
            assert (cn[i], rn[i]) == (cn1[0], rn1[0]) == (len(items[i].chosen), len(items[i].rejected))


def test_score_pairs_keeps_item_order(tiny_base, items):
    model, pad = tiny_base.model, tiny_base.tokenizer.pad_token_id
    seen = []
    out = score_pairs(model, items, pad, DEVICE, batch_size=5, progress=seen.append)
    assert sum(seen) == len(items) and len(seen) == 3
    with torch.no_grad():
        for i in (0, 5, 11):
            c, r, _, _ = pair_logps(model, [items[i]], pad, DEVICE)
            assert out["chosen"][i].item() == pytest.approx(c.item(), abs=1e-4)
            assert out["rejected"][i].item() == pytest.approx(r.item(), abs=1e-4)
    assert out["chosen_tokens"].tolist() == [len(t.chosen) for t in items]


def test_reference_logps_equal_policy_at_init_and_differ_after_training(tiny_base, items, tmp_path):
    recipe = tiny_recipe(max_steps=5)
    model = attach_adapters(tiny_base, recipe)
    pad = tiny_base.tokenizer.pad_token_id
    ref = reference_logps(model, items, pad, DEVICE)
    now = score_pairs(model, items, pad, DEVICE)
    # LoRA B starts at zero: the short adapter changes nothing yet
    assert torch.allclose(ref["chosen"], now["chosen"], atol=1e-5)
    assert torch.allclose(ref["rejected"], now["rejected"], atol=1e-5)

    train_short_term(model, tiny_base.tokenizer, items, recipe, DEVICE, tmp_path / "ckpt")
    after = score_pairs(model, items, pad, DEVICE)
    assert (after["chosen"] - ref["chosen"]).abs().max() > 1e-3
    # the reference (adapter off) is still the untouched base model
    ref2 = reference_logps(model, items, pad, DEVICE)
    assert torch.allclose(ref2["chosen"], ref["chosen"], atol=1e-5)
    assert torch.allclose(ref2["rejected"], ref["rejected"], atol=1e-5)
    # and reference_mode left the short adapter trainable
    assert all(p.requires_grad == (f".{SHORT}." in n) for n, p in model.named_parameters())


# ---------------------------------------------------------------------------
# training


class Recorder:
    def __init__(self, stop_at: int | None = None):
        self.stop_at = stop_at
        self.calls: list[tuple] = []

    def start(self, phase, total, done=0):
        self.calls.append(("start", phase, total, done))

    def advance(self, phase, n, metrics):
        self.calls.append(("advance", phase, n, dict(metrics)))
        if phase == "train" and metrics.get("step") == self.stop_at:
            raise KeyboardInterrupt


def test_bf16_autocast_training_sees_updated_weights(tiny_base, items, tmp_path):
    """Under bf16 autocast the policy must keep changing step after step (autocast caches its bf16 weight
    copies per context, so a context held across optimizer steps would train on frozen copies)."""
    recipe = tiny_recipe()
    model = attach_adapters(tiny_base, recipe)
    pad = tiny_base.tokenizer.pad_token_id
    ref = reference_logps(model, items, pad, DEVICE, bf16_autocast=True)
    state = train_short_term(model, tiny_base.tokenizer, items, recipe, DEVICE, tmp_path / "ckpt", bf16_autocast=True)
    losses = [h["loss"] for h in state.history]
    assert len(set(round(x, 6) for x in losses)) > 3, losses
    assert mean_fpo(model, items, pad, ref) < 0.95 * 0.25 * torch.log(torch.tensor(2.0)).item()


def test_train_short_term_lowers_fpo_loss(tiny_base, items, tmp_path):
    recipe = tiny_recipe()
    model = attach_adapters(tiny_base, recipe)
    pad = tiny_base.tokenizer.pad_token_id
    base_params = {n: p.detach().clone() for n, p in model.named_parameters() if SHORT not in n}
    ref = reference_logps(model, items, pad, DEVICE)
    before = mean_fpo(model, items, pad, ref)
    assert before == pytest.approx(0.25 * torch.log(torch.tensor(2.0)).item(), rel=1e-3)  # h = 0 everywhere

    rec = Recorder()
    state = train_short_term(model, tiny_base.tokenizer, items, recipe, DEVICE, tmp_path / "ckpt", reporter=rec)
    after = mean_fpo(model, items, pad, ref)
    assert after < 0.95 * before, (before, after)
    assert state.step == 15 and len(state.history) == 15
    assert [h["step"] for h in state.history] == list(range(1, 16))
    assert all(h["pairs"] == 4 for h in state.history)
    assert state.window("acc", first=False) > state.window("acc", first=True)
    # the base weights are frozen; only the short adapter moved
    for n, p in model.named_parameters():
        if n in base_params:
            assert torch.equal(p, base_params[n]), n
    # the reporter saw the reference pass then every training step
    assert ("start", "reference", len(items), 0) in rec.calls
    assert ("start", "train", 15, 0) in rec.calls
    assert sum(c[2] for c in rec.calls if c[:2] == ("advance", "reference")) == len(items)
    assert sum(1 for c in rec.calls if c[:2] == ("advance", "train")) == 15
    assert not (tmp_path / "ckpt").exists()  # no checkpoint without an interruption


def test_dpo_recipe_trains_too(tiny_base, items, tmp_path):
    recipe = tiny_recipe(loss="dpo", max_steps=6)
    model = attach_adapters(tiny_base, recipe)
    state = train_short_term(model, tiny_base.tokenizer, items, recipe, DEVICE, tmp_path / "ckpt")
    # with DPO the logged loss at step 1 is log 2 (policy == reference), not the focal 0.25 log 2
    assert state.history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)


def test_sft_warmup_runs_before_preference_steps(tiny_base, items, tmp_path):
    recipe = tiny_recipe(max_steps=2, sft_warmup_steps=3)
    model = attach_adapters(tiny_base, recipe)
    rec = Recorder()
    state = train_short_term(model, tiny_base.tokenizer, items, recipe, DEVICE, tmp_path / "ckpt", reporter=rec)
    assert state.sft_step == 3 and state.step == 2
    phases = [c[1] for c in rec.calls if c[0] == "advance" and c[1] != "reference"]
    assert phases == ["sft"] * 3 + ["train"] * 2
    # SFT already moved the policy, so the first preference step sees a non-zero margin
    assert state.history[0]["margin"] != 0.0


def test_memory_adapter_is_the_reference_and_stays_frozen(tiny_base_factory, items, tmp_path):
    from peft import PeftModel

    recipe = tiny_recipe(max_steps=6)
    mem_dir = random_memory_adapter(tiny_base_factory(), recipe, tmp_path / "memory")
    base = tiny_base_factory()
    model = attach_adapters(base, recipe, memory_dir=mem_dir)
    assert set(model.peft_config) == {MEMORY, SHORT}
    mem_before = {n: p.detach().clone() for n, p in model.named_parameters() if f".{MEMORY}." in n}
    assert mem_before and all(not model.get_parameter(n).requires_grad for n in mem_before)
    assert all(p.requires_grad == (f".{SHORT}." in n) for n, p in model.named_parameters())

    # base + memory, built independently through PEFT
    expected = PeftModel.from_pretrained(tiny_base_factory().model, str(mem_dir)).eval()
    plain = tiny_base_factory().model.eval()
    pad = base.tokenizer.pad_token_id
    ids, mask, _ = _collate([(t.prompt, t.chosen) for t in items[:4]], pad, DEVICE)
    want = logits_of(expected, ids, mask)
    assert not torch.allclose(want, logits_of(plain, ids, mask), atol=1e-3)  # the memory really changes the model

    with reference_mode(model):
        got = logits_of(model, ids, mask)
    assert torch.allclose(got, want, atol=1e-5)
    # the reference log-probs used for training are those of base + memory
    ref = reference_logps(model, items, pad, DEVICE)
    exp_scores = score_pairs(expected, items, pad, DEVICE)
    assert torch.allclose(ref["chosen"], exp_scores["chosen"], atol=1e-4)

    train_short_term(model, base.tokenizer, items, recipe, DEVICE, tmp_path / "ckpt")
    for n, before in mem_before.items():
        assert torch.equal(model.get_parameter(n), before), n
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in short_params(model).items() if "lora_B" in n)
    # after training: both adapters active changes the output, reference mode still equals base + memory
    assert not torch.allclose(logits_of(model, ids, mask), want, atol=1e-4)
    with reference_mode(model):
        assert torch.allclose(logits_of(model, ids, mask), want, atol=1e-5)
    assert all(p.requires_grad == (f".{SHORT}." in n) for n, p in model.named_parameters())


def test_bare_reference_is_the_base_alone_and_memory_stays_frozen(tiny_base_factory, items, tmp_path):
    """``reference: base`` (the authors' choice): the reference log-probs are the bare base's, with the memory
    adapter switched off too, and switching it back on leaves only the short adapter trainable."""
    recipe = tiny_recipe(max_steps=2, reference="base")
    mem_dir = random_memory_adapter(tiny_base_factory(), recipe, tmp_path / "memory")
    base = tiny_base_factory()
    model = attach_adapters(base, recipe, memory_dir=mem_dir)
    pad = base.tokenizer.pad_token_id
    plain = score_pairs(tiny_base_factory().model, items, pad, DEVICE)
    with_memory = reference_logps(model, items, pad, DEVICE)
    bare = reference_logps(model, items, pad, DEVICE, bare=True)
    assert torch.allclose(bare["chosen"], plain["chosen"], atol=1e-4)
    assert not torch.allclose(with_memory["chosen"], plain["chosen"], atol=1e-3)
    assert all(p.requires_grad == (f".{SHORT}." in n) for n, p in model.named_parameters())
    state = train_short_term(model, base.tokenizer, items, recipe, DEVICE, tmp_path / "ckpt")
    used = state.trained  # reference log-probs exist for the pairs the steps use
    assert torch.allclose(state.ref["chosen"][used], plain["chosen"][used], atol=1e-4)


def test_trained_indices_are_the_pairs_the_steps_see(items):
    from lifealign_lite.train import _batch_stream, trained_indices

    recipe = tiny_recipe(max_steps=2, batch_size=2)
    stream = _batch_stream(items, recipe, 0)
    assert trained_indices(items, recipe, 2) == sorted(next(stream) + next(stream))
    assert len(trained_indices(items, recipe, 2)) == 4 < len(items)
    assert trained_indices(items, recipe, len(items)) == list(range(len(items)))  # a whole epoch sees every pair


def test_cosine_schedule_decays_to_zero_after_warmup():
    from lifealign_lite.train import _lr_lambda

    linear, cosine = _lr_lambda(10, 2, "linear"), _lr_lambda(10, 2, "cosine")
    assert [cosine(s) for s in (0, 1)] == [0.5, 1.0] == [linear(s) for s in (0, 1)]
    assert cosine(2) == pytest.approx(1.0) and cosine(10) == pytest.approx(0.0)
    assert cosine(6) == pytest.approx(0.5) and linear(6) == pytest.approx(0.5)
    assert cosine(4) > linear(4) and cosine(8) < linear(8)  # cosine stays high longer, then drops faster


def test_save_adapter_loads_in_peft_with_same_logits(tiny_base_factory, items, tmp_path):
    from peft import PeftModel

    recipe = tiny_recipe(max_steps=4)
    base = tiny_base_factory()
    model = attach_adapters(base, recipe)
    train_short_term(model, base.tokenizer, items, recipe, DEVICE, tmp_path / "ckpt")
    out = save_adapter(model, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not list(out.glob("*.bin"))

    loaded = PeftModel.from_pretrained(tiny_base_factory().model, str(out)).eval()
    ids, mask, _ = _collate([(t.prompt, t.chosen) for t in items[:5]], base.tokenizer.pad_token_id, DEVICE)
    want = logits_of(model, ids, mask)
    assert torch.allclose(logits_of(loaded, ids, mask), want, atol=1e-5)
    assert not torch.allclose(logits_of(tiny_base_factory().model, ids, mask), want, atol=1e-4)
    assert loaded.peft_config["default"].r == recipe.lora_r
    assert sorted(loaded.peft_config["default"].target_modules) == sorted(recipe.target_modules)


# ---------------------------------------------------------------------------
# checkpoint and resume


def run_to_end(base, items, recipe, ckpt, resume=False, reporter=None, init_seed=0):
    torch.manual_seed(init_seed)  # the LoRA A init draws from the global RNG
    model = attach_adapters(base, recipe)
    state = train_short_term(model, base.tokenizer, items, recipe, DEVICE, ckpt, resume=resume, reporter=reporter)
    return model, state


def test_interrupt_writes_checkpoint(tiny_base, items, tmp_path):
    recipe = tiny_recipe(max_steps=8)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted) as ei:
        run_to_end(tiny_base, items, recipe, ckpt, reporter=Recorder(stop_at=3))
    assert ei.value.step == 3 and Path(ei.value.checkpoint) == ckpt
    assert "step 3" in str(ei.value)
    assert (ckpt / "state.json").is_file() and (ckpt / "state.safetensors").is_file()
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(ckpt.rglob("*.bin")) and not list(ckpt.rglob("*.pt"))
    assert not ckpt.with_name("ckpt.tmp").exists()


class Snapshot(Recorder):
    """Records the short adapter's weights after every training step."""

    def __init__(self, model_ref: list):
        super().__init__()
        self.model_ref, self.weights = model_ref, {}

    def advance(self, phase, n, metrics):
        super().advance(phase, n, metrics)
        if phase == "train":
            self.weights[metrics["step"]] = short_params(self.model_ref[0])


def test_resume_restores_adapter_reference_and_data_order(tiny_base_factory, items, tmp_path):
    from safetensors.torch import load_file

    recipe = tiny_recipe(max_steps=8)
    base = tiny_base_factory()
    torch.manual_seed(0)
    full_model = attach_adapters(base, recipe)
    snap = Snapshot([full_model])
    full_state = train_short_term(full_model, base.tokenizer, items, recipe, DEVICE, tmp_path / "full", reporter=snap)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        run_to_end(tiny_base_factory(), items, recipe, ckpt, reporter=Recorder(stop_at=3))
    # the checkpoint holds the adapter exactly as it was after step 3
    saved = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    at3 = {n.replace(f".{SHORT}", ""): w for n, w in snap.weights[3].items()}
    assert saved.keys() == at3.keys()
    for n in saved:
        assert torch.allclose(saved[n], at3[n], atol=1e-7), n
    meta = json.loads((ckpt / "state.json").read_text())
    assert meta["step"] == 3 and len(meta["history"]) == 3

    rec = Recorder()
    # a different LoRA A init for the fresh model: the checkpoint must overwrite it
    _, resumed_state = run_to_end(tiny_base_factory(), items, recipe, ckpt, resume=True, reporter=rec, init_seed=12345)
    assert resumed_state.step == 8
    assert [h["step"] for h in resumed_state.history] == list(range(1, 9))
    assert not any(c[1] == "reference" for c in rec.calls)  # reference log-probs came from the checkpoint
    assert ("start", "train", 8, 3) in rec.calls
    # the first step after resuming sees the same batch, reference and weights as the uninterrupted run
    assert [h["loss"] for h in resumed_state.history[:4]] == pytest.approx([h["loss"] for h in full_state.history[:4]], rel=1e-5)
    assert [h["margin"] for h in resumed_state.history[:4]] == pytest.approx([h["margin"] for h in full_state.history[:4]], rel=1e-4, abs=1e-6)


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tiny_base_factory, items, tmp_path):
    recipe = tiny_recipe(max_steps=8, warmup_ratio=0.0)
    full_model, full_state = run_to_end(tiny_base_factory(), items, recipe, tmp_path / "full")

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        run_to_end(tiny_base_factory(), items, recipe, ckpt, reporter=Recorder(stop_at=3))
    resumed_model, resumed_state = run_to_end(tiny_base_factory(), items, recipe, ckpt, resume=True, init_seed=12345)

    assert resumed_state.step == 8
    want, got = short_params(full_model), short_params(resumed_model)
    assert want.keys() == got.keys() and want
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-5), n
    assert [h["loss"] for h in resumed_state.history] == pytest.approx([h["loss"] for h in full_state.history], rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------
# align() end to end on the tiny model (load_base replaced by the tiny model)


@pytest.fixture
def tiny_align(monkeypatch, tiny_base_factory, tmp_path):
    monkeypatch.setattr(align_module, "load_base", lambda *a, **k: tiny_base_factory())
    data = tmp_path / "support.jsonl"
    write_pairs(data, SYNTHETIC)
    return data


def test_align_writes_run_folder_and_summary(tiny_align, tmp_path):
    from peft import PeftConfig

    recipe = tiny_recipe(max_steps=3)
    result = align(tiny_align, recipe, tmp_path / "home", tmp_path / "bank", domain="support")
    run = result.run_dir
    assert run.parent == tmp_path / "bank" / "runs" and run.name.endswith("-support")
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert PeftConfig.from_pretrained(str(run / "adapter")).r == recipe.lora_r
    summary = json.loads((run / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["domain"] == "support" and summary["pairs"] == len(SYNTHETIC) and summary["steps"] == 3
    assert summary["trained_pairs"] == 3 * recipe.batch_size
    assert len(summary["data_hash"]) >= 16
    assert json.loads((run / "run.json").read_text())["data_hash"] == summary["data_hash"]
    assert 0.0 <= summary["reward_acc_end"] <= 1.0
    assert set(summary["timings_s"]) >= {"load_model", "tokenize", "reference_and_train", "train_loop", "total"}
    assert not (run / "checkpoint").exists()


def test_align_resume_continues_the_interrupted_run(tiny_align, tmp_path):
    recipe = tiny_recipe(max_steps=5)
    bank = tmp_path / "bank"
    with pytest.raises(AlignError, match="nothing to resume"):
        align(tiny_align, recipe, tmp_path / "home", bank, resume=True)
    with pytest.raises(Interrupted):
        align(tiny_align, recipe, tmp_path / "home", bank, reporter=Recorder(stop_at=2))
    (run,) = (bank / "runs").iterdir()
    assert (run / "checkpoint" / "state.json").is_file() and not (run / "summary.json").exists()
    result = align(tiny_align, recipe, tmp_path / "home", bank, resume=True)
    assert result.run_dir == run
    assert result.summary["steps"] == 5
    assert len(list((bank / "runs").iterdir())) == 1


def test_align_same_seed_gives_the_same_adapter(tiny_align, tmp_path):
    from safetensors.torch import load_file

    recipe = tiny_recipe(max_steps=3)
    weights = []
    for i in range(2):
        torch.manual_seed(1000 + i)  # whatever the process did before must not matter
        result = align(tiny_align, recipe, tmp_path / "home", tmp_path / f"bank{i}")
        weights.append(load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
