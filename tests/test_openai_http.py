"""OpenAIEngine against a real HTTP server on 127.0.0.1 that serves canned OpenAI-format
rollouts (a pure function of the request seed) and misbehaves on purpose: dropped
connections, cut-off bodies, 503s, answers slower than the timeout. Every rollout must come
back exactly once, in its own slot, with the numbers its seed defines."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

pytest.importorskip("httpx")

from canopy_entropy.engines.base import DecodingPolicy
from canopy_entropy.engines.openai import OpenAIEngine
from canopy_entropy.errors import CanopyError

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


class FaultyServer:
    """A threaded HTTP server with per-seed fault plans; records every attempt per seed."""

    def __init__(self, faults: dict[int, list[str]] | None = None) -> None:
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.attempts: Counter[int] = Counter()
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
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
                if fault == "slow":
                    threading.Event().wait(1.5)
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
                r = canned_rollout(seed, body["top_k"], body["max_tokens"], body["logprobs"])
                payload = {
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
                if fault == "cut":  # promise a body, send half of it, hang up
                    raw = json.dumps(payload).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw[: len(raw) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._send(200, payload)

            def _send(self, code: int, obj: dict) -> None:
                raw = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # client gave up: expected
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FaultyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _engine(url: str, **kw) -> OpenAIEngine:
    opts = dict(
        base_url=url,
        tokenizer=False,
        eos_token_ids=EOS,
        vocab_size=VOCAB,
        processed_logprobs=True,
        concurrency=4,
        timeout=0.8,
        max_retries=3,
        backoff=0.01,
    )
    opts.update(kw)
    return OpenAIEngine("canned", **opts)


POLICY = DecodingPolicy(temperature=1.0, top_k=6, max_new_tokens=12, eos_token_ids=EOS)


def test_faults_lose_and_duplicate_nothing():
    seeds = np.arange(1000, 1016, dtype=np.int64)
    faults = {
        1000: ["drop"],
        1001: ["503", "drop"],
        1002: ["cut"],
        1003: ["slow"],
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
    for i, seed in enumerate(seeds.tolist()):
        want = canned_rollout(seed, 6, 12)
        sl = slice(batch.offsets[i], batch.offsets[i + 1])
        assert batch.token_ids[sl].tolist() == want["tokens"]
        np.testing.assert_allclose(batch.entropy[sl], want["entropy"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batch.eos_prob[sl], want["eos"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(batch.logprob[sl], want["sampled"], rtol=1e-5, atol=1e-6)
        expect_finish = "eos" if want["finish"] == "stop" else "length"
        assert batch.finish_reason[i] == expect_finish
        assert srv.attempts[seed] == 1 + len(faults.get(seed, []))
    assert batch.entropy_upper is None
    assert {"length", "eos"} <= set(batch.finish_reason)
    # the request carried the policy and asked for token ids and every EOS id as a stop id
    body = srv.bodies[0]
    assert body["top_k"] == 6 and body["logprobs"] == 6 and body["n"] == 1
    assert body["stop_token_ids"] == list(EOS) and body["return_tokens_as_token_ids"] is True
    assert body["prompt"] == [5, 6, 7]


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
    eng = _engine("http://127.0.0.1:9/v1", server="openai")
    with pytest.raises(CanopyError, match="cannot apply top_k"):
        eng.sample([1], np.array([1]), np.arange(1), POLICY)
    eng.close()


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
