"""``serve``: a real server process on a free port (tiny model, tiny bank, an API key), driven by the official
``openai`` client and by raw HTTP for what the client would never send.

The tests share one server (starting one costs the imports and the model load); they run in file order, and the
last one changes the bank under it (a second domain aligned while it serves).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import require, require_path

openai = require("openai")  # the test extra: a missing one fails with the way to install it
require("fastapi")
require("uvicorn")

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "lifealign-lite"
KEY = "test-key"
CAP = 48
TOKENS = 12
PROMPT = "I have a mild headache. Can I take ibuprofen?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(model_dir: Path):
    """Tiny runs with a learning rate high enough that each memory answers differently from the base model."""
    from lifealign_lite.recipe import load_recipe

    return load_recipe("edge-cpu", {"model": str(model_dir), "router": "base", "max_steps": 2, "batch_size": 2, "max_pairs": 8, "lr": 0.05})


@pytest.fixture(scope="module")
def bank_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A bank with the medical domain (version 1) on the tiny model."""
    from lifealign_lite.align import align

    root = tmp_path_factory.mktemp("serve-bank")
    align(REPO / "examples" / "medical.jsonl", _recipe(tiny_model_dir), root / "home", root / "bank", domain="medical")
    return root / "bank"


def _start(args: list[str], root: Path) -> tuple[subprocess.Popen, str]:
    """`lifealign-lite serve ARGS` on a free port, once it answers /health: (process, base URL)."""
    require_path(CLI, "the lifealign-lite console script")
    port = _free_port()
    log = root / f"server-{port}.log"
    env = dict(os.environ, LIFEALIGN_HOME=str(root / "home"), OMP_NUM_THREADS="1")
    with log.open("w") as f:
        proc = subprocess.Popen([str(CLI), "serve", "--port", str(port), *args], env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return proc, url
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.3)


@pytest.fixture(scope="module")
def server(bank_dir, tiny_model_dir, tmp_path_factory):
    """A server of the bank, with an API key: (base URL, bank folder)."""
    proc, url = _start(["--bank", str(bank_dir), "--model", str(tiny_model_dir), "--api-key", KEY, "--max-tokens-cap", str(CAP)],
                       tmp_path_factory.mktemp("serve"))
    yield url, bank_dir
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(bank_dir, tiny_model_dir, tmp_path_factory):
    """The same bank opened in this process, as `chat` opens it: what the server must answer and route."""
    import torch

    from lifealign_lite.chat import open_session

    torch.set_num_threads(1)
    return open_session(bank_dir, tmp_path_factory.mktemp("ref-home"), _recipe(tiny_model_dir))


def post(url: str, path: str, data: bytes, key: str | None = KEY, headers: dict | None = None) -> tuple[int, dict, dict]:
    """A raw POST: (status, JSON body, headers)."""
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    req = urllib.request.Request(f"{url}{path}", data=data, headers=h, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def chat(client, model: str | None, prompt: str = PROMPT, **kw):
    args = {"messages": [{"role": "user", "content": prompt}], "max_tokens": TOKENS, **kw}
    if model is not None:
        args["model"] = model
    raw = client.chat.completions.with_raw_response.create(**args)
    return raw.parse(), raw.headers


def test_stop_scanner_holds_back_only_what_could_begin_a_stop_string():
    from lifealign_lite.serve import StopScanner

    scanner = StopScanner(["END", "\n\n"])
    sent = [scanner.feed(p) for p in ["Hello E", "N", "ough. E", "ND and more", " never"]]
    assert sent == ["Hello", " ", "ENough.", " ", ""] and scanner.stopped and scanner.text == "Hello ENough. "
    plain = StopScanner([])
    assert [plain.feed(p) for p in ["a", "b"]] + [plain.flush()] == ["a", "b", ""]


def test_models_lists_domains_and_the_special_memories(client):
    assert sorted(m.id for m in client.models.list()) == ["auto", "base", "core", "medical"]


def test_chat_completion_answers_with_the_named_memory_as_chat_does(client, reference):
    """Greedy answers equal chat's (ChatSession.ask) for each memory, which tells the memories apart."""
    answers = {}
    for memory in ("medical", "core", "base"):
        completion, headers = chat(client, memory)
        assert headers["x-lifealign-memory"] == memory and completion.lifealign["memory"] == memory
        assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == TOKENS
        reference.set_domain(memory)
        expected = reference.ask(PROMPT, max_new_tokens=TOKENS, keep_history=False).text
        answers[memory] = completion.choices[0].message.content
        assert answers[memory].strip() == expected
    assert answers["medical"] != answers["base"] != answers["core"], "the memories should answer differently from the base model"


def test_auto_routes_the_whole_conversation_as_chat_does(client, server, reference):
    conversation = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": PROMPT}]
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=conversation, max_tokens=4)
    completion = raw.parse()
    route = reference.route(conversation)  # the whole conversation, as chat routes it
    memory = route.domain  # the bank has a core, so a novel prompt is answered by it
    assert raw.headers["x-lifealign-memory"] == memory == completion.lifealign["memory"]
    assert completion.lifealign["route"]["domain"] == route.domain
    assert completion.lifealign["route"]["scores"] == pytest.approx(route.scores, abs=1e-5)
    assert completion.lifealign["route"]["similarity"] == pytest.approx(route.similarity, abs=1e-5)
    assert completion.lifealign["route"]["similarity"] != pytest.approx(reference.route(PROMPT).similarity, abs=1e-5), "routed by the last message only"
    # an omitted model is auto (the openai client always sends one)
    code, body, headers = post(server[0], "/v1/chat/completions", json.dumps({"messages": conversation, "max_tokens": 4}).encode())
    assert code == 200 and headers["x-lifealign-memory"] == memory and body["lifealign"]["route"]["domain"] == route.domain


@pytest.mark.parametrize("memory", ["medical", "auto"])
def test_streaming_gives_the_same_answer_and_ends_with_done(client, server, memory):
    expected = chat(client, memory)[0].choices[0].message.content
    chunks = list(client.chat.completions.create(model=memory, messages=[{"role": "user", "content": PROMPT}], max_tokens=TOKENS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    body = json.dumps({"model": memory, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3, "stream": True}).encode()
    req = urllib.request.Request(f"{server[0]}/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream") and r.headers["x-lifealign-memory"]
        events = [line for line in r.read().decode().splitlines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_stream_options_include_usage_adds_a_last_chunk_with_the_token_counts(client, server):
    chunks = list(client.chat.completions.create(model="medical", messages=[{"role": "user", "content": PROMPT}], max_tokens=TOKENS,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == TOKENS
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + TOKENS > TOKENS
    assert chunks[-2].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks[:-1])
    code, data, _ = post(server[0], "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True,
                                                                        "stream_options": {"include_usage": "yes"}}).encode())
    assert code == 400 and "stream_options" in data["error"]["message"]


def test_completions_stop_and_seeded_sampling(client):
    text = client.completions.create(model="medical", prompt="The quick brown", max_tokens=TOKENS)
    assert text.choices[0].text and text.lifealign["memory"] == "medical"
    full = chat(client, "medical")[0].choices[0].message.content
    stop = full.strip()[3:6]
    cut = chat(client, "medical", stop=[stop])[0]
    assert cut.choices[0].message.content == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    a, b = (chat(client, "base", temperature=1.0, top_p=0.9, seed=7)[0].choices[0].message.content for _ in range(2))
    c = chat(client, "base", temperature=1.0, top_p=0.9, seed=8)[0].choices[0].message.content
    assert a == b and a != c


def test_concurrent_requests_for_different_memories_equal_sequential_ones(client):
    jobs = [("medical", PROMPT), ("core", PROMPT), ("base", PROMPT), ("medical", "Where is my order?"), ("auto", "Water boils at"), ("core", "Hello")]
    sequential = [chat(client, m, p)[0].choices[0].message.content for m, p in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(lambda job: chat(client, *job)[0].choices[0].message.content, jobs))
    assert concurrent == sequential


@pytest.mark.parametrize("path,body,status,words", [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/chat/completions", b'{"model": "medical"}', 400, "'messages' is required"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "'messages' is empty"),
    ("/v1/chat/completions", b'{"messages": "hello"}', 400, "must be a list"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400, "content must be a string"),
    ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "hi"}]}', 400, "role must be one of"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}', 400, "'max_tokens' must be an integer"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 49}', 400, "above this server's cap of 48"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400, "'temperature' must be a number"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400, "'stream' must be true or false"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "model": "legal"}', 404,
     "unknown model 'legal'; known models: medical, core, base, auto"),
    ("/v1/completions", b'{"model": "medical"}', 400, "'prompt' is required"),
    ("/v1/nowhere", b"{}", 404, "Not Found"),
    # not an object, or an object without a role: issue 26's probes (they were plain-text 500s)
    ("/v1/chat/completions", b'{"messages": [1]}', 400, "messages[0] must be an object"),
    ("/v1/chat/completions", b'{"messages": ["hi"]}', 400, "messages[0] must be an object"),
    ("/v1/chat/completions", b'{"messages": [null]}', 400, "messages[0] must be an object"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}, {"content": "no role"}]}', 400, "messages[1].role is required"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user"}]}', 400, "messages[0].content is required"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400, "only text parts"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a lone \\ud800 surrogate"}]}', 400, "not valid Unicode"),
    ("/v1/completions", b'{"prompt": "\\udfff"}', 400, "'prompt' must be a non-empty string of valid Unicode"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 2}', 400, "'top_p' must be a number between 0 and 1"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "'n' must be 1"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", ""]}', 400, "'stop' must be"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "model": 3}', 400, "'model' must be a string"),
])
def test_bad_input_gets_an_error_object_and_the_server_keeps_serving(server, client, path, body, status, words):
    code, data, _ = post(server[0], path, body)
    assert code == status and words in data["error"]["message"], data
    assert set(data["error"]) >= {"message", "type", "code"}
    assert chat(client, "base", max_tokens=2)[0].choices[0].message.content is not None


def test_body_over_the_limit_and_the_openai_client_errors(server, client):
    code, data, _ = post(server[0], "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "' + b"a" * 1_100_000 + b'"}]}')
    assert code == 413 and "over the limit" in data["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="known models"):
        client.chat.completions.create(model="legal", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="cap"):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=CAP + 1)
    assert chat(client, "base", max_tokens=2)[0].choices


def test_api_key_is_required(server):
    for key in (None, "wrong"):
        code, data, headers = post(server[0], "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}', key=key)
        assert code == 401 and "API key" in data["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0).models.list()
    with urllib.request.urlopen(f"{server[0]}/health", timeout=10) as r:  # liveness probes need no key
        assert json.loads(r.read())["status"] == "ok"


def test_binding_beyond_loopback_without_a_key_is_refused(tmp_path):
    from typer.testing import CliRunner

    from lifealign_lite.cli.app import app

    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--bank", str(tmp_path)], env={"LIFEALIGN_HOME": str(tmp_path)})
    assert result.exit_code == 2 and "--api-key" in result.stderr and "0.0.0.0" in result.stderr
    with socket.create_server(("127.0.0.1", 0)) as busy:  # a port in use is refused before the model loads
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--port", str(port), "--bank", str(tmp_path)], env={"LIFEALIGN_HOME": str(tmp_path)})
    assert result.exit_code == 2 and f"cannot serve on 127.0.0.1:{port}" in result.stderr and "another --port" in result.stderr


def test_export_all_writes_a_peft_folder_per_memory_and_the_vllm_command(bank_dir, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from lifealign_lite.cli.app import app
    from lifealign_lite.memory.bank import Bank

    out = tmp_path / "adapters"
    result = CliRunner().invoke(app, ["memory", "export", "--all", str(out), "--bank", str(bank_dir)], env={"LIFEALIGN_HOME": str(tmp_path / "home")})
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["core", "medical"]
    state = Bank(bank_dir).load()
    for name, src in (("medical", state.slot_dir("medical")), ("core", state.core_dir())):
        assert (out / name / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()
        assert json.loads((out / name / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    # entries keep their own rank (r is an entry's largest module rank); vLLM takes 8, 16, 32, ...: the smallest that holds all
    largest = max(json.loads((out / name / "adapter_config.json").read_text())["r"] for name in ("medical", "core"))
    assert largest <= 16
    assert result.stdout.strip() == (f"vllm serve {tiny_model_dir} --enable-lora --lora-modules medical={out / 'medical'} core={out / 'core'} "
                                     f"--max-lora-rank {8 if largest <= 8 else 16}")
    again = CliRunner().invoke(app, ["memory", "export", "--all", str(out), "--bank", str(bank_dir)], env={"LIFEALIGN_HOME": str(tmp_path / "home")})
    assert again.exit_code == 2 and "not an empty folder" in again.stderr


def test_upstream_routes_here_and_generates_there(server, client, bank_dir, tiny_model_dir, tmp_path):
    """A second real server forwards generation to the first (the upstream), with model = the memory it routed to."""
    proc, url = _start(["--bank", str(bank_dir), "--model", str(tiny_model_dir), "--upstream", f"{server[0]}/v1", "--upstream-key", KEY], tmp_path)
    try:
        front = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        for memory in ("medical", "base", "auto"):
            direct, direct_headers = chat(client, memory)
            forwarded, headers = chat(front, memory)
            assert headers["x-lifealign-memory"] == direct_headers["x-lifealign-memory"] == forwarded.lifealign["memory"]
            assert forwarded.choices[0].message.content == direct.choices[0].message.content
            assert forwarded.choices[0].finish_reason == "length"
        streamed = front.chat.completions.create(model="medical", messages=[{"role": "user", "content": PROMPT}], max_tokens=TOKENS, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat(client, "medical")[0].choices[0].message.content
        text = front.completions.create(model="medical", prompt="The quick brown", max_tokens=TOKENS)
        assert text.choices[0].text == client.completions.create(model="medical", prompt="The quick brown", max_tokens=TOKENS).choices[0].text
        # the upstream's refusal comes back as an error object, and the front keeps serving
        with pytest.raises(openai.APIStatusError, match="upstream .* answered 400: .*cap"):
            front.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=CAP + 1)
        assert chat(front, "base", max_tokens=2)[0].choices
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_version_committed_while_serving_is_used_by_the_next_request(server, client, tiny_model_dir, tmp_path):
    from lifealign_lite.align import align

    url, bank = server
    before = {m: chat(client, m)[0].choices[0].message.content for m in ("medical", "base")}
    assert json.loads(urllib.request.urlopen(urllib.request.Request(f"{url}/v1/bank", headers={"Authorization": f"Bearer {KEY}"})).read())["version"] == 1
    align(REPO / "examples" / "support.jsonl", _recipe(tiny_model_dir), tmp_path / "home", bank, domain="support")
    assert sorted(m.id for m in client.models.list()) == ["auto", "base", "core", "medical", "support"]
    completion, headers = chat(client, "support")
    assert headers["x-lifealign-memory"] == "support" and completion.lifealign["bank_version"] == 2
    assert completion.choices[0].message.content != before["base"]
    # the adapters were swapped, not stacked: medical's slot is unchanged in version 2, and so is its answer
    assert {m: chat(client, m)[0].choices[0].message.content for m in ("medical", "base")} == before
    info = json.loads(urllib.request.urlopen(urllib.request.Request(f"{url}/v1/bank", headers={"Authorization": f"Bearer {KEY}"})).read())
    assert info["version"] == 2 and info["domains"] == ["medical", "support"] and all(v > 0 for v in info["sizes_bytes"].values())


def test_request_models_accept_what_openai_clients_send_and_refuse_the_rest():
    """serve_api's pydantic models: extra fields pass, content parts join, the cap is checked after the types."""
    from lifealign_lite.serve_api import RequestError, parse_job

    job = parse_job({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"}],
                     "user": "someone", "logprobs": False, "stop": "END", "stream": True, "stream_options": {"include_usage": True},
                     "max_completion_tokens": 7, "seed": 3, "temperature": 1}, "chat", 48)
    assert job.prompt == [{"role": "user", "content": "ab"}] and job.stop == ["END"] and job.max_tokens == 7 and job.include_usage
    assert job.model == "auto" and job.seed == 3 and job.temperature == 1.0
    assert parse_job({"prompt": ["one"]}, "text", 48).prompt == "one"
    with pytest.raises(RequestError, match="cap of 48") as cut:
        parse_job({"prompt": "x", "max_tokens": 49}, "text", 48)
    assert cut.value.status == 400 and cut.value.body()["error"]["code"] == "max_tokens_above_cap"


def test_health_models_and_bank_never_wait_on_a_generation(bank_dir, tiny_model_dir, tmp_path):
    """While the engine lock is held (a torch generation in progress), /health, /v1/models and /v1/bank answer."""
    import threading

    from fastapi.testclient import TestClient

    from lifealign_lite.chat import open_session
    from lifealign_lite.serve import Engine
    from lifealign_lite.serve_app import create_app

    logged: list[str] = []
    engine = Engine(open_session(bank_dir, tmp_path / "home", _recipe(tiny_model_dir)), bank_dir, log=lambda s: None)
    client = TestClient(create_app(engine, access_log=logged.append))
    answers: dict[str, int] = {}
    with engine.lock:  # what a running generation holds
        def probe():
            for path in ("/health", "/v1/models", "/v1/bank"):
                answers[path] = client.get(path).status_code

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout=60)
    assert answers == {"/health": 200, "/v1/models": 200, "/v1/bank": 200}
    assert [line.split()[:3] for line in logged] == [["GET", "/health", "200"], ["GET", "/v1/models", "200"], ["GET", "/v1/bank", "200"]]
    response = client.post("/v1/chat/completions", json={"model": "medical", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3})
    assert response.status_code == 200
    assert logged[-1].startswith("POST /v1/chat/completions 200 memory=medical tokens=") and logged[-1].endswith("s")
    assert int(logged[-1].split("tokens=")[1].split()[0]) == response.json()["usage"]["completion_tokens"]
    client.post("/v1/chat/completions", content=b'{"messages": [1]}', headers={"Content-Type": "application/json"})
    assert logged[-1].startswith("POST /v1/chat/completions 400 memory=- tokens=-")


def test_a_llama_cpp_server_started_off_the_main_thread_gets_its_signals_back_without_a_request():
    """A hot reload starts llama.cpp's server (which takes SIGINT and SIGTERM) in a worker thread: the app's event loop,
    on the main thread as under uvicorn, puts Python's handlers back within a turn, not at the next request."""
    import asyncio
    import signal
    import threading

    from lifealign_lite import xllama
    from lifealign_lite.serve_app import create_app

    def ours(*args):
        pass

    before = signal.getsignal(signal.SIGINT)
    app = create_app(engine=None)

    async def serving():
        running = signal.getsignal(signal.SIGINT)  # asyncio.run's own
        async with app.router.lifespan_context(app):
            assert len(xllama.SIGNAL_WAKERS) == 1
            xllama._PENDING[signal.SIGINT] = ours  # what LlamaServer leaves when it starts in a worker
            worker = threading.Thread(target=xllama.restore_signals)
            worker.start()
            worker.join()
            assert signal.getsignal(signal.SIGINT) is running  # a worker may not set handlers
            for _ in range(50):
                await asyncio.sleep(0.01)
                if signal.getsignal(signal.SIGINT) is ours:
                    break
            assert signal.getsignal(signal.SIGINT) is ours and not xllama._PENDING
        assert not xllama.SIGNAL_WAKERS

    try:
        asyncio.run(serving())
    finally:
        signal.signal(signal.SIGINT, before)
        xllama._PENDING.clear()
