"""Preference pairs to model inputs: tokenize with the chat template, truncate, group by length, pad into batches,
and the reproducible stream of batches a training run draws from."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .data import Pair


@dataclass(frozen=True)
class Tokenized:
    """One preference pair as token ids: the prompt (chat template applied) and each response."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    @property
    def tokens(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


@dataclass
class TokenizeStats:
    pairs: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0


def tokenize_pairs(pairs: Sequence[Pair], tokenizer, max_length: int, max_prompt_length: int) -> tuple[list[Tokenized], TokenizeStats]:
    """Apply the chat template (TRL) and tokenize.

    Truncation policy: a prompt longer than ``max_prompt_length`` keeps its END (the latest turns, where
    the question is); a response longer than what is left of ``max_length`` keeps its BEGINNING.
    """
    from trl.data_utils import apply_chat_template

    stats = TokenizeStats(pairs=len(pairs))
    out = []
    for pair in pairs:
        text = apply_chat_template({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}, tokenizer)
        prompt = tokenizer(text["prompt"], add_special_tokens=False)["input_ids"]
        chosen = tokenizer(text["chosen"], add_special_tokens=False)["input_ids"]
        rejected = tokenizer(text["rejected"], add_special_tokens=False)["input_ids"]
        if len(prompt) > max_prompt_length:
            prompt = prompt[-max_prompt_length:]
            stats.truncated_prompts += 1
        room = max_length - len(prompt)
        if len(chosen) > room or len(rejected) > room:
            chosen, rejected = chosen[:room], rejected[:room]
            stats.truncated_responses += 1
        out.append(Tokenized(prompt, chosen, rejected))
    return out, stats


def length_grouped_batches(items: Sequence[Tokenized], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of similar-length pairs (less padding), in a seeded random order.

    Indices are shuffled, cut into chunks of 50 batches, sorted by length inside each chunk, then the
    batches are shuffled: randomness for SGD, little padding for speed.
    """
    rng = random.Random(seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: items[i].tokens)
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(seqs: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding) for (prompt, response) pairs."""
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        ids[row, :n] = torch.tensor(p + r)
        mask[row, :n] = 1
        labels[row, len(p) : n] = torch.tensor(r)
    return ids.to(device), mask.to(device), labels.to(device)


def optimizer_steps(n_items: int, recipe) -> tuple[int, int]:
    """(optimizer steps, batches per epoch)."""
    per_epoch = math.ceil(n_items / recipe.batch_size)
    total = recipe.max_steps or max(1, math.ceil(recipe.epochs * per_epoch / recipe.grad_accum))
    return total, per_epoch


def trained_indices(items, recipe, steps: int) -> list[int]:
    """The items that ``steps`` optimizer steps see (fewer than all when ``max_steps`` stops early), sorted."""
    stream = batch_stream(items, recipe, 0)
    return sorted({i for _ in range(steps * recipe.grad_accum) for i in next(stream)})


def batch_stream(items, recipe, start_batch: int) -> Iterator[list[int]]:
    """An endless, reproducible stream of length-grouped batches (a new seeded order each epoch)."""
    epoch, done = 0, 0
    while True:
        for batch in length_grouped_batches(items, recipe.batch_size, recipe.seed + epoch):
            if done >= start_batch:
                yield batch
            done += 1
        epoch += 1
