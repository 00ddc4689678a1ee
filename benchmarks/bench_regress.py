"""Benchmark: the published Beta GLMM specification on a 2400-row panel, and 250-sim diagnostics.

Targets (2 cores): fit < 15 s, diagnostics < 10 s. Also times glmmTMB on the same data when
Rscript with glmmTMB is installed. Prints wall and CPU seconds.
Run: PYTHONPATH=src python benchmarks/bench_regress.py [--prompts 100] [--no-r]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data"))

from make_beta_panel import make_panel  # noqa: E402

from canopy_entropy.stats.beta_glmm import _torch, fit_beta_glmm  # noqa: E402
from canopy_entropy.stats.dharma import run_diagnostics  # noqa: E402
from canopy_entropy.stats.regression import PUBLISHED_MEAN, PUBLISHED_PRECISION  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=100, help="prompts per task (x24 rows)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-r", action="store_true", help="skip the glmmTMB timing")
    args = parser.parse_args()

    t0 = time.perf_counter()
    _torch()
    with warnings.catch_warnings():  # one-off imports (formulaic, scipy.special) off the clock
        warnings.simplefilter("ignore")
        fit_beta_glmm(make_panel(seed=0, n_prompts=3), "D ~ R_sc + (1 | prompt)", "~ variant")
    print(f"imports + warm-up: {time.perf_counter() - t0:.2f} s")
    panel = make_panel(seed=args.seed, n_prompts=args.prompts)
    print(f"panel: {len(panel)} rows, {panel.prompt.nunique()} prompts, 3 families")

    wall, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit_beta_glmm(panel, PUBLISHED_MEAN, PUBLISHED_PRECISION, {"variant": "base"})
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (wall times inflate)")
    print(
        f"fit: {wall:.2f} s wall, {cpu:.2f} s CPU (target < 15 s); converged={result.converged}, "
        f"max|grad|={result.max_abs_gradient:.2e}, logLik={result.loglik:.4f}, "
        f"BFGS iterations={result.iterations}"
    )
    wall, cpu = time.perf_counter(), time.process_time()
    diag = run_diagnostics(result, nsim=250, seed=0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"diagnostics (250 sims, both kinds): {wall:.2f} s wall, {cpu:.2f} s CPU (target < 10 s)")
    print(f"  unconditional KS p = {diag.tests['unconditional']['ks']['p']:.3g}")

    if args.no_r or shutil.which("Rscript") is None:
        print("glmmTMB: skipped (no Rscript or --no-r)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        csv, out = Path(tmp) / "panel.csv", Path(tmp) / "glmmtmb_result.json"
        panel.to_csv(csv, index=False, float_format="%.17g")
        script = ROOT / "tests" / "data" / "glmmtmb_fit.R"
        proc = subprocess.run(["Rscript", str(script), str(csv), str(out)], capture_output=True)
        if proc.returncode != 0:
            print(f"glmmTMB: failed ({proc.stderr.decode()[-200:]})")
            return
        ref = json.loads(out.read_text())
        diff = max(
            abs(result.to_json()[part][term]["estimate"] - row["estimate"])
            for part in ("mean", "precision")
            for term, row in ref[part].items()
        )
        print(
            f"glmmTMB {ref['glmmTMB_version']}: fit {ref['fit_seconds']:.2f} s wall, "
            f"{ref['fit_cpu_seconds']:.2f} s CPU; "
            f"logLik {ref['loglik']:.4f} (ours - R: {result.loglik - ref['loglik']:+.2e}); "
            f"max |coef diff| {diff:.2e}; R max|grad| {ref['max_abs_gradient']:.2e}"
        )


if __name__ == "__main__":
    main()
