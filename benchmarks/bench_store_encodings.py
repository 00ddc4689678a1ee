"""Parquet options for the rollout shards: bytes per step and scan CPU-s, side by side.

Every option rewrites the same sample of shards (every ``--every``-th shard of a store from
``make_store.py``, or any canopy run folder) with ``pyarrow.parquet.write_table``, then times
the metrics stage's read of each rewrite (and the write, once) (the per-step float columns plus the per-rollout
scalars, one thread), interleaved over ``--repeats`` rounds, best of each. Bytes per step count
the whole file (footer included) against the stored steps. Prints a Markdown table; the first
row is what ``store.ROLLOUT_OPTIONS`` writes today.

    PYTHONPATH=src python benchmarks/bench_store_encodings.py --root /tmp/canopy-paper-0.1
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from canopy_entropy.metrics.columns import _READ_COLUMNS
from canopy_entropy.store import _DEFAULT_OPTIONS, ROLLOUT_OPTIONS, ROLLOUT_SCHEMA

LISTS = [f.name for f in ROLLOUT_SCHEMA if pa.types.is_list(f.type)]
SCALARS = [f.name for f in ROLLOUT_SCHEMA if not pa.types.is_list(f.type)]
FLOAT_LISTS = [n for n in LISTS if n != "token_ids"]


def _elements(names: list[str]) -> list[str]:
    return [f"{n}.list.element" for n in names]


def _with(**changes) -> dict:
    return {**ROLLOUT_OPTIONS, **changes}


OPTIONS: dict[str, dict] = {
    "current (ROLLOUT_OPTIONS)": dict(ROLLOUT_OPTIONS),
    "before: zstd 3, dictionaries, plain floats": dict(_DEFAULT_OPTIONS),
    "zstd 3 + byte-stream-split": _with(compression_level=3),
    "zstd 9 + byte-stream-split": _with(compression_level=9),
    "token ids plain (split floats only)": _with(use_byte_stream_split=_elements(FLOAT_LISTS)),
    "token ids dictionary": _with(
        use_dictionary=["token_ids.list.element"],
        use_byte_stream_split=_elements(FLOAT_LISTS),
    ),
    "token ids delta-binary-packed": {
        **{k: v for k, v in ROLLOUT_OPTIONS.items() if k != "use_byte_stream_split"},
        "column_encoding": {
            "token_ids.list.element": "DELTA_BINARY_PACKED",
            **dict.fromkeys(_elements(FLOAT_LISTS), "BYTE_STREAM_SPLIT"),
        },
    },
    "with min/max statistics for per-step lists": _with(write_statistics=True),
    "lz4 + byte-stream-split": _with(compression="lz4", compression_level=None),
    "with the Arrow schema copy in the footer": _with(store_schema=True),
    "zstd 15 (last landing)": _with(compression_level=15),
    "zstd 15, dictionaries and statistics for every scalar (last landing)": _with(
        compression_level=15, use_dictionary=SCALARS, write_statistics=SCALARS
    ),
    "zstd 19": _with(compression_level=19),
}


def _scan_cpu(files: list[Path]) -> float:
    t0 = time.process_time()
    for path in files:
        pq.read_table(path, columns=_READ_COLUMNS, use_threads=False)
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="a run folder (e.g. from make_store.py)")
    ap.add_argument("--every", type=int, default=10, help="sample every N-th shard")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    shards = sorted((Path(args.root) / "rollouts").glob("*.parquet"))[:: args.every]
    if not shards:
        raise SystemExit(f"error: no shards under {args.root}/rollouts")
    tables = [pq.read_table(p) for p in shards]
    steps = sum(int(pa.compute.sum(t["length"]).as_py()) for t in tables)
    work = Path(tempfile.mkdtemp(prefix="canopy-encodings-"))
    try:
        written: dict[str, list[Path]] = {}
        size: dict[str, int] = {}
        write: dict[str, float] = {}
        for i, (name, options) in enumerate(OPTIONS.items()):
            folder = work / str(i)
            folder.mkdir()
            paths = []
            t0 = time.process_time()
            for j, table in enumerate(tables):
                path = folder / f"{j}.parquet"
                pq.write_table(table, path, **options)
                paths.append(path)
            write[name] = time.process_time() - t0
            written[name] = paths
            size[name] = sum(p.stat().st_size for p in paths)
        for name, paths in written.items():  # lossless check: every rewrite reads back equal
            for path, table in zip(paths, tables, strict=True):
                if not pq.read_table(path).equals(table):
                    raise SystemExit(f"error: {name}: {path} does not read back equal")
        cpu: dict[str, list[float]] = {name: [] for name in OPTIONS}
        for r in range(args.repeats):
            names = list(OPTIONS)[:: 1 if r % 2 == 0 else -1]
            for name in names:
                cpu[name].append(_scan_cpu(written[name]))
        base = min(cpu["current (ROLLOUT_OPTIONS)"])
        print(f"{len(shards)} shards of {args.root}, {steps / 1e6:.2f} M steps")
        print("| options | bytes/step | write CPU-s | scan CPU-s | scan vs current |")
        print("|---|---|---|---|---|")
        for name in OPTIONS:
            best = min(cpu[name])
            print(
                f"| {name} | {size[name] / steps:.3f} | {write[name]:.2f} | {best:.2f} | "
                f"{best / base:.2f}x |"
            )
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
