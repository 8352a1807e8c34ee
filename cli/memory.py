"""``lifealign-lite memory``: list, show, verify, repair, remove, roll back and export bank entries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from .common import BankOpt, JsonOpt, err, existing_bank, fail as _fail, home_dir, out, sub_app

if TYPE_CHECKING:
    from lifealign_lite.memory.bank import Bank

memory_app = sub_app("Inspect and manage the long-term adapter bank.")


def _bank(path: Optional[Path]) -> Bank:
    from lifealign_lite.memory.bank import Bank  # here, not at the top: --help should not import torch

    return Bank(existing_bank(path))


def _rows(bank: Bank) -> list[dict]:
    from lifealign_lite.memory.adapter import adapter_rank
    from lifealign_lite.memory.bank import folder_size

    state = bank.load()
    rows = []
    for name, info in sorted(state.domains.items()):
        rows.append({
            "domain": name, "rank": adapter_rank(state.slot_dir(name)), "pairs_seen": info.get("pairs_seen"),
            "pairs_trained": info.get("pairs_trained", info.get("pairs_seen")), "versions": len(info.get("lineage", [])),
            "size_bytes": folder_size(state.slot_dir(name)), "updated": info.get("updated"),
        })
    if state.core_dir():
        rows.append({"domain": "core", "rank": adapter_rank(state.core_dir()), "pairs_seen": sum(r["pairs_seen"] for r in rows),
                     "pairs_trained": sum(r["pairs_trained"] for r in rows),
                     "versions": len(state.tasks), "size_bytes": folder_size(state.core_dir()), "updated": None})
    return rows


def _sizes(bank: Bank) -> dict:
    """Bytes of the current version, of every version on disk (shared files once), and of the short-term LoRAs
    (under BANK/runs) whose updates the current version holds."""
    from lifealign_lite.memory.bank import folder_size

    state = bank.load()
    runs = {e.get("run") for info in state.domains.values() for e in info.get("lineage", []) if e.get("run")}
    loras = [bank.root / "runs" / run / "adapter" / "adapter_model.safetensors" for run in sorted(runs)]
    return {"version_bytes": folder_size(state.folder) if state.folder else 0, "bank_bytes": folder_size(bank.root / "versions"),
            "versions_on_disk": len([p for p in (bank.root / "versions").glob("[0-9]*") if p.is_dir()]) if (bank.root / "versions").is_dir() else 0,
            "loras": len([p for p in loras if p.is_file()]), "lora_bytes": sum(p.stat().st_size for p in loras if p.is_file())}


@memory_app.command("list")
def list_cmd(bank: Optional[Path] = BankOpt, as_json: bool = JsonOpt) -> None:
    """A table of the bank's domains (and the core): rank and bytes of each, and the bank's size against its LoRAs."""
    b = _bank(bank)
    rows = _rows(b)
    version = b.load().version
    sizes = _sizes(b)
    if as_json:
        print(json.dumps({"version": version, **sizes, "entries": rows}, indent=2))
        return
    table = Table("domain", "rank", "pairs trained / given", "updates", "bytes", "last update", title=f"{b.root} (version {version})")
    for r in rows:
        table.add_row(r["domain"], str(r["rank"]), f"{r['pairs_trained']} / {r['pairs_seen']}", str(r["versions"]), f"{r['size_bytes']:,}", r["updated"] or "")
    out.print(table)
    err.print(f"version {version}: {sizes['version_bytes'] / 1e6:.2f} MB (all {sizes['versions_on_disk']} versions on disk: {sizes['bank_bytes'] / 1e6:.2f} MB); "
              f"the {sizes['loras']} short-term LoRAs it was built from: {sizes['lora_bytes'] / 1e6:.2f} MB", highlight=False, soft_wrap=True)


@memory_app.command("gc")
def gc_cmd(keep: int = typer.Option(..., "--keep", help="How many of the newest versions to keep (the current one is always kept)."),
           bank: Optional[Path] = BankOpt) -> None:
    """Remove older versions, freeing every file no kept version shares (their rollback is then impossible)."""
    b = _bank(bank)
    b.require()
    with b.lock():
        removed, freed = b.gc(keep)
    if not removed:
        err.print(f"nothing to remove: {b.root} keeps at most {keep} versions besides the current one")
        return
    err.print(f"removed version {', '.join(map(str, removed))}; freed {freed / 1e6:.2f} MB", highlight=False)


@memory_app.command("show")
def show_cmd(name: str = typer.Argument(..., help="A domain, or 'core'."), bank: Optional[Path] = BankOpt, as_json: bool = JsonOpt) -> None:
    """Everything recorded about one domain (lineage of every update: data, pairs, recipe, time, consolidation),
    or about the core (the tasks folded into it)."""
    from lifealign_lite.memory.adapter import BankError
    from lifealign_lite.memory.router import CORE

    b = _bank(bank)
    state = b.load()
    if name == CORE:
        if not state.core_dir():
            raise BankError(f"{b.root}: the bank has no core yet; align a domain first")
        lineage = [entry | {"domain": d} for d, info in state.domains.items() for entry in info.get("lineage", [])]
        info = {"tasks": state.tasks, "domains": sorted(state.domains), "lineage": sorted(lineage, key=lambda e: e.get("time", ""))}
    else:
        state.slot_dir(name)
        info = state.domains[name]
    record = {"domain": name, "version": state.version, **info}
    if as_json:
        print(json.dumps(record, indent=2))
        return
    table = Table("time", "domain", "data", "pairs trained / given", "replayed", "recipe", "trained from",
                  title=f"{name} at bank version {state.version}" + (f": tasks {', '.join(state.tasks)}" if name == CORE else ""))
    for e in record["lineage"]:
        table.add_row(e.get("time", ""), e.get("domain", name), e.get("data", ""), f"{e.get('trained_pairs', e.get('pairs'))} / {e.get('pairs')}",
                      str(e.get("replayed_trained", e.get("replayed", ""))), e.get("recipe", ""), e.get("trained_from", ""))
    out.print(table)


@memory_app.command("rm")
def rm_cmd(name: str, bank: Optional[Path] = BankOpt) -> None:
    """Remove a domain's slot, key and replay pairs (as a new version; `rollback` undoes it)."""
    b = _bank(bank)
    b.require()  # before the lock, which would create the folder
    err.print(f"removing {name} and refitting the router over the other domains ...", highlight=False, soft_wrap=True)
    with b.lock():
        state = b.remove_domain(name, b.manifest()["base"])
    err.print(f"removed {name}'s slot, key and replay pairs; bank is now at version {state.version}. The core keeps what every task taught it "
              f"({', '.join(state.tasks)}): see `lifealign-lite memory show core`; `memory rollback {state.version - 1}` undoes the removal",
              highlight=False, soft_wrap=True)


@memory_app.command("rollback")
def rollback_cmd(version: int, bank: Optional[Path] = BankOpt) -> None:
    """Make an earlier version the current one (later versions stay on disk)."""
    if version == 0:
        _fail("version 0 is the empty bank; to start over use a new --bank folder, or pick a version from `lifealign-lite memory versions`")
    b = _bank(bank)
    b.require()
    with b.lock():
        b.rollback(version)
    err.print(f"bank is now at version {version}")


@memory_app.command("verify")
def verify_cmd(
    bank: Optional[Path] = BankOpt,
    all_versions: bool = typer.Option(False, "--all", help="Check every version on disk, not only the current one."),
    adopt: bool = typer.Option(False, "--adopt", help="Once, for a bank written before checksums existed: record checksums for every "
                                                      "version that has none and whose files all parse. It trusts those files as they "
                                                      "are, so it is not for a checksums.json lost later (never done by default)."),
) -> None:
    """Check every file of the current version (or of every version) against its recorded SHA-256 and size.

    Exit 0: all intact; 1: something is damaged (the table names each file and what is wrong; a version without
    checksums.json and a missing or unreadable manifest are damage too); 2: no bank to check.
    """
    from lifealign_lite.memory.bank import Bank

    b = Bank(existing_bank(bank))
    manifest_problem = b.manifest_problem()
    if adopt:
        with b.lock():
            checks = b.adopt()
    else:
        manifest = {} if manifest_problem else b.manifest()
        listed = set() if manifest_problem else {v["version"] for v in manifest["versions"]} - set(manifest.get("removed", []))
        if all_versions or manifest_problem:  # without a manifest, every version on disk is checked
            versions = sorted(listed | set(b.versions_on_disk()))
        else:
            versions = [manifest["current"]] if manifest["current"] else []
        checks = [b.verify(v) for v in versions]
    current = None if manifest_problem else b.manifest()["current"]
    table = Table("version", "file", "status", title=f"{b.root} (current version {'unknown: no manifest' if current is None else current})")
    table.columns[1].overflow = "fold"  # a file's whole path, never an ellipsis
    for c in checks:
        label = f"{c.version}{' (current)' if c.version == current else ''}"
        if c.intact:
            table.add_row(label, f"all {c.files} files", "ok (checksums recorded now)" if c.adopted else "ok")
        for rel, what in c.problems:
            table.add_row(label, rel or "(version folder)", f"[red]damaged:[/] {what}")
    out.print(table)
    damaged = [c.version for c in checks if not c.intact]
    if manifest_problem:
        err.print(manifest_problem, soft_wrap=True, highlight=False)
    elif damaged:
        err.print(f"damaged: version {', '.join(map(str, damaged))}; `lifealign-lite memory rollback N` makes an intact version current", soft_wrap=True)
    if damaged or manifest_problem:
        raise typer.Exit(1)


@memory_app.command("repair")
def repair_cmd(bank: Optional[Path] = BankOpt) -> None:
    """Rebuild a missing or unreadable manifest from the versions on disk that verify (the newest becomes current;
    a damaged manifest is kept aside as manifest.json.damaged-TIME). Does nothing to a bank whose manifest is fine."""
    from lifealign_lite.memory.bank import Bank

    b = Bank(existing_bank(bank))
    with b.lock():
        done = b.repair()
    if not done["repaired"]:
        err.print(f"{b.manifest_path}: intact; nothing to repair (current version {done['current']})", highlight=False, soft_wrap=True)
        return
    left_out = f"; left out as damaged: {', '.join(map(str, done['damaged']))} (`memory verify --all` lists why)" if done["damaged"] else ""
    base = f"base model {done['base']['name']}" if done["base"] else "base model unknown (recorded again by the next align)"
    aside = f"; the damaged manifest is kept as {done['kept_aside']}" if done["kept_aside"] else ""
    err.print(f"manifest rebuilt: versions {', '.join(map(str, done['versions']))}, current {done['current']} (the newest that verifies: "
              f"`memory rollback N` picks another), {base}{left_out}{aside}", highlight=False, soft_wrap=True)


@memory_app.command("versions")
def versions_cmd(bank: Optional[Path] = BankOpt, as_json: bool = JsonOpt) -> None:
    """The version log."""
    manifest = _bank(bank).manifest()
    if as_json:
        print(json.dumps({"current": manifest["current"], "versions": manifest["versions"]}, indent=2))
        return
    table = Table("version", "parent", "event", "created", title=f"current: {manifest['current']}")
    for v in manifest["versions"]:
        table.add_row(str(v["version"]), str(v["parent"]), v["event"], v["created"])
    out.print(table)


@memory_app.command("export")
def export_cmd(
    name: Optional[str] = typer.Argument(None, help="A domain or 'core' (with --all: the folder)."),
    out_dir: Optional[Path] = typer.Argument(None, help="A new folder (peft, merged) or a new file (gguf, gguf-merged)."),
    fmt: str = typer.Option("peft", "--format", help="peft (adapter folder), merged (full model folder), gguf (llama.cpp LoRA adapter "
                                                     "file for the base GGUF) or gguf-merged (whole model GGUF with the entry merged in)."),
    outtype: str = typer.Option("f16", "--outtype", help="Weights of a gguf-merged file: f16 or q8_0."),
    base_gguf: Optional[Path] = typer.Option(None, "--base-gguf", help="The base model's GGUF (default: the embedded SmolLM2 file for the default model)."),
    check: Optional[Path] = typer.Option(None, "--check", help="After a gguf or gguf-merged export, compare it in llama.cpp (llama-cpp-python) "
                                                               "with the PEFT model on the prompts of this pairs file."),
    check_n: int = typer.Option(50, "--check-n", help="How many prompts of --check to compare."),
    all_entries: bool = typer.Option(False, "--all", help="Every domain and the core as PEFT folders named after them in one new folder, "
                                                            "and the vLLM command that serves them: `memory export --all DIR`."),
    bank: Optional[Path] = BankOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Export a bank entry as a PEFT adapter, a merged model (checked against the bank entry), or GGUF for llama.cpp
    (checked structurally against the base GGUF; --check compares next-token log-probs in llama.cpp)."""
    from lifealign_lite.export import FORMATS, export_all, export_entry, gguf_parity
    from lifealign_lite.recipe import load_recipe

    if all_entries and (name is None or out_dir is not None or fmt != "peft"):
        _fail("--all takes one folder and exports PEFT folders: `lifealign-lite memory export --all DIR`")
    if not all_entries and (name is None or out_dir is None):
        _fail("give NAME and a new folder: `lifealign-lite memory export NAME DIR` (or --all DIR)")
    if fmt not in FORMATS:
        _fail(f"unknown export format {fmt!r}; use {', '.join(FORMATS)}")
    if (check is not None or base_gguf is not None) and not fmt.startswith("gguf"):
        _fail("--check and --base-gguf go with --format gguf or gguf-merged")
    if check is not None and (not check.is_file() or check_n < 1):
        _fail(f"--check {check}: not a pairs file" if not check.is_file() else f"--check-n must be at least 1, got {check_n}")
    root = _bank(bank).root
    err.print(f"export: {'every entry' if all_entries else name} as {fmt} (loading the model) ...", highlight=False, soft_wrap=True)
    if all_entries:
        result = export_all(root, Path(name), home_dir(), load_recipe(None))
    else:
        result = export_entry(root, name, out_dir, fmt, home_dir(), load_recipe(None), base_gguf, outtype)
        if check is not None:
            result["parity"] = gguf_parity(root, name, out_dir, check, check_n, home_dir(), load_recipe(None), base_gguf)
    if all_entries:
        err.print(f"exported {', '.join(result['names'])} as PEFT folders to {result['out']}; serve them with vLLM:", highlight=False, soft_wrap=True)
        print(result["vllm"])
        return
    if as_json:
        print(json.dumps(result, indent=2))
    elif "llama_cpp" in result:
        print(result["llama_cpp"])
    err.print(f"exported {name} as {result['format']} to {result['out']}" + (f" (checked: max logit difference {result['max_logit_diff']:.1e})" if "max_logit_diff" in result else "")
              + (" (structure checked against the base GGUF)" if fmt == "gguf" else ""), highlight=False, soft_wrap=True)
    if "parity" in result:
        p, b = result["parity"]["export"], result["parity"]["base_only"]
        err.print(f"llama.cpp vs PEFT on {result['parity']['prompts']} prompts: top-1 agreement {p['top1_agreement']:.0%}, max |log-prob diff| "
                  f"{p['max_abs_logprob_diff']:.3f} (bare base GGUF vs transformers: {b['top1_agreement']:.0%}, {b['max_abs_logprob_diff']:.3f}; "
                  f"the memory changes the top-1 token on {result['parity']['memory_changes_top1']:.0%})"
                  + (f"; where they disagree, llama.cpp's top-1 is at most {p['disagreement_gaps'][0]:.3f} nats below the PEFT model's"
                     if p["disagreement_gaps"] else ""), highlight=False, soft_wrap=True)
