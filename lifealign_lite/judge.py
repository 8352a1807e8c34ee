"""An optional LLM judge: score generated answers 1 to 10 with one rubric per domain (../shared/DESIGN.md,
evaluation protocol; the paper's headline scores are LLM-judge scores).

The judge is any OpenAI-compatible chat endpoint (vLLM, llama.cpp's ``llama-server``, Ollama, TGI, a hosted
API). ``Judge(url)`` takes the server's base URL with or without the ``/v1`` suffix, so
``http://localhost:8000``, ``http://localhost:8000/v1`` and ``http://localhost:8000/v1/chat/completions`` all
post to ``http://localhost:8000/v1/chat/completions``. Requests use the chat format: the system message is the
domain's rubric (``recipes/judges/<domain>.md``, else ``default.md``), the user message is the conversation and
the answer to rate; temperature 0. The rubric asks for a final ``Score: N`` line, which :func:`parse_score`
reads (leniently).

Only the standard library is used for HTTP. Nothing here reads the environment: pass the API key in.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.request
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from .errors import InputError, LifeAlignError
from .recipe import recipes_dir

__all__ = ["JudgeError", "Judge", "load_rubric", "parse_score", "judge_pairs", "rubric_dir", "format_request"]

DEFAULT_RUBRIC = "default"
MIN_SCORE, MAX_SCORE = 1.0, 10.0
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


class JudgeError(LifeAlignError, RuntimeError):
    """The judge could not be asked: unreachable, an HTTP error, or a reply that is not a chat completion.

    The message is one line naming the URL and what to do.
    """


# ---------------------------------------------------------------------------------------------- rubrics


def rubric_dir() -> Path:
    """The folder of rubric files shipped with the package (``recipes/judges``)."""
    return recipes_dir() / "judges"


def rubric_name(domain: str | None) -> str:
    """The rubric a domain is judged with: its own file if there is one, else ``default``."""
    if domain and _NAME_RE.fullmatch(domain) and not domain.startswith("."):
        for name in (domain, domain.lower()):
            if (rubric_dir() / f"{name}.md").is_file():
                return name
    return DEFAULT_RUBRIC


@lru_cache(maxsize=None)
def _read_rubric(name: str) -> str:
    path = rubric_dir() / f"{name}.md"
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise JudgeError(f"judge rubric {path} cannot be read ({exc.strerror or exc}); reinstall lifealign-lite") from None


def load_rubric(domain: str | None) -> str:
    """The rubric text for ``domain`` (``recipes/judges/<domain>.md``), falling back to ``default.md``."""
    return _read_rubric(rubric_name(domain))


# ---------------------------------------------------------------------------------------------- parsing

_NUM = r"(-?\d+(?:\.\d+)?)"
_DENOM = r"(?:\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?"
# "Score: 7", "score = 7/10", "**Score:** 8", "Rating: 6 out of 10", "Final score: [[7]]", "Overall grade - 9".
# Between the word and the number: up to 20 characters that are neither digits nor a line break.
_EXPLICIT = re.compile(r"\b(?:score|rating|grade)\b[^\d\n]{0,20}?" + _NUM + r"[\s*\]\)]*" + _DENOM, re.IGNORECASE)
# A line holding only a number: "9", "7.5", "**8**", "[[6]]", "8/10", "8."
_BARE_LINE = re.compile(r"^[\s*\[\(]*" + _NUM + r"[\s*\]\)]*(?:(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?\s*\.?\s*$",
                        re.IGNORECASE | re.MULTILINE)
# Anywhere: "7/10", "8 out of 10".
_OUT_OF_TEN = re.compile(r"(?<![\d.])" + _NUM + r"\s*(?:/|out\s+of)\s*(10(?:\.0+)?)(?!\d|\.\d)", re.IGNORECASE)


def _value(number: str, denominator: str | None) -> float | None:
    value = float(number)
    if denominator is not None and float(denominator) != 10.0:
        return None  # "8/100", "4/5": not the 1..10 scale the rubric asks for
    if not math.isfinite(value) or not MIN_SCORE <= value <= MAX_SCORE:
        return None
    return value


def parse_score(text: str | None) -> float | None:
    """The 1..10 score in a judge's reply, or None when there is none.

    In order of precedence: the LAST explicit mention (``Score: 7``, ``score = 7/10``, ``**Score:** 8``,
    ``Rating: 6 out of 10``, ``Final score: [[7]]``); else the last line holding only a number (``9``,
    ``7.5``, ``**8**``); else the last ``N/10`` or ``N out of 10`` anywhere. Decimals are kept. A value
    outside 1..10 (or a denominator other than 10) is rejected as None, not clamped: the judge did not
    follow the rubric, and a clamped guess would bias the mean.
    """
    if not text:
        return None
    for pattern in (_EXPLICIT, _BARE_LINE, _OUT_OF_TEN):
        matches = list(pattern.finditer(text))
        if matches:
            number, denominator = matches[-1].group(1), matches[-1].group(2)
            return _value(number, denominator)
    return None


# ---------------------------------------------------------------------------------------------- the judge


def _base_url(url: str) -> str:
    """``http://host:port[/prefix]/v1`` from a URL given with or without ``/v1`` (or the full endpoint)."""
    base = url.strip().rstrip("/")
    if base.endswith("/chat/completions"):
        base = base[: -len("/chat/completions")].rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return base


def _conversation_text(messages: Sequence[dict]) -> str:
    return "\n\n".join(f"[{m.get('role', 'user')}]\n{m.get('content', '')}" for m in messages)


def format_request(prompt_messages: Sequence[dict], answer: str) -> str:
    """The user message sent to the judge: the conversation, then the answer to rate."""
    return (
        "Rate the assistant's answer to the last user turn of this conversation, following your rubric.\n\n"
        f"<conversation>\n{_conversation_text(prompt_messages)}\n</conversation>\n\n"
        f"<answer>\n{answer}\n</answer>\n\n"
        "Reply with at most three short sentences of reasoning, then a final line `Score: N` (N an integer from 1 to 10)."
    )


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Judge:
    """A chat model behind an OpenAI-compatible endpoint that rates answers 1 to 10.

    ``url``: the server's base URL, with or without a trailing ``/v1`` (``http://localhost:8000`` and
    ``http://localhost:8000/v1`` are the same); requests go to ``<base>/v1/chat/completions``.
    ``model``: the model name the server expects. ``api_key``: sent as ``Authorization: Bearer``, if given.
    ``timeout``: seconds per request. ``retries``: extra tries after a connection failure, a timeout, HTTP 429
    or 5xx, waiting ``backoff * 2**i`` seconds before try ``i + 1``.
    """

    def __init__(self, url: str, model: str = "judge", api_key: str | None = None, timeout: float = 60, retries: int = 2,
                 backoff: float = 1.0):
        if not url or not re.match(r"^https?://[^/\s]+", url.strip()):
            raise JudgeError(f"judge URL {url!r} is not an http(s) URL; pass the server's base URL, e.g. http://localhost:8000/v1")
        self.base_url = _base_url(url)
        self.endpoint = self.base_url + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.last_reply: str | None = None  # the judge's text for the last scored answer

    def __repr__(self) -> str:
        return f"Judge({self.endpoint!r}, model={self.model!r})"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def check(self) -> None:
        """Fail fast (JudgeError) if nothing answers at the URL; any HTTP answer to ``GET <base>/models`` will do."""
        request = urllib.request.Request(self.base_url + "/models", headers=self._headers(), method="GET")
        try:
            with urllib.request.urlopen(request, timeout=min(self.timeout, 10)) as response:
                response.read()
        except urllib.error.HTTPError:
            return  # the server is there; /models is optional for OpenAI-compatible servers
        except (urllib.error.URLError, OSError) as exc:
            raise JudgeError(self._unreachable(exc)) from None

    def _unreachable(self, exc: BaseException) -> str:
        reason = getattr(exc, "reason", exc)
        return (f"judge at {self.endpoint} is unreachable ({_one_line(reason, 120)}); "
                "start the OpenAI-compatible server or fix the --judge URL")

    def complete(self, messages: list[dict]) -> str:
        """POST one chat completion (temperature 0) and return the reply's text."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0}).encode("utf-8")
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            request = urllib.request.Request(self.endpoint, data=body, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                    status = response.status
            except urllib.error.HTTPError as exc:
                detail = ""
                try:
                    detail = exc.read().decode("utf-8", "replace")
                except OSError:
                    pass
                if (exc.code == 429 or exc.code >= 500) and not last:
                    self._wait(attempt)
                    continue
                hint = {401: "set --judge-key-env to the variable holding the API key",
                        403: "check the API key and its permissions",
                        404: "check the --judge URL (it should be the server's base URL, with or without /v1) and --judge-model"
                        }.get(exc.code, "check the judge server's log, the --judge URL and --judge-model")
                raise JudgeError(f"judge at {self.endpoint} answered HTTP {exc.code}"
                                 + (f" ({_one_line(detail)})" if detail.strip() else "") + f"; {hint}") from None
            except (urllib.error.URLError, OSError) as exc:  # refused, DNS, timeout (socket.timeout is an OSError)
                if not last:
                    self._wait(attempt)
                    continue
                raise JudgeError(self._unreachable(exc)) from None
            if status != 200:
                raise JudgeError(f"judge at {self.endpoint} answered HTTP {status}; expected 200 from an OpenAI-compatible /chat/completions endpoint")
            return self._content(raw)
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, attempt: int) -> None:
        if self.backoff > 0:
            time.sleep(self.backoff * 2**attempt)

    def _content(self, raw: bytes) -> str:
        try:
            data = json.loads(raw.decode("utf-8"))
            content = data["choices"][0]["message"]["content"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise JudgeError(f"judge at {self.endpoint} returned malformed JSON ({type(exc).__name__}: {_one_line(exc, 80)}; "
                             f"got {_one_line(raw.decode('utf-8', 'replace'), 120)!r}); "
                             "is the --judge URL an OpenAI-compatible chat-completions server?") from None
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""

    def score(self, prompt_messages: Sequence[dict], answer: str, domain: str | None = None) -> float | None:
        """The judge's 1..10 score of ``answer`` to the conversation ``prompt_messages``, with ``domain``'s rubric;
        None when the reply holds no usable score (the reply is kept in ``last_reply``)."""
        messages = [{"role": "system", "content": load_rubric(domain)},
                    {"role": "user", "content": format_request(prompt_messages, answer)}]
        self.last_reply = self.complete(messages)
        return parse_score(self.last_reply)


# ---------------------------------------------------------------------------------------------- evaluation


def _split_prompt(messages: Sequence[dict]) -> tuple[list[dict], str]:
    """(turns before the last user turn, the last user turn's text)."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        raise InputError("a pair's prompt has no user turn to answer")
    return [dict(m) for m in messages[:last_user]], messages[last_user]["content"]


def _summary(scores: list[float], unparsed: int) -> dict:
    return {"judge_score": (sum(scores) / len(scores)) if scores else None, "judged": len(scores), "unparsed": unparsed}


def judge_pairs(session, pairs: Sequence, judge: Judge, domain_mode: str, max_new_tokens: int = 128, reporter=None) -> dict:
    """Generate an answer to every pair's prompt with the memory ``domain_mode`` selects (a domain, ``auto``,
    ``core`` or ``base``; greedy, as in ``chat``) and have ``judge`` score it 1 to 10.

    The rubric is the pair's domain, else the name of the domain memory that answered, else ``default``.
    Returns ``{"judge_score": mean of the parsed scores (None if none), "judged": answers scored,
    "unparsed": replies without a usable score, "per_domain": {rubric domain: the same three figures}}``.
    The session's domain and history are restored afterwards. JudgeError propagates (the judge is down).
    """
    from .memory.router import CORE
    from .session import BASE

    saved_domain, saved_history = session.domain, session.history
    session.set_domain(domain_mode)
    report = reporter.advance if reporter else (lambda *a: None)
    if reporter:
        reporter.start("judge", len(pairs))
    scores: list[float] = []
    unparsed = 0
    by_domain: dict[str, list[float]] = defaultdict(list)
    unparsed_by_domain: dict[str, int] = defaultdict(int)
    try:
        for pair in pairs:
            history, text = _split_prompt(pair.prompt)
            session.history = history
            turn = session.ask(text, max_new_tokens=max_new_tokens, keep_history=False)
            name = pair.domain or (turn.memory if turn.memory not in (BASE, CORE) else None) or DEFAULT_RUBRIC
            value = judge.score(list(pair.prompt), turn.text, name)
            by_domain.setdefault(name, [])
            if value is None:
                unparsed += 1
                unparsed_by_domain[name] += 1
            else:
                scores.append(value)
                by_domain[name].append(value)
            report("judge", 1, {})
    finally:
        session.history = saved_history
        session.domain = saved_domain
    return {**_summary(scores, unparsed),
            "per_domain": {d: _summary(s, unparsed_by_domain[d]) for d, s in sorted(by_domain.items())}}
