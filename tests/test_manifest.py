"""The typed run manifest: one writer for generate, import and the reference model; versions;
provenance that is never silently rebuilt."""

from __future__ import annotations

import json

import pytest

from canopy_entropy.engines.base import DecodingPolicy
from canopy_entropy.errors import ConfigError, StoreError
from canopy_entropy.generate import generate_run
from canopy_entropy.importer import import_jsonl
from canopy_entropy.metrics import compute_metrics
from canopy_entropy.reference import FiniteStateLM
from canopy_entropy.run.manifest import MANIFEST_SCHEMA, Manifest, read_manifest
from canopy_entropy.tasks.base import Prompt
from canopy_entropy.testing import build_tiny_model

LINES = [
    {"prompt_id": "a", "entropy": [0.5, 1.0], "eos_prob": [0.1, 0.6], "finish_reason": "eos"},
    {"prompt_id": "a", "entropy": [0.7, 0.2, 0.1], "finish_reason": "length"},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny")


def _jsonl(path, lines=LINES):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_generate_after_import_works_and_records_both(tmp_path, tiny):
    run = tmp_path / "run"
    import_jsonl(_jsonl(tmp_path / "r.jsonl"), run, model="ext", variant="base", max_new_tokens=3)
    generate_run(
        run,
        model=str(tiny),
        prompts=[Prompt("p1", "Once upon a time", "stories")],
        rollouts=2,
        policy=DecodingPolicy(top_k=40, max_new_tokens=8),
        model_label="tiny",
        device="cpu",
        seed=3,
    )
    m = read_manifest(run)
    assert m.models["ext"].source == "import" and m.models["ext"].policy.max_new_tokens == 3
    assert m.models["tiny"].source == "generate" and m.models["tiny"].policy.top_k == 40
    assert m.models["tiny"].policy.eos_token_ids == (2, 4) and m.policy.max_new_tokens == 8
    assert m.seed_scheme.run_seed == 3 and len(m.imports) == 1
    pooled = compute_metrics(run, by=["model"], warn=False).pooled.set_index("model")
    assert pooled.loc["ext", "n_rollouts"] == 2 and pooled.loc["tiny", "n_rollouts"] == 2
    # importing under the generated label is refused before anything is written
    with pytest.raises(Exception, match="made by 'generate'"):
        import_jsonl(_jsonl(tmp_path / "s.jsonl"), run, model="tiny", variant="base")
    assert len(read_manifest(run).imports) == 1


def test_generate_under_an_imported_label_is_refused(tmp_path, tiny):
    run = tmp_path / "run"
    import_jsonl(_jsonl(tmp_path / "r.jsonl"), run, model="tiny", variant="base")
    with pytest.raises(ConfigError, match="made by 'import'"):
        generate_run(
            run,
            model=str(tiny),
            prompts=[Prompt("p1", "Once upon a time", "stories")],
            rollouts=2,
            policy=DecodingPolicy(top_k=40, max_new_tokens=8),
            model_label="tiny",
            device="cpu",
        )


def test_missing_manifest_with_rollouts_is_an_error_not_a_rebuild(tmp_path):
    run = tmp_path / "run"
    import_jsonl(_jsonl(tmp_path / "r.jsonl"), run, model="ext", variant="base")
    (run / "manifest.json").unlink()
    with pytest.raises(StoreError, match=r"holds rollouts but no manifest\.json"):
        read_manifest(run)
    with pytest.raises(StoreError, match=r"restore manifest\.json"):
        import_jsonl(_jsonl(tmp_path / "s.jsonl", LINES[:1]), run, model="x", variant="base")
    assert not (run / "manifest.json").exists()


def test_unknown_version_and_damage_are_one_line_errors(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": "canopy-manifest/9"}))
    with pytest.raises(StoreError, match=r"manifest version .canopy-manifest/9.*upgrade"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(StoreError, match="not a canopy manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"schema": "canopy-manifest/2", "models": {"m": 3}}')
    with pytest.raises(StoreError, match="damaged"):
        read_manifest(tmp_path)


def test_version_1_documents_are_upgraded_in_memory(tmp_path):
    v1 = {
        "schema": "canopy-manifest/1",
        "policy": {"temperature": 1.0, "top_k": 100, "top_p": 1.0, "min_p": 0.0,
                   "max_new_tokens": 64, "eos_token_ids": [], "stop_strings": []},
        "seed_scheme": {"run_seed": 5, "common_random_numbers": False, "scheme": "hash"},
        "models": {"g": {"model": "org/g", "variant": "base", "family": "g", "rollouts": 4,
                         "vocab_size": 1000, "engine": {"engine": "hf"},
                         "resolved_policy": {"temperature": 1.0, "top_k": 100, "top_p": 1.0,
                                             "min_p": 0.0, "max_new_tokens": 64,
                                             "eos_token_ids": [2], "stop_strings": []}}},
        "imports": [{"source": "x.jsonl", "sha256": "ab", "n_rollouts": 2, "shards": ["s"],
                     "flags": {"model": "ext", "variant": "instruct", "max_new_tokens": 9}}],
    }  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps(v1))
    m = read_manifest(tmp_path)
    assert m.models["g"].policy.eos_token_ids == (2,) and m.models["g"].seed_scheme.run_seed == 5
    assert m.models["ext"].source == "import" and m.max_new_tokens("ext") == 9
    assert m.models["g"].h_max == pytest.approx(__import__("math").log(100))
    # an imported/reference-only v1 folder has no run-level generate policy
    (tmp_path / "manifest.json").write_text(
        json.dumps({"policy": {"max_new_tokens": 4}, "seed_scheme": "imported: unknown"})
    )
    assert read_manifest(tmp_path).policy is None and read_manifest(tmp_path).seed_scheme is None


def test_round_trip_and_reference_writer(tmp_path):
    lm = FiniteStateLM.random(seed=0)
    lm.sample_store(tmp_path, n_prompts=2, m=3, seed=1, max_new_tokens=20, model="ref")
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert doc["schema"] == MANIFEST_SCHEMA
    m = read_manifest(tmp_path)
    assert m.models["ref"].source == "reference" and m.models["ref"].policy.max_new_tokens == 20
    assert Manifest.from_dict(m.to_dict()) == m
