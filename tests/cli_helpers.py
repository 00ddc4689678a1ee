"""Run the ``canopy`` CLI in-process and capture exit code and output (no 5 s start-up)."""

from __future__ import annotations

import sys

import pytest


def run_cli(args: list[str], capsys: pytest.CaptureFixture, monkeypatch) -> tuple[int, str, str]:
    """``canopy <args>`` through ``main()`` (the real error handling); returns (code, out, err)."""
    from canopy_entropy.cli.main import main

    monkeypatch.setattr(sys, "argv", ["canopy", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
