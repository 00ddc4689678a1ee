"""The README and docs/ stand alone and their examples are real.

* Every fenced block whose info string starts with ``toml`` in README.md, docs/*.md and
  examples/*.md parses with the project's own config parser
  (``parse_config(text, check_models=False)``). Convention: a block marked ```` ```toml fragment ````
  is a partial config; the test completes it with a minimal ``[[models]]`` table (when it has
  none) and parses that. Every other ``toml`` block must be a complete config.
* No Markdown file links or refers to anything outside the repository: every relative link
  target (and every ``../`` path in the text) resolves inside the repository and exists, anchors
  name a heading of the target page, and nothing points at the internal spec or the machine the
  project was developed on.
* Files named in the shell examples exist, the README's import example runs on the shipped
  example file, and the worked examples of docs/metrics.md are what the code computes.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from canopy_entropy.config import load_config, parse_config
from canopy_entropy.importer import import_jsonl
from canopy_entropy.metrics import compute_metrics
from canopy_entropy.stats.pooling import pool_fisher, pool_kendall
from cli_helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
MARKDOWN = sorted([REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("examples/*.md")])
FRAGMENT_MODELS = '\n[[models]]\nmodel = "org/model"\n'
FORBIDDEN = [
    (re.compile(r"shared/(spec|data)"), "a path outside the repository"),
    (re.compile(r"\bSPEC\b"), "the internal spec (users do not have it)"),
    (re.compile(r"development machine", re.I), "the development machine"),
]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def fenced_blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line of the opening fence, info string, body) of every fenced code block."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*(`{3,}|~{3,})\s*(.*)$", lines[i])
        if not m:
            i += 1
            continue
        fence, info, start = m.group(1), m.group(2).strip(), i + 1
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        blocks.append((start, info, "\n".join(lines[start:i])))
        i += 1
    return blocks


def without_fences(path: Path) -> str:
    """The file's text without its fenced code blocks."""
    text = path.read_text(encoding="utf-8")
    return re.sub(r"^\s*(`{3,}|~{3,}).*?^\s*\1\s*$", "", text, flags=re.M | re.S)


def prose(path: Path) -> str:
    """The file's text without fenced blocks and inline code spans (where links live)."""
    return re.sub(r"`[^`\n]*`", "", without_fences(path))


def toml_blocks() -> list[tuple[str, str, str]]:
    return [
        (f"{rel(p)}:{line}", info, body)
        for p in MARKDOWN
        for line, info, body in fenced_blocks(p)
        if info.split()[:1] == ["toml"] and "task" not in info.split()
    ]


def task_blocks() -> list[tuple[str, str]]:
    """``toml task`` blocks: task files, parsed with the task-file parser."""
    return [
        (f"{rel(p)}:{line}", body)
        for p in MARKDOWN
        for line, info, body in fenced_blocks(p)
        if info.split() == ["toml", "task"]
    ]


@pytest.mark.parametrize(("name", "body"), task_blocks(), ids=[b[0] for b in task_blocks()])
def test_task_block_is_the_example_task_file(name, body):
    import dataclasses

    from canopy_entropy.tasks import parse_task, read_task_file

    tomllib = pytest.importorskip("tomllib")
    example = REPO / "examples" / "tasks" / "capitals.toml"
    spec = parse_task(tomllib.loads(body), "capitals", name, example.parent)
    assert spec == dataclasses.replace(read_task_file(example), path="")
    assert body.strip() == example.read_text().strip()


TOML_BLOCKS = toml_blocks()


def test_docs_have_toml_blocks_to_check():
    where = {name.split(":")[0] for name, _, _ in TOML_BLOCKS}
    assert {"README.md", "docs/running.md", "docs/scaling.md"} <= where
    assert any("fragment" in info.split() for _, info, _ in TOML_BLOCKS)


@pytest.mark.parametrize(("name", "info", "body"), TOML_BLOCKS, ids=[b[0] for b in TOML_BLOCKS])
def test_toml_block_parses_with_the_config_parser(name, info, body):
    text = body
    if "fragment" in info.split() and "[[models]]" not in body:
        text = body + FRAGMENT_MODELS
    cfg = parse_config(text, source=name, base_dir=REPO, check_models=False)
    assert cfg.models


def test_shipped_configs_parse():
    configs = sorted(REPO.glob("configs/*.toml"))
    assert configs
    for path in configs:
        assert load_config(path, check_models=False).models


def github_slugs(path: Path) -> set[str]:
    """Anchors GitHub gives the headings of ``path`` (duplicates get -1, -2, ...)."""
    seen: dict[str, int] = {}
    for line in without_fences(path).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
    return {f"{s}-{k}" if k else s for s, n in seen.items() for k in range(n + 1)}


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)


def links(path: Path) -> list[str]:
    text = prose(path)
    return LINK.findall(text) + REF_LINK.findall(text)


def test_link_extraction_finds_links():
    found = links(REPO / "README.md")
    assert "docs/metrics.md" in found and "examples/prompts.jsonl" in found


@pytest.mark.parametrize("path", MARKDOWN, ids=rel)
def test_links_stay_in_the_repository_and_exist(path):
    problems = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.is_relative_to(REPO):
            problems.append(f"{target}: leaves the repository")
        elif not dest.exists():
            problems.append(f"{target}: does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in github_slugs(dest):
            problems.append(f"{target}: no heading '#{anchor}' in {rel(dest)}")
    assert not problems, f"{rel(path)}: " + "; ".join(problems)


@pytest.mark.parametrize("path", MARKDOWN, ids=rel)
def test_no_reference_outside_the_repository(path):
    text = path.read_text(encoding="utf-8")
    problems = [
        f"line {text[: m.start()].count(chr(10)) + 1}: '{m.group(0)}' names {why}"
        for pattern, why in FORBIDDEN
        for m in pattern.finditer(text)
    ]
    for m in re.finditer(r"(?:\.\./)+[\w./-]*", text):
        if not (path.parent / m.group(0)).resolve().is_relative_to(REPO):
            problems.append(f"'{m.group(0)}' leaves the repository")
    assert not problems, f"{rel(path)}: " + "; ".join(problems)


def test_files_named_in_shell_examples_exist():
    named = set()
    for path in MARKDOWN:
        for _, info, body in fenced_blocks(path):
            if info.split()[:1] in (["bash"], ["sh"], ["console"]):
                named |= set(re.findall(r"(?<![\w/.-])((?:examples|configs)/[\w./-]+)", body))
    assert "examples/prompts.jsonl" in named and "examples/rollouts.jsonl" in named
    missing = sorted(n for n in named if not (REPO / n).exists())
    assert not missing, f"shell examples name files that do not exist: {missing}"


def readme_command(prefix: str) -> list[str]:
    for _, _info, body in fenced_blocks(REPO / "README.md"):
        for line in body.replace("\\\n", " ").splitlines():
            if line.startswith(prefix):
                return shlex.split(line)
    raise AssertionError(f"README has no '{prefix}' command")


def test_readme_import_example_runs_on_the_shipped_file(tmp_path, capsys, monkeypatch):
    args = readme_command("canopy import examples/")
    run = tmp_path / "mine"
    args[args.index("--run") + 1] = str(run)
    monkeypatch.chdir(REPO)
    code, _, err = run_cli(args[1:], capsys, monkeypatch)
    assert code == 0, err
    cap = int(args[args.index("--max-new-tokens") + 1])
    # independent numbers straight from the JSONL file: per prompt the mean of sum(entropy)
    by_prompt: dict[str, list[dict]] = {}
    for line in (REPO / args[2]).read_text().splitlines():
        row = json.loads(line)
        by_prompt.setdefault(str(row["prompt_id"]), []).append(row)
    ce = [np.mean([sum(r["entropy"]) for r in rows]) for rows in by_prompt.values()]
    cut = [np.mean([r["finish_reason"] == "length" for r in rows]) for rows in by_prompt.values()]
    assert any(len(r["entropy"]) == cap for rows in by_prompt.values() for r in rows)
    pooled = compute_metrics(run, warn=False).pooled
    assert len(pooled) == 1
    row = pooled.iloc[0]
    assert row["n_prompts"] == len(by_prompt) and row["n_rollouts"] == 16
    assert row["ce_star"] == pytest.approx(np.mean(ce), rel=1e-6)
    assert row["truncation_rate"] == pytest.approx(np.mean(cut))


METRICS_DOC = (REPO / "docs/metrics.md").read_text(encoding="utf-8")


def doc_number(value: float) -> str:
    """``value`` as the worked examples print it (6 decimals), checked to be in metrics.md."""
    text = f"{value:.6f}"
    assert text in METRICS_DOC, f"docs/metrics.md does not show {text}"
    return text


def test_metrics_doc_pooling_example_is_what_the_code_computes():
    n = np.array([28, 53, 3, 10])
    rho = pool_fisher(np.array([0.42, -0.15, 0.90, np.nan]), n)
    z = np.arctanh([0.42, -0.15])  # by hand: weights 25 and 50, prompts 3 and 4 carry none
    assert float(rho) == pytest.approx(np.tanh((25 * z[0] + 50 * z[1]) / 75), abs=1e-15)
    assert doc_number(float(rho)) == "0.048432"
    tau = pool_kendall(np.array([0.30, -0.10, 0.60, np.nan]), n)
    assert float(tau) == pytest.approx((378 * 0.30 - 1378 * 0.10 + 3 * 0.60) / 1759, abs=1e-15)
    assert doc_number(float(tau)) == "-0.012848"


def test_metrics_doc_length_law_example_is_what_the_code_computes(tmp_path):
    rows = [
        {"prompt_id": "q", "entropy": [1.0, 1.5], "eos_prob": [0.1, 0.6], "finish_reason": "eos"},
        {
            "prompt_id": "q",
            "entropy": [0.8, 0.9, 1.2],
            "eos_prob": [0.2, 0.3, 0.4],
            "finish_reason": "length",
        },
    ]
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import_jsonl(src, tmp_path / "run", model="m", variant="base", max_new_tokens=3)
    got = compute_metrics(tmp_path / "run", warn=False).prompts.iloc[0]
    law = np.array([0.15, 0.45, 0.2, 0.2])  # p_hat(1..3) and the cut outcome, by hand
    assert got["length_entropy"] == pytest.approx(-(law * np.log(law)).sum(), rel=1e-6)
    assert doc_number(got["length_entropy"]) == "1.287672"
    assert doc_number(got["length_entropy_hist"]) == "0.693147"
