"""``chat`` on torch: the session whose engine is the transformers model (session.py has what every engine shares).

Every adapter of the bank version (core and every slot) is read once as fp32 weight updates ``B @ A``; the
active one is added into the fp32 base weights, so each answer runs the plain transformers model at its own
speed (no LoRA layers, no autocast, no PEFT import), and switching domain copies the touched weights back
from their originals (kept once) before adding another. A 4-bit base (``--quant nf4``) or ``--unmerged`` goes
through PEFT instead: PEFT holds every adapter and merges the active one in (``merge``) or runs it as LoRA layers.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

from .errors import InputError
from .memory.adapter import read_adapter
from .memory.bank import Bank
from .memory.consolidate import LowRank
from .memory.state import BankState
from .session import AUTO, BASE, Session, adapter_folders, check_domain, routing
from .system import quiet

if TYPE_CHECKING:  # annotations only: torch is imported where tensors are made
    import torch


@dataclass
class ChatSession(Session):
    """The torch engine: a base model with the bank's adapters loaded, one of them in use at a time.

    ``direct`` selects the direct fp32 merge of ``updates`` (memory name -> {module name: update}); without it,
    ``model`` is a PEFT model holding the adapters (merged in by PEFT when ``merge``, else run as separate LoRA layers).
    """

    merge: bool = True
    updates: dict[str, dict[str, LowRank]] = field(default_factory=dict)
    _originals: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> its base weight
    direct: bool = False  # adapters merged as fp32 updates (``updates``) instead of through PEFT
    engine: ClassVar[str] = "torch"
    embedder_shares_model: ClassVar[bool] = True  # the "base" routing embedder reads this session's model (adapter off)

    @property
    def peft(self) -> bool:
        """Whether PEFT holds the adapters now (not ``direct``, and a bank version with at least one adapter)."""
        return hasattr(self.model, "peft_config")

    def activate(self, name: str) -> None:
        """Make ``name`` (a domain, core or base) the adapter in use."""
        if name == self.active:
            return
        if self.direct:
            self._merge_update(self.updates.get(name, {}))
        elif self.peft:
            if self.merge and self.active not in (None, BASE):
                self.model.unmerge_adapter()
            if name != BASE:
                self.model.set_adapter(name)
                if self.merge:
                    self.model.merge_adapter()
        self.active = name

    @contextlib.contextmanager
    def using(self, memory: str):
        """``memory`` active, and for base on PEFT every adapter layer off (PEFT keeps one adapter set)."""
        self.activate(memory)
        with self.model.disable_adapter() if memory == BASE and self.peft else contextlib.nullcontext():
            yield

    def _merge_update(self, update: dict[str, LowRank]) -> None:
        """Set each weight an update touches to base + B @ A, and every other touched weight back to base.

        Copying from the kept original (instead of subtracting the old update) leaves no rounding behind.
        """
        import torch

        with torch.no_grad():
            for module, original in self._originals.items():
                if module not in update:
                    self.model.get_submodule(module).weight.copy_(original)
            for module, low_rank in update.items():
                weight = self.model.get_submodule(module).weight
                if module not in self._originals:
                    self._originals[module] = weight.detach().clone()
                torch.add(self._originals[module], (low_rank.B @ low_rank.A).to(weight.dtype), out=weight)

    def seed(self, seed: int) -> None:
        import torch

        torch.manual_seed(seed)

    def generate(self, prompt: str | list[dict], memory: str, on_token: Callable[[str], None], max_new_tokens: int = 256,
                 stop: threading.Event | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> tuple[str, int]:
        """:meth:`session.Engine.generate` in transformers' ``generate`` (in a thread, streaming to this one)."""
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        if max_new_tokens < 1:  # generate() would raise in its thread and leave the streamer waiting forever
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if seed is not None:
            self.seed(seed)
        with self.using(memory):
            if isinstance(prompt, str):
                enc = self.tokenizer(prompt, return_tensors="pt")
            else:
                enc = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            device = next(self.model.parameters()).device
            enc = {k: v.to(device) for k, v in enc.items()}
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            stop = stop or threading.Event()
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
            kwargs = dict(**enc, max_new_tokens=max_new_tokens, repetition_penalty=1.1, streamer=streamer, pad_token_id=self.tokenizer.pad_token_id,
                          use_cache=True, stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]), **sampling)
            new_tokens = []

            def generate():
                with torch.no_grad():
                    new_tokens.append(self.model.generate(**kwargs).shape[1] - enc["input_ids"].shape[1])

            thread = threading.Thread(target=generate, daemon=True)  # daemon: an exit never waits for an answer
            pieces = []
            try:
                thread.start()
                for piece in streamer:
                    pieces.append(piece)
                    on_token(piece)
            finally:
                stop.set()  # Ctrl-C or a failing on_token must not leave generate() running; it checks after every token
                thread.join()
        return "".join(pieces), new_tokens[0] if new_tokens else 0

    def load_adapters(self, state: BankState) -> None:
        """Load every adapter of ``state``, none of them active.

        With ``direct``, each is read as fp32 updates for the direct merge; otherwise PEFT holds them (it merges
        into 4-bit weights, de-quantizing and re-quantizing, or runs them as LoRA layers).
        """
        adapters = adapter_folders(state)
        self.state, self.active, self._router = state, None, None
        if self.direct:
            self.updates = {name: read_adapter(folder)[0] for name, folder in adapters}
            return
        if not adapters:
            return
        from peft import PeftModel

        with quiet():
            for i, (name, folder) in enumerate(adapters):
                if i == 0:
                    self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name)
                else:
                    self.model.load_adapter(str(folder), adapter_name=name)
        self.model.eval()

    def use_version(self, state: BankState) -> None:
        if self.direct:
            self._merge_update({})  # every touched weight back to the base
        elif self.peft:
            if self.merge and self.active not in (None, BASE):
                self.model.unmerge_adapter()
            self.model = self.model.unload()
        self.load_adapters(state)


class _StopOnEvent:
    """A transformers stopping criterion: stop every sequence once ``event`` is set (from another thread)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def open_session(bank_dir: Path, home: Path, recipe, domain: str = AUTO, merge: bool = True, version: int | None = None,
                 note: Callable[[str], None] | None = None) -> ChatSession:
    """Load the base model and every adapter of a bank version (default: the current one) for chatting.

    Answers run in fp32 whatever the recipe's training autocast: merged into fp32 weights, an adapter's small
    change is kept (merged and then cast to bf16 by autocast it was rounded away: preference accuracy 0.50
    against 0.42 unmerged and 0.42 in fp32 on 12 hh-helpful dev pairs), and casting every weight to bf16 at
    every step under autocast cost more than it saved (docs/PERFORMANCE.md, ``bench chat``).
    """
    from .model import load_base

    bank = Bank(bank_dir)
    state = bank.load(version)
    check_domain(state, domain)  # a wrong domain is reported before the slow imports and the model load
    base = load_base(recipe.model, home, recipe.quant, trust_remote_code=recipe.trust_remote_code, note=note)
    bank.check_base(base.info.identity())
    base.model.eval()
    session = ChatSession(model=base.model, tokenizer=base.tokenizer, state=state, domain=AUTO, **routing(bank, state, recipe, home, base),
                          merge=merge, direct=merge and base.info.quant == "none")
    session.load_adapters(state)
    session.set_domain(domain)
    return session
