"""The run manifest: one typed, versioned record of how a run folder's rollouts were made.

``RUN/manifest.json`` holds, per model label, what was sampled (model, variant, family, rollouts
per prompt), with which resolved decoding policy, seed scheme, EOS ids, vocabulary size, engine
facts (tokenizer hashes, versions) and whether entropies are exact; plus the run's requested
policy and seed scheme (generate refuses to continue a folder with others), the imports and the
experiment config. Generate, import and the reference model all write it through
``update_manifest`` (read-modify-write under a file lock); every reader gets a ``Manifest``.

Version 1 files (written before the typed manifest) are read and upgraded in memory; a file of
an unknown version is an error naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from canopy_entropy.errors import StoreError

MANIFEST_SCHEMA = "canopy-manifest/2"
_OLD_SCHEMAS = (None, "canopy-manifest/1")
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class PolicyRecord:
    """A decoding policy as recorded (None: not known, e.g. for imported rollouts)."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    max_new_tokens: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    @classmethod
    def from_policy(cls, policy: Any) -> PolicyRecord:
        """From an engine ``DecodingPolicy``."""
        return cls(
            temperature=float(policy.temperature),
            top_k=None if policy.top_k is None else int(policy.top_k),
            top_p=float(policy.top_p),
            min_p=float(policy.min_p),
            max_new_tokens=int(policy.max_new_tokens),
            eos_token_ids=tuple(int(x) for x in policy.eos_token_ids),
            stop_strings=tuple(str(s) for s in policy.stop_strings),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> PolicyRecord:
        d = d or {}
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["eos_token_ids"] = tuple(kw.get("eos_token_ids") or ())
        kw["stop_strings"] = tuple(kw.get("stop_strings") or ())
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["stop_strings"] = list(self.stop_strings)
        return d

    def differences(self, other: PolicyRecord) -> list[str]:
        """Names of the fields whose values differ."""
        a, b = self.to_dict(), other.to_dict()
        return sorted(k for k in a if a[k] != b[k])


@dataclass(frozen=True)
class SeedScheme:
    """How rollout randomness was derived: ``kind`` is 'counter-hash' (canopy's engines),
    'imported' (seeds as given, -1 when unknown) or 'reference' (the exact toy model)."""

    kind: str
    run_seed: int | None = None
    common_random_numbers: bool = False
    description: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any] | str | None) -> SeedScheme | None:
        if d is None:
            return None
        if isinstance(d, str):  # version 1 import / reference manifests
            kind = "imported" if d.startswith("imported") else "reference"
            return cls(kind=kind, description=d)
        kind = d.get("kind") or "counter-hash"
        return cls(
            kind=kind,
            run_seed=d.get("run_seed"),
            common_random_numbers=bool(d.get("common_random_numbers", False)),
            description=d.get("description") or d.get("scheme") or "",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelRecord:
    """One model label of the run: what was sampled and how."""

    label: str
    model: str
    variant: str
    family: str
    source: str  # 'generate', 'import' or 'reference'
    rollouts: int | None = None  # rollouts per prompt (None: as many as were imported)
    policy: PolicyRecord = field(default_factory=PolicyRecord)  # resolved (engine EOS ids)
    seed_scheme: SeedScheme | None = None
    vocab_size: int | None = None
    context_length: int | None = None
    engine: dict[str, Any] = field(default_factory=dict)  # engine facts, tokenizer hashes
    approximate: bool = False  # entropies from top-k logprobs only (bounds, not exact)
    versions: dict[str, str] = field(default_factory=dict)
    series: str | None = None  # checkpoint series (None: not part of one; older manifests)
    step: int | None = None  # its step within the series
    enable_thinking: bool = False  # prompts rendered with the chat template's thinking on

    @property
    def tokenizer_sha256(self) -> str | None:
        return self.engine.get("tokenizer_sha256")

    @property
    def h_max(self) -> float | None:
        """Largest possible per-step entropy: log of the smaller of top_k and the vocabulary."""
        import math

        sizes = [int(v) for v in (self.policy.top_k, self.vocab_size) if v]
        return math.log(min(sizes)) if sizes else None

    @classmethod
    def from_dict(cls, label: str, d: dict[str, Any]) -> ModelRecord:
        return cls(
            label=label,
            model=str(d.get("model", label)),
            variant=str(d.get("variant", "")),
            family=str(d.get("family", "")),
            source=str(d.get("source", "generate")),
            rollouts=d.get("rollouts"),
            policy=PolicyRecord.from_dict(d.get("policy")),
            seed_scheme=SeedScheme.from_dict(d.get("seed_scheme")),
            vocab_size=d.get("vocab_size"),
            context_length=d.get("context_length"),
            engine=dict(d.get("engine") or {}),
            approximate=bool(d.get("approximate", False)),
            versions=dict(d.get("versions") or {}),
            series=d.get("series") or None,
            step=None if d.get("step") is None else int(d["step"]),
            enable_thinking=bool(d.get("enable_thinking", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["label"]
        d["policy"] = self.policy.to_dict()
        d["seed_scheme"] = None if self.seed_scheme is None else self.seed_scheme.to_dict()
        return d


@dataclass(frozen=True)
class ImportRecord:
    """One ``canopy import`` of a JSONL file."""

    source: str
    sha256: str
    flags: dict[str, Any]
    n_rollouts: int
    shards: tuple[str, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImportRecord:
        return cls(
            source=str(d["source"]),
            sha256=str(d["sha256"]),
            flags=dict(d.get("flags") or {}),
            n_rollouts=int(d.get("n_rollouts", 0)),
            shards=tuple(d.get("shards") or ()),
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shards"] = list(self.shards)
        return d


@dataclass(frozen=True)
class Manifest:
    """The typed content of ``RUN/manifest.json``."""

    run: str = ""
    models: dict[str, ModelRecord] = field(default_factory=dict)
    policy: PolicyRecord | None = None  # the run's requested policy (set by generate)
    seed_scheme: SeedScheme | None = None  # the run's seed scheme (set by generate)
    imports: tuple[ImportRecord, ...] = ()
    experiment: dict[str, Any] | None = None  # the resolved config of ``canopy run``

    @property
    def approximate(self) -> bool:
        """True when any model's entropies are bounds rather than exact values."""
        return any(m.approximate for m in self.models.values())

    def model(self, label: str) -> ModelRecord | None:
        return self.models.get(label)

    def max_new_tokens(self, label: str) -> int | None:
        """The length cap T of ``label``'s rollouts, when recorded."""
        m = self.models.get(label)
        return m.policy.max_new_tokens if m is not None else None

    def with_model(self, record: ModelRecord) -> Manifest:
        return dataclasses.replace(self, models={**self.models, record.label: record})

    def with_checkpoints(self, steps: dict[str, tuple[str | None, int | None]]) -> Manifest:
        """The manifest with (series, step) set on the named model labels (others kept)."""
        models = dict(self.models)
        for label, (series, step) in steps.items():
            if label in models:
                models[label] = dataclasses.replace(models[label], series=series, step=step)
        return dataclasses.replace(self, models=models)

    def with_import(self, record: ImportRecord) -> Manifest:
        kept = tuple(i for i in self.imports if i.sha256 != record.sha256)
        return dataclasses.replace(self, imports=(*kept, record))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": MANIFEST_SCHEMA,
            "run": self.run,
            "models": {k: m.to_dict() for k, m in sorted(self.models.items())},
            "policy": None if self.policy is None else self.policy.to_dict(),
            "seed_scheme": None if self.seed_scheme is None else self.seed_scheme.to_dict(),
            "imports": [i.to_dict() for i in self.imports],
            "experiment": self.experiment,
            "approximate": self.approximate,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | str = MANIFEST_NAME) -> Manifest:
        """Parse (and upgrade a version-1 document); unknown versions are a StoreError."""
        if not isinstance(d, dict):
            raise StoreError(f"{path} is not a canopy manifest (not a JSON object); restore it")
        schema = d.get("schema")
        if schema not in (MANIFEST_SCHEMA, *_OLD_SCHEMAS):
            raise StoreError(
                f"{path} has manifest version {schema!r}, which this canopy-entropy does not "
                f"know (it reads {MANIFEST_SCHEMA}); upgrade canopy-entropy"
            )
        if schema != MANIFEST_SCHEMA:
            d = _upgrade_v1(d)
        try:
            return cls(
                run=str(d.get("run") or ""),
                models={k: ModelRecord.from_dict(k, v) for k, v in (d.get("models") or {}).items()},
                policy=None if d.get("policy") is None else PolicyRecord.from_dict(d["policy"]),
                seed_scheme=SeedScheme.from_dict(d.get("seed_scheme")),
                imports=tuple(ImportRecord.from_dict(i) for i in d.get("imports") or ()),
                experiment=d.get("experiment"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreError(f"{path} is damaged ({exc}); restore it from a backup") from exc


def _upgrade_v1(d: dict[str, Any]) -> dict[str, Any]:
    """Version 1: generate wrote per-model ``resolved_policy`` and a run-level policy; import
    and the reference model wrote policies at the run level or per model."""
    d = dict(d)
    run_policy = d.get("policy")
    run_seed = d.get("seed_scheme")
    models = {}
    for label, m in (d.get("models") or {}).items():
        m = dict(m)
        if "resolved_policy" in m:
            m["policy"] = m.pop("resolved_policy")
            m.setdefault("source", "generate")
            m.setdefault("seed_scheme", run_seed)
        elif m.get("engine") == "reference-fsm":
            m["engine"] = {"engine": "reference-fsm"}
            m.setdefault("source", "reference")
            m.setdefault("seed_scheme", run_seed)
        m.setdefault("policy", run_policy)
        models[label] = m
    for imp in d.get("imports") or ():  # version 1 kept imported models only in the flags
        flags = imp.get("flags") or {}
        label = flags.get("model")
        if label and label not in models:
            models[label] = {
                "model": label,
                "variant": flags.get("variant", ""),
                "family": flags.get("family") or label,
                "source": "import",
                "policy": {"max_new_tokens": flags.get("max_new_tokens")},
                "seed_scheme": {"kind": "imported", "description": str(run_seed or "")},
            }
    d["models"] = models
    if isinstance(run_seed, str):  # the run-level record belongs to generate only
        d["seed_scheme"] = None
    if run_policy is not None and not any(m.get("source") == "generate" for m in models.values()):
        d["policy"] = None
    return d


# ------------------------------------------------------------------------------------------
# reading and writing


def manifest_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / MANIFEST_NAME


def read_manifest(run_dir: str | os.PathLike[str], *, missing_ok: bool = False) -> Manifest:
    """The run's manifest; an empty Manifest for a new folder. Rollouts without a manifest are
    an error (a writer must never silently rebuild it) unless ``missing_ok``: readers of bare
    shards, and a writer that just committed a folder's first shards."""
    path = manifest_path(run_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        rollouts = Path(run_dir) / "rollouts"
        if not missing_ok and rollouts.is_dir() and any(rollouts.glob("*.parquet")):
            raise StoreError(
                f"{run_dir} holds rollouts but no manifest.json (how they were made is lost); "
                "restore manifest.json from a backup, or move rollouts/ away and generate or "
                "import them again"
            ) from None
        return Manifest()
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"cannot read {path} ({exc}); restore it from a backup") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path} is not valid JSON ({exc.msg}); restore it from a backup") from exc
    return Manifest.from_dict(doc, path)


def write_manifest(run_dir: str | os.PathLike[str], manifest: Manifest) -> None:
    """Write the manifest atomically (use ``update_manifest`` to change one)."""
    from canopy_entropy.store import atomic_write_json

    atomic_write_json(manifest_path(run_dir), manifest.to_dict())


@contextlib.contextmanager
def _manifest_lock(run_dir: Path) -> Iterator[None]:
    import fcntl

    lock = run_dir / ".canopy" / "manifest.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def update_manifest(
    run_dir: str | os.PathLike[str], change: Callable[[Manifest], Manifest]
) -> Manifest:
    """Read, change and write the manifest under an exclusive lock (concurrent writers safe)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with _manifest_lock(run_dir):
        new = change(read_manifest(run_dir, missing_ok=True))
        write_manifest(run_dir, new)
    return new
