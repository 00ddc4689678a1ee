"""User-facing errors: one line naming the problem and the fix, never a traceback."""


class CanopyError(Exception):
    """A user mistake or bad input. The CLI prints ``error: <message>`` and exits with code 2."""


class StoreError(CanopyError):
    """A rollout store problem (corrupt or foreign shard, schema mismatch)."""


class ConfigError(CanopyError):
    """An invalid experiment config or command-line option."""


class Notice(UserWarning):
    """Information, not a problem (a model converted once, with its time): the CLI prints
    it as one ``note:`` line, where other library warnings get ``warning:``."""


class MissingExtraError(CanopyError):
    """An optional dependency is missing; the message carries the pip command that fixes it."""


def require(module: str, extra: str):
    """Import an optional dependency or raise a MissingExtraError with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised when extras are absent
        raise MissingExtraError(
            f"'{module}' is not installed; install it with: pip install 'canopy-entropy[{extra}]'"
        ) from exc
