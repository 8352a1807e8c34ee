"""The judge's stdlib HTTP client (lifealign_lite.judge.Judge.complete) vs the openai package, per request, against a
local OpenAI-compatible stub that answers at once (so only client overhead is timed). Run: python scripts/judge_client_overhead.py (docs/ARCHITECTURE.md, hand-written on purpose)"""
import json, statistics, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPLY = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "judge",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Fine.\nScore: 8"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


class Stub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(REPLY)))
        self.end_headers()
        self.wfile.write(REPLY)

    def log_message(self, *a):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
threading.Thread(target=server.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{server.server_address[1]}/v1"
messages = [{"role": "system", "content": "rubric " * 200}, {"role": "user", "content": "answer " * 300}]

t = time.perf_counter(); import openai; import_s = time.perf_counter() - t
from lifealign_lite.judge import Judge

judge = Judge(url, retries=0)
client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


def times(fn, n=200):
    fn()
    out = []
    for _ in range(n):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return round(statistics.median(out) * 1000, 3), round(min(out) * 1000, 3)


ours = times(lambda: judge.complete(messages))
theirs = times(lambda: client.chat.completions.create(model="judge", messages=messages, temperature=0).choices[0].message.content)
print(json.dumps({"stdlib_ms_median_min": ours, "openai_ms_median_min": theirs, "openai_import_s": round(import_s, 2),
                  "openai": openai.__version__}))
server.shutdown()
