"""report.html: self-contained, escaped, right numbers, notes for missing stages, and a real
headless-Chromium load with the network off (no console errors, no requests, not blank)."""

from __future__ import annotations

import io
import json
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from canopy_entropy.errors import CanopyError
from canopy_entropy.plots import FIGURE_NAMES
from canopy_entropy.plots import data as pdata
from canopy_entropy.report import _dominant, build_report, fmt, render_report
from canopy_entropy.store import RunStore
from plot_fixtures import EVIL, build_run, rendered_run


class Parsed(HTMLParser):
    """Collects tags, attributes, table cells and text of a page."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def run() -> Path:
    return rendered_run()


@pytest.fixture(scope="module")
def page(run) -> str:
    return (run / "report.html").read_text()


@pytest.fixture(scope="module")
def parsed(page) -> Parsed:
    return Parsed(page)


def test_self_contained_no_external_resources(page, parsed):
    urls = [
        v
        for _, attrs in parsed.tags
        for k, v in attrs.items()
        if k in ("src", "href", "srcset", "poster", "data", "action") and v
    ]
    assert urls, "expected embedded images and in-page links"
    for url in urls:
        assert url.startswith(("data:image/png;base64,", "#")), url[:80]
    assert not [t for t, a in parsed.tags if t in ("link", "iframe", "object", "embed")]
    scripts = [a for t, a in parsed.tags if t == "script"]
    assert scripts == [{}]  # exactly one, inline
    assert "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(" not in page
    csp = [a for t, a in parsed.tags if t == "meta" and a.get("http-equiv")]
    assert "default-src 'none'" in csp[0]["content"]


def test_all_figures_embedded_and_decodable(parsed):
    import base64

    imgs = [a for t, a in parsed.tags if t == "img"]
    assert len(imgs) == len(FIGURE_NAMES)
    for a in imgs:
        raw = base64.b64decode(a["src"].split(",", 1)[1])
        img = mpimg.imread(io.BytesIO(raw), format="png")
        assert img[..., :3].std() > 0.05
        assert a["alt"]


def test_data_strings_are_escaped(page, parsed):
    assert EVIL not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;" in page
    text = "".join(parsed.text)
    assert EVIL in text  # shown verbatim to the reader (model name, config note)


def _cells(page: str) -> list[dict[str, str | None]]:
    return [a for t, a in Parsed(page).tags if t == "td"]


def test_headline_numbers_are_the_pooled_values(run, page):
    pooled = pdata.metrics_pooled(run)
    sort_values = {a.get("data-sort") for a in _cells(page)}
    for value in pd.concat([pooled["ce_star"], pooled["genppl"], pooled["chebyshev_bound"]]):
        assert repr(float(value)) in sort_values
    comp = pdata.comparison(run)
    for value in comp["pct"].dropna():
        assert repr(float(value)) in sort_values


def test_summary_counts_and_truncation_warning(run, page):
    counts = RunStore(run).read_rollouts(columns=["finish_reason", "length"]).to_pandas()
    n, n_trunc = len(counts), int((counts["finish_reason"] == "length").sum())
    assert n_trunc > 0
    assert f"{n:,} rollouts, {int(counts['length'].sum()):,} tokens" in page
    assert f"{n_trunc:,} of {n:,} ({100 * n_trunc / n:.1f}%) are truncated" in page
    assert 'class="alert danger"' in page  # > 5% truncated in one group: loud


def test_policy_regression_and_manifest_shown(page):
    text = "".join(Parsed(page).text)
    for needle in (
        "temperature",
        "top_k",
        "max_new_tokens",
        "R_sc:variantinstruct",
        "slope ratio",
        "2.66 ± 0.4",
        "random-effect SD (prompt)",
        "conditional.ks.p",
        "manifest.json",
        "config.toml",
        "seed_scheme",
    ):
        assert needle in text, needle


def test_missing_stages_notes(tmp_path):
    run = build_run(tmp_path / "r", prompts=3, rollouts=4, stages=("rollouts",))
    path = build_report(run, formats=("png",))
    text = "".join(Parsed(path.read_text()).text)
    for needle in (
        "run 'canopy metrics' first",
        "run 'canopy compare' first",
        "run 'canopy regress' first",
        "not drawn:",
    ):
        assert needle in text
    assert len([t for t, _ in Parsed(path.read_text()).tags if t == "img"]) == 3


def test_report_without_rollouts_and_without_figures(tmp_path):
    run = build_run(tmp_path / "r", prompts=3, rollouts=4, stages=("metrics", "compare"))
    out = build_report(run, figures=False, out=tmp_path / "x.html")
    text = "".join(Parsed(out.read_text()).text)
    assert "no rollouts in rollouts/" in text
    assert "not drawn yet: run 'canopy plot' first" in text
    assert not (run / "report.html").exists()


def test_non_converged_regression_is_loud(tmp_path):
    run = build_run(tmp_path / "r", prompts=3, rollouts=4, stages=("regression",))
    res = json.loads((run / "regression" / "result.json").read_text())
    res["converged"] = False
    res["convergence"]["max_abs_gradient"] = 0.3
    (run / "regression" / "result.json").write_text(json.dumps(res))
    page = render_report(run)
    assert "did not converge" in page and 'class="alert danger"' in page


def test_dominant_component_detects_either_convention():
    p, m = 10.0, 20.0
    df = pd.DataFrame(
        {
            "n_prompts": [p, p],
            "n_rollouts": [p * m, p * m],
            "ce_star_var_between": [4.0, 0.01],
            "ce_star_var_within": [1.0, 30.0],
        }
    )
    df["ce_star_se"] = np.sqrt(df["ce_star_var_between"] / p + df["ce_star_var_within"] / (p * m))
    assert list(_dominant(df)) == ["prompts (between)", "rollouts (within)"]
    df["ce_star_se"] = np.sqrt(df["ce_star_var_between"] + df["ce_star_var_within"])
    assert list(_dominant(df)) == ["prompts (between)", "rollouts (within)"]
    df["ce_star_se"] = 99.0
    assert _dominant(df) is None


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "—"),
        (float("nan"), "—"),
        (3, "3"),
        (12345, "12,345"),
        (0.123456, "0.1235"),
        (13.7249, "13.72"),
        (2.0, "2.0"),
        (1e-5, "1.000e-05"),
        (True, "yes"),
    ],
)
def test_fmt(value, text):
    assert fmt(value) == text


def test_not_a_run_folder(tmp_path):
    with pytest.raises(CanopyError, match="not a canopy run folder"):
        build_report(tmp_path)


# --- a real browser ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium():
    from cdp_pipe import find_chromium

    binary = find_chromium()
    if binary is None:
        pytest.skip(
            "headless Chromium not found (install the Debian 'chromium' package, or "
            "set CANOPY_CHROMIUM=/path/to/chrome) - browser test skipped"
        )
    return binary


@pytest.mark.browser
def test_report_in_headless_chromium_offline(run, chromium, tmp_path):
    from cdp_pipe import Browser, evaluate, load_offline, print_pdf, problems, screenshot

    url = (run / "report.html").resolve().as_uri()
    # a negative control proves the checks can fail: an external image and a console error
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<html><body><img src="https://example.com/x.png">'
        "<script>console.error('boom')</script></body></html>"
    )
    with Browser(chromium, window=(1280, 1400)) as browser:
        session = load_offline(browser, url)
        assert problems(browser.events, url) == []
        assert evaluate(
            browser,
            session,
            "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)",
        )
        png = screenshot(browser, session)
        img = mpimg.imread(io.BytesIO(png), format="png")
        assert img.shape[0] >= 1000 and img[..., :3].std() > 0.05, "screenshot looks blank"
        # clicking a header sorts the table: ascending then descending by that column
        script = """(function () {
          var t = document.querySelector('#summary table.sortable');
          var th = t.tHead.rows[0].cells[7];
          function col() { return Array.from(t.tBodies[0].rows).map(
              r => parseFloat(r.cells[7].getAttribute('data-sort'))); }
          th.click(); var up = col(); th.click(); var down = col();
          return {up: up, down: down, aria: th.getAttribute('aria-sort')};
        })()"""
        got = evaluate(browser, session, script)
        assert got["up"] == sorted(got["up"]) and got["down"] == sorted(got["down"])[::-1]
        assert got["aria"] == "descending" and len(set(got["up"])) > 1
        assert print_pdf(browser, session)[:5] == b"%PDF-"
        assert problems(browser.events, url) == []
        load_offline(browser, bad.resolve().as_uri())
        found = problems(browser.events, bad.resolve().as_uri())
        assert any("example.com" in p for p in found) and any("boom" in p for p in found)


def test_cli_report_no_figures(run, tmp_path, monkeypatch, capsys):
    import sys

    from canopy_entropy.cli.main import main

    target = tmp_path / "r.html"
    monkeypatch.setattr(
        sys, "argv", ["canopy", "report", str(run), "--no-figures", "--out", str(target)]
    )
    try:
        main()
    except SystemExit as exc:
        assert not exc.code
    assert capsys.readouterr().out.strip() == str(target)
    assert len([t for t, _ in Parsed(target.read_text()).tags if t == "img"]) == len(FIGURE_NAMES)


def test_report_redraws_figures_only_when_stale(tmp_path):
    from canopy_entropy.plots.figures import figures_are_fresh, make_figures

    run = build_run(tmp_path / "r", prompts=3, rollouts=4, stages=("rollouts", "compare"))
    make_figures(run, formats=("png",), names=["fig5_comparison"])
    png = run / "figures" / "fig5_comparison.png"
    before = png.stat().st_mtime_ns
    assert figures_are_fresh(run) and not figures_are_fresh(run, min_active=3)
    build_report(run)  # fresh: embeds the existing PNG, draws nothing
    assert png.stat().st_mtime_ns == before
    assert len([t for t, _ in Parsed((run / "report.html").read_text()).tags if t == "img"]) == 1
    (run / "compare" / "comparison.parquet").unlink()  # an input disappears: stale
    assert not figures_are_fresh(run)
    build_report(run, formats=("png",))
    assert not png.exists()
    assert "not drawn: compare/comparison.parquet not found" in (run / "report.html").read_text()


def test_pipeline_reference_run_metrics_compare_figures_report(tmp_path):
    """Real upstream stages (metrics, compare) on the exact reference model feed the figures
    and the report; pooled groups without a family column still get family colours."""
    from canopy_entropy.comparison import compare_run
    from canopy_entropy.metrics import write_metrics
    from canopy_entropy.plots.figures import make_figures
    from canopy_entropy.reference import FiniteStateLM

    run = tmp_path / "ref"
    for fi, family in enumerate(("famA", "famB")):
        for vi, variant in enumerate(("base", "instruct")):
            lm = FiniteStateLM.random(seed=10 * fi + vi, mean_eos=0.08 if vi == 0 else 0.05)
            for ti, task in enumerate(("math", "story")):
                lm.sample_store(
                    run,
                    4,
                    6,
                    seed=100 * fi + 10 * vi + ti,
                    model=f"{family}-{variant}",
                    variant=variant,
                    family=family,
                    task=task,
                    max_new_tokens=40,
                    prompt_seed=ti,
                )
    write_metrics(run, warn=False)
    compare_run(run, by=("family", "task"), n_boot=100)
    made = make_figures(run, formats=("png",))
    assert sorted(made.notes) == ["fig6_coefficients", "fig6_qq", "fig6_rate_vs_diversity"]
    pooled = pdata.metrics_pooled(run)
    assert "family" not in pd.read_parquet(run / "metrics" / "pooled.parquet").columns
    assert set(pooled["family"]) == {"famA", "famB"}
    page = build_report(run, figures=False).read_text()
    sort_values = {a.get("data-sort") for a in _cells(page)}
    for value in pooled["ce_star"]:
        assert repr(float(value)) in sort_values
    assert "rollouts (within)" in page or "prompts (between)" in page
    assert len([t for t, _ in Parsed(page).tags if t == "img"]) == 5
