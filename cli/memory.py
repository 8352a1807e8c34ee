"""``lifealign-lite memory``: list, show, verify, remove, roll back and export bank entries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lifealign_lite.memory.bank import Bank, BankError, VersionCheck, folder_size

memory_app = typer.Typer(help="Inspect and manage the long-term adapter bank.", no_args_is_help=True)


def _bank(path: Optional[Path]) -> Bank:
    from .app import default_bank

    return Bank(path or default_bank())


def _fail(message: str) -> None:
    from .app import fail

    fail(message)


BankOpt = typer.Option(None, "--bank", help="Adapter bank folder (default: $LIFEALIGN_HOME/bank).")


def _rows(bank: Bank) -> list[dict]:
    state = bank.load()
    rows = []
    for name, info in sorted(state.domains.items()):
        rows.append({
            "domain": name, "rank": info.get("rank"), "pairs_seen": info.get("pairs_seen"), "versions": len(info.get("lineage", [])),
            "size_bytes": folder_size(state.slot_dir(name)), "updated": info.get("updated"),
        })
    if state.core_dir():
        rows.append({"domain": "core", "rank": state.meta.get("bank_rank"), "pairs_seen": sum(r["pairs_seen"] for r in rows),
                     "versions": len(state.tasks), "size_bytes": folder_size(state.core_dir()), "updated": None})
    return rows


@memory_app.command("list")
def list_cmd(bank: Optional[Path] = BankOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """A table of the bank's domains (and the core)."""
    from .app import out

    try:
        b = _bank(bank)
        rows = _rows(b)
        version = b.load().version
    except BankError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps({"version": version, "bank_bytes": folder_size(b.root / "versions"), "entries": rows}, indent=2))
        return
    table = Table("domain", "rank", "pairs seen", "updates", "size", "last update", title=f"{b.root} (version {version})")
    for r in rows:
        table.add_row(r["domain"], str(r["rank"]), str(r["pairs_seen"]), str(r["versions"]), f"{r['size_bytes'] / 1e6:.2f} MB", r["updated"] or "")
    out.print(table)


@memory_app.command("show")
def show_cmd(name: str, bank: Optional[Path] = BankOpt) -> None:
    """Everything recorded about one domain: lineage of every update (data hash, recipe, time, consolidation)."""
    from .app import out

    try:
        state = _bank(bank).load()
        state.slot_dir(name)
    except BankError as exc:
        _fail(str(exc))
    out.print_json(json.dumps({"domain": name, "version": state.version, **state.domains[name]}))


@memory_app.command("rm")
def rm_cmd(name: str, bank: Optional[Path] = BankOpt) -> None:
    """Remove a domain's slot, key and replay pairs (as a new version; `rollback` undoes it)."""
    from .app import err

    b = _bank(bank)
    try:
        b.require()  # before the lock, which would create the folder
        with b.lock():
            state = b.remove_domain(name, b.manifest()["base"])
    except BankError as exc:
        _fail(str(exc))
    err.print(f"removed {name}; bank is now at version {state.version}")


@memory_app.command("rollback")
def rollback_cmd(version: int, bank: Optional[Path] = BankOpt) -> None:
    """Make an earlier version the current one (later versions stay on disk)."""
    from .app import err

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
    from .app import err, out

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
def versions_cmd(bank: Optional[Path] = BankOpt) -> None:
    """The version log."""
    from .app import out

    try:
        manifest = _bank(bank).manifest()
    except BankError as exc:
        _fail(str(exc))
    table = Table("version", "parent", "event", "created", title=f"current: {manifest['current']}")
    for v in manifest["versions"]:
        table.add_row(str(v["version"]), str(v["parent"]), v["event"], v["created"])
    out.print(table)


@memory_app.command("export")
def export_cmd(
    name: str = typer.Argument(..., help="A domain or 'core'."),
    out_dir: Path = typer.Argument(..., help="A new folder."),
    fmt: str = typer.Option("peft", "--format", help="peft (adapter folder) or merged (full model folder)."),
    bank: Optional[Path] = BankOpt,
) -> None:
    """Export a bank entry as a PEFT adapter or a merged model (checked against the bank entry)."""
    from lifealign_lite.export import export_entry
    from lifealign_lite.model import ModelError
    from lifealign_lite.recipe import load_recipe

    from .app import err, home_dir

    try:
        result = export_entry(bank or _bank(None).root, name, out_dir, fmt, home_dir(), load_recipe(None))
    except (BankError, ModelError, ValueError) as exc:
        _fail(str(exc))
    err.print(f"exported {name} as {result['format']} to {result['out']}" + (f" (checked: max logit difference {result['max_logit_diff']:.1e})" if "max_logit_diff" in result else ""))
