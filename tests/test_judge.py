"""The optional LLM judge: score parsing, rubrics, the HTTP client against a local fake OpenAI-compatible
server (127.0.0.1, a random free port, shut down after each test), judge_pairs with a tiny random model,
and `eval --judge` through CliRunner with the model loading swapped for the tiny model.

Nothing here downloads anything or uses the real model.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lifealign_lite.data import Pair
from lifealign_lite.judge import Judge, JudgeError, judge_pairs, load_rubric, parse_score, rubric_dir

from conftest import invoke_cli as invoke

DOMAINS = ["default", "truthfulqa", "hh-harmless", "hh-helpful", "safe-rlhf", "medical", "support"]
CANNED = "The answer is fine.\nScore: 8"
MAX_REQUESTS = 20  # the fake server refuses (HTTP 429) anything beyond this: no test can loop on it


# ------------------------------------------------------------------------------------------ parse_score


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Score: 7", 7.0),
        ("score = 7/10", 7.0),
        ("**Score:** 8", 8.0),
        ("Rating: 6 out of 10", 6.0),
        ("Reasonable answer, a bit short.\n9", 9.0),
        ("7.5", 7.5),
        ("Score: 7.5/10", 7.5),
        ("Final score: **8**/10", 8.0),
        ("Rating: [[7]]", 7.0),
        ("SCORE - 10", 10.0),
        ("Score: 1", 1.0),
        ("Score: 3\nOn reflection the answer is correct after all.\nScore: 9", 9.0),  # the last explicit one
        ("It lists 3 steps and 2 warnings.\nScore: 6", 6.0),  # other numbers do not count
        ("Good answer overall; I would give it 7/10.", 7.0),
        ("Decent.\n**8**\n", 8.0),
        # no usable score
        ("", None),
        (None, None),
        ("The answer is fine.", None),
        ("It lists 3 steps and 2 warnings.", None),
        ("Score: N", None),
        ("Score: 11", None),
        ("Score: 0", None),
        ("Score: -3", None),
        ("Score: 80/100", None),
        ("Score: 9\nScore: 12", None),  # the last explicit one is out of range: not a fallback to 9
        ("1. Correct\n2. Safe", None),  # list numbering is not a score
    ],
)
def test_parse_score(text, expected):
    assert parse_score(text) == expected


# ------------------------------------------------------------------------------------------ rubrics


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_rubric_exists_and_asks_for_a_score_line(domain):
    path = rubric_dir() / f"{domain}.md"
    assert path.is_file()
    text = load_rubric(domain)
    assert text == path.read_text(encoding="utf-8").strip()
    assert "Score: N" in text and "1 to 10" in text


def test_load_rubric_falls_back_to_default():
    default = load_rubric(None)
    assert default == load_rubric("default") == load_rubric("") == load_rubric("no-such-domain")
    assert load_rubric("../judges/medical") == default  # not a path
    assert load_rubric("Medical") == load_rubric("medical") != default
    assert load_rubric("truthfulqa") != default


# ------------------------------------------------------------------------------------------ a fake judge server


class FakeJudge:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 that checks each request's shape."""

    def __init__(self, reply: str = CANNED, status: int = 200, raw: bytes | None = None, api_key: str | None = None):
        self.reply, self.status, self.raw, self.api_key = reply, status, raw, api_key
        self.requests: list[dict] = []
        self.problems: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _send(self, status: int, body: bytes, ctype: str = "application/json"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(200 if self.path == "/v1/models" else 404, b'{"data": [{"id": "judge"}]}')

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if len(fake.requests) >= MAX_REQUESTS:
                    return self._send(429, b'{"error": "too many requests in this test"}')
                try:
                    request = json.loads(body)
                except json.JSONDecodeError:
                    request = {}
                fake.requests.append({"path": self.path, "body": request, "auth": self.headers.get("Authorization")})
                problem = fake.check(self.path, request, self.headers.get("Authorization"))
                if problem:
                    fake.problems.append(problem)
                    return self._send(400, json.dumps({"error": problem}).encode())
                if fake.raw is not None:
                    return self._send(fake.status, fake.raw)
                if fake.status != 200:
                    return self._send(fake.status, b'{"error": {"message": "model crashed"}}')
                completion = {"id": "x", "object": "chat.completion", "model": request["model"],
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": fake.reply}, "finish_reason": "stop"}]}
                self._send(200, json.dumps(completion).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def check(self, path: str, request: dict, auth: str | None) -> str | None:
        if path != "/v1/chat/completions":
            return f"wrong path {path}"
        if request.get("model") != "judge-x":
            return f"wrong model {request.get('model')!r}"
        if request.get("temperature") != 0:
            return "temperature must be 0"
        messages = request.get("messages")
        if not isinstance(messages, list) or [m.get("role") for m in messages] != ["system", "user"]:
            return "expected [system, user] messages"
        if "Score: N" not in messages[0]["content"] or "<answer>" not in messages[1]["content"]:
            return "system must be a rubric, user the conversation and answer"
        if self.api_key and auth != f"Bearer {self.api_key}":
            return "missing or wrong API key"
        return None

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def fake_judge():
    servers = []

    def start(**kwargs) -> FakeJudge:
        servers.append(FakeJudge(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROMPT = [{"role": "user", "content": "Can I stop my antibiotics once I feel better?"}]


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/", "/v1/chat/completions"])
def test_judge_scores_with_the_domain_rubric(fake_judge, suffix):
    server = fake_judge(api_key="sk-test")
    judge = Judge(server.url + suffix, model="judge-x", api_key="sk-test", timeout=5, retries=0)
    assert judge.endpoint == server.url + "/v1/chat/completions"
    assert judge.score(PROMPT, "Finish the course unless your doctor says otherwise.", "medical") == 8.0
    assert judge.last_reply == CANNED
    assert not server.problems and len(server.requests) == 1
    messages = server.requests[0]["body"]["messages"]
    assert messages[0]["content"] == load_rubric("medical")
    assert "Can I stop my antibiotics" in messages[1]["content"] and "Finish the course" in messages[1]["content"]
    judge.check()  # the server answers


def test_judge_reply_without_score_is_none(fake_judge):
    server = fake_judge(reply="I cannot rate this.")
    assert Judge(server.url, model="judge-x", timeout=5, retries=0).score(PROMPT, "ok", None) is None


def test_judge_http_error_names_the_url(fake_judge):
    server = fake_judge(status=500)
    judge = Judge(server.url, model="judge-x", timeout=5, retries=1, backoff=0)
    with pytest.raises(JudgeError) as info:
        judge.score(PROMPT, "ok", "medical")
    message = str(info.value)
    assert "\n" not in message and judge.endpoint in message and "HTTP 500" in message and "model crashed" in message
    assert len(server.requests) == 2  # one retry on a 5xx, then the error


def test_judge_rejected_request_is_not_retried(fake_judge):
    server = fake_judge()
    judge = Judge(server.url, model="wrong-model", timeout=5, retries=2, backoff=0)
    with pytest.raises(JudgeError, match="HTTP 400"):
        judge.score(PROMPT, "ok", None)
    assert len(server.requests) == 1


def test_judge_malformed_json(fake_judge):
    server = fake_judge(raw=b"<html>not json</html>")
    with pytest.raises(JudgeError) as info:
        Judge(server.url, model="judge-x", timeout=5, retries=0).score(PROMPT, "ok", None)
    assert "malformed JSON" in str(info.value) and server.url in str(info.value) and "\n" not in str(info.value)


def test_judge_closed_port():
    url = f"http://127.0.0.1:{closed_port()}"
    judge = Judge(url, timeout=2, retries=1, backoff=0)
    with pytest.raises(JudgeError) as info:
        judge.score(PROMPT, "ok", None)
    message = str(info.value)
    assert url + "/v1/chat/completions" in message and "unreachable" in message and "\n" not in message
    with pytest.raises(JudgeError, match="unreachable"):
        judge.check()


def test_judge_rejects_non_http_url():
    with pytest.raises(JudgeError, match="not an http"):
        Judge("localhost:8000")


# ------------------------------------------------------------------------------------------ judge_pairs


def tiny_session(tiny_base):
    from lifealign_lite.chat import ChatSession
    from lifealign_lite.memory.bank import BankState

    return ChatSession(model=tiny_base.model, tokenizer=tiny_base.tokenizer, state=BankState(), domain="base",
                       threshold=0, embedder_factory=lambda: None)


def three_pairs() -> list[Pair]:
    a = [{"role": "assistant", "content": "Fine."}]
    b = [{"role": "assistant", "content": "No."}]
    return [
        Pair(prompt=[{"role": "user", "content": "What is the capital of France?"}], chosen=a, rejected=b, domain="truthfulqa"),
        Pair(prompt=[{"role": "user", "content": "How do I reset my password?"},
                     {"role": "assistant", "content": "Use the forgot password link."},
                     {"role": "user", "content": "The email never arrived."}], chosen=a, rejected=b, domain="support"),
        Pair(prompt=[{"role": "user", "content": "Water boils at what temperature?"}], chosen=a, rejected=b),
    ]


class Recorder:
    def __init__(self):
        self.calls = []

    def start(self, phase, total, done=0):
        self.calls.append(("start", phase, total))

    def advance(self, phase, n, metrics):
        self.calls.append(("advance", phase, n))


def test_judge_pairs_end_to_end(fake_judge, tiny_base, single_thread):
    server = fake_judge()
    session = tiny_session(tiny_base)
    session.history = [{"role": "user", "content": "kept"}]
    reporter = Recorder()
    judge = Judge(server.url, model="judge-x", timeout=10, retries=0)
    result = judge_pairs(session, three_pairs(), judge, "base", max_new_tokens=4, reporter=reporter)
    assert not server.problems
    assert result["judge_score"] == 8 and result["judged"] == 3 and result["unparsed"] == 0
    assert result["per_domain"] == {d: {"judge_score": 8.0, "judged": 1, "unparsed": 0} for d in ("default", "support", "truthfulqa")}
    assert reporter.calls == [("start", "judge", 3)] + [("advance", "judge", 1)] * 3
    assert session.history == [{"role": "user", "content": "kept"}] and session.domain == "base"
    # each request: the pair's rubric, and the whole conversation including the earlier turns
    systems = [r["body"]["messages"][0]["content"] for r in server.requests]
    assert systems == [load_rubric("truthfulqa"), load_rubric("support"), load_rubric(None)]
    assert "Use the forgot password link." in server.requests[1]["body"]["messages"][1]["content"]


def test_judge_pairs_counts_unparsed(fake_judge, tiny_base, single_thread):
    server = fake_judge(reply="No idea.")
    result = judge_pairs(tiny_session(tiny_base), three_pairs()[:1], Judge(server.url, model="judge-x", retries=0), "base", max_new_tokens=2)
    assert result["judge_score"] is None and result["judged"] == 0 and result["unparsed"] == 1
    assert result["per_domain"] == {"truthfulqa": {"judge_score": None, "judged": 0, "unparsed": 1}}


# ------------------------------------------------------------------------------------------ eval --judge


@pytest.fixture
def cli_env(tmp_path, monkeypatch, tiny_base):
    """An isolated home and open_session swapped for the tiny model (no bank, no real model)."""
    import lifealign_lite.chat as chat

    monkeypatch.setenv("LIFEALIGN_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(chat, "open_session", lambda *a, **k: tiny_session(tiny_base))
    bank = tmp_path / "home" / "bank"  # an empty bank (eval refuses a folder with no bank)
    bank.mkdir(parents=True)
    (bank / "manifest.json").write_text(json.dumps({"format": 1, "current": 0, "base": None, "versions": []}))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p.to_json()) + "\n" for p in three_pairs()), encoding="utf-8")
    return {"LIFEALIGN_HOME": str(tmp_path / "home"), "COLUMNS": "200", "JUDGE_TEST_KEY": "sk-cli"}, data


def test_eval_with_judge_cli(cli_env, fake_judge, single_thread):
    env, data = cli_env
    server = fake_judge(api_key="sk-cli")
    common = ["eval", data, "--domain", "base", "--judge", server.url + "/v1", "--judge-model", "judge-x",
              "--judge-key-env", "JUDGE_TEST_KEY", "--judge-max-new-tokens", "3"]
    result = invoke(common + ["--json"], env)
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["judge_score"] == 8 and out["judged"] == 3 and out["unparsed"] == 0 and out["pairs"] == 3
    assert out["per_domain"]["support"]["judge_score"] == 8 and "pref_acc" in out["per_domain"]["support"]
    assert set(out["per_domain"]) == {"default", "support", "truthfulqa"} and "judge_per_domain" not in out  # judge figures once
    assert not server.problems and len(server.requests) == 3

    table = invoke(common, env)
    assert table.exit_code == 0, table.stderr
    assert "judge score" in table.stdout and "8.00" in table.stdout


def test_eval_with_judge_cli_errors(cli_env, fake_judge):
    env, data = cli_env
    url = f"http://127.0.0.1:{closed_port()}"
    result = invoke(["eval", data, "--domain", "base", "--judge", url], env)
    assert result.exit_code == 2 and "unreachable" in result.stderr and url in result.stderr
    server = fake_judge()
    result = invoke(["eval", data, "--domain", "base", "--judge", server.url, "--judge-key-env", "NO_SUCH_VAR_FOR_JUDGE"], env)
    assert result.exit_code == 2 and "NO_SUCH_VAR_FOR_JUDGE" in result.stderr
    assert not server.requests
