"""``canopy regress``: the Beta mixed-effects regression of diversity on entropy rate."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from canopy_entropy.errors import CanopyError


def _parse_reference(items: list[str] | None) -> dict[str, str]:
    ref = {}
    for item in items or []:
        if "=" not in item:
            raise CanopyError(f"--reference {item!r} must look like COLUMN=LEVEL, e.g. task=math")
        key, value = item.split("=", 1)
        ref[key.strip()] = value.strip()
    return ref


def _read_panel(path: Path):
    import pandas as pd

    if not path.exists():
        raise CanopyError(f"panel file {path} does not exist")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as exc:
        raise CanopyError(f"cannot read panel {path}: {exc}") from exc


def _print_result(payload: dict, console: Console) -> None:
    for part in ("mean", "precision"):
        table = Table(title=f"{part} model ({'logit' if part == 'mean' else 'log'} link)")
        for col in ("term", "estimate", "SE", "z", "p"):
            table.add_column(col, justify="left" if col == "term" else "right")
        for term, row in payload[part].items():
            cells = [row[k] for k in ("estimate", "se", "z", "p")]
            table.add_row(term, *("" if v is None else f"{v:.4g}" for v in cells))
        console.print(table)
    sds = ", ".join(f"{g} {sd:.4g}" for g, sd in payload["re_sd"].items())
    console.print(f"random-effect SDs: {sds or 'none'}")
    console.print(
        f"logLik {payload['loglik']:.4f}  AIC {payload['aic']:.4f}  nobs {payload['nobs']}  "
        f"converged: {'yes' if payload['converged'] else '[bold red]NO[/]'}"
    )
    ratio = payload.get("slope_ratio")
    if ratio:
        console.print(
            f"slope ratio ({ratio['main']} + {ratio['interaction']}) / {ratio['main']} = "
            f"{ratio['estimate']:.4f} (SE {ratio['se']:.4f}, 95% CI {ratio['lo']:.4f} to "
            f"{ratio['hi']:.4f})"
        )
    diag = payload.get("diagnostics")
    if diag:
        for kind in ("unconditional", "conditional"):
            t = diag[kind]
            console.print(
                f"diagnostics ({kind}, {diag['nsim']} sims): KS p {t['ks']['p']:.3g}, "
                f"dispersion ratio {t['dispersion']['ratio']:.3g} (p {t['dispersion']['p']:.3g}), "
                f"outliers {t['outliers']['outliers']} (p {t['outliers']['p']:.3g})"
            )


def _print_model(payload: dict, console: Console) -> None:
    """The coefficient tables of a robustness fit (lmm, quadratic, vendi, rse)."""
    if "fits" not in payload:  # vendi / rse: a Beta fit like the default model
        console.print(f"response {payload['response']}: {payload['formula']['mean']}")
        _print_result(payload, console)
        return
    for name, fit in payload["fits"].items():
        table = Table(title=f"{name}: {fit['formula']} (linear mixed model, ML)")
        for col in ("term", "estimate", "SE", "z", "p"):
            table.add_column(col, justify="left" if col == "term" else "right")
        for term, row in fit["coefficients"].items():
            cells = [row[k] for k in ("estimate", "se", "z", "p")]
            table.add_row(term, *("" if v is None else f"{v:.4g}" for v in cells))
        console.print(table)
        console.print(
            f"random-intercept var {fit['re_var']:.4g}, residual var {fit['resid_var']:.4g}, "
            f"logLik {fit['loglik']:.4f}  AIC {fit['aic']:.4f}  nobs {fit['nobs']}  "
            f"converged: {'yes' if fit['converged'] else '[bold red]NO[/]'}"
        )
    lrt = payload.get("lrt")
    if lrt:
        console.print(
            f"likelihood-ratio test, quadratic vs interaction: chi2 = {lrt['statistic']:.4f} "
            f"on {lrt['df']} df, p = {lrt['p_value']:.4g}"
        )


def _check_model_options(model: str, **given: bool) -> None:
    """Options of the Beta model given with another model are an error, never ignored."""
    from canopy_entropy.stats.regression import check_model

    check_model(model)
    used = [name for name, on in given.items() if on]
    if model != "beta" and used:
        raise CanopyError(
            f"{', '.join(used)} only apply to --model beta; --model {model} fits the published "
            "specification of its model"
        )


def command(
    run: Annotated[
        Path | None, typer.Argument(help="Run folder; fits the published specification.")
    ] = None,
    panel: Annotated[
        Path | None, typer.Option("--panel", help="CSV/Parquet panel to fit instead of a run.")
    ] = None,
    mean: Annotated[
        str | None, typer.Option("--mean", help="Mean formula, e.g. 'D ~ x * g + (1 | id)'.")
    ] = None,
    precision: Annotated[
        str | None, typer.Option("--precision", help="Precision formula, e.g. '~ g'.")
    ] = None,
    reference: Annotated[
        list[str] | None,
        typer.Option("--reference", help="Reference level COLUMN=LEVEL (repeatable)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the fit as JSON.")] = False,
    diagnostics: Annotated[
        bool | None,
        typer.Option(
            "--diagnostics/--no-diagnostics",
            help="DHARMa-like simulation diagnostics (default: on for a run, off for --panel).",
        ),
    ] = None,
    nsim: Annotated[int, typer.Option("--nsim", help="Simulations per row.")] = 250,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the simulations.")] = 0,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="With --panel: folder for result.json, tables, figures."),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="beta (the published Beta GLMM), lmm (linear mixed main + interaction), "
            "quadratic (LRT of R_c^2), vendi (Beta fit of the Vendi score), rse (Beta fit of RSE).",
        ),
    ] = "beta",
) -> None:
    """Fit the Beta mixed-effects regression of diversity on entropy rate.

    `canopy regress RUN` fits the published specification on the run's panel and writes
    RUN/regression, RUN/tables/regression.* and RUN/figures/regression_*. `canopy regress
    --panel FILE.csv --mean "D ~ ..." --precision "~ ..."` fits any specification on any table.
    `--model lmm|quadratic|vendi|rse` fits a robustness model into RUN/regression/MODEL/.
    Specification and diagnostics: docs/regression.md.
    """
    from canopy_entropy.stats import regression as reg

    if (run is None) == (panel is None):
        raise CanopyError("give either a run folder or --panel FILE.csv (not both)")
    if nsim < 1:
        raise CanopyError(f"--nsim must be at least 1, not {nsim}")
    _check_model_options(
        model,
        **{
            "--mean": mean is not None,
            "--precision": precision is not None,
            "--diagnostics": bool(diagnostics),
            "--nsim": nsim != 250,
            "--seed": seed != 0,
        },
    )
    ref = _parse_reference(reference)
    err = Console(stderr=True)
    if model != "beta":
        _command_model(run, panel, out, model, ref, json_out, err)
        return
    with (
        warnings.catch_warnings(record=True) as caught,
        err.status("fitting the Beta mixed-effects model ...", spinner="dots"),
    ):
        warnings.simplefilter("always")
        if run is not None:
            if out is not None:
                raise CanopyError("--out only applies with --panel; a run writes into RUN/")
            payload = reg.regress_run(
                run,
                diagnostics=True if diagnostics is None else diagnostics,
                nsim=nsim,
                seed=seed,
                reference=ref or None,
                mean=mean or reg.PUBLISHED_MEAN,
                precision=precision or reg.PUBLISHED_PRECISION,
            ).summary
        else:
            if not mean:
                raise CanopyError("--panel needs --mean 'RESPONSE ~ TERMS', e.g. 'D ~ R_sc'")
            data = _read_panel(panel)
            if out is not None:
                payload = reg.regress_panel(
                    data,
                    out,
                    bool(diagnostics),
                    nsim,
                    seed,
                    ref,
                    mean,
                    precision or "~ 1",
                ).summary
            else:
                payload = reg.regress(
                    data,
                    diagnostics=bool(diagnostics),
                    nsim=nsim,
                    seed=seed,
                    reference=ref,
                    mean=mean,
                    precision=precision or "~ 1",
                ).summary
    _print_warnings(caught, err)
    if json_out:
        typer.echo(json.dumps(payload, indent=2))
    else:
        _print_result(payload, Console())


def _print_warnings(caught: list, err: Console) -> None:
    from canopy_entropy.stats.beta_glmm import ConvergenceWarning

    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            err.print(f"[bold red]WARNING: {w.message}[/]", highlight=False, soft_wrap=True)
        elif issubclass(w.category, UserWarning):
            err.print(f"[yellow]warning:[/] {w.message}", highlight=False, soft_wrap=True)


def _command_model(
    run: Path | None,
    panel: Path | None,
    out: Path | None,
    model: str,
    ref: dict[str, str],
    json_out: bool,
    err: Console,
) -> None:
    """``--model lmm|quadratic|vendi|rse`` on a run (into RUN/regression/MODEL/) or a panel."""
    from canopy_entropy.stats import regression as reg

    with (
        warnings.catch_warnings(record=True) as caught,
        err.status(f"fitting the {model} model ...", spinner="dots"),
    ):
        warnings.simplefilter("always")
        if run is not None:
            if out is not None:
                raise CanopyError("--out only applies with --panel; a run writes into RUN/")
            payload = reg.regress_model_run(run, model, ref or None)
        else:
            payload = reg.fit_model(_read_panel(panel), model, ref or None)
            if out is not None:
                reg.write_model_result(out, payload)
    _print_warnings(caught, err)
    if json_out:
        typer.echo(json.dumps(payload, indent=2))
    else:
        _print_model(payload, Console())
