"""Sampling through an OpenAI-compatible HTTP server (vLLM serve, llama.cpp, hosted APIs).

Each rollout is ONE request keyed by its own seed (``n = 1``), so a retried request after a
dropped connection reproduces the same rollout and writes the same slot: nothing is lost or
duplicated. Requests run on a thread pool with a concurrency limit, a timeout, and retries
with exponential backoff on connection errors, timeouts, 408/409/429 and 5xx answers.

Per step the server returns the top-K log-probs. Where they cover the policy's kept set
(vLLM started with ``--logprobs-mode processed_logprobs`` and ``top_logprobs >= top_k``:
pass ``processed_logprobs=True``) the entropy is exact. Otherwise (hosted APIs, top-20) the
step entropy is bracketed: ``entropy`` holds the lower bound, ``entropy_upper`` the upper
bound (see ``engines/topk.py``) and ``engine.approximate`` is True so the run is marked.
"""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from canopy_entropy.engines.base import DecodingPolicy, Engine, RolloutBatch
from canopy_entropy.engines.topk import topk_step_stats
from canopy_entropy.errors import CanopyError, ConfigError, require

TOKEN_ID_PREFIX = "token_id:"
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
SERVERS = ("vllm", "openai", "llama.cpp")
# llama.cpp applies its samplers in this order; SPEC order is temperature first.
LLAMA_CPP_SAMPLERS = ["temperature", "top_k", "top_p", "min_p"]


class OpenAIEngine(Engine):
    """Rollouts from an OpenAI-compatible ``/v1/completions`` (or ``/v1/chat/completions``).

    ``server="vllm"`` also sends vLLM's extra fields (``top_k``, ``min_p``,
    ``stop_token_ids`` = every EOS id, ``return_tokens_as_token_ids``) so token ids are exact
    and the policy is the one configured; ``server="openai"`` sends only standard fields and
    refuses policies the API cannot apply (top-k, min-p).
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        chat: bool = False,
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        tokenizer: Any = None,
        top_logprobs: int | None = None,
        processed_logprobs: bool = False,
        server: str = "vllm",
        vocab_size: int | None = None,
        eos_token_ids: list[int] | tuple[int, ...] | None = None,
        context_length: int | None = None,
        extra_body: dict | None = None,
    ) -> None:
        httpx = require("httpx", "openai")
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise ConfigError(
                "engine 'openai' needs the server address: set engine option base_url "
                "(e.g. http://127.0.0.1:8000/v1) or OPENAI_BASE_URL"
            )
        if server not in SERVERS:
            raise ConfigError(f"unknown server kind '{server}'; use one of {list(SERVERS)}")
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1 (got {concurrency})")
        if max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0 (got {max_retries})")
        if top_logprobs is not None and top_logprobs < 1:
            raise ConfigError(f"top_logprobs must be >= 1 (got {top_logprobs})")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.chat = bool(chat)
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.top_logprobs = top_logprobs
        # llama.cpp's post-sampling probabilities are those of the sampled policy
        self.processed_logprobs = bool(processed_logprobs) or server == "llama.cpp"
        self.server = server
        if server == "llama.cpp" and chat:
            raise ConfigError("server='llama.cpp' uses the native /completion endpoint; chat=False")
        self.extra_body = dict(extra_body or {})
        self.approximate = not self.processed_logprobs
        # tokenizer=False: none at all (token ids must come from the server).
        source = None if tokenizer is False else (tokenizer if tokenizer is not None else model)
        self.tokenizer = _load_tokenizer(source)
        if eos_token_ids is None:
            eos_token_ids = _eos_ids(source, self.tokenizer)
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        if vocab_size is None and self.tokenizer is not None:
            vocab_size = len(self.tokenizer)
        self.vocab_size = int(vocab_size or 0)
        self.context_length = context_length
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(max_connections=self.concurrency),
        )
        self._httpx = httpx
        self._rng = random.Random()
        self._rng_lock = threading.Lock()
        self.requests_sent = 0  # attempts, for tests and the manifest
        self._pseudo_ids: dict[str, int] = {}

    # ------------------------------------------------------------------ contract
    def describe(self) -> dict:
        """Facts for the manifest (never the API key)."""
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
        }

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
        self._pseudo_ids: dict[str, int] = {}
        jobs = []
        for r, (prompt, seeds, _) in enumerate(requests):
            if self.chat and not isinstance(prompt, str):
                raise ConfigError(
                    "chat mode sends the user message, not token ids; call sample_chat(text, ...) "
                    "or use chat=False with the completions endpoint"
                )
            for j, seed in enumerate(np.asarray(seeds, dtype=np.int64)):
                jobs.append((r, j, self._body(prompt, int(seed), policy, k)))
        results: list[list[dict | None]] = [[None] * len(req[1]) for req in requests]
        path = "/chat/completions" if self.chat else "/completions"
        if self.server == "llama.cpp":
            path = "/completion"
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [(r, j, pool.submit(self._post, path, body)) for r, j, body in jobs]
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
        """llama.cpp native ``/completion``: post-sampling probabilities, SPEC sampler order."""
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

    def _post(self, path: str, body: dict) -> dict:
        """POST with retries; the same body (same seed) is resent, so retries are idempotent."""
        httpx = self._httpx
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._rng_lock:
                    jitter = 1.0 + 0.25 * self._rng.random()
                time.sleep(self.backoff * (2 ** (attempt - 1)) * jitter)
            self.requests_sent += 1
            try:
                resp = self._client.post(path, json=body)
            except httpx.TransportError as exc:  # dropped connection, timeout, refused
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            if resp.status_code == 200:
                try:
                    data = resp.json()
                    if data.get("choices") or "completion_probabilities" in data:
                        return data
                    last = "answer without choices / completion_probabilities"
                except ValueError:
                    last = "answer was not JSON (cut off?)"
                continue
            if resp.status_code in RETRY_STATUS:
                last = f"HTTP {resp.status_code}"
                continue
            raise CanopyError(
                f"{self.base_url}{path} refused the request (HTTP {resp.status_code}: "
                f"{_server_message(resp)}); check the model name and the sampling options"
            )
        raise CanopyError(
            f"{self.base_url}{path}: no answer after {self.max_retries + 1} tries ({last}); "
            "check that the server is up, or raise max_retries / timeout"
        )

    # ------------------------------------------------------------------ parsing
    def _token_id(self, token: str | int) -> int:
        """The token id; unknown token strings get a distinct pseudo id <= -2 (never stored)."""
        if isinstance(token, int):
            return token
        if token.startswith(TOKEN_ID_PREFIX):
            return int(token[len(TOKEN_ID_PREFIX) :])
        if self.tokenizer is not None:
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != getattr(self.tokenizer, "unk_token_id", None):
                return tid
        return self._pseudo_ids.setdefault(token, -2 - len(self._pseudo_ids))

    def _parse(self, resp: dict) -> tuple[list, list, list, str | None, str | None]:
        """(tokens, sampled log-probs, top entries per step, finish reason, text) of an answer.

        Tokens are ints (llama.cpp) or token strings (``token_id:N`` with vLLM)."""
        if "completion_probabilities" in resp:  # llama.cpp native, post-sampling probs
            rows = resp["completion_probabilities"] or []
            with np.errstate(divide="ignore"):
                tokens = [int(r["id"]) for r in rows]
                sampled = [float(np.log(r["prob"])) for r in rows]
                tops = [
                    [(int(t["id"]), float(np.log(t["prob"]))) for t in r["top_probs"]] for r in rows
                ]
            finish = {"limit": "length", "eos": "stop", "word": "stop"}.get(resp.get("stop_type"))
            if resp.get("truncated"):
                finish = "length"
            return tokens, sampled, tops, finish, resp.get("content")
        choice = resp["choices"][0]
        tokens, sampled, tops = self._steps(choice)
        msg = choice.get("message")
        text = msg.get("content") if isinstance(msg, dict) else choice.get("text")
        return tokens, sampled, tops, choice.get("finish_reason"), text

    def _steps(self, choice: dict) -> tuple[list[str], list[float], list[list[tuple[str, float]]]]:
        """(tokens, sampled log-probs, top entries per step) from a completions/chat choice."""
        lp = choice.get("logprobs")
        if not lp:
            raise CanopyError(
                f"{self.base_url} returned no logprobs; use a server that supports them "
                "(vLLM: raise --max-logprobs to the requested top_logprobs)"
            )
        if "content" in lp:  # chat format
            content = lp["content"] or []
            tokens = [c["token"] for c in content]
            sampled = [c["logprob"] for c in content]
            tops = [
                [(t["token"], t["logprob"]) for t in (c.get("top_logprobs") or [])] for c in content
            ]
        else:  # completions format
            tokens = list(lp.get("tokens") or [])
            sampled = list(lp.get("token_logprobs") or [])
            tops = [list((d or {}).items()) for d in (lp.get("top_logprobs") or [])]
        if not (len(tokens) == len(sampled) == len(tops)):
            raise CanopyError(f"{self.base_url} returned logprobs of mismatched lengths")
        return tokens, sampled, tops

    def _to_batch(
        self,
        responses: list[dict | None],
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
            tokens, sampled, tops, finish_raw, text = self._parse(resp)
            ids = [self._token_id(t) for t in tokens]
            for tid, slp, top in zip(ids, sampled, tops, strict=True):
                counts.append(len(top))
                top_ids.extend(self._token_id(t) for t, _ in top)
                top_lp.extend(float(v) if v is not None else -np.inf for _, v in top)
                extra_ids.append(tid)
                extra_lp.append(-np.inf if slp is None else float(slp))
            all_ids.extend(ids)
            all_lp.extend(-np.inf if v is None else float(v) for v in sampled)
            lengths.append(len(ids))
            finish.append(_finish_reason(finish_raw, ids, eos))
            texts.append(text)
        from canopy_entropy.engines.topk import pad_ragged

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
        logprob = np.asarray(all_lp, dtype=np.float32)
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
                extra_logprobs=np.asarray(extra_lp, dtype=np.float64),
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


def _server_message(resp: Any) -> str:
    try:
        data = resp.json()
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message", err) if isinstance(err, dict) else err
    except ValueError:
        msg = resp.text
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
