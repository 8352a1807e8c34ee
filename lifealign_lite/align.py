"""``align``: one task of the lifelong stream.

Validate the data; under the bank's lock, start from the base plus the domain's current memory (its slot,
else the long-term core), mix in replay, train the short-term adapter with FPO, then consolidate it (SLMC)
into a new bank version: core, the domain's slot, its routing key, the replay buffer and the history.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from .batching import tokenize_pairs
from .checkpoint import settle
from .data import DataError, Pair, load_pairs, pairs_hash, validate_domain_name
from .distributed import Ranks
from .errors import LifeAlignError
from .files import atomic_write
from .losses import preference_loss
from .memory.adapter import BankError, read_adapter, replace_adapter
from .memory.bank import Bank, now
from .memory.consolidate import add_adapters, compress_adapter, consolidate_adapter, denoise
from .memory.replay import replay_sample, update_replay
from .memory.router import add_prompts, fit_router, make_embedder, prompt_text
from .memory.state import BankState
from .model import attach_adapters, check_device, load_base, save_adapter
from .recipe import Recipe
from .regularize import accumulate_fisher, combine, ewc_penalty, fisher_diagonal, olora_penalty, subspace_bases
from .system import MATPLOTLIB_MISSING, peak_rss_mb
from .train import plot_history, train_short_term


class AlignError(LifeAlignError, RuntimeError):
    """align cannot run as asked (for example: nothing to resume)."""


@dataclass
class AlignResult:
    run_dir: Path
    summary: dict
    bank_version: int


def pick_domain(pairs: list[Pair], domain: str | None, path: Path) -> str:
    """The task's domain: the flag, else the one every line names, else ``general``."""
    if domain is not None:
        return validate_domain_name(domain)
    named = sorted({p.domain for p in pairs if p.domain})
    if len(named) > 1:
        raise DataError([f"{path}: lines name several domains ({', '.join(named)}); pass --domain NAME or split the file by domain"])
    return named[0] if named else "general"


IF_STOPPED = "if-stopped"  # align's resume=: continue a stopped run of this domain and data if there is one, else start one


def _stopped_run(runs: Path, domain: str, data_hash: str) -> Path | None:
    """The newest run of ``domain`` on this data that stopped with a checkpoint before its summary, if any."""
    for run in sorted(runs.glob(f"*-{domain}"), reverse=True):
        meta = run / "run.json"
        if (settle(run / "checkpoint") / "state.json").is_file() and not (run / "summary.json").exists() and meta.is_file():
            if json.loads(meta.read_text()).get("data_hash") == data_hash:
                return run
    return None


def _find_resumable(runs: Path, domain: str, data_hash: str) -> Path:
    run = _stopped_run(runs, domain, data_hash)
    if run is None:
        raise AlignError(f"nothing to resume for domain {domain!r} with this data in {runs}; run align without --resume")
    return run


def _check_bank_shape(state: BankState, recipe: Recipe) -> dict:
    """The bank keeps one rank and one set of target modules for every adapter (fast switching)."""
    meta = {"bank_rank": recipe.bank_rank, "target_modules": sorted(recipe.target_modules), "router": recipe.router}
    if state.meta and (state.meta.get("bank_rank"), state.meta.get("target_modules")) != (meta["bank_rank"], meta["target_modules"]):
        raise BankError(
            f"this bank keeps rank {state.meta['bank_rank']} on {', '.join(state.meta['target_modules'])}; "
            f"the recipe asks for rank {recipe.bank_rank} on {', '.join(meta['target_modules'])}: use the same settings or another --bank"
        )
    return state.meta or meta


def build_slot(recipe: Recipe, new_core: dict, memory: dict, denoised: dict, slot_update: dict | None, known: bool) -> dict:
    """The domain's slot (``recipe.slot_from``; docs/RESULTS.md): ``base``: the LoRA trained from the bare base against the
    bare base on the domain's pairs alone (``slot_update``); ``update``: the denoised update alone; ``memory`` (and a domain
    the bank already holds, whose update was trained from its own slot): memory + denoised update. Sums are cut to the
    rank cap only: tau acts once, on the update (as the paper)."""
    if recipe.slot_mode == "core":
        return new_core
    if slot_update is not None and not known:
        return compress_adapter(slot_update, recipe.bank_rank)
    if recipe.slot_from == "update" and not known:
        return compress_adapter(denoised, recipe.bank_rank)
    return compress_adapter(add_adapters(memory, denoised), recipe.bank_rank)


def consolidate_task(bank: Bank, state: BankState, update: dict, memory: dict, domain: str, pairs: list[Pair], recipe: Recipe,
                     base_identity: dict, embedder, lineage: dict, fisher: dict | None = None,
                     slot_update: dict | None = None) -> tuple[BankState, dict]:
    """SLMC: fold the short-term ``update`` into a new bank version (core, slot, key, replay, history).

    ``lineage["trained_pairs"]`` (when given) is how many of ``pairs`` the steps used; the domain counts both.
    ``slot_update``: the slot's own LoRA (``slot_from: base``), see :func:`build_slot`."""
    trained = lineage.get("trained_pairs", len(pairs))
    t0 = time.perf_counter()
    history = state.history()
    consolidated, stats = consolidate_adapter(update, history, recipe.tau, recipe.projection_gamma)
    core = read_adapter(state.core_dir())[0] if state.core_dir() else {}
    # tau acts once (denoise, in consolidate_adapter); the core's sum is only cut to the rank cap, bank_rank (a second
    # tau cut dropped any update under ~10 % of the core's energy and eroded the core at each task: issue 23)
    new_core = compress_adapter(add_adapters(core, consolidated), recipe.bank_rank)
    denoised = {name: denoise(u, recipe.tau)[0] for name, u in update.items()}
    slot = build_slot(recipe, new_core, memory, denoised, slot_update, domain in state.domains)

    keys, key_texts = state.keys(), state.key_texts()
    texts = [prompt_text(p) for p in pairs]
    keys[domain], key_texts[domain] = add_prompts(keys.get(domain), key_texts.get(domain), embedder(texts), texts, seed=recipe.seed)
    router = fit_router(keys, key_texts, recipe.route_quantile)
    replay = update_replay(state.replay(), pairs, domain, recipe.replay_ratio, recipe.replay_size, recipe.seed)

    with bank.transaction(state, f"align {domain} ({trained} of {len(pairs)} pairs trained)", base_identity) as pending:
        meta = pending.state.meta = _check_bank_shape(state, recipe) | {"route_quantile": recipe.route_quantile}
        folder = pending.folder
        replace_adapter(folder / "core", new_core, meta["bank_rank"], meta["target_modules"], base_identity["name"])
        replace_adapter(folder / "slots" / domain, slot, meta["bank_rank"], meta["target_modules"], base_identity["name"])
        info = pending.state.domains.setdefault(domain, {"pairs_seen": 0, "lineage": []})
        info["pairs_seen"] += len(pairs)
        info["pairs_trained"] = info.get("pairs_trained", 0) + trained
        info["rank"] = max((u.rank for u in slot.values()), default=0)
        info["updated"] = now()
        summary = {k: v for k, v in stats.items() if k != "per_module"} | {"slot_from": recipe.slot_from if recipe.slot_mode == "specialist" else "core"}
        info["lineage"].append(lineage | {"consolidation": summary})
        pending.state.tasks.append(domain)
        pending.keys, pending.key_texts, pending.router = keys, key_texts, router
        # the history keeps each task's denoised update (rank <= the LoRA's), not its consolidated one: both lists span the
        # same space (a consolidated update is its denoised update minus a combination of earlier ones, by induction),
        # so SLMC's projection is the same, while a consolidated update's rank grows with every earlier task's
        pending.history, pending.replay, pending.fisher = history + [denoised], replay, fisher
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return pending.committed, summary


def _train_slot(base, model, items: list, recipe: Recipe, run_dir: Path, resume: bool, reporter, bf16: bool, ranks: Ranks) -> None:
    """``slot_from: base``: a fresh LoRA on the bare base, trained against the bare base on the domain's own pairs (no
    replay), exactly as the bank's first task would be, saved to ``run_dir/slot``. The core's adapters are taken off
    ``model`` first (unloaded, nothing merged), so ``base`` is the bare base again."""
    model.unload()
    torch.manual_seed(recipe.seed)  # the same initialization as a direct run
    slot = attach_adapters(base, recipe)
    train_short_term(slot, base.tokenizer, items, recipe, base.info.device, run_dir / "slot-checkpoint", resume=resume, reporter=reporter,
                     bf16_autocast=bf16, log_path=run_dir / "slot_train_log.jsonl" if ranks.is_main else None, ranks=ranks)
    if ranks.is_main:
        save_adapter(slot, run_dir / "slot")


def continual_penalty(model, state: BankState, recipe: Recipe, fisher: dict):
    """The EWC and O-LoRA penalties a recipe asks for, built from what the bank holds (None when off or first task).

    ``fisher`` is the bank version's accumulated Fisher (read once by the caller, which also extends it).
    """
    ewc = olora = None
    if recipe.ewc_lambda > 0 and fisher:
        ewc = ewc_penalty(model, fisher, recipe.ewc_lambda)
    if recipe.olora_lambda > 0 and (history := state.history()):
        olora = olora_penalty(model, subspace_bases(history), recipe.olora_lambda)
    return combine(ewc, olora)


def align(
    data_path: Path,
    recipe: Recipe,
    home: Path,
    bank_dir: Path,
    domain: str | None = None,
    resume: bool | str = False,
    reporter=None,
    wait_s: float = 0.0,
    pairs: list[Pair] | None = None,
) -> AlignResult | None:
    """Align the model to the pairs in ``data_path`` and consolidate the result into the bank at ``bank_dir``.

    Under a launcher (``distributed.py``) every process calls this: the main process takes the lock and returns the
    result; the others train their share of each batch and return None (they read the bank version the main
    process opened and write nothing). ``pairs``: the file's pairs as ``load_pairs`` read them with this recipe's
    ``max_pairs`` and ``seed``, when the caller already did (the CLI, to refuse bad data before its slow imports).
    ``resume``: True continues a stopped run (none is an error), :data:`IF_STOPPED` continues one if there is one."""
    t_start = time.perf_counter()
    check_device(recipe)
    data_path = Path(data_path)
    if pairs is None:
        pairs = load_pairs(data_path, max_pairs=recipe.max_pairs or None, seed=recipe.seed)
    domain = pick_domain(pairs, domain, data_path)
    data_hash = pairs_hash(pairs)
    bank = Bank(bank_dir)
    runs = bank.root / "runs"
    ranks = Ranks.start()
    if not ranks.is_main:
        reporter = None
    try:
        result = _align(data_path, pairs, domain, data_hash, recipe, home, bank, runs, resume, reporter, wait_s, ranks, t_start)
    finally:
        ranks.close()
    return result


def _align(data_path: Path, pairs: list[Pair], domain: str, data_hash: str, recipe: Recipe, home: Path, bank: Bank, runs: Path,
           resume: bool | str, reporter, wait_s: float, ranks: Ranks, t_start: float) -> AlignResult | None:
    note = getattr(reporter, "note", None) or (lambda message: None)  # status lines for the silent phases

    def load_model():  # the status line comes once the model is found, so a missing folder is a one-line error
        return load_base(recipe.model, home, recipe.quant, device=ranks.device, trust_remote_code=recipe.trust_remote_code,
                         autocast_setting=recipe.autocast, note=note,
                         loading_note=f"loading model {recipe.model} ({len(pairs)} pairs of {data_path.name}, domain {domain})")

    base = None
    with contextlib.ExitStack() as held:  # the main process holds the bank's lock until the new version is committed
        if ranks.is_main:
            try:
                if not bank.root.exists():  # a new bank: fail on the model (or --resume) before the lock creates its folder
                    if resume is True:
                        _find_resumable(runs, domain, data_hash)
                    base = load_model()
                held.enter_context(bank.lock(wait_s))
                state = bank.load()  # verifies every file of the version: damage stops align before it trains
                _check_bank_shape(state, recipe)
                stopped = _find_resumable(runs, domain, data_hash) if resume is True else _stopped_run(runs, domain, data_hash) if resume else None
                run_dir = stopped or runs / f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}-{domain}"
                resume = stopped is not None  # training continues from the checkpoint of the run picked, if any
                base = base or load_model()
                bank.check_base(base.info.identity())
            except LifeAlignError as exc:  # the other processes wait for the version: they stop with the same error
                ranks.broadcast({"error": str(exc)})
                raise
            ranks.broadcast({"version": state.version, "run_dir": str(run_dir)})
        else:  # the version the main process holds under its lock (read, never written: Bank.load only reads)
            setup = ranks.broadcast(None)
            if "error" in setup:
                raise AlignError(setup["error"])
            state, run_dir = bank.load(setup["version"]), Path(setup["run_dir"])
            base = load_model()
        t_loaded = time.perf_counter()

        # core_from slot: a new domain's one run is its slot (the bare base, its own pairs), also the core's update
        slot_is_update = recipe.core_from == "slot" and domain not in state.domains
        memory_dir = state.slot_dir(domain) if domain in state.domains else None if slot_is_update else state.core_dir()
        trained_from = f"slot {domain} v{state.version}" if domain in state.domains else (f"core v{state.version}" if memory_dir else "base")
        buffer = [] if slot_is_update else state.replay()
        replay = replay_sample(buffer, domain, len(buffer) if recipe.replay_all else round(recipe.replay_mix * len(pairs)), recipe.seed)
        torch.manual_seed(recipe.seed)  # the new LoRA's initialization must follow the recipe's seed
        model = attach_adapters(base, recipe, memory_dir)
        items, tstats = tokenize_pairs(pairs + replay, base.tokenizer, recipe.max_length, recipe.max_prompt_length)
        t_tokenized = time.perf_counter()

        if ranks.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(run_dir / "run.json", json.dumps({"domain": domain, "data": str(data_path), "data_hash": data_hash, "recipe": recipe.to_dict(),
                                                           "processes": ranks.world}, indent=2))
        bf16 = base.info.bf16_autocast
        prior_fisher = state.fisher() if recipe.ewc_lambda > 0 else {}
        st = train_short_term(model, base.tokenizer, items, recipe, base.info.device, run_dir / "checkpoint", resume=resume, reporter=reporter,
                              bf16_autocast=bf16, regularizer=continual_penalty(model, state, recipe, prior_fisher),
                              log_path=run_dir / "train_log.jsonl" if ranks.is_main else None, ranks=ranks)
        slot_run = recipe.slot_mode == "specialist" and recipe.slot_from == "base" and memory_dir is not None and domain not in state.domains
        if not ranks.is_main:
            if slot_run:
                _train_slot(base, model, items[: len(pairs)], recipe, run_dir, resume, None, bf16, ranks)
            return None  # the main process saves, consolidates and reports
        if st.history and plot_history(st.history, run_dir / "training.png") is None:
            note(f"training.png: {MATPLOTLIB_MISSING}")
        t_trained = time.perf_counter()
        fisher = None
        if recipe.ewc_lambda > 0:  # the Fisher of this task's own pairs (not the replayed ones), for the next tasks
            own = [i for i in st.trained if i < len(pairs)]
            if reporter:
                reporter.start("fisher", len(own))
            task_fisher = fisher_diagonal(model, [items[i] for i in own], {k: v[own] for k, v in st.ref.items()}, preference_loss(recipe.loss, recipe.beta, recipe.focal_gamma), base.tokenizer.pad_token_id,
                                          base.info.device, bf16, progress=(lambda n: reporter.advance("fisher", n, {})) if reporter else None)
            fisher = accumulate_fisher(prior_fisher, task_fisher)
        save_adapter(model, run_dir / "adapter", full_state=st.full_state)
        t_slot = time.perf_counter()
        if slot_run:  # the core's path stays as it was; the slot is trained beside it (build_slot)
            note("training the domain's slot from the bare base on its own pairs (slot_from: base)")
            _train_slot(base, model, items[: len(pairs)], recipe, run_dir, resume, reporter, bf16, ranks)
        t_slot = time.perf_counter() - t_slot

        recipe_hash = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
        own_trained = sum(i < len(pairs) for i in st.trained)
        lineage = {"run": run_dir.name, "data": str(data_path), "data_hash": data_hash, "pairs": len(pairs), "trained_pairs": own_trained,
                   "replayed": len(replay), "replayed_trained": len(st.trained) - own_trained,
                   "recipe": recipe.name, "recipe_hash": recipe_hash, "trained_from": trained_from, "base": base.info.name, "time": now()}
        memory = read_adapter(memory_dir)[0] if memory_dir else {}
        del model  # training memory is no longer needed for consolidation
        if recipe.tau < 1.0 or recipe.projection_gamma < 1.0:
            how = f"SLMC: denoise, project against {len(state.tasks)} earlier task(s)"
        else:  # tau 1 and gamma 1 (the bench's sequential baselines) turn SLMC off
            how = "no SLMC: tau 1, projection_gamma 1"
        note(f"consolidating into the bank ({how}, update key and replay)")
        update = read_adapter(run_dir / "adapter")[0]
        slot_update = read_adapter(run_dir / "slot")[0] if slot_run else None
        if recipe.slot_from == "base" and memory_dir is None:  # trained from the bare base against it, on its own pairs: that LoRA
            slot_update = update
        new_state, cstats = consolidate_task(bank, state, update, memory, domain, pairs, recipe, base.info.identity(),
                                             make_embedder(recipe.router, base), lineage, fisher, slot_update)

    train_time = st.history[-1]["time"] if st.history else 0.0
    trained_pairs = sum(h["pairs"] for h in st.history)
    summary = {
        "domain": domain,
        "data": str(data_path),
        "data_hash": data_hash,
        "pairs": len(pairs),
        "pairs_trained": own_trained,  # distinct pairs of the data the steps used (fewer than "pairs" when max_steps stops early)
        "replayed_pairs": len(replay),
        "replayed_trained": len(st.trained) - own_trained,
        "trained_from": trained_from,
        "truncated_prompts": tstats.truncated_prompts,
        "truncated_responses": tstats.truncated_responses,
        "steps": st.step,
        "sft_warmup_steps": st.sft_step,
        "trained_pairs": trained_pairs,
        "reward_acc_start": st.window("acc", first=True),
        "reward_acc_end": st.window("acc", first=False),
        "loss_start": st.window("loss", first=True),
        "loss_end": st.window("loss", first=False),
        "penalty_start": st.window("reg", first=True),  # EWC / O-LoRA penalty (None when off)
        "penalty_end": st.window("reg", first=False),
        "model": base.info.to_dict(),
        "recipe": recipe.to_dict(),
        "consolidation": cstats,
        "bank_version": new_state.version,
        "timings_s": {
            "load_model": round(t_loaded - t_start, 2),
            "tokenize": round(t_tokenized - t_loaded, 2),
            "reference_and_train": round(t_trained - t_tokenized, 2),
            "train_loop": round(train_time, 2),
            "slot_train": round(t_slot, 2),  # slot_from base, a new domain after the first task: the slot's own run
            "consolidate": cstats["seconds"],
            "total": round(time.perf_counter() - t_start, 2),
        },
        "pairs_per_s": round(trained_pairs / train_time, 3) if train_time else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),  # of the main process
        "processes": ranks.world,
        "finished": now(),
        "adapter": str(run_dir / "adapter"),
    }
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
    return AlignResult(run_dir=run_dir, summary=summary, bank_version=new_state.version)
