"""The ``canopy`` command line (typer + rich). One module per command."""
