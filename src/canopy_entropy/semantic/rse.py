"""Relaxed semantic entropy (docs/semantic-compare.md): an LLM judge clusters each prompt's rollouts.

For m rollouts of a prompt the judge labels every ordered pair (i, j) "similar" or
"different"; i and j are linked only when both orders say similar (``J & J.T``), clusters are
the connected components and ``RSE = -sum_c (|c|/m) log(|c|/m)``. ``rse_run`` asks any canopy
engine (greedy, a few tokens) with a task-specific judge prompt, caches every verdict in
``RUN/semantic/rse_verdicts.parquet`` keyed by (judge, task, prompt id, text-pair hash) and
writes one row per prompt to ``RUN/semantic/rse.parquet``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from canopy_entropy.engines.base import DecodingPolicy, Engine, rollout_seed
from canopy_entropy.errors import CanopyError, ConfigError, StoreError
from canopy_entropy.run.layout import PROMPT_KEYS, artefact_path, schema_of
from canopy_entropy.store import (
    KEY_COLUMNS,
    RunStore,
    atomic_write_json,
    atomic_write_table,
    read_table,
)

DEFAULT_JUDGE = "smollm2-135m-instruct"
VERDICTS_SCHEMA_VERSION = schema_of("semantic.rse_verdicts")
RSE_SCHEMA_VERSION = schema_of("semantic.rse")
MAX_FAILURE_SHARE = 0.05
JUDGE_TASKS = ("coding", "completion", "math", "stories")
PLACEHOLDERS = ("question", "response_a", "response_b")
RETRY_REMINDER = (
    "\n\nYour previous answer could not be read. Reply with exactly one line: "
    '"Response: similar" or "Response: different".'
)
VERDICT_COLUMNS = ["judge", "judge_key", "task", "prompt_id", "pair_sha1", "verdict"]
VERDICT_COLUMNS += ["attempts", "output"]
RSE_COLUMNS = ["rse", "rse_normalized", "rse_clusters", "rse_m", "rse_failures"]
SIMILAR, DIFFERENT, FAILED = 1, 0, -1
WEAK_JUDGE_NOTE = (
    f"the judge {DEFAULT_JUDGE} is a weak judge (135M parameters): its verdicts are noisy; "
    "use a stronger instruct model (e.g. served through the openai engine) for published numbers"
)

_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
_VERDICT_LINE = re.compile(
    r"^[\s*_#>`-]*response[\s*_`]*:[\s*_`]*(similar|different)[\s*_`.!]*$", re.IGNORECASE
)
_BARE_VERDICT = re.compile(r"^[\s*_`]*(similar|different)[\s*_`.!]*$", re.IGNORECASE)


@dataclass(frozen=True, eq=False)
class RSEResult:
    """RSE of one prompt: entropy (nats), cluster count, entropy / log m, cluster per rollout."""

    entropy: float
    num_clusters: int
    normalized: float
    labels: np.ndarray


def relaxed_semantic_entropy(verdicts: Any) -> RSEResult:
    """RSE from an m x m boolean matrix of ordered-pair verdicts (True = similar; diagonal ignored).

    i and j are linked only when both ``verdicts[i, j]`` and ``verdicts[j, i]`` are True; the
    clusters are the connected components of the links (labels numbered in rollout order).
    """
    v = np.asarray(verdicts)
    if v.ndim != 2 or v.shape[0] != v.shape[1] or v.shape[0] == 0:
        raise CanopyError(f"verdicts must be a non-empty square m x m matrix, got shape {v.shape}")
    if v.dtype != np.bool_:
        if not np.isin(v, (0, 1)).all():
            raise CanopyError("verdicts must be booleans (True = similar) or 0/1 values")
        v = v.astype(bool)
    m = v.shape[0]
    links = v & v.T
    np.fill_diagonal(links, False)
    _, raw = connected_components(csr_matrix(links), directed=False)
    _, first = np.unique(raw, return_index=True)
    relabel = np.empty(len(first), dtype=np.int32)
    relabel[np.argsort(np.argsort(first))] = np.arange(len(first), dtype=np.int32)
    labels = relabel[raw]
    p = np.bincount(labels) / m
    entropy = float(-(p * np.log(p)).sum()) + 0.0
    normalized = entropy / float(np.log(m)) if m > 1 else 0.0
    return RSEResult(entropy, len(p), normalized, labels)


# ---------------------------------------------------------------------- judge prompts
def load_judge_prompt(task: str, path: str | os.PathLike[str] | None = None) -> str:
    """The judge prompt template of ``task``: the file at ``path``, else the packaged one.

    A template holds ``{question}``, ``{response_a}`` and ``{response_b}`` once each.
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"judge prompt file {p} does not exist; give a text file")
        text = p.read_text(encoding="utf-8")
        where = str(p)
    elif task in JUDGE_TASKS:
        res = importlib.resources.files("canopy_entropy") / "data" / "judge_prompts"
        text = (res / f"{task}.txt").read_text(encoding="utf-8")
        where = f"the packaged {task} prompt"
    else:
        raise ConfigError(
            f"no judge prompt for task '{task}' (packaged: {', '.join(JUDGE_TASKS)}); "
            f"give one with judge_prompts={{'{task}': 'FILE.txt'}}"
        )
    for name in PLACEHOLDERS:
        if text.count("{" + name + "}") != 1:
            raise ConfigError(
                f"judge prompt {where} must contain {{{name}}} exactly once "
                f"(found {text.count('{' + name + '}')})"
            )
    return text


def render_judge_prompt(template: str, question: str, response_a: str, response_b: str) -> str:
    """Fill the template in one pass (braces inside the texts are never substituted again)."""
    values = {"question": question, "response_a": response_a, "response_b": response_b}
    return _PLACEHOLDER.sub(lambda mt: values[mt.group(1)], template)


def parse_verdict(text: str | None) -> bool | None:
    """True for "similar", False for "different", None when the output is not a clear verdict.

    A verdict line is ``Response: similar`` or ``Response: different`` (any case, markdown
    emphasis and a final full stop allowed, nothing else on the line). Every verdict line of the
    output must agree; an output that is only the bare word also counts. Anything else
    (no verdict line, conflicting lines, "not similar", extra words on the line) is None.
    """
    if not text:
        return None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    found = {mt.group(1).lower() for ln in lines if (mt := _VERDICT_LINE.match(ln))}
    if not found and len(lines) == 1 and (mt := _BARE_VERDICT.match(lines[0])):
        found = {mt.group(1).lower()}
    if len(found) != 1:
        return None
    return found.pop() == "similar"


# ---------------------------------------------------------------------- the run stage
@dataclass
class RSERunResult:
    """What ``rse_run`` did: judge, counts, throughput, notes and the per-prompt table."""

    judge: str
    m: int
    n_prompts: int
    n_left_out: int
    calls: int
    pairs_judged: int
    pairs_cached: int
    seconds_judging: float
    notes: list[str] = field(default_factory=list)
    table: pd.DataFrame | None = None

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds_judging if self.seconds_judging > 0 else float("nan")


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def subsample(n_rollouts: int, m: int, seed: int, key: str) -> np.ndarray:
    """Positions of the m rollouts used (all when ``n_rollouts <= m``), sorted.

    The first m of one seeded permutation per prompt, so the set for a smaller m is a subset
    of the set for a larger m and a rerun with a larger m reuses the cached verdicts.
    """
    if n_rollouts <= m:
        return np.arange(n_rollouts)
    rng = np.random.default_rng(rollout_seed(seed, key, 0, stream="rse"))
    return np.sort(rng.permutation(n_rollouts)[:m])


def _verdict_table(rows: pd.DataFrame) -> pa.Table:
    return pa.table(
        {
            "judge": pa.array(rows["judge"].tolist(), pa.string()),
            "judge_key": pa.array(rows["judge_key"].tolist(), pa.string()),
            "task": pa.array(rows["task"].tolist(), pa.string()),
            "prompt_id": pa.array(rows["prompt_id"].tolist(), pa.string()),
            "pair_sha1": pa.array(rows["pair_sha1"].tolist(), pa.string()),
            "verdict": pa.array(rows["verdict"].to_numpy(np.int8)),
            "attempts": pa.array(rows["attempts"].to_numpy(np.int8)),
            "output": pa.array(rows["output"].tolist(), pa.string()),
        }
    )


def read_verdicts(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Every cached judge verdict of a run (empty when none); verdict 1 similar, 0 different,
    -1 unparseable after the retry."""
    path = artefact_path(run_dir, "semantic.rse_verdicts")
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype=object) for c in VERDICT_COLUMNS})
    return read_table(path, VERDICTS_SCHEMA_VERSION).to_pandas()


def read_rse(run_dir: str | os.PathLike[str]) -> pd.DataFrame | None:
    """The run's per-prompt RSE table, or None when ``semantic-entropy`` has not run."""
    path = artefact_path(run_dir, "semantic.rse")
    if not path.exists():
        return None
    return read_table(path, RSE_SCHEMA_VERSION).to_pandas()


class _Judge:
    """Asks an engine for greedy verdicts on rendered judge prompts, batched."""

    def __init__(self, engine: Engine, max_new_tokens: int, seed: int):
        self.engine = engine
        self.seed = seed
        self.chat = bool(getattr(engine, "chat", False))
        tok = getattr(engine, "tokenizer", None)
        if not self.chat and tok is None:
            raise ConfigError(
                "the judge engine has no tokenizer to render its prompts; give the engine a "
                "tokenizer or use chat mode (engine option chat=True)"
            )
        self.variant = "instruct" if self.chat or getattr(tok, "chat_template", None) else "base"
        self.policy = DecodingPolicy(
            temperature=0.0,
            max_new_tokens=max_new_tokens,
            eos_token_ids=tuple(engine.eos_token_ids),
        ).validate()
        many = hasattr(engine, "sample_many")
        self.batch = int(getattr(engine, "prompts_per_call", 64)) if many else 1
        self.calls = 0
        self.seconds = 0.0

    def render(self, text: str) -> Any:
        """What the engine takes: the user text (chat APIs) or the templated token ids."""
        if self.chat:
            return text
        from canopy_entropy.prompting import render_prompt

        return render_prompt(self.engine.tokenizer, text, self.variant)[1]

    def fits(self, request: Any) -> bool:
        limit = getattr(self.engine, "context_length", None)
        if self.chat or not limit:
            return True
        return len(request) + self.policy.max_new_tokens <= limit

    def ask(
        self, requests: list[Any], keys: list[str], on_done: Callable[[int], None] | None
    ) -> list[str | None]:
        """Greedy outputs (text or None) of the requests, in order."""
        out: list[str | None] = []
        for start in range(0, len(requests), self.batch):
            chunk = requests[start : start + self.batch]
            reqs = [
                (
                    r,
                    np.array([rollout_seed(self.seed, k, 0, stream="rse")], dtype=np.int64),
                    np.zeros(1, dtype=np.int32),
                )
                for r, k in zip(chunk, keys[start : start + self.batch], strict=True)
            ]
            t0 = time.perf_counter()
            if self.batch == 1:
                batches = [self.engine.sample(*reqs[0], self.policy)]
            else:
                batches = self.engine.sample_many(reqs, self.policy)
            self.seconds += time.perf_counter() - t0
            self.calls += len(chunk)
            for b in batches:
                text = b.text[0] if b.text else None
                if text is None and getattr(self.engine, "tokenizer", None) is not None:
                    text = self.engine.tokenizer.decode(b.token_ids, skip_special_tokens=True)
                out.append(text)
            if on_done is not None:
                on_done(len(chunk))
        return out


def _judge_identity(engine: Engine | str, judge: str, judge_name: str | None) -> str:
    if judge_name:
        return judge_name
    if isinstance(engine, str):
        return f"{engine}:{judge}"
    model = engine.describe().get("model")
    if not model:
        raise ConfigError(
            "cannot tell which model this judge engine runs (needed to key the verdict cache); "
            "pass judge_name='...'"
        )
    return f"{engine.name}:{model}"


def rse_run(
    run_dir: str | os.PathLike[str],
    judge: str = DEFAULT_JUDGE,
    engine: str | Engine = "hf",
    m: int = 24,
    seed: int = 0,
    judge_prompts: dict[str, str | os.PathLike[str]] | None = None,
    max_new_tokens: int = 16,
    engine_options: dict[str, Any] | None = None,
    judge_name: str | None = None,
    progress: Callable[[dict], None] | None = None,
) -> RSERunResult:
    """Relaxed semantic entropy of every prompt of a run, judged by ``judge`` (resumable).

    ``engine`` is an engine name (``hf``, ``openai``, ``vllm``; built for model ``judge`` with
    ``engine_options``) or a ready Engine (then ``judge_name`` or its ``describe()['model']``
    names it in the cache). Per prompt: m rollouts (seeded subsample), m(m-1) ordered-pair
    verdicts, greedy, at most ``max_new_tokens``; an unparseable verdict is asked again once
    with a reminder, then counted as a failure. A failed order takes the other order's verdict
    (both failed: not linked); a prompt with more than 5% failures is left out with a note.
    Verdicts are saved after every prompt, so a killed run resumes where it stopped.
    ``progress`` receives a dict (pairs_done, pairs_total, prompts_done, prompts_total, calls,
    elapsed_s) after each batch.
    """
    if m < 2:
        raise ConfigError(f"m must be at least 2 rollouts per prompt (got {m})")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    run = Path(run_dir)
    if not run.is_dir():
        raise CanopyError(f"run folder {run} does not exist")
    store = RunStore(run)
    keys, group_files = store.read_keys([*PROMPT_KEYS, "rollout_index"])
    keys = keys.to_pandas()
    dup = keys.duplicated([*PROMPT_KEYS, "rollout_index"])
    if dup.any():
        row = keys[dup].iloc[0]
        raise StoreError(
            f"rollout {row['prompt_id']}#{row['rollout_index']} of {row['model']}/{row['task']} "
            f"appears more than once; remove the duplicate shard from {store.rollouts_dir}"
        )
    sizes = keys.groupby(list(PROMPT_KEYS), sort=True, observed=True).size()
    tasks = sorted(keys["task"].astype(str).unique())
    overrides = dict(judge_prompts or {})
    unknown = sorted(set(overrides) - set(tasks))
    if unknown:
        raise ConfigError(
            f"judge prompt given for task(s) {', '.join(unknown)} not in the run "
            f"(tasks: {', '.join(tasks)}); fix the task name"
        )
    templates = {t: load_judge_prompt(t, overrides.get(t)) for t in tasks}
    questions = _questions(store)
    identity = _judge_identity(engine, judge, judge_name)
    judge_keys = {
        t: _sha1(json.dumps([identity, templates[t], max_new_tokens, RETRY_REMINDER]))
        for t in tasks
    }
    notes: list[str] = []
    if identity == f"hf:{DEFAULT_JUDGE}":
        notes.append(WEAK_JUDGE_NOTE)
    small = sizes[sizes < m]
    if len(small):
        notes.append(
            f"{len(small)} prompt(s) have fewer than m = {m} rollouts (min {int(small.min())}); "
            "all their rollouts were used"
        )

    cache_df = read_verdicts(run)
    cache = {
        (k, t, p, h): (int(v), int(a), o)
        for k, t, p, h, v, a, o in cache_df[VERDICT_COLUMNS[1:]].itertuples(index=False)
    }
    new_rows: list[tuple] = []
    sem = run / "semantic"

    eng = engine if isinstance(engine, Engine) else None
    owns = eng is None
    start = time.perf_counter()
    state = {"pairs_done": 0, "prompts_done": 0}
    mm = np.minimum(sizes.to_numpy(), m)
    pairs_total = int((mm * (mm - 1)).sum())
    judge_obj: _Judge | None = None

    def report() -> None:
        if progress is not None:
            progress(
                {
                    **state,
                    "pairs_total": pairs_total,
                    "prompts_total": len(sizes),
                    "calls": judge_obj.calls if judge_obj else 0,
                    "elapsed_s": time.perf_counter() - start,
                }
            )

    def advance(k: int) -> None:
        state["pairs_done"] += k
        report()

    rows: list[dict] = []
    left_out: list[dict] = []
    n_too_long = n_cached = n_judged = 0
    try:
        shards = keys[list(KEY_COLUMNS)].drop_duplicates().sort_values(list(KEY_COLUMNS))
        for shard in shards.itertuples(index=False):
            flt = None
            for col, val in zip(KEY_COLUMNS, shard, strict=True):
                expr = pc.field(col) == val
                flt = expr if flt is None else flt & expr
            frame = (
                store.read_rollouts(
                    columns=[*PROMPT_KEYS, "rollout_index", "text"],
                    filter=flt,
                    files=group_files[tuple(shard)],
                )
                .to_pandas()
                .sort_values(["prompt_id", "rollout_index"])
            )
            if frame["text"].isna().any():
                raise CanopyError(
                    f"{int(frame['text'].isna().sum())} rollouts of {shard.model}/{shard.task} "
                    "have no text; the judge needs decoded text: re-generate, or import with a "
                    "'text' column"
                )
            task = str(shard.task)
            for pid, group in frame.groupby("prompt_id", sort=True):
                texts_all = group["text"].tolist()
                unit = f"{shard.model}/{shard.variant}/{shard.family}/{task}/{pid}"
                sel = subsample(len(texts_all), m, seed, unit)
                texts = [texts_all[i] for i in sel]
                k = len(texts)
                question = questions.get((*shard, pid), "(the prompt text was not recorded)")
                qh = _sha1(question)
                th = [_sha1(t) for t in texts]
                pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
                hashes = [_sha1(qh + th[i] + th[j]) for i, j in pairs]
                verdict = np.full((k, k), FAILED, dtype=np.int8)
                todo = []
                for (i, j), h in zip(pairs, hashes, strict=True):
                    hit = cache.get((judge_keys[task], task, pid, h))
                    if hit is None:
                        todo.append((i, j, h))
                    else:
                        verdict[i, j] = hit[0]
                n_cached += len(pairs) - len(todo)
                advance(len(pairs) - len(todo))
                if todo:
                    if judge_obj is None:
                        if eng is None:
                            from canopy_entropy.engines.registry import get_engine

                            eng = get_engine(str(engine), judge, **dict(engine_options or {}))
                        judge_obj = _Judge(eng, max_new_tokens, seed)
                    results, too_long = _judge_pairs(
                        judge_obj, templates[task], question, texts, todo, advance
                    )
                    n_too_long += too_long
                    n_judged += len(todo)
                    for (i, j, h), (v, attempts, output) in zip(todo, results, strict=True):
                        verdict[i, j] = v
                        cache[(judge_keys[task], task, pid, h)] = (v, attempts, output)
                        new_rows.append(
                            (identity, judge_keys[task], task, pid, h, v, attempts, output)
                        )
                    _write_verdicts(run, cache_df, new_rows)
                failures = int((verdict[~np.eye(k, dtype=bool)] == FAILED).sum())
                key = dict(zip(PROMPT_KEYS, (*shard, pid), strict=True))
                if k > 1 and failures > MAX_FAILURE_SHARE * k * (k - 1):
                    left_out.append({**key, "failures": failures, "pairs": k * (k - 1)})
                else:
                    res = relaxed_semantic_entropy(_impute(verdict))
                    rows.append(
                        {
                            **key,
                            "rse": res.entropy,
                            "rse_normalized": res.normalized,
                            "rse_clusters": res.num_clusters,
                            "rse_m": k,
                            "rse_failures": failures,
                        }
                    )
                state["prompts_done"] += 1
                report()
    finally:
        if owns and eng is not None:
            eng.close()

    if n_too_long:
        notes.append(
            f"{n_too_long} judge prompt(s) were longer than the judge's context and counted as "
            "failures; use a judge with a longer context"
        )
    if left_out:
        worst = max(left_out, key=lambda r: r["failures"])
        notes.append(
            f"{len(left_out)} of {len(sizes)} prompt(s) left out: more than "
            f"{MAX_FAILURE_SHARE:.0%} of their judge verdicts were unparseable after one retry "
            f"(worst: {worst['model']}/{worst['task']}/{worst['prompt_id']}, "
            f"{worst['failures']} of {worst['pairs']})"
        )
    table = pd.DataFrame(rows, columns=[*PROMPT_KEYS, *RSE_COLUMNS])
    for col in ("rse_clusters", "rse_m", "rse_failures"):
        table[col] = table[col].astype(np.int32)
    for col in ("rse", "rse_normalized"):
        table[col] = table[col].astype(np.float64)
    out = pa.Table.from_pandas(table, preserve_index=False)
    out = out.replace_schema_metadata({b"canopy.judge": identity.encode()})
    atomic_write_table(artefact_path(run_dir, "semantic.rse"), out, RSE_SCHEMA_VERSION)
    calls = judge_obj.calls if judge_obj else 0
    seconds = judge_obj.seconds if judge_obj else 0.0
    atomic_write_json(
        sem / "rse.json",
        {
            "judge": identity,
            "m": m,
            "seed": seed,
            "max_new_tokens": max_new_tokens,
            "n_prompts": len(sizes),
            "left_out": left_out,
            "calls": calls,
            "pairs_judged": n_judged,
            "pairs_cached": n_cached,
            "seconds_judging": seconds,
            "notes": notes,
        },
    )
    return RSERunResult(
        judge=identity,
        m=m,
        n_prompts=len(sizes),
        n_left_out=len(left_out),
        calls=calls,
        pairs_judged=n_judged,
        pairs_cached=n_cached,
        seconds_judging=seconds,
        notes=notes,
        table=table,
    )


def _questions(store: RunStore) -> dict[tuple, str]:
    prompts = store.read_prompts().select([*PROMPT_KEYS, "text"]).to_pandas()
    return {tuple(r[:-1]): r[-1] for r in prompts[[*PROMPT_KEYS, "text"]].itertuples(index=False)}


def _judge_pairs(
    judge: _Judge,
    template: str,
    question: str,
    texts: list[str],
    todo: list[tuple[int, int, str]],
    advance: Callable[[int], None],
) -> tuple[list[tuple[int, int, str | None]], int]:
    """(verdict, attempts, last output) per pair, and how many did not fit the context.

    One ask; unparseable answers are asked once more with a reminder appended (greedy
    decoding would repeat the same answer to the same prompt). Pairs too long for the judge's
    context are never sent and stay failures (attempts 0).
    """
    n = len(todo)
    verdicts = [FAILED] * n
    attempts = [0] * n
    outputs: list[str | None] = [None] * n
    prompts = [render_judge_prompt(template, question, texts[i], texts[j]) for i, j, _ in todo]
    too_long = 0
    pending = list(range(n))
    for attempt in (1, 2):
        idx, reqs = [], []
        for q in pending:
            req = judge.render(prompts[q] if attempt == 1 else prompts[q] + RETRY_REMINDER)
            if judge.fits(req):
                idx.append(q)
                reqs.append(req)
            elif attempt == 1:
                too_long += 1
        keys = [todo[q][2] + str(attempt) for q in idx]
        answers = judge.ask(reqs, keys, advance if attempt == 1 else None)
        for q, output in zip(idx, answers, strict=True):
            parsed = parse_verdict(output)
            verdicts[q] = FAILED if parsed is None else (SIMILAR if parsed else DIFFERENT)
            attempts[q] = attempt
            outputs[q] = output
        pending = [q for q in idx if verdicts[q] == FAILED]
    if too_long:
        advance(too_long)
    return list(zip(verdicts, attempts, outputs, strict=True)), too_long


def _impute(verdict: np.ndarray) -> np.ndarray:
    """Boolean similar-matrix where a failed order takes the other order's verdict."""
    similar = verdict == SIMILAR
    failed = verdict == FAILED
    return np.where(failed, similar.T, similar)


def _write_verdicts(run: Path, cached: pd.DataFrame, new_rows: list[tuple]) -> None:
    new = pd.DataFrame(new_rows, columns=VERDICT_COLUMNS)
    frame = new if cached.empty else pd.concat([cached, new], ignore_index=True)
    path = artefact_path(run, "semantic.rse_verdicts")
    atomic_write_table(path, _verdict_table(frame), VERDICTS_SCHEMA_VERSION)


__all__ = [
    "DEFAULT_JUDGE",
    "RSEResult",
    "RSERunResult",
    "load_judge_prompt",
    "parse_verdict",
    "read_rse",
    "read_verdicts",
    "relaxed_semantic_entropy",
    "render_judge_prompt",
    "rse_run",
]
