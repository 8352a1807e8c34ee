"""Penalties for two continual-learning baselines, online EWC and O-LoRA, acting on the short-term adapter.

Both act on what a task adds. The memory a task trains on top of is frozen, so the short LoRA's update
``dW = scale * B @ A`` of each targeted matrix is exactly how far the weights move from where the earlier
tasks left them.

- **EWC**, online form (Schwarz et al., 2018): ``lam * sum F * dW**2``. ``F`` is the diagonal Fisher of the
  earlier tasks' preference loss with respect to the targeted matrices. Each task's Fisher is scaled to mean 1
  and added to the running sum, which the bank keeps (``fisher.safetensors``).
- **O-LoRA** (Wang et al., 2023): ``lam * sum ||A Q||**2``. ``Q`` is an orthonormal basis of the input
  directions the earlier tasks' updates read from: the row space of their ``A`` factors, taken from the bank's
  history. The new task learns in directions orthogonal to theirs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .errors import InputError
from .memory.consolidate import LowRank
from .model import PEFT_PREFIX, SHORT, autocast


def lora_layers(model, adapter: str = SHORT) -> dict[str, torch.nn.Module]:
    """The PEFT LoRA layers that hold ``adapter``, by module name as the bank writes it (``model.layers.0...``)."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(PEFT_PREFIX): mod for name, mod in model.named_modules()
            if isinstance(mod, LoraLayer) and adapter in mod.lora_A}


def _delta(layer, adapter: str = SHORT) -> torch.Tensor:
    """The adapter's weight update ``scale * B @ A`` (d_out, d_in), differentiable."""
    return layer.scaling[adapter] * (layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight)


def fisher_diagonal(model, items: Sequence, ref: dict[str, torch.Tensor], loss_fn, pad_id: int, device,
                    bf16_autocast: bool = False, progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of the preference loss, pair by pair, w.r.t. every targeted weight matrix.

    The gradient of a linear layer's weight is ``g^T x`` (output gradient times input, summed over tokens);
    hooks on the LoRA layers collect it, so this works whatever the base weights are stored as (fp32 or 4-bit).
    ``items[i]`` is scored against ``ref['chosen'][i]`` and ``ref['rejected'][i]``.
    """
    from .logprobs import pair_logps

    layers = lora_layers(model)
    fisher = {n: torch.zeros(m.out_features, m.in_features) for n, m in layers.items()}
    grads: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def forward_hook(module, inputs, output):
            x = inputs[0].detach()

            def backward_hook(g):
                gw = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                grads[name] = grads[name] + gw if name in grads else gw

            if output.requires_grad:
                output.register_hook(backward_hook)
        return forward_hook

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        for i, item in enumerate(items):
            grads.clear()
            with autocast(bf16_autocast):
                pc, pr, _, _ = pair_logps(model, [item], pad_id, device)
            out = loss_fn(pc, pr, ref["chosen"][[i]].to(device), ref["rejected"][[i]].to(device))
            out.losses.sum().backward()
            for name, g in grads.items():
                fisher[name] += g.cpu().square()
            if progress:
                progress(1)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return {n: f / max(1, len(items)) for n, f in fisher.items()}


def accumulate_fisher(previous: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Online EWC: add the new task's Fisher, scaled to mean 1 so each task weighs the same whatever its loss scale."""
    total = sum(f.sum() for f in new.values())
    count = sum(f.numel() for f in new.values())
    scale = count / total if total > 0 else 0.0
    return {n: previous.get(n, torch.zeros_like(f)) + f * scale for n, f in new.items()}


def ewc_penalty(model, fisher: dict[str, torch.Tensor], lam: float) -> Callable[[], torch.Tensor]:
    """``lam * sum F * dW**2`` over the short adapter's updates."""
    layers = lora_layers(model)
    missing = sorted(set(layers) - set(fisher))
    if missing:
        raise InputError(f"the bank's Fisher has no entry for {missing[0]}; it was built with other target modules")
    pairs = [(layers[n], fisher[n].to(next(layers[n].parameters()).device)) for n in layers]

    def penalty() -> torch.Tensor:
        return lam * sum(((f * _delta(layer).float().square()).sum() for layer, f in pairs), torch.zeros(()))

    return penalty


def subspace_bases(history: Sequence[dict[str, LowRank]], rel_tol: float = 1e-6) -> dict[str, torch.Tensor]:
    """Per module, an orthonormal basis (d_in, k) of the row spaces of every earlier update's ``A`` factor."""
    rows: dict[str, list[torch.Tensor]] = {}
    for update in history:
        for name, u in update.items():
            if u.rank:
                rows.setdefault(name, []).append(u.A.double())
    bases = {}
    for name, parts in rows.items():
        _, s, vh = torch.linalg.svd(torch.cat(parts), full_matrices=False)
        keep = s > rel_tol * s.max() if s.numel() and s.max() > 0 else torch.zeros_like(s, dtype=torch.bool)
        bases[name] = vh[keep].T.float().contiguous()
    return bases


def olora_penalty(model, bases: dict[str, torch.Tensor], lam: float) -> Callable[[], torch.Tensor]:
    """``lam * sum ||A Q||**2``: the short adapter's input directions inside the earlier tasks' subspaces."""
    layers = lora_layers(model)
    pairs = [(layer, bases[n].to(layer.lora_A[SHORT].weight.device)) for n, layer in layers.items() if n in bases]

    def penalty() -> torch.Tensor:
        return lam * sum(((layer.lora_A[SHORT].weight.float() @ q).square().sum() for layer, q in pairs), torch.zeros(()))

    return penalty


def combine(*penalties: Callable[[], torch.Tensor] | None) -> Callable[[], torch.Tensor] | None:
    """One callable summing the given penalties (``None`` when there are none)."""
    active = [p for p in penalties if p is not None]
    if not active:
        return None
    return lambda: sum(p() for p in active)
