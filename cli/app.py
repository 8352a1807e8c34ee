"""``lifealign-lite``: parse flags, call one library function, print the result."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lifealign_lite.recipe import GROUPS, describe, list_recipes, load_recipe

from .bench import bench_app
from .chat import chat_loop
from .common import (HELP_SETTINGS, App, BankOpt, EngineOpt, JsonOpt, RecipeOpt, SetOpt, build_recipe, default_bank, err, existing_bank,
                     fail, home_dir, out, recipe_options, relaunch_args, status)
from .memory import memory_app

app = typer.Typer(
    cls=App,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=HELP_SETTINGS,
)
app.add_typer(memory_app, name="memory")
app.add_typer(bench_app, name="bench")
BANK_MODEL = {"model": "It must be the bank's."}  # chat, eval and serve use the bank's memory: trained on that base


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"lifealign-lite {version('lifealign-lite')}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Keep a language model aligned as new preference data arrives (LifeAlign: FPO + memory consolidation)."""


@app.command()
@recipe_options()
def align(
    ctx: typer.Context,
    data: Path = typer.Argument(..., help="Preference pairs as JSON Lines (TRL plain or conversational format)."),
    domain: Optional[str] = typer.Option(None, "--domain", "-d", help="Domain name of this task (default: the lines' domain field, else 'general')."),
    bank: Optional[Path] = BankOpt,
    recipe: Optional[str] = RecipeOpt,
    flags: Optional[dict] = None,  # the recipe's flags (--model, --lr, ...: every knob marked flag), from recipe_options
    sets: Optional[list[str]] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run of this domain and data."),
    wait: float = typer.Option(0.0, "--wait", metavar="SECONDS", help="If another align is writing the bank, wait up to SECONDS for it."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout (progress stays on stderr)."),
    num_processes: int = typer.Option(1, "--num-processes", min=1, metavar="N",
                                      help="Train data-parallel in N processes on this machine (each a share of every batch; "
                                           "for GPUs and several machines use `accelerate launch`: README)."),
) -> None:
    """Align the model to preference pairs with FPO into a short-term LoRA saved in the bank."""
    from lifealign_lite.distributed import is_main_process

    rcp = build_recipe(recipe, sets, **flags)
    if num_processes > 1:
        from lifealign_lite.data import load_pairs
        from lifealign_lite.distributed import launch

        load_pairs(data)  # bad data is one line here, not one per process
        raise typer.Exit(launch(relaunch_args(ctx, drop={"num_processes"}), num_processes))

    from lifealign_lite.data import load_pairs
    from lifealign_lite.model import check_model_folder

    pairs = load_pairs(data, max_pairs=rcp.max_pairs or None, seed=rcp.seed)  # bad data, a wrong --model folder: refused
    check_model_folder(rcp.model)  # before the status line and the slow imports, in one line
    if is_main_process():
        status(f"align: {len(pairs)} pair{'s' if len(pairs) != 1 else ''} of {data}; loading torch and the model ...")
    from lifealign_lite.align import align as run_align
    from lifealign_lite.progress import reporter_for
    from lifealign_lite.train import Interrupted

    try:
        with reporter_for(err) if is_main_process() else contextlib.nullcontext() as reporter:
            result = run_align(data, rcp, home_dir(), bank or default_bank(), domain=domain, resume=resume, reporter=reporter, wait_s=wait,
                               pairs=pairs)
    except Interrupted as exc:
        if is_main_process():
            err.print(f"[yellow]interrupted:[/] {exc}; " + ("continue with the same command plus --resume" if exc.checkpoint else "run the same command again"))
        raise typer.Exit(130)
    if result is None:  # another process of a data-parallel run: the main one reports
        return
    s = result.summary
    if as_json:
        print(json.dumps({**s, "run_dir": str(result.run_dir)}, indent=2))
        return
    table = Table(title=f"aligned domain '{s['domain']}'", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # a long saved path wraps instead of being cut
    for key, val in [
        ("distinct pairs trained / given", f"{s['pairs_trained']} / {s['pairs']}"),
        ("distinct replayed pairs trained / mixed in", f"{s['replayed_trained']} / {s['replayed_pairs']}"),
        ("pairs drawn (steps x batch, repeats and replay included)", s["trained_pairs"]), ("steps", s["steps"]), ("reward acc start → end", f"{s['reward_acc_start']:.2f} → {s['reward_acc_end']:.2f}"),
        ("loss start → end", f"{s['loss_start']:.4f} → {s['loss_end']:.4f}"), ("pairs/s", s["pairs_per_s"]),
        ("truncated (prompt / response)", f"{s['truncated_prompts']} / {s['truncated_responses']}"),
        ("wall time", f"{s['timings_s']['total']} s"), ("peak memory", f"{s['peak_rss_mb']:.0f} MB"), ("saved", str(result.run_dir)),
    ]:
        table.add_row(key, str(val))
    err.print(table)


@app.command()
@recipe_options("model", "quant", notes=BANK_MODEL)
def chat(
    domain: str = typer.Option("auto", "--domain", "-d", help="A domain's memory, 'auto' (route each prompt), 'core' or 'base'."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer this one prompt on stdout and exit."),
    bank: Optional[Path] = BankOpt,
    recipe: Optional[str] = RecipeOpt,
    flags: Optional[dict] = None,  # --model, --quant from recipe_options
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", metavar="N", help="Longest answer, in tokens."),
    unmerged: bool = typer.Option(False, "--unmerged", help="Keep the adapter unmerged (slower; for comparison)."),
    engine: str = EngineOpt,
    sets: Optional[list[str]] = SetOpt,
) -> None:
    """Chat with the model and the bank's memory. Inside: /domain [NAME], /reset, /help, /bye (also /exit, /quit).

    Ctrl-C stops an answer and returns to the prompt; line editing and history work as in a shell."""
    from lifealign_lite.engines import open_chat

    if max_new_tokens < 1:
        fail(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    from lifealign_lite.system import seconds_since_process_start

    rcp = build_recipe(recipe, sets, **flags)
    bank_dir = existing_bank(bank)
    status(f"loading the model and the memory of {bank_dir} ...")  # within 1 s of the start: the load takes seconds
    try:
        session = open_chat(bank_dir, home_dir(), rcp, engine=engine, domain=domain, merge=not unmerged, note=status)
    except KeyboardInterrupt:  # Ctrl-C while loading: leave without a traceback
        raise typer.Exit(130)
    if prompt is not None:
        since_start: list[float | None] = []

        def show(piece: str) -> None:
            if not since_start:
                since_start.append(seconds_since_process_start())
            print(piece, end="", flush=True)

        turn = session.ask(prompt, on_token=show, max_new_tokens=max_new_tokens)
        print()
        waited = f"first token {since_start[0]:.2f} s after the command started, " if since_start and since_start[0] is not None else "first token "
        err.print(f"[dim]memory: {turn.memory}  engine: {session.engine}  {waited}{turn.first_token_s:.2f} s after loading  "
                  f"{turn.tokens / max(turn.seconds, 1e-9):.1f} tokens/s[/]")
        raise typer.Exit(130 if turn.interrupted else 0)
    chat_loop(session, max_new_tokens)


@app.command("route")
def route_cmd(
    text: Optional[str] = typer.Argument(None, help="A prompt to route (or give --messages)."),
    messages: Optional[Path] = typer.Option(None, "--messages", help="A JSON file holding a conversation: a list of {role, content} messages, or {\"messages\": [...]}."),
    bank: Optional[Path] = BankOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Say which memory chat would use for TEXT or a conversation, with each domain's probability."""
    if (text is None) == (messages is None):
        fail("give a prompt TEXT or --messages FILE (one of them)")
    conversation = text if messages is None else read_messages(messages)
    bank_dir = existing_bank(bank)
    status("route: loading the bank's router and its prompt embedder ...")  # before the slow imports
    from lifealign_lite.session import routing_session
    from lifealign_lite.memory.bank import Bank

    bank_ = Bank(bank_dir)
    state = bank_.load()
    if not state.domains:
        fail(f"{bank_.root}: no domains aligned yet; run `lifealign-lite align DATA --domain NAME` first")
    result = routing_session(bank_.root, home_dir(), load_recipe(None), state).route(conversation)  # as chat --domain auto and serve route
    if as_json:
        print(json.dumps({"domain": result.domain, "threshold": result.threshold, "similarity": result.similarity, "scores": result.scores,
                          "gate": result.gate}))
        return
    gate = f", or a highest probability below {result.gate:.2f}" if result.gate > 0 else ""
    table = Table("domain", "probability", title=f"routes to: {result.domain} (nearest prompts' similarity {result.similarity:.3f}, "
                  f"core below {result.threshold:.3f}{gate})")
    for name, score in result.scores.items():
        table.add_row(name, f"{score:.3f}")
    out.print(table)


def read_messages(path: Path) -> list[dict]:
    """A conversation from a JSON file, checked: a list of {role, content} messages, or {"messages": [...]}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"{path}: file not found")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        fail(f"{path}: not valid JSON ({str(exc).splitlines()[0][:80]}); give a list of {{\"role\", \"content\"}} messages")
    except OSError as exc:
        fail(f"{path}: cannot read ({exc.strerror})")
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    ok = isinstance(data, list) and data and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in data)
    if not ok:
        fail(f"{path}: expected a non-empty list of {{\"role\": str, \"content\": str}} messages (or {{\"messages\": [...]}})")
    return [{"role": m["role"], "content": m["content"]} for m in data]


@app.command("eval")
@recipe_options("model", notes=BANK_MODEL)
def eval_cmd(
    data: Path = typer.Argument(..., help="Held-out preference pairs (JSON Lines)."),
    domain: str = typer.Option("auto", "--domain", "-d", help="A domain's memory, 'auto' (route each pair), 'core' or 'base'."),
    bank: Optional[Path] = BankOpt,
    recipe: Optional[str] = RecipeOpt,
    flags: Optional[dict] = None,  # --model from recipe_options
    max_pairs: Optional[int] = typer.Option(None, "--max-pairs", metavar="N", help="Score N pairs (seeded shuffle)."),
    as_json: bool = JsonOpt,
    sets: Optional[list[str]] = SetOpt,
    judge_url: Optional[str] = typer.Option(None, "--judge", metavar="URL",
                                            help="Also generate answers and score them 1-10 with an LLM judge at this OpenAI-compatible base URL (with or without /v1)."),
    judge_model: str = typer.Option("judge", "--judge-model", metavar="NAME", help="Model name the judge server expects."),
    judge_key_env: Optional[str] = typer.Option(None, "--judge-key-env", metavar="VAR", help="Name of the environment variable holding the judge's API key."),
    judge_max_new_tokens: int = typer.Option(128, "--judge-max-new-tokens", min=1, metavar="N", help="Tokens generated per answer for the judge."),
) -> None:
    """Preference accuracy (implicit reward vs the base), length-normalized accuracy and mean reward margin;
    with --judge, also the mean LLM-judge score (1-10, one rubric per domain) of generated answers."""
    from lifealign_lite.data import load_pairs
    from lifealign_lite.distributed import refuse_launcher
    from lifealign_lite.judge import Judge, judge_pairs

    refuse_launcher("eval")  # scoring a dev split takes seconds to minutes: one process
    rcp = build_recipe(recipe, sets, **flags)
    judge = None
    if judge_url:
        api_key = None
        if judge_key_env:
            api_key = os.environ.get(judge_key_env)
            if not api_key:
                fail(f"--judge-key-env {judge_key_env}: that environment variable is not set or empty; export it with the judge's API key")
        judge = Judge(judge_url, model=judge_model, api_key=api_key)
        judge.check()
    pairs = load_pairs(data, max_pairs=max_pairs, seed=rcp.seed)
    bank_dir = existing_bank(bank)
    status(f"eval: {len(pairs)} pair{'s' if len(pairs) != 1 else ''} of {data}; loading the model and the bank's memory ...")  # before the slow imports
    from lifealign_lite.chat import open_session
    from lifealign_lite.evaluate import evaluate
    from lifealign_lite.progress import reporter_for

    with reporter_for(err) as reporter:  # its heartbeat covers the model load too
        session = open_session(bank_dir, home_dir(), rcp, domain=domain, note=status)
        reporter.note(f"scoring {len(pairs)} pairs with the base model, then with memory '{domain}'")
        result = evaluate(session, pairs, rcp, domain, reporter=reporter).summary
        if judge is not None:
            judged = judge_pairs(session, pairs, judge, domain, max_new_tokens=judge_max_new_tokens, reporter=reporter)
            result.update({k: judged[k] for k in ("judge_score", "judged", "unparsed")})
            per_domain = result.setdefault("per_domain", {})
            for name, figures in judged["per_domain"].items():  # one row per domain, the judge's figures beside the rest
                per_domain.setdefault(name, {}).update(figures)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    headers = ["pairs", "preference acc", "length-norm acc", "mean reward margin"] + (["judge score (1-10)", "judged"] if judge else [])
    table = Table(*headers, title=f"{data} with memory '{domain}'")
    rows = [("all", result)] + list(result.get("per_domain", {}).items())
    if len(rows) > 1:
        table.columns.insert(0, type(table.columns[0])(header="domain"))

    def fmt(r, key, spec):
        return format(r[key], spec) if r.get(key) is not None else "-"

    for name, r in rows:
        cells = [str(r.get("pairs", "-")), fmt(r, "pref_acc", ".3f"), fmt(r, "lennorm_acc", ".3f"), fmt(r, "margin", "+.4f")]
        if judge:
            cells += [fmt(r, "judge_score", ".2f"), f"{r.get('judged', 0)}" + (f" ({r['unparsed']} unparsed)" if r.get("unparsed") else "")]
        table.add_row(*(([name] if len(rows) > 1 else []) + cells))
    out.print(table)
    err.print(f"memory used: {result['memory_used']}")


@app.command()
def recipes(
    name: Optional[str] = typer.Argument(None, metavar="[NAME|PATH]", help="Show this preset's every field and where its YAML file is."),
    as_json: bool = JsonOpt,
) -> None:
    """List the recipe presets, or show one preset's fields (what --set and the flags override)."""
    from lifealign_lite.recipe import recipe_path

    if name is None:
        rows = [{"name": n, "description": d, "path": str(recipe_path(n))} for n, d in list_recipes()]
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        table = Table("recipe", "description", title="lifealign-lite recipes NAME shows a preset's fields")
        for row in rows:
            table.add_row(row["name"], row["description"])
        out.print(table)
        return
    path, rcp = recipe_path(name), load_recipe(name)
    if as_json:
        print(json.dumps({"path": str(path), "fields": rcp.to_dict()}, indent=2))
        return
    table = Table("group", "key", "value", "what it does", title=f"{rcp.name}: {path}")
    for key, value in sorted(rcp.to_dict().items(), key=lambda kv: GROUPS.index(describe(kv[0])["group"])):
        if key != "description":
            info = describe(key)
            choices = f" ({'|'.join(info['choices'])})" if info["choices"] else ""
            table.add_row(info["group"], key, ", ".join(value) if isinstance(value, list) else str(value), info["help"] + choices)
    out.print(rcp.description, highlight=False)
    out.print(table)


@app.command()
@recipe_options("model", "quant", notes=BANK_MODEL)
def serve(
    bank: Optional[Path] = BankOpt,
    host: str = typer.Option("127.0.0.1", "--host", metavar="ADDRESS", help="Address to bind; anything but loopback needs --api-key."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, metavar="N", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LIFEALIGN_API_KEY", metavar="KEY",
                                          help="Require 'Authorization: Bearer KEY' on every /v1 request."),
    max_tokens_cap: int = typer.Option(1024, "--max-tokens-cap", min=1, metavar="N", help="Refuse requests asking for more than N new tokens."),
    upstream: Optional[str] = typer.Option(None, "--upstream", metavar="URL", help="Route here, generate on this OpenAI-compatible engine "
                                           "(e.g. http://HOST:8000/v1 of a vLLM serving `memory export --all`), model = the routed memory."),
    upstream_key: Optional[str] = typer.Option(None, "--upstream-key", envvar="LIFEALIGN_UPSTREAM_KEY", metavar="KEY", help="Bearer key of the upstream."),
    recipe: Optional[str] = RecipeOpt,
    flags: Optional[dict] = None,  # --model, --quant from recipe_options
    engine: str = EngineOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No access-log line per request."),
    parallel: Optional[int] = typer.Option(None, "--parallel", min=1, max=256, metavar="N",
                                           help="llama.cpp engine: conversations decoded at once (continuous batching; default 8)."),
    context: Optional[int] = typer.Option(None, "--context", min=128, max=131072, metavar="N",
                                          help="llama.cpp engine: tokens of one conversation, prompt and answer (default 2048); a longer one gets a 400."),
    sets: Optional[list[str]] = SetOpt,
) -> None:
    """Serve the model and the bank's memory over an OpenAI-compatible HTTP API.

    The request's `model` picks the memory: a domain, core, base, or auto (route the conversation; the default).
    A bank version committed while serving is used from the next request on."""
    from lifealign_lite.engines import open_chat
    from lifealign_lite.serve import check_bind
    from lifealign_lite.serve_app import serve as run_server
    from lifealign_lite.xllama import SERVE_SLOTS, SLOT_CONTEXT

    check_bind(host, port, api_key)
    rcp = build_recipe(recipe, sets, **flags)
    bank_dir = existing_bank(bank)
    parallel, context = parallel or SERVE_SLOTS, context or SLOT_CONTEXT
    status(f"loading the model and the memory of {bank_dir} ...")
    try:
        session = open_chat(bank_dir, home_dir(), rcp, engine=engine, note=status, slots=parallel, context=context)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    slots = f", {parallel} conversations of {context} tokens at once" if session.concurrent else ""
    status(f"serving {', '.join(session.available())} and auto on http://{host}:{port}/v1 with {session.engine}{slots} (Ctrl-C stops)")
    run_server(session, bank_dir, host, port, api_key, max_tokens_cap, log=status, upstream=upstream, upstream_key=upstream_key, quiet=quiet)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
