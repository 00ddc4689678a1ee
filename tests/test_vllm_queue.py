"""vLLM engine logic that needs no vLLM: declared options and the replica work queue."""

from __future__ import annotations

import numpy as np
import pytest

from canopy_entropy.engines.base import DecodingPolicy
from canopy_entropy.engines.vllm import VLLMEngine, VLLMOptions, _Compact, _feed_and_collect
from canopy_entropy.errors import ConfigError

POLICY = DecodingPolicy(temperature=1.0, top_k=5, max_new_tokens=8, eos_token_ids=(2,))


def test_options_are_declared_and_checked_before_vllm_is_needed():
    assert VLLMEngine.OPTIONS["data_parallel_size"] is int
    assert VLLMEngine.OPTIONS["prompts_per_call"] is int
    assert set(VLLMEngine.OPTIONS) == set(VLLMOptions.__dataclass_fields__)
    with pytest.raises(ConfigError, match="did you mean 'data_parallel_size'") as info:
        VLLMEngine("m", data_paralel_size=2)
    assert "\n" not in str(info.value) and "llm_kwargs" in str(info.value)
    with pytest.raises(ConfigError, match="'prompts_per_call' must be int"):
        VLLMEngine("m", prompts_per_call="16")
    with pytest.raises(ConfigError, match="rollouts_in_flight must be >= 1"):
        VLLMEngine("m", rollouts_in_flight=0)
    with pytest.raises(ConfigError, match="unknown data_parallel_backend 'slurm'"):
        VLLMEngine("m", data_parallel_backend="slurm")


def test_llm_arguments_pass_llm_kwargs_through_and_leave_unset_ones_to_vllm():
    kw = VLLMOptions.parse(
        {"max_num_seqs": 8, "llm_kwargs": {"swap_space": 0, "seed": 5}}
    ).llm_arguments()
    assert kw["max_num_seqs"] == 8 and kw["swap_space"] == 0 and kw["seed"] == 5
    assert kw["logprobs_mode"] == "processed_logprobs" and "kv_cache_memory_bytes" not in kw


def _one_rollout(row: int, tokens: np.ndarray) -> _Compact:
    zeros = np.zeros(len(tokens), np.float32)
    return _Compact(np.array([row]), np.array([len(tokens)]), ["eos"], tokens, zeros, zeros, zeros)


class FakeReplica:
    """Finishes its oldest rollout every ``every``-th wait (a slow replica has a large one)."""

    def __init__(self, every: int) -> None:
        self.every, self.ticks, self.queue, self.done_rows = every, 0, [], []
        self.max_queued = 0

    def feed(self, rows, prompts, seeds, policy, eos):
        assert len(rows) == len(prompts) == len(seeds)
        self.queue.extend(zip(rows.tolist(), seeds.tolist(), strict=True))
        self.max_queued = max(self.max_queued, len(self.queue))

    def reset(self):
        self.queue.clear()

    @staticmethod
    def wait(handles):
        got = []
        for h in handles:
            h.ticks += 1
            if h.queue and h.ticks % h.every == 0:
                row, seed = h.queue.pop(0)
                h.done_rows.append(row)
                n = seed % 3 + 1  # a rollout of 1-3 steps whose tokens encode its seed
                got.append((h, _one_rollout(row, np.full(n, seed, np.int32))))
        return got


def test_replicas_are_topped_up_from_one_queue():
    """A replica 4x slower than the other gets about a fifth of the rollouts (a static split
    would give it half), no replica holds more than its window, and every rollout comes back
    exactly once with its own seed."""
    fast, slow = FakeReplica(every=1), FakeReplica(every=4)
    seeds = np.arange(100, 200, dtype=np.int64)
    prompts = [[1, 2]] * len(seeds)
    results = list(_feed_and_collect([fast, slow], 3, prompts, seeds, POLICY, (2,)))
    rows = np.concatenate([c.rows for c in results])
    assert sorted(rows.tolist()) == list(range(100))
    for c in results:
        assert c.token_ids.tolist() == [int(seeds[c.rows[0]])] * int(c.lengths[0])
    assert max(fast.max_queued, slow.max_queued) == 3
    assert 12 <= len(slow.done_rows) <= 28 and len(fast.done_rows) >= 72


def test_a_stopped_consumer_resets_the_replicas():
    a, b = FakeReplica(every=1), FakeReplica(every=1)
    stream = _feed_and_collect([a, b], 4, [[1]] * 20, np.arange(20), POLICY, (2,))
    next(stream)
    assert a.queue and b.queue
    stream.close()
    assert not a.queue and not b.queue
