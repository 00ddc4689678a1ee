"""The report's correctness section: accuracy, pass@k and majority vote per model and task,
and the AUROC/AUPRC of each uncertainty for flagging an incorrect rollout."""

from __future__ import annotations

from pathlib import Path

from canopy_entropy.plots import data
from canopy_entropy.report.html import Column, fmt, html_table, note, percent


def correctness(run: Path, alerts: list[str]) -> str:
    """HTML of the correctness tables, or a note naming what fills them."""
    from canopy_entropy.plots.fig_accuracy import accuracy_tables

    try:
        result = accuracy_tables(run)
    except data.MissingInput as exc:
        return note(str(exc))
    pooled = result.pooled
    ks = [c for c in pooled.columns if c.startswith("pass_at_")]
    cols = [Column("model", True), Column("variant", True), Column("task", True),
            Column("prompts", tip="prompts scored"),
            Column("accuracy", tip="share of correct rollouts, mean over prompts"),
            Column("majority vote", tip="correctness of each prompt's most common answer"),
            *(Column(f"pass@{k[8:]}", tip="unbiased 1 - C(n-c,k)/C(n,k), mean over prompts")
              for k in ks)]  # fmt: skip
    rows = [
        [
            r["model"],
            r["variant"],
            r["task"],
            fmt(int(r["n_prompts"])),
            percent(r["accuracy"]),
            percent(r.get("majority")),
            *(percent(r[k]) for k in ks),
        ]
        for _, r in pooled.iterrows()
    ]
    link = result.link
    lcols = [Column("model", True), Column("variant", True), Column("task", True),
             Column("uncertainty", True),
             Column("AUROC", tip="chance that an incorrect rollout ranks above a correct one"),
             Column("AUPRC", tip="average precision of flagging incorrect rollouts"),
             Column("chance AUPRC", tip="share of incorrect rollouts"),
             Column("rollouts")]  # fmt: skip
    lrows = [
        [
            r["model"],
            r["variant"],
            r["task"],
            r["label"],
            fmt(r["auroc"], 3),
            fmt(r["auprc"], 3),
            percent(r["incorrect_rate"]),
            fmt(int(r["n_rollouts"])),
        ]
        for _, r in link.iterrows()
    ]
    return (
        html_table(cols, rows)
        + "<h3>Does the uncertainty point at the errors?</h3>"
        + html_table(lcols, lrows)
        + note(
            "AUROC/AUPRC pool every rollout of a model and task (all prompts ranked together); "
            "0.5 = no better than chance. Figures fig8 show accuracy by entropy-rate decile."
        )
    )
