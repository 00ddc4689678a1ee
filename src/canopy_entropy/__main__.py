"""``python -m canopy_entropy`` is the ``canopy`` command."""

from canopy_entropy.cli.main import main

main()
