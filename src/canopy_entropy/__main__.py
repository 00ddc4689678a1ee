"""``python -m canopy_entropy`` is the ``canopy`` command."""

from canopy_entropy.cli.main import main

if __name__ == "__main__":
    main()
