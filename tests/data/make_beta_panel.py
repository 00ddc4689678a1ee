"""Generate tests/data/beta_panel.csv: a small panel shaped like the published one (seeded).

4 tasks x 30 prompts x 3 families x 2 variants with known generating parameters:
logit(mu) = -0.3 + 0.7 R + 0.4 I + 1.2 R I + 0.3 x - 0.15 x^2 + task + u_prompt + v_family,
log(phi) = 3.0 + 0.3 I + task_phi - 0.2 R, u ~ N(0, 0.4^2), v ~ N(0, 0.3^2), x = invN_sc.
Run: python tests/data/make_beta_panel.py  (writes beta_panel.csv next to this file).
"""

from pathlib import Path

import numpy as np
import pandas as pd


def make_panel(seed: int = 20260601, n_prompts: int = 30, raw: bool = False) -> pd.DataFrame:
    """The generating process described in the module docstring (``raw``: keep R and invN)."""
    rng = np.random.default_rng(seed)
    tasks, families, variants = ["T1", "T2", "T3", "T4"], ["fa", "fb", "fc"], ["base", "instruct"]
    task_mu = dict(zip(tasks, [0.0, 0.5, -0.4, 0.2], strict=False))
    task_phi = dict(zip(tasks, [0.0, -0.3, 0.2, 0.4], strict=False))
    fam_re = dict(zip(families, rng.normal(0, 0.3, len(families)), strict=False))
    rows = []
    for task in tasks:
        for k in range(n_prompts):
            prompt = f"{task}-p{k:02d}"
            u = rng.normal(0, 0.4)
            r_prompt = rng.normal(0, 0.6)
            for fam in families:
                for variant in variants:
                    inst = variant == "instruct"
                    r = r_prompt + rng.normal(0, 0.8) - 0.3 * inst
                    x = rng.normal(0, 1)
                    eta = (
                        -0.3
                        + 0.7 * r
                        + 0.4 * inst
                        + 1.2 * r * inst
                        + 0.3 * x
                        - 0.15 * x**2
                        + task_mu[task]
                        + u
                        + fam_re[fam]
                    )
                    mu = 1 / (1 + np.exp(-eta))
                    phi = np.exp(3.0 + 0.3 * inst + task_phi[task] - 0.2 * r)
                    d = float(np.clip(rng.beta(mu * phi, (1 - mu) * phi), 1e-6, 1 - 1e-6))
                    rows.append((task, prompt, fam, variant, d, r, x))
    df = pd.DataFrame(rows, columns=["task", "prompt", "family", "variant", "D", "R", "invN"])
    df["R_sc"] = (df.R - df.R.mean()) / df.R.std(ddof=1)
    df["invN_sc"] = (df.invN - df.invN.mean()) / df.invN.std(ddof=1)
    cols = ["task", "prompt", "family", "variant", "D", "R_sc", "invN_sc"]
    return df[[*cols, "R", "invN"]] if raw else df[cols]


if __name__ == "__main__":
    out = Path(__file__).with_name("beta_panel.csv")
    make_panel().to_csv(out, index=False, float_format="%.17g")
    print(f"wrote {out}")
