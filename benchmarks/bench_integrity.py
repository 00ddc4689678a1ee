"""Benchmark: read-time cost of each content-integrity check on a ~200 MB rollout store.

Builds (once, reused) a store with the real writer (page checksums + whole-file digest), then
times, interleaved in each round so every option sees the same machine load:

- scan: a streaming pyarrow scan of the columns ``compute_metrics`` reads, no checks (the
  reader before integrity checks);
- scan + page CRC: the same scan verifying every page's CRC32 while decoding;
- footer + scan + CRC: Parquet footer parse per file, then the CRC scan (the cheap option);
- digest + scan + CRC: ``RunStore.iter_batches`` (SHA-256 of every file, then the CRC scan);
- digest only / crc32 only: hashing every file alone (SHA-256 as used, zlib.crc32 to compare);
- compute_metrics: the whole metrics stage as it runs now, and with the digest check swapped
  for the footer-only check it had before.

Then flips one random bit at every byte of a small shard and counts, per check, how many flips
raise an error, leave the read columns equal, or change them silently.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/bench_integrity.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from bench_metrics import build
from canopy_entropy import store as st
from canopy_entropy.errors import StoreError
from canopy_entropy.metrics import compute_metrics
from canopy_entropy.metrics.columns import _READ_COLUMNS
from canopy_entropy.reference import FiniteStateLM


def scan(files: list[Path], fmt: ds.ParquetFileFormat) -> int:
    data = ds.dataset([str(p) for p in files], schema=st.ROLLOUT_SCHEMA, format=fmt)
    return sum(b.num_rows for b in data.to_batches(columns=_READ_COLUMNS, batch_size=4096))


def crc32_files(files: list[Path]) -> int:
    total = 0
    for path in files:
        crc = 0
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                crc = zlib.crc32(chunk, crc)
        total ^= crc
    return total


def footer_only(path: Path, schema_tag: str) -> bool:
    """The check before content digests: parse the footer and read the schema tag."""
    return pq.read_metadata(path).metadata[st.META_KEY].decode() == schema_tag


def metrics_footer_only(root: Path) -> None:
    digest_check, st.verify_file = st.verify_file, footer_only
    try:
        compute_metrics(root, warn=False)
    finally:
        st.verify_file = digest_check


def flip_coverage() -> None:
    """Flip one random bit of every byte of a small shard; count outcomes per check."""
    with tempfile.TemporaryDirectory() as tmp:
        FiniteStateLM.random(seed=1).sample_store(tmp, n_prompts=4, m=6, seed=0, max_new_tokens=30)
        path = st.RunStore(tmp).shard_files()[0]
        good = path.read_bytes()
        reference = pq.read_table(io.BytesIO(good), columns=_READ_COLUMNS)
        checks = {
            "none": lambda b: pq.read_table(io.BytesIO(b), columns=_READ_COLUMNS),
            "page CRC": lambda b: pq.read_table(
                io.BytesIO(b), columns=_READ_COLUMNS, page_checksum_verification=True
            ),
            "digest + page CRC": lambda b: (
                path.write_bytes(b)
                and st.read_table(path, st.SCHEMA_VERSION, columns=_READ_COLUMNS)
            ),
        }
        rng = np.random.default_rng(0)
        bits = rng.integers(0, 8, size=len(good))
        counts = {name: {"error": 0, "equal": 0, "silent": 0} for name in checks}
        for pos in range(len(good)):
            damaged = bytearray(good)
            damaged[pos] ^= 1 << int(bits[pos])
            for name, read in checks.items():
                try:
                    same = read(bytes(damaged)).equals(reference)
                except (StoreError, OSError, ValueError, pa.ArrowException):
                    counts[name]["error"] += 1
                    continue
                counts[name]["equal" if same else "silent"] += 1
    print(f"\nflips of one bit at each of {len(good)} bytes of a shard:")
    print("| check              | error | equal | silent |")
    print("|--------------------|-------|-------|--------|")
    for name, c in counts.items():
        print(f"| {name:<18} | {c['error']:5d} | {c['equal']:5d} | {c['silent']:6d} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/canopy-bench-integrity")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args()
    root = Path(args.root)
    tag = root / ".built-6-50-50-1000"
    if args.rebuild or not tag.exists():
        shutil.rmtree(root, ignore_errors=True)
        build(root, groups=6, prompts=50, rollouts=50, mean_length=1000.0)
        tag.touch()
    store = st.RunStore(root)
    files = store.shard_files()
    size = sum(p.stat().st_size for p in files)
    plain = ds.ParquetFileFormat()
    crc = st._verified_format()
    options = {
        "scan (no checks)": lambda: scan(files, plain),
        "scan + page CRC": lambda: scan(files, crc),
        "footer + scan + CRC": lambda: [pq.read_metadata(p) for p in files] and scan(files, crc),
        "digest + scan + CRC": lambda: sum(
            b.num_rows for b in store.iter_batches(columns=_READ_COLUMNS)
        ),
        "digest only (sha256)": lambda: [st.verify_file(p, st.SCHEMA_VERSION) for p in files],
        "crc32 only (zlib)": lambda: crc32_files(files),
        "compute_metrics": lambda: compute_metrics(root, warn=False),
        "compute_metrics, footer": lambda: metrics_footer_only(root),
    }
    for run in options.values():  # warm the page cache and every code path once
        run()
    wall: dict[str, list[float]] = {k: [] for k in options}
    cpu: dict[str, list[float]] = {k: [] for k in options}
    for _ in range(args.rounds):
        for name, run in options.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    base = statistics.median(wall["scan (no checks)"])
    base_cpu = statistics.median(cpu["scan (no checks)"])
    print(f"{len(files)} shards, {size / 1e6:.0f} MB, median of {args.rounds} interleaved rounds")
    print(f"| {'option':<23} | wall s | CPU s | wall / scan | CPU / scan |")
    print(f"|{'-' * 25}|--------|-------|-------------|------------|")
    for name in options:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"| {name:<23} | {w:6.2f} | {c:5.2f} | {w / base:11.2f} | {c / base_cpu:10.2f} |")
    flip_coverage()


if __name__ == "__main__":
    main()
