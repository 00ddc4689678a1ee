"""Peak host memory of VLLMEngine calls at several length caps, as JSON on stdout.

Run in a fresh process (``python tests/vllm_memory_probe.py MODEL CAP...``) by
test_vllm_engine.py: the peak is the kernel's high-water mark (VmHWM), reset before each call.
"""

from __future__ import annotations

import gc
import json
import sys

import numpy as np


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_growth_mib(fn):
    """(peak RSS during ``fn()`` minus RSS before it, in MiB; what ``fn`` returned)."""
    gc.collect()
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    out = fn()
    return _status_mib("VmHWM") - before, out


def main(model: str, caps: list[int]) -> None:
    from canopy_entropy.engines.base import DecodingPolicy
    from canopy_entropy.engines.vllm import VLLMEngine

    eng = VLLMEngine(
        model, dtype="float32", kv_cache_memory_bytes=64 << 20, max_model_len=max(caps) + 16,
        enforce_eager=True, decode_text=False,
    )  # fmt: skip
    rollouts = 8
    request = ([1, 10, 11, 12], np.arange(rollouts, dtype=np.int64), np.arange(rollouts))

    def call(cap: int):
        # no top-k: the whole vocabulary's log-probs every step (the most vLLM holds)
        policy = DecodingPolicy(max_new_tokens=cap, eos_token_ids=eng.eos_token_ids)
        return eng.sample_many([request], policy)[0]

    call(16)  # warm-up
    control, _ = peak_growth_mib(lambda: bytearray(64 << 20))
    out = {"control_64mib": control, "rollouts": rollouts, "caps": {}}
    for cap in caps:
        growth, batch = peak_growth_mib(lambda cap=cap: call(cap))
        out["caps"][str(cap)] = {"growth_mib": growth, "steps": int(batch.offsets[-1])}
    eng.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], [int(c) for c in sys.argv[2:]])
