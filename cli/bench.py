"""``lifealign-lite bench``: speed and memory against TRL, CPU precision, chat latency.

Each command runs every variant in its own subprocess (so peak memory is per variant) and prints a table,
or one JSON object with ``--json``. Progress lines go to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import BankOpt, err, existing_bank, fail, home_dir, out, status, sub_app, with_options

bench_app = sub_app("Benchmarks: continual alignment (LifeAlign vs baselines), routing accuracy, training speed vs TRL, "
                    "CPU precision, chat latency, server throughput.")

JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout instead of a table.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Show each subprocess's own output on stderr.")
ThreadsOpt = typer.Option(None, "--threads", help="torch threads in every variant (default: torch's choice).")
ModelOpt = typer.Option("default", "--model", help="Local model folder or hub id; 'default' is the embedded SmolLM2-135M-Instruct.")
TimeoutOpt = typer.Option(3600.0, "--timeout", help="Seconds before one variant's subprocess is stopped.")
# what every benchmark that runs variants in subprocesses takes, passed on to it as keyword arguments
RUN_OPTIONS = {"model": (str, ModelOpt), "threads": (Optional[int], ThreadsOpt), "timeout": (float, TimeoutOpt), "verbose": (bool, VerboseOpt)}
run_options = with_options("run", RUN_OPTIONS)


def training_run_options(pairs: int):
    """:data:`RUN_OPTIONS` plus the training a benchmark times (speed, quant): which pairs, how many, how many steps,
    what batch size."""
    return with_options("run", {
        "data": (Optional[Path], typer.Option(None, "--data", help="Preference pairs (JSON Lines) (default: ../shared/data/hh-helpful/train.jsonl "
                                                                     "next to the repo).")),
        "pairs": (int, typer.Option(pairs, "--pairs", help="Use N pairs (seeded shuffle).")),
        "steps": (int, typer.Option(0, "--steps", help="Optimizer steps (default 0: one epoch, pairs / batch size).")),
        "batch_size": (int, typer.Option(2, "--batch-size", help="Pairs per optimizer step.")), **RUN_OPTIONS})


def printed_json(result: dict, as_json: bool) -> bool:
    """With --json, print the result as one JSON object on stdout and say so; without, the caller prints tables."""
    if as_json:
        print(json.dumps(result, indent=2))
    return as_json


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _table(title: str, first: str, columns: list[tuple[str, str, str]], results: dict) -> Table:
    """One row a variant (or mode): its figures (header, result key, format), then its peak memory; a variant that
    failed says so, with the peak memory it reached when known."""
    table = Table(first, *(header for header, _, _ in columns), "peak MB", title=title)
    for name, r in results.items():
        if r.get("ok"):
            table.add_row(r.get("label", name), *(_fmt(r[key], spec) for _, key, spec in columns), _fmt(r["peak_rss_mb"], ".0f"))
        else:
            table.add_row(r.get("label", name), "failed", *["-"] * (len(columns) - 1), _fmt(r.get("peak_rss_mb"), ".0f"))
    return table


def _failures(err, results: dict) -> None:
    for name, res in results.items():
        if not res.get("ok"):
            err.print(f"[bold red]{name} failed:[/] {res.get('error')}", highlight=False, soft_wrap=True)


@bench_app.command("speed")
@training_run_options(pairs=40)
def speed_cmd(
    run: Optional[dict] = None,  # --data, --pairs, --steps, --batch-size, --model, --threads, --timeout, --verbose
    max_length: int = typer.Option(256, "--max-length", help="Longest prompt + response, in tokens."),
    lr: float = typer.Option(5e-5, "--lr", help="Learning rate of every variant."),
    variants: Optional[str] = typer.Option(None, "--variants", help="Comma-separated subset of trl-default,trl-tuned,lifealign,lifealign-unshared (lifealign with prefix_sharing off)."),
    trl_bf16: Optional[bool] = typer.Option(None, "--trl-bf16/--trl-fp32", help="Force TRL's bf16 autocast on or off (default: TRL's default, on)."),
    matmul_size: int = typer.Option(2048, "--matmul-size", help="Side of the square matrices of the peak-GFLOP/s probe."),
    matmul_repeats: int = typer.Option(5, "--matmul-repeats", help="Timed repeats of the matmul probe (best counts)."),
    as_json: bool = JsonOpt,
) -> None:
    """TRL DPOTrainer (defaults; tuned) vs lifealign-lite FPO: wall time, pairs/s, tokens/s, peak memory."""
    from lifealign_lite.bench.speed import bench_speed

    result = bench_speed(home_dir(), max_length=max_length, lr=lr, variants=variants, matmul_size=matmul_size,
                         matmul_repeats=matmul_repeats, log=status, trl_bf16=trl_bf16, **run)
    if not printed_json(result, as_json):
        out.print(_table(f"bench speed: {run['pairs']} pairs, batch {run['batch_size']}, max length {max_length}", "variant", [
            ("wall s", "wall_s", ".1f"), ("pairs/s", "pairs_per_s", ".3f"), ("train pairs/s", "train_pairs_per_s", ".3f"),
            ("tokens/s", "tokens_per_s", ".1f")], result["variants"]))
        mm = result["matmul"] or {}
        out.print(f"(c) / (a) pairs/s: {_fmt(result['ratio_vs_trl_default'], '.2f')}   (c) / (b): {_fmt(result['ratio_vs_trl_tuned'], '.2f')}"
                  f"   (train loop only: {_fmt(result['train_ratio_vs_trl_default'], '.2f')} / {_fmt(result['train_ratio_vs_trl_tuned'], '.2f')})"
                  f"   (c) / (d): {_fmt(result.get('ratio_shared_vs_unshared'), '.2f')}")
        flops = result["flops_per_token_estimate"]
        out.print(f"fp32 matmul {mm.get('n')}x{mm.get('n')}: {_fmt(mm.get('best_gflops'), '.1f')} GFLOP/s (bf16: {_fmt(mm.get('bf16_best_gflops'), '.1f')});  "
                  f"(c) at {_fmt(flops / 1e9 if flops else None, '.2f')} GFLOP/token: {_fmt((result['share_of_matmul_peak'] or 0) * 100 if result['share_of_matmul_peak'] is not None else None, '.1f')} % of it")
    _failures(err, result["variants"])


@bench_app.command("quant")
@training_run_options(pairs=8)
def quant_cmd(
    run: Optional[dict] = None,  # --data, --pairs, --steps, --batch-size, --model, --threads, --timeout, --verbose
    new_tokens: int = typer.Option(64, "--new-tokens", help="Greedy tokens generated for the tokens/s figure."),
    modes: Optional[str] = typer.Option(None, "--modes", help="Comma-separated subset of none,nf4,int8."),
    as_json: bool = JsonOpt,
) -> None:
    """Precision on this machine (what `--quant auto` decides): load time, footprint, FPO pairs/s, generation tokens/s."""
    from lifealign_lite.bench.quant import bench_quant

    result = bench_quant(home_dir(), new_tokens=new_tokens, modes=modes, log=status, **run)
    if not printed_json(result, as_json):
        out.print(_table("bench quant", "quant", [("load s", "load_s", ".1f"), ("weights MB", "footprint_mb", ".0f"),
                                                  ("FPO pairs/s", "train_pairs_per_s", ".3f"), ("generate tokens/s", "gen_tokens_per_s", ".1f")],
                         result["modes"]))
    _failures(err, result["modes"])


@bench_app.command("chat")
@run_options
def chat_cmd(
    bank: Optional[Path] = typer.Option(None, "--bank", help="Time a memory of this bank (default: a random LoRA r=16 on q_proj/v_proj)."),
    domain: Optional[str] = typer.Option(None, "--domain", "-d", help="The bank's memory to time (default: its first domain, else core)."),
    new_tokens: int = typer.Option(64, "--new-tokens", help="Greedy tokens generated per timed answer."),
    repeats: int = typer.Option(3, "--repeats", help="Timed answers per mode (after one untimed answer that also merges)."),
    cold_repeats: int = typer.Option(2, "--cold-repeats", help="Cold starts of `lifealign-lite chat --prompt` to time."),
    modes: Optional[str] = typer.Option(None, "--modes", help="Comma-separated subset of merged,unmerged,nf4,llama.cpp (default: all; llama.cpp where its binding, xllamacpp by default, imports)."),
    run: Optional[dict] = None,  # --model, --threads, --timeout, --verbose
    as_json: bool = JsonOpt,
) -> None:
    """Time to first token and tokens/s with an adapter merged, unmerged, on a 4-bit base and on llama.cpp; CLI cold start."""
    from lifealign_lite.bench.chat import bench_chat

    result = bench_chat(home_dir(), bank, domain, new_tokens=new_tokens, repeats=repeats, cold_repeats=cold_repeats, modes=modes,
                        log=status, **run)
    if not printed_json(result, as_json):
        out.print(_table(f"bench chat: {result['settings']['memory']}", "mode", [
            ("load s", "load_s", ".1f"), ("first token s", "first_token_s", ".2f"), ("tokens/s", "tokens_per_s", ".1f"),
            ("decode tokens/s", "decode_tokens_per_s", ".1f")], result["modes"]))
        out.print(f"tokens/s {_fmt(result['tokens_per_s'], '.1f')} (slowest memory) vs plain transformers generate "
                  f"{_fmt(result['transformers_tokens_per_s'], '.1f')}: ratio {_fmt(result['ratio_vs_transformers'], '.2f')}; "
                  f"first token {_fmt(result['first_token_s'], '.2f')} s; memory switch {_fmt(result['switch_ms'], '.1f')} ms; "
                  f"--help {_fmt(result['help_s'], '.2f')} s (engine {result['settings']['engine']}, figures of mode {result['settings']['figures_from_mode']})")
        if result["llama_cpp_chat_tokens_per_s"] is not None:
            out.print(f"llama.cpp: chat {_fmt(result['llama_cpp_chat_tokens_per_s'], '.1f')} tokens/s vs plain llama.cpp "
                      f"{_fmt(result['llama_cpp_tokens_per_s'], '.1f')}; first token {_fmt(result['llama_cpp_first_token_s'], '.2f')} s; "
                      f"switch {_fmt(result['llama_cpp_switch_ms'], '.1f')} ms")
        cold = result["cold_start"]
        out.print(f"cold start `lifealign-lite chat --prompt ... --domain {cold['domain']}`: first output {_fmt(cold['best_first_output_s'], '.1f')} s, "
                  f"answer complete {_fmt(cold['best_total_s'], '.1f')} s (best of {len(cold['runs'])})")
        for run in cold["runs"]:
            if not run.get("ok"):
                err.print(f"[bold red]cold start failed:[/] {run.get('error')}", highlight=False, soft_wrap=True)
    _failures(err, result["modes"])


@bench_app.command("serve")
def serve_cmd(
    bank: Optional[Path] = BankOpt,
    clients: str = typer.Option("1,4,16", "--clients", metavar="N,N,...", help="Concurrent clients to measure, comma-separated."),
    requests: int = typer.Option(32, "--requests", metavar="N", help="Requests sent at each number of clients."),
    max_tokens: int = typer.Option(32, "--max-tokens", metavar="N", help="max_tokens of every request (greedy, streamed)."),
    data: Optional[list[Path]] = typer.Option(None, "--data", metavar="FILE", help="Prompts from these preference files (repeat the option; default: ../shared/data/hh-helpful/dev.jsonl)."),
    model: str = ModelOpt,
    threads: Optional[int] = typer.Option(None, "--threads", help="OMP_NUM_THREADS of the server (default: llama.cpp engine, the physical cores less one; torch engine, torch's choice)."),
    models: Optional[str] = typer.Option(None, "--models", metavar="NAME,NAME,...", help="The requests' model names in turn (default: auto and every domain; one name: every client on one memory)."),
    as_json: bool = JsonOpt,
) -> None:
    """Start `lifealign-lite serve` on a free port and measure requests/s and time to first token at each number of clients."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lifealign_lite.bench.serve import bench_serve
    from lifealign_lite.progress import LineReporter

    bank_dir = existing_bank(bank)
    tasks: dict[str, int] = {}
    if err.is_terminal:
        shown = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(), TimeElapsedColumn(), console=err)
        log = lambda s: shown.console.print(f"[dim]{s}[/]", highlight=False)  # noqa: E731

        def progress(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = shown.add_task(label, total=total)
            shown.update(tasks[label], completed=done)
    else:  # a pipe or a log: one plain line per finished request, and a heartbeat while none finishes
        shown = LineReporter(err)
        log = shown.note
        last_done: dict[str, int] = {}

        def progress(label: str, done: int, total: int) -> None:
            if last_done.get(label) != done:
                last_done[label] = done
                shown.note(f"{label}: {done}/{total} requests")

    with shown:
        result = bench_serve(home_dir(), bank_dir, model, clients, requests, max_tokens, data, threads, models=models.split(",") if models else None,
                             progress=progress, log=log)
    if not printed_json(result, as_json):
        s = result["settings"]
        table = Table("clients", "requests/s", "first token median s", "first token p90 s", "latency median s", "tokens/s", "errors",
                      title=f"bench serve: {s['requests']} requests of {s['max_tokens']} tokens, models {', '.join(s['models'])}")
        for n, r in result["clients"].items():
            table.add_row(n, _fmt(r["requests_per_s"]), _fmt(r["ttft_median_s"], ".2f"), _fmt(r["ttft_p90_s"], ".2f"),
                          _fmt(r["latency_median_s"], ".2f"), _fmt(r["tokens_per_s"], ".1f"), str(r["errors"]))
        out.print(table)
        out.print(f"server answered /health {_fmt(result['server_start_s'], '.1f')} s after start")
    failed = {n: r for n, r in result["clients"].items() if r["errors"]}
    if failed:
        fail("; ".join(f"{r['errors']} of {r['requests']} requests failed at {n} clients ({'; '.join(r['error_messages'])})" for n, r in failed.items()), code=1)


@bench_app.command("continual")
def continual_cmd(
    tasks: list[str] = typer.Argument(None, help="Tasks in order, each NAME=TRAIN.jsonl:TEST.jsonl (or use --preset)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="signal (safe-rlhf, truthfulqa, hc3: a stream this CPU learns, about an hour), smoke (CI, minutes) or paper4 (the four shared domains in the paper's order)."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated, or all: " + ", ".join(
        ["seq-dpo", "seq-fpo", "replay", "replay-fpo", "replay-slmc", "ewc", "olora", "sep", "sep-fpo", "mtl", "lifealign-update", "lifealign", "lifealign-bank"])),
    out_dir: Path = typer.Option(Path("bench-continual"), "--out", help="Output folder (results.json, results.md, PNG plots); rerun to resume."),
    max_pairs: Optional[int] = typer.Option(None, "--max-pairs", help="Training pairs per task (seeded sample)."),
    max_test: Optional[int] = typer.Option(None, "--max-test", help="Test pairs per task."),
    tests_dir: Optional[Path] = typer.Option(None, "--tests", help="Score each task on DIR/NAME/test.jsonl instead of its own test file (training unchanged)."),
    order: str = typer.Option("given", "--order", help="Task order: given (as listed or the preset's) or reversed."),
    merge: Optional[list[Path]] = typer.Option(None, "--merge", help="Train nothing: combine these --out folders (same tasks and "
                                               "settings, other methods) into --out's results.json (repeat the option)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Preset name or YAML path every method trains with."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Override any recipe field: --set key=value."),
) -> None:
    """Train a task sequence with LifeAlign and the baselines; score every task after each (AP, BWT, FWT)."""
    import shlex
    import sys

    from lifealign_lite.bench.continual import ORDERS, PRESETS, BenchError, merge_runs, ordered, parse_methods, parse_task, run_continual, with_test_dir
    from lifealign_lite.progress import reporter_for
    from lifealign_lite.recipe import parse_set_options

    command = " ".join(shlex.quote(a) for a in ["lifealign-lite", *sys.argv[1:]])
    if merge:
        merge_runs(merge, out_dir, command=command)
        out.print((out_dir / "results.md").read_text())
        return

    if preset and preset not in PRESETS:
        fail(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    spec = PRESETS.get(preset, {})
    task_list = [parse_task(t) for t in (tasks or spec.get("tasks", []))]
    if not task_list:
        raise BenchError("give tasks as NAME=TRAIN.jsonl:TEST.jsonl, or --preset " + "|".join(PRESETS))
    if order not in ORDERS:
        fail(f"--order must be one of {', '.join(ORDERS)}, got {order!r}")
    task_list = ordered(task_list, order)
    if tests_dir is not None:
        task_list = with_test_dir(task_list, tests_dir)
    overrides = {**spec.get("overrides", {}), **parse_set_options(sets or [])}
    from lifealign_lite.checkpoint import Interrupted

    try:
        with reporter_for(err) as reporter:
            run_continual(
                task_list, parse_methods(methods or spec.get("methods", "seq-dpo,replay,lifealign,lifealign-bank")), out_dir, home_dir(),
                recipe_name=recipe, overrides=overrides, max_pairs=max_pairs if max_pairs is not None else spec.get("max_pairs", 0),
                max_test=max_test if max_test is not None else spec.get("max_test", 0), reporter=reporter, order=order,
                command=command)
    except (Interrupted, KeyboardInterrupt) as exc:  # Ctrl-C, or SIGTERM while a cell trains: one line, not a traceback
        where = f" ({exc})" if isinstance(exc, Interrupted) else ""
        err.print(f"[yellow]interrupted{where}[/]; the same command resumes from {out_dir / 'state.json'} (finished cells are kept)")
        raise typer.Exit(130)
    out.print((out_dir / "results.md").read_text())
    err.print(f"results: {out_dir / 'results.json'}, plots: {out_dir}/*.png")


@bench_app.command("routing")
def routing_cmd(
    tasks: list[str] = typer.Argument(..., help="Domains, each NAME=TRAIN.jsonl:TEST.jsonl."),
    max_train: int = typer.Option(300, "--max-train", help="Training prompts per domain kept as its key (align keeps at most 300)."),
    max_test: int = typer.Option(0, "--max-test", help="Test prompts per domain (0 = all)."),
    quantile: Optional[float] = typer.Option(None, "--quantile", help="route_quantile to report the routers at (default: the recipe's)."),
    as_json: bool = JsonOpt,
) -> None:
    """Routing accuracy per domain of each router on test prompts, its confusion, and unseen-domain fallback to the core."""
    from lifealign_lite.bench.continual import parse_task
    from lifealign_lite.bench.routing import SHIPPED, routing_report
    from lifealign_lite.memory.router import MiniLMEmbedder
    from lifealign_lite.progress import LineReporter
    from lifealign_lite.recipe import Recipe

    q = Recipe().route_quantile if quantile is None else quantile
    if not 0 <= q < 1:
        fail(f"--quantile must be in [0, 1), got {q}")
    parsed = [parse_task(t) for t in tasks]
    if len({t.name for t in parsed}) != len(parsed):
        fail("each domain may be given once")
    doing = "embedding prompts and fitting routers (leave-one-domain-out refits each router once per domain)"
    if err.is_terminal:
        shown, say = err.status(doing), lambda what: err.print(f"[dim]done: {what}[/]")
    else:  # a pipe: plain lines and a heartbeat, not a spinner
        lines = LineReporter(err)
        lines.note(doing)
        shown, say = lines, lambda what: lines.note(f"done: {what}")
    with shown:
        report = routing_report(parsed, MiniLMEmbedder(), max_train=max_train, max_test=max_test, quantile=q, progress=say)
    if printed_json(report, as_json):
        return
    names = list(report["shipped"]["accuracy"])

    def pct(v, iv=None):
        return f"{100 * v:.1f}" + (f" [{100 * iv[0]:.0f}, {100 * iv[1]:.0f}]" if iv else "")

    table = Table("router", "mean accuracy", *names, "unseen → core", title=f"routing at route_quantile {q} (accuracy in %, 95 % intervals)")
    for kind, r in report["routers"].items():
        label = f"{kind} (shipped)" if kind == SHIPPED else kind
        table.add_row(label, pct(r["mean_accuracy"], r["mean_accuracy_interval"]), *[pct(r["accuracy"][n]) for n in names],
                      pct(r["mean_unseen_fallback"], r["mean_unseen_fallback_interval"]) if "mean_unseen_fallback" in r else "n/a")
    out.print(table)
    table = Table("route_quantile", "mean accuracy", "unseen → core", title=f"{SHIPPED}: in-domain accuracy against unseen fallback")
    for row in report["by_quantile"]:
        table.add_row(f"{row['route_quantile']}", pct(row["mean_accuracy"], row["mean_accuracy_interval"]),
                      pct(row["mean_unseen_fallback"], row["mean_unseen_fallback_interval"]) if "mean_unseen_fallback" in row else "n/a")
    out.print(table)
    timing = report["setting"]["route_one_prompt_ms"]
    err.print(f"routing one prompt as chat does: {timing['total_ms']} ms median ({timing['embed_ms']} ms of it embedding), "
              f"over {timing['prompts']} prompts")
    table = Table("true \\ routed", *names, "core", title=f"{SHIPPED}: confusion (test prompts)")
    for d in names:
        table.add_row(d, *[str(report["shipped"]["confusion"][d].get(n, 0)) for n in [*names, "core"]])
    out.print(table)
