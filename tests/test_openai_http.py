"""OpenAIEngine against a real HTTP server on 127.0.0.1 that serves canned OpenAI-format
rollouts (a pure function of the request seed) and misbehaves on purpose: dropped
connections, cut-off bodies, 503s and 429s with Retry-After, malformed 200 answers, stalls
past the read timeout, trickles past the total deadline, ignored seeds. Every rollout must
come back exactly once, in its own slot, with the numbers its seed defines. Timeouts are
generous and retried, sleeps and clocks injected, so a busy machine changes nothing."""

from __future__ import annotations

import dataclasses
import email.utils
import itertools
import json
import re
import socket
import threading
import warnings
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

pytest.importorskip("httpx")

from canopy_entropy.engines.base import DecodingPolicy
from canopy_entropy.engines.openai import PROBE_SEED, PROBE_TOKENS, OpenAIEngine, OpenAIOptions
from canopy_entropy.engines.registry import get_engine
from canopy_entropy.errors import CanopyError, ConfigError

VOCAB = 40
EOS = (2, 4)


def canned_rollout(seed: int, top_k: int, max_tokens: int, n_logprobs: int | None = None) -> dict:
    """The rollout a seed defines: per step a top-k policy over VOCAB tokens, sampled."""
    rng = np.random.default_rng(seed)
    tokens, sampled, tops, ent, eos_p = [], [], [], [], []
    finish = "length"
    for _ in range(max_tokens):
        logits = rng.normal(scale=2.0, size=VOCAB)
        logits[list(EOS)] += 1.5
        keep = np.argsort(-logits, kind="stable")[:top_k]
        p = np.exp(logits[keep] - logits[keep].max())
        p /= p.sum()
        choice = int(rng.choice(top_k, p=p))
        tok = int(keep[choice])
        tokens.append(tok)
        sampled.append(float(np.log(p[choice])))
        shown = zip(keep[:n_logprobs], p[:n_logprobs], strict=True)
        top = {f"token_id:{int(t)}": float(np.log(q)) for t, q in shown}
        top[f"token_id:{tok}"] = float(np.log(p[choice]))  # like vLLM: sampled token too
        tops.append(top)
        ent.append(float(-(p * np.log(p)).sum()))
        eos_p.append(float(p[np.isin(keep, EOS)].sum()))
        if tok in EOS:
            finish = "stop"
            break
    return {
        "tokens": tokens,
        "sampled": sampled,
        "tops": tops,
        "entropy": ent,
        "eos": eos_p,
        "finish": finish,
    }


def _payload(seed: int, body: dict) -> dict:
    """The /v1/completions answer (vLLM format, token ids as strings) for a request."""
    top_k = body["top_k"] if body["top_k"] > 0 else VOCAB
    n_logprobs = body["top_logprobs"] if "messages" in body else body["logprobs"]
    r = canned_rollout(seed, top_k, body["max_tokens"], n_logprobs)
    return {
        "id": f"cmpl-{seed}",
        "object": "text_completion",
        "choices": [
            {
                "index": 0,
                "text": " ".join(map(str, r["tokens"])),
                "finish_reason": r["finish"],
                "logprobs": {
                    "tokens": [f"token_id:{t}" for t in r["tokens"]],
                    "token_logprobs": r["sampled"],
                    "top_logprobs": r["tops"],
                },
            }
        ],
    }


def _as_chat(payload: dict, fault: str | None) -> dict:
    """The same answer in /v1/chat/completions format; fault "chat-null-top" nulls a list."""
    choice = payload["choices"][0]
    lp = choice.pop("logprobs")
    content = [
        {
            "token": t,
            "logprob": v,
            "top_logprobs": [{"token": k, "logprob": q} for k, q in d.items()],
        }
        for t, v, d in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True)
    ]
    if fault == "chat-null-top":
        content[0]["top_logprobs"] = None
    choice["message"] = {"role": "assistant", "content": choice.pop("text")}
    choice["logprobs"] = {"content": content}
    return payload


def _set_step(key: str, value):
    """A fault that overwrites one logprobs field at step 0."""

    def mutate(payload):
        lp = payload["choices"][0]["logprobs"]
        if key == "top":
            lp["top_logprobs"][0] = value
        elif key == "top_value":
            first = next(iter(lp["top_logprobs"][0]))
            lp["top_logprobs"][0][first] = value
        elif key == "sampled":
            lp["token_logprobs"][0] = value
        elif key == "token":
            lp["tokens"][0] = value
        return payload

    return mutate


def _short_top(payload):
    """Step 0 lists only its two largest entries (not the top_k asked for)."""
    lp = payload["choices"][0]["logprobs"]
    top = lp["top_logprobs"][0]
    keep = sorted(top, key=top.get, reverse=True)[:2]
    lp["top_logprobs"][0] = {t: top[t] for t in keep}
    lp["tokens"][0] = keep[0]
    lp["token_logprobs"][0] = top[keep[0]]
    return payload


# 200 answers that are not usable completions: each must be retried, never recorded
MALFORMED = {
    "null-top": _set_step("top", None),
    "nan-top": _set_step("top_value", float("nan")),
    "inf-sampled": _set_step("sampled", float("-inf")),
    "null-sampled": _set_step("sampled", None),
    "positive-top": _set_step("top_value", 0.7),
    "string-top": _set_step("top_value", "-0.5"),
    "bad-token": _set_step("token", "token_id:x"),
    "short-top": _short_top,
    "array": lambda payload: [payload],
    "no-choices": lambda payload: {"id": payload["id"], "object": "text_completion"},
}


class FaultyServer:
    """A threaded HTTP server with per-seed fault plans; records every attempt per seed.

    ``ignore_seed=True`` serves a fresh rollout per request, like a server that drops
    ``seed``. Stalled answers are released when the server stops."""

    def __init__(self, faults: dict[int, list[str]] | None = None, ignore_seed=False) -> None:
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.attempts: Counter[int] = Counter()
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                seed = int(body["seed"])
                with server.lock:
                    server.attempts[seed] += 1
                    server.bodies.append(body)
                    plan = server.faults.get(seed, [])
                    fault = plan.pop(0) if plan else None
                    if ignore_seed:
                        seed = 10_000 + len(server.bodies)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "bad":
                    self._send(400, {"error": {"message": "model 'nope' does not exist"}})
                    return
                if fault == "503":
                    self._send(503, {"error": {"message": "overloaded"}})
                    return
                if fault and fault.startswith("retry-after="):
                    after = fault.split("=", 1)[1]
                    self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": after})
                    return
                if fault == "stall":  # never answers before the client gives up
                    server.release.wait()
                    return
                if self.path.endswith("/completion"):  # llama.cpp native format
                    r = canned_rollout(seed, body["top_k"], body["n_predict"], body["n_probs"])
                    rows = [
                        {
                            "id": t,
                            "token": f"<{t}>",
                            "prob": float(np.exp(lp)),
                            "top_probs": [
                                {"id": int(k[9:]), "token": "?", "prob": float(np.exp(v))}
                                for k, v in top.items()
                            ],
                        }
                        for t, lp, top in zip(r["tokens"], r["sampled"], r["tops"], strict=True)
                    ]
                    stop_type = "eos" if r["finish"] == "stop" else "limit"
                    self._send(200, {"content": "x", "tokens": r["tokens"], "stop": True,
                                     "stop_type": stop_type, "completion_probabilities": rows})  # fmt: skip
                    return
                payload = _payload(seed, body)
                if self.path.endswith("/chat/completions"):
                    payload = _as_chat(payload, fault)
                if fault in MALFORMED:
                    self._send(200, MALFORMED[fault](payload))
                    return
                raw = json.dumps(payload).encode()
                if fault == "cut":  # promise a body, send half of it, hang up
                    self._head(200, len(raw))
                    self.wfile.write(raw[: len(raw) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault and fault.startswith("trickle="):  # every read on time, all too slow
                    size, gap = fault.split("=", 1)[1].split("/")
                    self._head(200, len(raw))
                    for i in range(0, len(raw), int(size)):
                        if server.release.wait(float(gap)):
                            return
                        self.wfile.write(raw[i : i + int(size)])
                        self.wfile.flush()
                    return
                self._send(200, payload)

            def _head(self, code: int, length: int, headers: dict | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(length))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()

            def _send(self, code: int, obj, headers: dict | None = None) -> None:
                raw = json.dumps(obj).encode()
                self._head(code, len(raw), headers)
                self.wfile.write(raw)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # a busy machine must not see refused connections

            def handle_error(self, request, client_address):  # client gave up: expected
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FaultyServer:
        self.thread.start()
        # ready when it accepts a connection (it listens from construction on)
        socket.create_connection(self.httpd.server_address, timeout=120).close()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def bodies_of(self, seed: int) -> list[dict]:
        return [b for b in self.bodies if int(b["seed"]) == seed]


def _engine(url: str, **kw) -> OpenAIEngine:
    """An engine with generous timeouts (a busy machine never times out) and no sleeping."""
    opts = dict(
        base_url=url,
        tokenizer=False,
        eos_token_ids=EOS,
        vocab_size=VOCAB,
        processed_logprobs=True,
        concurrency=4,
        timeout=120.0,
        max_retries=3,
        backoff=0.01,
        seed_probe=False,
    )
    opts.update(kw)
    return OpenAIEngine("canned", **opts)


POLICY = DecodingPolicy(temperature=1.0, top_k=6, max_new_tokens=12, eos_token_ids=EOS)


def _assert_canned(batch, seeds, top_k=6, max_tokens=12):
    """Every rollout is the one its seed defines, in its own slot."""
    for i, seed in enumerate(np.asarray(seeds).tolist()):
        want = canned_rollout(seed, top_k, max_tokens)
        sl = slice(batch.offsets[i], batch.offsets[i + 1])
        assert batch.token_ids[sl].tolist() == want["tokens"]
        np.testing.assert_allclose(batch.entropy[sl], want["entropy"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batch.eos_prob[sl], want["eos"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(batch.logprob[sl], want["sampled"], rtol=1e-5, atol=1e-6)
        assert batch.finish_reason[i] == ("eos" if want["finish"] == "stop" else "length")


def test_faults_lose_and_duplicate_nothing():
    seeds = np.arange(1000, 1016, dtype=np.int64)
    faults = {
        1000: ["drop"],
        1001: ["503", "drop"],
        1002: ["cut"],
        1003: ["retry-after=0"],
        1007: ["drop", "503", "cut"],
        1011: ["503"],
    }
    with FaultyServer(faults) as srv:
        eng = _engine(srv.url)
        idx = np.arange(len(seeds), dtype=np.int32)[::-1].copy()  # rollout index != order
        batch = eng.sample([5, 6, 7], seeds, idx, POLICY)
        eng.close()
    assert eng.approximate is False
    assert batch.rollout_index.tolist() == idx.tolist()
    assert batch.seed.tolist() == seeds.tolist()
    _assert_canned(batch, seeds)
    for seed in seeds.tolist():
        assert srv.attempts[seed] == 1 + len(faults.get(seed, []))
    assert batch.entropy_upper is None
    assert {"length", "eos"} <= set(batch.finish_reason)
    # the request carried the policy and asked for token ids and every EOS id as a stop id
    body = srv.bodies_of(1005)[0]
    assert body["top_k"] == 6 and body["logprobs"] == 6 and body["n"] == 1
    assert body["stop_token_ids"] == list(EOS) and body["return_tokens_as_token_ids"] is True
    assert body["prompt"] == [5, 6, 7]


def test_read_timeout_is_retried():
    """A server that never answers the first attempt: the per-read timeout fires, the retry
    gets the rollout (more retries absorb a busy machine's slow answers)."""
    with FaultyServer({1100: ["stall"]}) as srv:
        eng = _engine(srv.url, timeout=2.0, max_retries=6)
        batch = eng.sample([1], np.array([1100, 1101]), np.arange(2), POLICY)
        eng.close()
    _assert_canned(batch, [1100, 1101])
    assert srv.attempts[1100] >= 2


def test_retry_after_seconds_and_http_date_are_honoured_and_capped():
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    cases = {
        1200: ("retry-after=2", 2.0),
        1201: (f"retry-after={date}", 7.0),
        1202: ("retry-after=3600", 30.0),  # capped by max_retry_after
        1203: ("retry-after=1.5", 1.5),
    }
    sleeps: list[float] = []
    with FaultyServer({s: [fault] for s, (fault, _) in cases.items()} | {1204: ["503"]}) as srv:
        eng = _engine(srv.url, max_retry_after=30.0, backoff=0.25)
        eng._sleep = sleeps.append
        eng._wallclock = lambda: now
        for seed, (_, want) in cases.items():
            batch = eng.sample([1], np.array([seed]), np.arange(1), POLICY)
            _assert_canned(batch, [seed])
            assert sleeps.pop() == pytest.approx(want, abs=1e-9), seed
            assert not sleeps
        eng.sample([1], np.array([1204]), np.arange(1), POLICY)  # no Retry-After: backoff
        eng.close()
    assert len(sleeps) == 1 and 0.25 <= sleeps[0] <= 0.25 * 1.25
    assert all(srv.attempts[s] == 2 for s in cases)


@pytest.mark.parametrize("fault", sorted(MALFORMED))
def test_malformed_answer_is_retried_never_recorded(fault):
    with FaultyServer({1300: [fault], 1301: [fault] * 10}) as srv:
        eng = _engine(srv.url, max_retries=2)
        batch = eng.sample([1], np.array([1300, 1302]), np.arange(2), POLICY)
        _assert_canned(batch, [1300, 1302])
        with pytest.raises(CanopyError, match="gave no usable answer in 3 tries") as info:
            eng.sample([1], np.array([1301]), np.arange(1), POLICY)
        eng.close()
    msg = str(info.value)
    assert "\n" not in msg and f"{srv.url}/completions" in msg
    assert srv.attempts[1300] == 2 and srv.attempts[1301] == 3
    if fault == "array":
        assert "answered HTTP 200 with a JSON array, expected a JSON object" in msg


def test_short_top_list_is_fine_for_bounds():
    """Fewer entries than asked cannot give an exact entropy, but the bounds still hold."""
    with FaultyServer({1400: ["short-top"]}) as srv:
        eng = _engine(srv.url, processed_logprobs=False)
        batch = eng.sample([1], np.array([1400]), np.arange(1), POLICY)
        eng.close()
    assert srv.attempts[1400] == 1
    truth = canned_rollout(1400, 6, 12)
    tokens = truth["tokens"]
    assert batch.token_ids[1:].tolist() == tokens[1:]
    assert batch.entropy[0] <= truth["entropy"][0] + 1e-5 <= batch.entropy_upper[0] + 2e-5
    assert batch.entropy_upper[0] > batch.entropy[0] + 1e-3


class FakeClock:
    """A monotonic clock that advances one second per reading (thread-safe)."""

    def __init__(self) -> None:
        self.ticks = itertools.count()

    def __call__(self) -> float:
        return float(next(self.ticks))


def test_trickling_server_hits_total_deadline_injected_clock():
    """Each byte arrives well within the read timeout; the total deadline still cuts the
    attempt (clock: one second per chunk read, whatever the machine's speed)."""
    with FaultyServer({1500: ["trickle=1/0.01"] * 2}) as srv:
        eng = _engine(srv.url, deadline=40.0, max_retries=1)
        eng._monotonic = FakeClock()
        with pytest.raises(CanopyError, match="within the deadline of 40 s") as info:
            eng.sample([1], np.array([1500]), np.arange(1), POLICY)
        eng.close()
    assert "no answer after 2 tries" in str(info.value)
    assert srv.attempts[1500] == 2


def test_trickled_answer_within_deadline_is_complete():
    with FaultyServer({1600: ["trickle=97/0.002"]}) as srv:
        eng = _engine(srv.url, deadline=1e6)
        eng._monotonic = FakeClock()
        batch = eng.sample([1], np.array([1600, 1601]), np.arange(2), POLICY)
        eng.close()
    _assert_canned(batch, [1600, 1601])
    assert srv.attempts[1600] == 1


def test_total_deadline_with_real_clock():
    """The trickle would take 20 s whatever the machine's speed; the 1 s deadline ends it."""
    with FaultyServer({1700: ["trickle=10/0.1"]}) as srv:
        eng = _engine(srv.url, deadline=1.0, max_retries=0)
        with pytest.raises(CanopyError, match="within the deadline of 1 s"):
            eng.sample([1], np.array([1700]), np.arange(1), POLICY)
        eng.close()
    assert srv.attempts[1700] == 1


@pytest.mark.parametrize("ignore_seed", [False, True])
def test_seed_probe(ignore_seed):
    with FaultyServer(ignore_seed=ignore_seed) as srv:
        eng = _engine(srv.url, seed_probe=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = eng.describe()
            eng.describe()
            eng.sample([1], np.array([1800]), np.arange(1), POLICY)
        eng.close()
    seed_warnings = [w for w in caught if "ignores the request seed" in str(w.message)]
    assert info["seed_reproducible"] is (not ignore_seed)
    assert len(seed_warnings) == int(ignore_seed)
    probes = srv.bodies_of(PROBE_SEED)
    assert len(probes) == 2 and probes[0] == probes[1]  # probed once, two identical requests
    assert probes[0]["max_tokens"] == PROBE_TOKENS and probes[0]["temperature"] == 1.0
    assert probes[0]["ignore_eos"] is True and probes[0]["stop_token_ids"] == []
    assert srv.bodies[-1]["seed"] == 1800
    assert _engine(srv.url).describe()["seed_reproducible"] is None  # probe off: unknown


def test_options_are_declared_and_checked():
    assert set(OpenAIEngine.OPTIONS) == {f.name for f in dataclasses.fields(OpenAIOptions)}
    assert OpenAIEngine.OPTIONS["timeout"] is float
    with pytest.raises(ConfigError, match=r"no option 'timout'.*did you mean 'timeout'"):
        get_engine("openai", "canned", base_url="http://127.0.0.1:9/v1", timout=5)
    with pytest.raises(ConfigError, match="option 'concurrency' must be int"):
        get_engine("openai", "canned", base_url="http://127.0.0.1:9/v1", concurrency="8")
    with pytest.raises(ConfigError, match="option 'eos_token_ids'"):
        _engine("http://127.0.0.1:9/v1", eos_token_ids=[2, 1.7])
    with pytest.raises(
        ConfigError, match=re.escape("needs a scheme; write it as http://127.0.0.1:8000/v1")
    ):
        _engine("127.0.0.1:8000/v1")
    with pytest.raises(ConfigError, match="deadline must be > 0"):
        _engine("http://127.0.0.1:9/v1", deadline=0)
    eng = _engine("http://127.0.0.1:9/v1", timeout=5, chat=True)  # int for float is fine
    assert eng.timeout == 5.0 and eng.chat is True
    eng.close()


def test_chat_format_and_its_malformed_answer():
    with FaultyServer({1900: ["chat-null-top"], 1901: ["chat-null-top"] * 5}) as srv:
        eng = _engine(srv.url, chat=True, max_retries=1)
        batch = eng.sample_chat("hi", np.array([1900, 1902]), np.arange(2), POLICY)
        with pytest.raises(CanopyError, match="chat/completions gave no usable answer in 2"):
            eng.sample_chat("hi", np.array([1901]), np.arange(1), POLICY)
        eng.close()
    _assert_canned(batch, [1900, 1902])
    assert batch.text[1] == " ".join(map(str, canned_rollout(1902, 6, 12)["tokens"]))
    assert srv.attempts[1900] == 2 and srv.attempts[1901] == 2
    assert srv.bodies_of(1902)[0]["messages"] == [{"role": "user", "content": "hi"}]


def test_sample_many_matches_per_prompt_and_bounds_mode():
    with FaultyServer({2001: ["drop"]}) as srv:
        eng = _engine(srv.url, top_logprobs=3, processed_logprobs=False)
        a = np.array([2000, 2001], dtype=np.int64)
        b = np.array([2002], dtype=np.int64)
        many = eng.sample_many([([1, 2], a, np.arange(2)), ([3], b, np.arange(1))], POLICY)
        one = eng.sample([3], b, np.arange(1), POLICY)
        eng.close()
    assert eng.approximate is True
    assert many[1].token_ids.tolist() == one.token_ids.tolist()
    for batch, seeds in ((many[0], a), (many[1], b)):
        truth = np.concatenate([canned_rollout(int(s), 6, 12)["entropy"] for s in seeds])
        assert batch.entropy_upper is not None
        assert np.all(batch.entropy <= truth + 1e-5)
        assert np.all(batch.entropy_upper >= truth - 1e-5)
        assert np.any(batch.entropy_upper > batch.entropy + 1e-3)


def test_persistent_failure_is_one_line_error():
    with FaultyServer({3000: ["drop"] * 10}) as srv:
        eng = _engine(srv.url, max_retries=2)
        with pytest.raises(CanopyError, match=r"no answer after 3 tries") as info:
            eng.sample([1], np.array([3000]), np.arange(1), POLICY)
        eng.close()
    assert "\n" not in str(info.value)
    assert srv.attempts[3000] == 3


def test_client_error_is_not_retried():
    with FaultyServer({4000: ["bad"]}) as srv:
        eng = _engine(srv.url)
        with pytest.raises(CanopyError, match="does not exist"):
            eng.sample([1], np.array([4000]), np.arange(1), POLICY)
        eng.close()
    assert srv.attempts[4000] == 1


def test_hosted_server_refuses_top_k():
    eng = _engine("http://127.0.0.1:9/v1", server="openai", seed_probe=True)
    with pytest.raises(CanopyError, match="cannot apply top_k"):  # before any request
        eng.sample([1], np.array([1]), np.arange(1), POLICY)
    eng.close()
    assert eng.requests_sent == 0


def test_missing_base_url_is_config_error(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(CanopyError, match="needs the server address"):
        OpenAIEngine("canned", tokenizer=False, eos_token_ids=EOS)


def test_llama_cpp_native_post_sampling_probs_exact():
    with FaultyServer({5001: ["drop"]}) as srv:
        eng = _engine(srv.url, server="llama.cpp", processed_logprobs=False)
        seeds = np.arange(5000, 5006, dtype=np.int64)
        short = DecodingPolicy(temperature=1.0, top_k=6, max_new_tokens=3, eos_token_ids=EOS)
        batch = eng.sample([1, 2, 3], seeds, np.arange(6), short)
        eng.close()
    assert eng.approximate is False and batch.entropy_upper is None
    body = srv.bodies[0]
    assert body["post_sampling_probs"] is True and body["n_probs"] == 6
    assert body["samplers"][0] == "temperature" and body["top_k"] == 6
    for i, seed in enumerate(seeds.tolist()):
        want = canned_rollout(seed, 6, 3)
        sl = slice(batch.offsets[i], batch.offsets[i + 1])
        assert batch.token_ids[sl].tolist() == want["tokens"]
        np.testing.assert_allclose(batch.entropy[sl], want["entropy"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batch.eos_prob[sl], want["eos"], rtol=1e-5, atol=1e-7)
        assert batch.finish_reason[i] == ("eos" if want["finish"] == "stop" else "length")
    assert set(batch.finish_reason) == {"eos", "length"}
