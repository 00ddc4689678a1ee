"""``canopy compare``: paired bootstrap comparison of two models on the same prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from canopy_entropy.errors import CanopyError, ConfigError


def command(
    run: Annotated[Path, typer.Argument(help="Run folder holding both models' rollouts.")],
    a: Annotated[str, typer.Option("--a", help="Side A (the reference), e.g. base.")] = "base",
    b: Annotated[str, typer.Option("--b", help="Side B, e.g. instruct.")] = "instruct",
    by: Annotated[
        str, typer.Option(help="Comma-separated grouping columns; '' for one pooled group.")
    ] = "family,task",
    bootstrap: Annotated[int, typer.Option(help="Bootstrap replicates (B).")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the prompt resampling.")] = 0,
    on: Annotated[
        str,
        typer.Option(
            help="Column --a/--b refer to: 'variant', 'model' or 'step' (checkpoints of a "
            "series; --by then defaults to 'task')."
        ),
    ] = "variant",
    series: Annotated[
        str | None, typer.Option(help="With --on step: the series (default: the only one).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the tidy table as JSON.")] = False,
) -> None:
    """Compare two models (paired prompt bootstrap): CE*, GenPPL, BF, rho, D with SEs and CIs.

    Writes RUN/compare/. Method and the length-matched analysis: docs/semantic-compare.md.
    """
    from canopy_entropy.comparison import compare
    from canopy_entropy.metrics import current_metrics

    if not run.is_dir():
        raise CanopyError(f"run folder {run} does not exist; pass the folder 'canopy run' wrote")
    if on not in ("variant", "model", "step"):
        raise ConfigError(f"--on must be 'variant', 'model' or 'step', got '{on}'")
    if series is not None and on != "step":
        raise ConfigError("--series names the series of --on step; add --on step or drop it")
    if on == "step":  # the two checkpoints' model labels, compared as models
        from canopy_entropy.series import step_label

        a, b, on = step_label(run, a, series), step_label(run, b, series), "model"
        by = "task" if by == "family,task" else by
    by_cols = tuple(c.strip() for c in by.split(",") if c.strip())
    result = compare(current_metrics(run), a=a, b=b, by=by_cols, n_boot=bootstrap, seed=seed, on=on)
    paths = result.save(run)
    err = Console(stderr=True)
    for note in result.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    if as_json:
        from canopy_entropy.jsonvalues import json_records  # full float64 precision

        records = json_records(result.table)
        matched = json_records(result.length_matched)
        doc = {"comparison": records, "length_matched": matched, "notes": result.notes}
        print(json.dumps(doc, indent=2, allow_nan=False))
        return
    out = Console()
    view = Table(title=f"{b} vs {a} (paired bootstrap, B={bootstrap}, 95% CI)")
    for col in [*by_cols, "metric", a, b, "change", "95% CI"]:
        view.add_column(col, justify="left" if col in (*by_cols, "metric") else "right")
    for _, r in result.table.iterrows():
        if r["kind"] == "ratio":
            change = f"{r['pct']:+.1f}%"
            ci = f"[{r['ratio_lo']:+.1f}%, {r['ratio_hi']:+.1f}%]"
        else:
            change = f"{r['diff']:+.4f}"
            ci = f"[{r['diff_lo']:+.4f}, {r['diff_hi']:+.4f}]"
        view.add_row(
            *[str(r[c]) for c in by_cols],
            r["metric"],
            f"{r['a']:.4g} ± {r['a_se']:.2g}",
            f"{r['b']:.4g} ± {r['b_se']:.2g}",
            change,
            ci,
        )
    out.print(view)
    lm = result.length_matched
    if not lm.empty:
        lm_view = Table(
            title="length-matched (within prompt, log-length bins): unmatched -> matched"
        )
        for col in [*by_cols, "model", "statistic", "unmatched", "matched", "rollouts kept"]:
            lm_view.add_column(
                col, justify="left" if col in (*by_cols, "model", "statistic") else "right"
            )
        for _, r in lm.iterrows():
            lm_view.add_row(
                *[str(r[c]) for c in by_cols],
                str(r["label"]),
                str(r["statistic"]),
                f"{r['unmatched']:+.3f}",
                f"{r['matched']:+.3f}",
                f"{r['n_rollouts_matched']}/{r['n_rollouts_unmatched']}",
            )
        out.print(lm_view)
    for name, path in paths.items():
        if name in ("compare.table", "compare.length_matched") or name.endswith(".md"):
            out.print(f"wrote {path}", highlight=False)
