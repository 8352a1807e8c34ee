"""``lifealign-lite memory``: list, show, verify, remove, roll back and export bank entries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from .common import BankOpt, JsonOpt, err, existing_bank, fail as _fail, home_dir, out, sub_app

if TYPE_CHECKING:
    from lifealign_lite.memory.bank import Bank, VersionCheck

memory_app = sub_app("Inspect and manage the long-term adapter bank.")


def _bank(path: Optional[Path]) -> Bank:
    from lifealign_lite.memory.bank import Bank  # here, not at the top: --help should not import torch

    return Bank(existing_bank(path))


def _rows(bank: Bank) -> list[dict]:
    from lifealign_lite.memory.bank import folder_size

    state = bank.load()
    rows = []
    for name, info in sorted(state.domains.items()):
        rows.append({
            "domain": name, "rank": info.get("rank"), "pairs_seen": info.get("pairs_seen"),
            "pairs_trained": info.get("pairs_trained", info.get("pairs_seen")), "versions": len(info.get("lineage", [])),
            "size_bytes": folder_size(state.slot_dir(name)), "updated": info.get("updated"),
        })
    if state.core_dir():
        rows.append({"domain": "core", "rank": state.meta.get("bank_rank"), "pairs_seen": sum(r["pairs_seen"] for r in rows),
                     "pairs_trained": sum(r["pairs_trained"] for r in rows),
                     "versions": len(state.tasks), "size_bytes": folder_size(state.core_dir()), "updated": None})
    return rows


@memory_app.command("list")
def list_cmd(bank: Optional[Path] = BankOpt, as_json: bool = JsonOpt) -> None:
    """A table of the bank's domains (and the core)."""
    from lifealign_lite.memory.bank import BankError, folder_size

    try:
        b = _bank(bank)
        rows = _rows(b)
        version = b.load().version
    except BankError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps({"version": version, "bank_bytes": folder_size(b.root / "versions"), "entries": rows}, indent=2))
        return
    table = Table("domain", "rank", "pairs trained / given", "updates", "size", "last update", title=f"{b.root} (version {version})")
    for r in rows:
        table.add_row(r["domain"], str(r["rank"]), f"{r['pairs_trained']} / {r['pairs_seen']}", str(r["versions"]), f"{r['size_bytes'] / 1e6:.2f} MB", r["updated"] or "")
    out.print(table)


@memory_app.command("show")
def show_cmd(name: str = typer.Argument(..., help="A domain, or 'core'."), bank: Optional[Path] = BankOpt, as_json: bool = JsonOpt) -> None:
    """Everything recorded about one domain (lineage of every update: data, pairs, recipe, time, consolidation),
    or about the core (the tasks folded into it)."""
    from lifealign_lite.memory.bank import BankError
    from lifealign_lite.memory.router import CORE

    try:
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
    except BankError as exc:
        _fail(str(exc))
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
    from lifealign_lite.memory.bank import BankError

    b = _bank(bank)
    try:
        b.require()  # before the lock, which would create the folder
        with b.lock():
            state = b.remove_domain(name, b.manifest()["base"])
    except BankError as exc:
        _fail(str(exc))
    err.print(f"removed {name}'s slot, key and replay pairs; bank is now at version {state.version}. The core keeps what every task taught it "
              f"({', '.join(state.tasks)}): see `lifealign-lite memory show core`; `memory rollback {state.version - 1}` undoes the removal",
              highlight=False, soft_wrap=True)


@memory_app.command("rollback")
def rollback_cmd(version: int, bank: Optional[Path] = BankOpt) -> None:
    """Make an earlier version the current one (later versions stay on disk)."""
    from lifealign_lite.memory.bank import BankError

    if version == 0:
        _fail("version 0 is the empty bank; to start over use a new --bank folder, or pick a version from `lifealign-lite memory versions`")
    b = _bank(bank)
    try:
        b.require()
        with b.lock():
            b.rollback(version)
    except BankError as exc:
        _fail(str(exc))
    err.print(f"bank is now at version {version}")


@memory_app.command("verify")
def verify_cmd(
    bank: Optional[Path] = BankOpt,
    all_versions: bool = typer.Option(False, "--all", help="Check every version on disk, not only the current one."),
) -> None:
    """Check every file of the current version (or of every version) against its recorded SHA-256 and size.

    Exit 0: all intact; 1: something is damaged (the table names each file and what is wrong); 2: no bank to check.
    Versions written before checksums existed are checked for structure only and shown as unverified.
    """
    from lifealign_lite.memory.bank import BankError

    b = _bank(bank)
    try:
        b.require()
        manifest = b.manifest()
    except BankError as exc:
        _fail(str(exc))
    if all_versions:
        versions = sorted({v["version"] for v in manifest["versions"]} | {int(p.name) for p in (b.root / "versions").glob("[0-9]*") if p.name.isdigit()})
    else:
        versions = [manifest["current"]] if manifest["current"] else []
    checks: list[VersionCheck] = [b.verify(v) for v in versions]
    table = Table("version", "file", "status", title=f"{b.root} (current version {manifest['current']})")
    table.columns[1].overflow = "fold"  # a file's whole path, never an ellipsis
    for c in checks:
        current = " (current)" if c.version == manifest["current"] else ""
        if c.intact:
            table.add_row(f"{c.version}{current}", f"all {c.files} files", "ok" if c.verified else "unverified (no checksums; structure ok)")
        for rel, what in c.problems:
            table.add_row(f"{c.version}{current}", rel or "(version folder)", f"[red]damaged:[/] {what}")
    out.print(table)
    damaged = [c.version for c in checks if not c.intact]
    if damaged:
        err.print(f"damaged: version {', '.join(map(str, damaged))}; `lifealign-lite memory rollback N` makes an intact version current", soft_wrap=True)
        raise typer.Exit(1)


@memory_app.command("versions")
def versions_cmd(bank: Optional[Path] = BankOpt, as_json: bool = JsonOpt) -> None:
    """The version log."""
    from lifealign_lite.memory.bank import BankError

    try:
        manifest = _bank(bank).manifest()
    except BankError as exc:
        _fail(str(exc))
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
    out_dir: Optional[Path] = typer.Argument(None, help="A new folder."),
    fmt: str = typer.Option("peft", "--format", help="peft (adapter folder) or merged (full model folder)."),
    all_entries: bool = typer.Option(False, "--all", help="Every domain and the core as PEFT folders named after them in one new folder, "
                                                            "and the vLLM command that serves them: `memory export --all DIR`."),
    bank: Optional[Path] = BankOpt,
) -> None:
    """Export a bank entry as a PEFT adapter or a merged model (checked against the bank entry)."""
    from lifealign_lite.memory.bank import BankError
    from lifealign_lite.export import export_all, export_entry
    from lifealign_lite.model import ModelError
    from lifealign_lite.recipe import load_recipe

    if all_entries and (name is None or out_dir is not None or fmt != "peft"):
        _fail("--all takes one folder and exports PEFT folders: `lifealign-lite memory export --all DIR`")
    if not all_entries and (name is None or out_dir is None):
        _fail("give NAME and a new folder: `lifealign-lite memory export NAME DIR` (or --all DIR)")
    try:
        if all_entries:
            result = export_all(_bank(bank).root, Path(name), home_dir(), load_recipe(None))
        else:
            result = export_entry(_bank(bank).root, name, out_dir, fmt, home_dir(), load_recipe(None))
    except (BankError, ModelError) as exc:
        _fail(str(exc))
    if all_entries:
        err.print(f"exported {', '.join(result['names'])} as PEFT folders to {result['out']}; serve them with vLLM:", highlight=False, soft_wrap=True)
        print(result["vllm"])
        return
    err.print(f"exported {name} as {result['format']} to {result['out']}" + (f" (checked: max logit difference {result['max_logit_diff']:.1e})" if "max_logit_diff" in result else ""))
