"""``bench serve``: requests per second and time to first token of a real ``lifealign-lite serve`` process.

The benchmark starts ``lifealign-lite serve`` on a free loopback port against a bank, waits for ``/health``,
sends one untimed request per model name (it loads the routing embedder and makes every memory's merge happen
once), then, for each number of concurrent clients, sends the same list of streamed chat requests: real
prompts from preference data, the request's ``model`` cycling through ``auto`` and each of the bank's domains.
Each client is a thread with its own HTTP connection that takes the next request as soon as its last one is
done. Time to first token is taken at the first streamed piece of text, as a client sees it (queueing
behind other requests included); completion tokens come from the stream's usage chunk
(``stream_options: {"include_usage": true}``). Every request must end with a finish reason and
``data: [DONE]``; anything else counts as an error, with its message kept.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shlex
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from ..errors import BenchError
from .harness import REPO, cli_command, machine_info

DEFAULT_DATA = (REPO.parent / "shared" / "data" / "hh-helpful" / "dev.jsonl",)
DEFAULT_CLIENTS = (1, 4, 16)
LEVEL_KEYS = {"clients", "requests", "ok", "errors", "wall_s", "requests_per_s", "ttft_median_s", "ttft_p90_s",
              "latency_median_s", "tokens", "tokens_per_s", "memories", "error_messages"}
TOP_KEYS = {"bench", "machine", "settings", "server_start_s", "clients", "ok", "load_average"}


# -- pure helpers -----------------------------------------------------------------------------------------

def parse_clients(text: str | list[int] | tuple[int, ...]) -> list[int]:
    """``"1,4,16"`` -> [1, 4, 16]: positive integers, in the order given, without repeats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        counts = [int(str(x).strip()) for x in items if str(x).strip()]
    except ValueError:
        raise BenchError(f"--clients must be comma-separated positive integers (e.g. 1,4,16), got {text!r}") from None
    if not counts or min(counts) < 1:
        raise BenchError(f"--clients must be comma-separated positive integers (e.g. 1,4,16), got {text!r}")
    if len(set(counts)) != len(counts):
        raise BenchError(f"--clients lists a number twice: {text!r}")
    return counts


def quantile(xs: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``xs`` with linear interpolation between order statistics; None when empty."""
    xs = sorted(xs)
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[round(q * 100) - 1] if 0 < q < 1 else (xs[0] if q <= 0 else xs[-1])


def plan_requests(prompts: list[list[dict]], models: list[str], n: int) -> list[tuple[str, list[dict]]]:
    """``n`` (model, conversation) requests: prompts in order, models in turn (so each model gets varied prompts)."""
    if not prompts or not models:
        raise BenchError("no prompts or no models to send")
    return [(models[i % len(models)], prompts[i % len(prompts)]) for i in range(n)]


def summarize(clients: int, results: list[dict], wall_s: float) -> dict:
    """One concurrency level's figures from its per-request records (``ok``, ``ttft_s``, ``latency_s``, ``tokens``, ``memory``, ``error``)."""
    good = [r for r in results if r["ok"]]
    ttft = [r["ttft_s"] for r in good if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in good)
    memories: dict[str, int] = {}
    for r in good:
        memories[r["memory"]] = memories.get(r["memory"], 0) + 1

    def rnd(x, digits=3):
        return None if x is None else round(x, digits)

    return {
        "clients": clients, "requests": len(results), "ok": len(good), "errors": len(results) - len(good), "wall_s": rnd(wall_s, 2),
        "requests_per_s": rnd(len(good) / wall_s if wall_s > 0 else None), "ttft_median_s": rnd(quantile(ttft, 0.5)),
        "ttft_p90_s": rnd(quantile(ttft, 0.9)), "latency_median_s": rnd(quantile([r["latency_s"] for r in good], 0.5)),
        "tokens": tokens, "tokens_per_s": rnd(tokens / wall_s if wall_s > 0 else None, 2), "memories": dict(sorted(memories.items())),
        "error_messages": sorted({r["error"] for r in results if not r["ok"]})[:5],
    }


# -- the client side ----------------------------------------------------------------------------------------

def stream_chat(port: int, model: str, messages: list[dict], max_tokens: int, api_key: str | None = None, timeout: float = 600) -> dict:
    """One streamed chat completion over its own connection: time to first text, latency, tokens, memory, or the error."""
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
                       "stream_options": {"include_usage": True}})
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    record = {"ok": False, "model": model, "memory": None, "ttft_s": None, "latency_s": None, "tokens": 0, "error": None}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            message = json.loads(response.read() or b"{}").get("error", {}).get("message", response.reason)
            record["error"] = f"HTTP {response.status}: {message}"
            return record
        record["memory"] = response.getheader("x-lifealign-memory")
        finish, done, usage = None, False, None
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            data = json.loads(line[6:])
            if "error" in data:
                record["error"] = f"error in stream: {data['error'].get('message')}"
                return record
            usage = data.get("usage") or usage
            for choice in data.get("choices", []):
                if choice["delta"].get("content") and record["ttft_s"] is None:
                    record["ttft_s"] = time.perf_counter() - t0
                finish = choice.get("finish_reason") or finish
        record["latency_s"] = time.perf_counter() - t0
        if not done or finish is None:
            record["error"] = "the stream ended without a finish reason and data: [DONE]"
        elif usage is None:
            record["error"] = "the stream carried no usage chunk"
        else:
            record.update(ok=True, tokens=usage["completion_tokens"])
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return record


def run_level(port: int, plan: list[tuple[str, list[dict]]], clients: int, max_tokens: int, api_key: str | None = None,
              on_done: Callable[[dict], None] | None = None) -> tuple[list[dict], float]:
    """Send ``plan`` with ``clients`` requests in flight at a time: (per-request records, wall seconds)."""
    lock = threading.Lock()

    def one(job):
        record = stream_chat(port, job[0], job[1], max_tokens, api_key)
        if on_done:
            with lock:
                on_done(record)
        return record

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        records = list(pool.map(one, plan))
    return records, time.perf_counter() - t0


# -- the server -----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``lifealign-lite serve`` in a child process on a free port; ``with Server(...) as s`` waits for /health and stops it after."""

    def __init__(self, home: Path, bank: Path, model: str = "default", threads: int | None = None, start_timeout: float = 600):
        self.port = free_port()
        self.command = cli_command() + ["serve", "--bank", str(bank), "--port", str(self.port)] + ([] if model == "default" else ["--model", model])
        self.env = dict(os.environ, LIFEALIGN_HOME=str(home), PYTHONUNBUFFERED="1", **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        self.start_timeout = start_timeout
        self.start_s: float | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="lifealign-bench-serve-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    def log_tail(self, n: int = 1500) -> str:
        return Path(self._log.name).read_text(errors="replace")[-n:].strip()

    def __enter__(self) -> "Server":
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None:
                    last = (self.log_tail(600).splitlines() or ["(no output)"])[-1]  # the server's own one-line error
                    self.__exit__()
                    raise BenchError(f"`{shlex.join(self.command)}` exited with code {self.proc.returncode}: {last}") from None
                if time.perf_counter() - t0 > self.start_timeout:
                    self.__exit__()
                    raise BenchError(f"`{shlex.join(self.command)}` did not answer /health within {self.start_timeout:.0f} s") from None
                time.sleep(0.3)
        self.start_s = round(time.perf_counter() - t0, 2)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc) -> None:  # also the clean-up of a failed start
        self.stop()
        self._log.close()
        os.unlink(self._log.name)


# -- the benchmark ---------------------------------------------------------------------------------------------

def load_prompts(paths: list[Path], n: int, seed: int = 0) -> list[list[dict]]:
    """Up to ``n`` prompts (conversations) from each file, shuffled together with ``seed``."""
    from ..data import DataError, load_pairs

    prompts = []
    for path in paths:
        if not Path(path).is_file():
            raise BenchError(f"{path}: data file not found; pass --data with preference pairs (JSON Lines)")
        try:
            prompts += [p.prompt for p in load_pairs(path, max_pairs=n, seed=seed)]
        except DataError as exc:
            raise BenchError(f"{path}: {str(exc).splitlines()[0]}") from None
    random.Random(seed).shuffle(prompts)
    return prompts


def bench_serve(home: Path, bank: Path, model: str = "default", clients: str | list[int] = DEFAULT_CLIENTS, requests: int = 32,
                max_tokens: int = 32, data: list[Path] | None = None, threads: int | None = None, models: list[str] | None = None,
                progress: Callable[[str, int, int], None] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Measure a real server of ``bank``: one entry per concurrency level under ``clients`` (see the module doc).

    ``progress(label, done, total)`` is called once before and after each request of a level.
    """
    from ..memory.bank import Bank

    counts = parse_clients(clients)
    if requests < 1:
        raise BenchError(f"--requests must be >= 1, got {requests}")
    if max_tokens < 1:
        raise BenchError(f"--max-tokens must be >= 1, got {max_tokens}")
    state = Bank(bank).load()  # a folder without a bank fails here, before the server starts
    models = [m.strip() for m in models if m.strip()] if models else ["auto", *sorted(state.domains)]  # in turn, request by request
    if not models:
        raise BenchError("--models names no model")
    paths = [Path(p) for p in (data or DEFAULT_DATA)]
    plan = plan_requests(load_prompts(paths, requests), models, requests)
    say = log or (lambda s: None)
    load_start = os.getloadavg()[0]
    say(f"starting lifealign-lite serve on the bank {bank} ...")
    with Server(home, bank, model, threads) as server:
        say(f"server answering after {server.start_s} s; warming up ({', '.join(models)})")
        for name in models:
            warm = stream_chat(server.port, name, plan[0][1], 2)
            if not warm["ok"]:
                raise BenchError(f"warm-up request for model {name!r} failed: {warm['error']}")
        levels = {}
        for n in counts:
            label = f"{n} client{'s' if n > 1 else ''}"
            done = [0]

            def tick(record, label=label, done=done):
                done[0] += 1
                if progress:
                    progress(label, done[0], len(plan))

            if progress:
                progress(label, 0, len(plan))
            records, wall = run_level(server.port, plan, n, max_tokens, on_done=tick)
            levels[str(n)] = summarize(n, records, wall)
        start_s = server.start_s
    settings = {"bank": str(bank), "bank_version": state.version, "model": model, "clients": counts, "requests": requests, "max_tokens": max_tokens,
                "data": [str(p) for p in paths], "models": models, "threads": threads, "decoding": "greedy, streamed"}
    return {"bench": "serve", "machine": machine_info(), "settings": settings, "server_start_s": start_s, "clients": levels,
            "ok": all(level["errors"] == 0 for level in levels.values()),
            "load_average": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)}}  # 1-minute load: was the machine busy?
