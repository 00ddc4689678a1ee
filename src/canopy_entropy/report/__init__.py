"""One self-contained HTML report of a run (``canopy report RUN`` -> ``RUN/report.html``).

Everything is inside the file: figures as base64 PNG, the package's CSS and a small script
that sorts tables (``data/report/``), print rules. A Content-Security-Policy forbids every
network request, so the page opens offline and can be mailed. Every string that comes from
data (model names, prompts, config values) is HTML-escaped.
"""

from canopy_entropy.report.build import build_report, missing_sections, render_report

__all__ = ["build_report", "missing_sections", "render_report"]
