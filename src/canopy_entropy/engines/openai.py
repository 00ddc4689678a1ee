"""Sampling through an OpenAI-compatible HTTP server (vLLM serve, llama.cpp, hosted APIs).

Each rollout is ONE request keyed by its own seed (``n = 1``), so a retried request after a
dropped connection reproduces the same rollout and writes the same slot: nothing is lost or
duplicated, provided the server honours ``seed`` (probed once: two identical requests).
Requests run on a thread pool with a concurrency limit, a per-read timeout and a total
per-attempt deadline, and are retried with exponential backoff (or the server's
``Retry-After``) on connection errors, timeouts, 408/409/425/429/5xx and malformed answers.

Per step the server returns the top-K log-probs. Where they cover the policy's kept set
(vLLM started with ``--logprobs-mode processed_logprobs`` and ``top_logprobs >= top_k``:
pass ``processed_logprobs=True``) the entropy is exact. Otherwise (hosted APIs, top-20) the
step entropy is bracketed: ``entropy`` holds the lower bound, ``entropy_upper`` the upper
bound (see ``engines/topk.py``) and ``engine.approximate`` is True so the run is marked.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import random
import threading
import time
import typing
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from canopy_entropy.engines.base import DecodingPolicy, Engine, RolloutBatch, check_options
from canopy_entropy.engines.topk import MASS_TOLERANCE, pad_ragged, topk_step_stats
from canopy_entropy.errors import CanopyError, ConfigError, require

TOKEN_ID_PREFIX = "token_id:"
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
SERVERS = ("vllm", "openai", "llama.cpp")
# llama.cpp applies its samplers in this order; canopy's order is temperature first (docs/engines.md).
LLAMA_CPP_SAMPLERS = ["temperature", "top_k", "top_p", "min_p"]
# log-probs above this (probability > 1 beyond float32 noise) are not log-probabilities
LOGPROB_SLACK = 1e-3
PROBE_SEED = 1_234_567
PROBE_TOKENS = 8

# (tokens, sampled log-probs, top entries per step, finish reason, text) of one answer
Parsed = tuple[list, list, list, Any, Any]


@dataclass(frozen=True)
class OpenAIOptions:
    """The options ``OpenAIEngine`` accepts (``engine_options`` in the run config)."""

    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1; default $OPENAI_BASE_URL
    api_key: str | None = None  # bearer token; default $OPENAI_API_KEY; never recorded
    chat: bool = False  # /v1/chat/completions with the user text instead of token ids
    concurrency: int = 8  # requests in flight
    timeout: float = 60.0  # seconds per connect and per socket read
    deadline: float = 900.0  # seconds per request attempt in total (slow trickles are cut)
    max_retries: int = 5  # retries per request after the first attempt
    backoff: float = 0.5  # first retry delay in seconds, doubled per retry, jittered
    max_retry_after: float = 120.0  # cap in seconds on a server's Retry-After
    seed_probe: bool = True  # send one short request twice to check that seeds are honoured
    tokenizer: Any = None  # name/path or tokenizer object; False: none (ids from the server)
    top_logprobs: int | None = None  # K per step; default top_k (processed) or 20
    processed_logprobs: bool = False  # the server returns the sampled policy's log-probs
    server: str = "vllm"  # "vllm", "openai" (standard fields only) or "llama.cpp"
    vocab_size: int | None = None  # default: the tokenizer's length
    eos_token_ids: list[int] | tuple[int, ...] | None = None  # default: generation config
    context_length: int | None = None  # prompt + new tokens limit, checked before sampling
    extra_body: dict | None = None  # extra request fields, sent as given

    @classmethod
    def parse(cls, options: dict[str, Any]) -> OpenAIOptions:
        """Options from a dict, refusing unknown names and values of the wrong type."""
        check_options(cls, options, "openai")
        return cls(**options)


class OpenAIEngine(Engine):
    """Rollouts from an OpenAI-compatible ``/v1/completions`` (or ``/v1/chat/completions``).

    ``server="vllm"`` also sends vLLM's extra fields (``top_k``, ``min_p``,
    ``stop_token_ids`` = every EOS id, ``return_tokens_as_token_ids``) so token ids are exact
    and the policy is the one configured; ``server="openai"`` sends only standard fields and
    refuses policies the API cannot apply (top-k, min-p). Options: ``OpenAIOptions``.
    """

    name = "openai"
    # option name -> accepted type, for validating engine options before construction
    OPTIONS: ClassVar[dict[str, Any]] = typing.get_type_hints(OpenAIOptions)
    prompts_per_call = 16  # requests run concurrently; the server batches them

    def __init__(self, model: str, **options: Any) -> None:
        opts = OpenAIOptions.parse(options)
        httpx = require("httpx", "openai")
        base_url = opts.base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise ConfigError(
                "engine 'openai' needs the server address: set engine option base_url "
                "(e.g. http://127.0.0.1:8000/v1) or OPENAI_BASE_URL"
            )
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"engine 'openai' base_url '{base_url}' needs a scheme; "
                f"write it as http://{base_url.split('://')[-1]}"
            )
        if opts.server not in SERVERS:
            raise ConfigError(f"unknown server kind '{opts.server}'; use one of {list(SERVERS)}")
        for name in ("concurrency", "timeout", "deadline"):
            if not getattr(opts, name) > 0:
                raise ConfigError(f"{name} must be > 0 (got {getattr(opts, name)})")
        for name in ("max_retries", "backoff", "max_retry_after"):
            if not getattr(opts, name) >= 0:
                raise ConfigError(f"{name} must be >= 0 (got {getattr(opts, name)})")
        if opts.top_logprobs is not None and opts.top_logprobs < 1:
            raise ConfigError(f"top_logprobs must be >= 1 (got {opts.top_logprobs})")
        if opts.server == "llama.cpp" and opts.chat:
            raise ConfigError("server='llama.cpp' uses the native /completion endpoint; chat=False")
        self.options = opts
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.chat = opts.chat
        self.concurrency = opts.concurrency
        self.timeout = float(opts.timeout)
        self.deadline = float(opts.deadline)
        self.max_retries = opts.max_retries
        self.backoff = float(opts.backoff)
        self.max_retry_after = float(opts.max_retry_after)
        self.top_logprobs = opts.top_logprobs
        # llama.cpp's post-sampling probabilities are those of the sampled policy
        self.processed_logprobs = opts.processed_logprobs or opts.server == "llama.cpp"
        self.server = opts.server
        self.extra_body = dict(opts.extra_body or {})
        self.approximate = not self.processed_logprobs
        # tokenizer=False: none at all (token ids must come from the server).
        tok = opts.tokenizer
        source = None if tok is False else (tok if tok is not None else model)
        self.tokenizer = _load_tokenizer(source)
        eos_token_ids = opts.eos_token_ids
        if eos_token_ids is None:
            eos_token_ids = _eos_ids(source, self.tokenizer)
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        vocab_size = opts.vocab_size
        if vocab_size is None and self.tokenizer is not None:
            vocab_size = len(self.tokenizer)
        self.vocab_size = int(vocab_size or 0)
        self.context_length = opts.context_length
        key = opts.api_key if opts.api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(min(self.timeout, self.deadline)),
            limits=httpx.Limits(max_connections=self.concurrency),
        )
        self._httpx = httpx
        self._rng = random.Random()
        self._lock = threading.Lock()
        # injectable for tests: the retry sleep, the deadline clock, the Retry-After date clock
        self._sleep = time.sleep
        self._monotonic = time.monotonic
        self._wallclock = time.time
        self.requests_sent = 0  # attempts, for tests and the manifest
        self._seed_reproducible: bool | None = None
        self._pseudo_ids: dict[str, int] = {}

    # ------------------------------------------------------------------ contract
    def describe(self) -> dict:
        """Facts for the manifest (never the API key); runs the seed probe if not yet done."""
        return {
            "engine": self.name,
            "model": self.model,
            "base_url": self.base_url,
            "endpoint": "chat/completions" if self.chat else "completions",
            "server": self.server,
            "top_logprobs": self.top_logprobs,
            "processed_logprobs": self.processed_logprobs,
            "approximate": self.approximate,
            "eos_token_ids": list(self.eos_token_ids),
            "vocab_size": self.vocab_size,
            "seed_reproducible": self.seed_reproducible,
        }

    @property
    def seed_reproducible(self) -> bool | None:
        """Whether two identical seeded requests gave the same answer (None: probe disabled).

        Sent once, lazily: a retried request reproduces its rollout only if this holds."""
        if not self.options.seed_probe:
            return None
        with self._lock:
            if self._seed_reproducible is not None:
                return self._seed_reproducible
        body = self._probe_body()
        first, second = (self._fetch(self._path, body, k=1, full_cover=False) for _ in "12")
        same = (first[0], first[4]) == (second[0], second[4])
        if not same:
            warnings.warn(
                f"{self.base_url} ignores the request seed: the same seeded request gave two "
                "different answers, so rollouts are not reproducible and a retried request "
                "may record a different rollout than the first attempt began; use a server "
                "that honours seeds (vLLM does), or set max_retries=0 to never resend",
                stacklevel=2,
            )
        with self._lock:
            self._seed_reproducible = same
        return same

    def sample(
        self,
        prompt_token_ids: list[int],
        seeds: np.ndarray,
        rollout_indices: np.ndarray,
        policy: DecodingPolicy,
    ) -> RolloutBatch:
        """M rollouts of one prompt given as token ids (``/v1/completions``)."""
        return self.sample_many([(prompt_token_ids, seeds, rollout_indices)], policy)[0]

    def sample_many(
        self,
        requests: list[tuple[Any, np.ndarray, np.ndarray]],
        policy: DecodingPolicy,
    ) -> list[RolloutBatch]:
        """Many prompts at once, all rollouts sharing one concurrency-limited request pool.

        Each request is ``(prompt, seeds, rollout_indices)``; the prompt is a list of token
        ids, or (chat mode) the user message text.
        """
        policy.validate()
        k, exact = self._plan(policy)
        self._pseudo_ids = {}
        jobs = []
        for r, (prompt, seeds, _) in enumerate(requests):
            if self.chat and not isinstance(prompt, str):
                raise ConfigError(
                    "chat mode sends the user message, not token ids; call sample_chat(text, ...) "
                    "or use chat=False with the completions endpoint"
                )
            for j, seed in enumerate(np.asarray(seeds, dtype=np.int64)):
                jobs.append((r, j, self._body(prompt, int(seed), policy, k)))
        self.seed_reproducible  # noqa: B018 - the probe, once, before the real requests
        results: list[list[Parsed | None]] = [[None] * len(req[1]) for req in requests]
        full_cover = exact and policy.temperature > 0
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [
                (r, j, pool.submit(self._fetch, self._path, body, k, full_cover))
                for r, j, body in jobs
            ]
            try:
                for r, j, fut in futures:
                    results[r][j] = fut.result()
            except BaseException:  # a request gave up (or Ctrl-C): do not send the rest
                for _, _, fut in futures:
                    fut.cancel()
                raise
        return [
            self._to_batch(res, np.asarray(seeds), np.asarray(idx), policy, exact, k)
            for res, (_, seeds, idx) in zip(results, requests, strict=True)
        ]

    def sample_chat(
        self, text: str, seeds: np.ndarray, rollout_indices: np.ndarray, policy: DecodingPolicy
    ) -> RolloutBatch:
        """M rollouts of one user message through ``/v1/chat/completions`` (chat=True)."""
        if not self.chat:
            raise ConfigError("sample_chat needs an engine built with chat=True")
        return self.sample_many([(text, seeds, rollout_indices)], policy)[0]

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------ requests
    @property
    def _path(self) -> str:
        if self.server == "llama.cpp":
            return "/completion"
        return "/chat/completions" if self.chat else "/completions"

    def _plan(self, policy: DecodingPolicy) -> tuple[int, bool]:
        """How many log-probs to ask for, and whether they give the exact entropy."""
        if self.server == "openai" and (policy.top_k is not None or policy.min_p > 0):
            raise ConfigError(
                "server='openai' cannot apply top_k or min_p, so the recorded entropy would not "
                "be the sampled policy's; unset them or use a vLLM server (server='vllm')"
            )
        k = self.top_logprobs
        if k is None:
            k = policy.top_k if (self.processed_logprobs and policy.top_k) else 20
        if self.chat and self.server == "openai":
            k = min(k, 20)
        exact = self.processed_logprobs and (
            (policy.top_k is not None and k >= policy.top_k)
            or (self.vocab_size > 0 and k >= self.vocab_size)
        )
        if policy.temperature == 0:
            exact = True
        self.approximate = not exact
        return int(k), exact

    def _probe_body(self) -> dict:
        """A short untruncated seeded request at temperature 1 that runs to its token limit."""
        probe = DecodingPolicy(temperature=1.0, max_new_tokens=PROBE_TOKENS)
        first = getattr(self.tokenizer, "bos_token_id", None)
        if first is None:
            first = self.eos_token_ids[0] if self.eos_token_ids else 0
        prompt = "Write one random word." if self.chat else [int(first)]
        body = self._body(prompt, PROBE_SEED, probe, 1)
        if self.server != "openai":  # more tokens to compare
            body["ignore_eos"] = True
        if self.server == "vllm":
            body["stop_token_ids"] = []
        return body

    def _body(self, prompt: Any, seed: int, policy: DecodingPolicy, k: int) -> dict:
        if self.server == "llama.cpp":
            return self._llama_cpp_body(prompt, seed, policy, k)
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": int(policy.max_new_tokens),
            "temperature": float(policy.temperature),
            "top_p": float(policy.top_p),
            "seed": seed,
            "n": 1,
            "stream": False,
        }
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
            body["logprobs"] = True
            body["top_logprobs"] = k
        else:
            body["prompt"] = list(map(int, prompt))
            body["logprobs"] = k
        if policy.stop_strings:
            body["stop"] = list(policy.stop_strings)
        if self.server == "vllm":
            body.update(
                top_k=int(policy.top_k) if policy.top_k else -1,
                min_p=float(policy.min_p),
                stop_token_ids=list(policy.eos_token_ids or self.eos_token_ids),
                ignore_eos=False,
                return_tokens_as_token_ids=True,
                skip_special_tokens=False,
            )
        body.update(self.extra_body)
        return body

    def _llama_cpp_body(self, prompt: Any, seed: int, policy: DecodingPolicy, k: int) -> dict:
        """llama.cpp native ``/completion``: post-sampling probabilities, canopy's sampler order."""
        body: dict[str, Any] = {
            "prompt": list(map(int, prompt)),
            "n_predict": int(policy.max_new_tokens),
            "temperature": float(policy.temperature),
            "top_k": int(policy.top_k) if policy.top_k else 0,
            "top_p": float(policy.top_p),
            "min_p": float(policy.min_p),
            "seed": seed,
            "n_probs": k,
            "post_sampling_probs": True,
            "samplers": LLAMA_CPP_SAMPLERS,
            "repeat_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "dry_multiplier": 0.0,
            "xtc_probability": 0.0,
            "typical_p": 1.0,
            "ignore_eos": False,
            "return_tokens": True,
            "cache_prompt": True,
            "stream": False,
        }
        if policy.stop_strings:
            body["stop"] = list(policy.stop_strings)
        body.update(self.extra_body)
        return body

    def _fetch(self, path: str, body: dict, k: int, full_cover: bool) -> Parsed:
        """POST with retries and parse the answer; the same body (same seed) is resent, so
        retries are idempotent. Transport errors, deadlines, retryable statuses and malformed
        answers are retried; other HTTP errors are reported at once."""
        httpx = self._httpx
        url = f"{self.base_url}{path}"
        last, malformed, wait = "no attempt made", False, 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._sleep(wait)
            with self._lock:
                self.requests_sent += 1
                wait = self.backoff * (2**attempt) * (1.0 + 0.25 * self._rng.random())
            malformed = False
            try:
                status, headers, raw = self._send(path, body)
            except (httpx.TransportError, httpx.DecodingError) as exc:  # dropped, timeout, ...
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            except _DeadlineExceeded:
                last = f"no complete answer within the deadline of {self.deadline:g} s"
                continue
            if status == 200:
                try:
                    return self._parse(_json_answer(raw, self.server), k, full_cover)
                except _Malformed as exc:
                    last, malformed = str(exc), True
                    continue
            if status in RETRY_STATUS:
                last = f"HTTP {status}"
                after = self._retry_after(headers.get("retry-after"))
                if after is not None:
                    wait = min(after, self.max_retry_after)
                continue
            raise CanopyError(
                f"{url} refused the request (HTTP {status}: {_server_message(raw)}); "
                "check the model name and the sampling options"
            )
        if malformed:
            raise CanopyError(
                f"{url} gave no usable answer in {self.max_retries + 1} tries (last: {last}); "
                "check that base_url points at an OpenAI-compatible server (vLLM: .../v1)"
            )
        raise CanopyError(
            f"{url}: no answer after {self.max_retries + 1} tries ({last}); "
            "check that the server is up, or raise max_retries / timeout / deadline"
        )

    def _send(self, path: str, body: dict) -> tuple[int, Any, bytes]:
        """One attempt: (status, headers, body bytes), read as a stream so the whole attempt
        stops at ``deadline`` even when every single read is within ``timeout``."""
        stop = self._monotonic() + self.deadline
        with self._client.stream("POST", path, json=body) as resp:
            chunks = []
            if self._monotonic() > stop:
                raise _DeadlineExceeded
            for chunk in resp.iter_bytes():
                chunks.append(chunk)
                if self._monotonic() > stop:
                    raise _DeadlineExceeded
            return resp.status_code, resp.headers, b"".join(chunks)

    def _retry_after(self, value: str | None) -> float | None:
        """Seconds asked for by a ``Retry-After`` header (delta-seconds or HTTP-date)."""
        if not value:
            return None
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            if when.tzinfo is None:  # an HTTP-date is GMT
                return None
            seconds = when.timestamp() - self._wallclock()
        return max(seconds, 0.0) if math.isfinite(seconds) else None

    # ------------------------------------------------------------------ parsing
    def _token_id(self, token: str | int) -> int:
        """The token id; unknown token strings get a distinct pseudo id <= -2 (never stored)."""
        if isinstance(token, int):
            return token
        if self.tokenizer is not None:
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != getattr(self.tokenizer, "unk_token_id", None):
                return tid
        return self._pseudo_ids.setdefault(token, -2 - len(self._pseudo_ids))

    def _parse(self, resp: dict, k: int, full_cover: bool) -> Parsed:
        """(tokens, sampled log-probs, top entries per step, finish reason, text) of an answer,
        checked: a null, non-finite or impossible log-prob raises ``_Malformed`` (retried).

        Tokens are ints (llama.cpp, ``token_id:N`` of vLLM) or token strings. With
        ``full_cover`` (exact entropy wanted) every step must list ``k`` entries or its
        whole mass."""
        if self.server == "llama.cpp":  # native format, post-sampling probabilities
            tokens, sampled, tops, finish, text = _llama_cpp_steps(resp)
        else:
            choice = resp["choices"][0]
            tokens, sampled, tops = self._steps(choice)
            msg = choice.get("message")
            text = msg.get("content") if isinstance(msg, dict) else choice.get("text")
            finish = choice.get("finish_reason")
        n = len(tokens)
        if not (n == len(sampled) == len(tops)):
            raise _Malformed("log-prob lists of different lengths")
        tokens = [_token_key(t) for t in tokens]
        tops = [[(_token_key(t), v) for t, v in row] for row in tops]
        sampled_lp = _logprobs(sampled, "sampled token")
        counts = np.array([len(row) for row in tops], dtype=np.int64)
        top_lp = _logprobs([v for row in tops for _, v in row], "top_logprobs")
        extra = np.array(
            [tok not in {t for t, _ in row} for tok, row in zip(tokens, tops, strict=True)],
            dtype=bool,
        )
        with np.errstate(under="ignore"):
            mass = np.bincount(np.repeat(np.arange(n), counts), np.exp(top_lp), minlength=n)
            mass = mass + np.where(extra, np.exp(sampled_lp), 0.0)
        if n and mass.max() > 1.0 + LOGPROB_SLACK:
            i = int(mass.argmax())
            raise _Malformed(f"step {i}: the listed probabilities sum to {mass[i]:.4g} > 1")
        if full_cover:
            want = min(k, self.vocab_size) if self.vocab_size else k
            short = (counts + extra < want) & (mass < 1.0 - MASS_TOLERANCE)
            if short.any():
                i = int(np.argmax(short))
                raise _Malformed(
                    f"step {i}: {int(counts[i])} top log-probs of the {want} asked for, covering "
                    f"mass {mass[i]:.4g}: the exact entropy cannot be computed"
                )
        return tokens, sampled_lp, tops, finish, text

    def _steps(self, choice: dict) -> tuple[list, list, list]:
        """(tokens, sampled log-probs, top entries per step) from a completions/chat choice."""
        lp = choice.get("logprobs")
        if not lp:
            raise CanopyError(
                f"{self.base_url} returned no logprobs; use a server that supports them "
                "(vLLM: raise --max-logprobs to the requested top_logprobs)"
            )
        try:
            if "content" in lp:  # chat format
                content = lp["content"] or []
                tokens = [c["token"] for c in content]
                sampled = [c["logprob"] for c in content]
                tops = [[(t["token"], t["logprob"]) for t in c["top_logprobs"]] for c in content]
            else:  # completions format
                tokens = list(lp["tokens"])
                sampled = list(lp["token_logprobs"])
                tops = lp["top_logprobs"]
                for i, d in enumerate(tops):
                    if not isinstance(d, dict):
                        kind = JSON_KINDS.get(type(d), "null")
                        raise _Malformed(
                            f"step {i}: the top_logprobs entry is {kind}, not an object"
                        )
                tops = [list(d.items()) for d in tops]
        except (KeyError, TypeError, AttributeError) as exc:  # null entries, wrong shapes
            raise _Malformed(f"malformed 'logprobs' ({type(exc).__name__}: {exc})") from None
        return tokens, sampled, tops

    def _to_batch(
        self,
        responses: list[Parsed | None],
        seeds: np.ndarray,
        rollout_indices: np.ndarray,
        policy: DecodingPolicy,
        exact: bool,
        k: int,
    ) -> RolloutBatch:
        """Parse one prompt's answers; the top list is cut to the ``k`` largest per step
        (servers add the sampled token to it), the sampled token is passed on its own."""
        eos = tuple(policy.eos_token_ids or self.eos_token_ids)
        lengths, finish, texts = [], [], []
        all_ids, all_lp, counts, top_ids, top_lp, extra_ids, extra_lp = [], [], [], [], [], [], []
        for resp in responses:
            assert resp is not None
            tokens, sampled, tops, finish_raw, text = resp
            ids = [self._token_id(t) for t in tokens]
            for top in tops:
                counts.append(len(top))
                top_ids.extend(self._token_id(t) for t, _ in top)
                top_lp.extend(v for _, v in top)
            extra_ids.extend(ids)
            extra_lp.append(sampled)
            all_ids.extend(ids)
            all_lp.append(sampled)
            lengths.append(len(ids))
            finish.append(_finish_reason(finish_raw, ids, eos))
            texts.append(text)
        ids_kk, lps_kk = pad_ragged(
            np.asarray(counts, dtype=np.int64),
            np.asarray(top_ids, dtype=np.int64),
            np.asarray(top_lp, dtype=np.float64),
        )
        if ids_kk.shape[1] > k:  # keep the k largest: only they bound the rest by p_K
            order = np.argsort(-lps_kk, axis=1, kind="stable")[:, :k]
            ids_kk = np.take_along_axis(ids_kk, order, axis=1)
            lps_kk = np.take_along_axis(lps_kk, order, axis=1)
        token_ids = np.asarray(all_ids, dtype=np.int64)
        token_ids = np.where(token_ids < 0, -1, token_ids).astype(np.int32)
        logprob = np.concatenate([np.zeros(0), *all_lp]).astype(np.float32)
        if policy.temperature == 0:
            steps = len(token_ids)
            entropy = np.zeros(steps, np.float32)
            upper = None
            eos_prob = np.isin(token_ids, np.asarray(eos, dtype=np.int64)).astype(np.float32)
            logprob = np.zeros(steps, np.float32)
        else:
            stats = topk_step_stats(
                ids_kk,
                lps_kk,
                eos,
                vocab_size=max(self.vocab_size, ids_kk.shape[1] + 1),
                exact_kept_set=exact,
                extra_ids=np.asarray(extra_ids, dtype=np.int64),
                extra_logprobs=np.concatenate([np.zeros(0), *extra_lp]),
            )
            entropy, upper, eos_prob = stats.entropy, stats.entropy_upper, stats.eos_prob
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return RolloutBatch(
            rollout_index=np.asarray(rollout_indices, dtype=np.int32),
            seed=np.asarray(seeds, dtype=np.int64),
            finish_reason=finish,
            offsets=offsets,
            token_ids=token_ids,
            entropy=entropy,
            eos_prob=eos_prob,
            logprob=logprob,
            kept_mass=None,
            entropy_upper=upper,
            text=texts,
        )


def _finish_reason(reason: str | None, ids: list[int], eos: tuple[int, ...]) -> str:
    if reason == "length":
        return "length"
    if ids and ids[-1] in eos:
        return "eos"
    return "stop"


class _Malformed(Exception):
    """A 200 answer that is not a usable completion (retried like a transport error)."""


class _DeadlineExceeded(Exception):
    """An attempt ran past the total per-request deadline."""


JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _json_answer(raw: bytes, server: str) -> dict:
    """The decoded answer object, or ``_Malformed`` saying what was expected."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise _Malformed("the answer was not JSON (cut off?)") from None
    want = "'completion_probabilities'" if server == "llama.cpp" else "a 'choices' list"
    if not isinstance(data, dict):
        kind = JSON_KINDS.get(type(data), "null")
        raise _Malformed(
            f"answered HTTP 200 with a JSON {kind}, expected a JSON object with {want}"
        )
    if server == "llama.cpp":
        ok = isinstance(data.get("completion_probabilities"), list)
    else:
        choices = data.get("choices")
        ok = isinstance(choices, list) and bool(choices) and isinstance(choices[0], dict)
    if not ok:
        raise _Malformed(f"answered HTTP 200 with a JSON object without {want}")
    return data


def _llama_cpp_steps(resp: dict) -> Parsed:
    """llama.cpp ``completion_probabilities`` (probabilities, not log-probs) as log-probs."""
    try:
        rows = resp["completion_probabilities"]
        tokens = [r["id"] for r in rows]
        probs = _probabilities([r["prob"] for r in rows])
        tops = [[(t["id"], t["prob"]) for t in r["top_probs"]] for r in rows]
    except (KeyError, TypeError) as exc:
        raise _Malformed(f"malformed 'completion_probabilities' ({exc!r})") from None
    flat = _probabilities([p for row in tops for _, p in row])
    with np.errstate(divide="ignore"):  # a sampled probability 0 is refused later
        sampled = np.log(probs).tolist()
        # a listed probability that underflowed to 0 is kept as the smallest positive one
        logs = iter(np.log(np.maximum(flat, np.finfo(np.float64).tiny)).tolist())
    tops = [[(t, next(logs)) for t, _ in row] for row in tops]
    finish = {"limit": "length", "eos": "stop", "word": "stop"}.get(resp.get("stop_type"))
    if resp.get("truncated"):
        finish = "length"
    return tokens, sampled, tops, finish, resp.get("content")


def _probabilities(values: list) -> np.ndarray:
    """Probabilities as float64, or ``_Malformed`` for a null, non-finite or > 1 value."""
    p = _floats(values, "probability")
    bad = ~((p >= 0) & (p <= 1.0 + LOGPROB_SLACK))
    if bad.any():
        raise _Malformed(f"probability {float(p[bad][0])} is not in [0, 1]")
    return p


def _logprobs(values: list, what: str) -> np.ndarray:
    """Log-probs as float64, or ``_Malformed`` for a null, non-finite or positive value."""
    lp = _floats(values, f"{what} log-prob")
    bad = ~(np.isfinite(lp) & (lp <= LOGPROB_SLACK))
    if bad.any():
        raise _Malformed(f"{what} log-prob {float(lp[bad][0])} is not a finite log-probability")
    return lp


def _floats(values: list, what: str) -> np.ndarray:
    """JSON numbers as float64 (no nulls, bools or strings), or ``_Malformed``."""
    numeric = (int, float)
    if not all(type(v) in numeric for v in values):
        bad = next(v for v in values if type(v) not in numeric)
        raise _Malformed(f"a {what} is {bad!r}, not a number")
    return np.asarray(values, dtype=np.float64).reshape(len(values))


def _token_key(token: Any) -> int | str:
    """A token as its id (int, ``token_id:N``) or its string; ``_Malformed`` otherwise."""
    if isinstance(token, int) and not isinstance(token, bool):
        return token
    if isinstance(token, str):
        if not token.startswith(TOKEN_ID_PREFIX):
            return token
        digits = token[len(TOKEN_ID_PREFIX) :]
        if digits.isdigit():
            return int(digits)
    raise _Malformed(f"token {token!r} is neither a token id nor a token string")


def _server_message(raw: bytes) -> str:
    """The server's error message from an error answer's body, on one line."""
    try:
        data = json.loads(raw)
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message", err) if isinstance(err, dict) else err
    except ValueError:
        msg = raw.decode("utf-8", "replace")
    return " ".join(str(msg).split())[:300]


def _load_tokenizer(name_or_path: Any) -> Any:
    """A HF tokenizer (for prompt rendering and token strings), or None if unavailable."""
    if name_or_path is None or not isinstance(name_or_path, str):
        return name_or_path
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception:  # served names need not be loadable tokenizers
        return None


def _eos_ids(name_or_path: Any, tokenizer: Any) -> list[int]:
    """Every EOS id of the model's generation config, else the tokenizer's EOS."""
    ids: list[int] = []
    if isinstance(name_or_path, str):
        try:
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(name_or_path).eos_token_id
            ids = [eos] if isinstance(eos, int) else list(eos or [])
        except Exception:
            ids = []
    if not ids and tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids = [int(tokenizer.eos_token_id)]
    return ids
