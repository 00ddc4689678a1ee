"""Finding scorers by name (built-in or ``module:function``) and versioning them."""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
from collections.abc import Callable
from typing import Any

from canopy_entropy.scoring.answers import (
    ScoringError,
    choice_match,
    exact_match,
    numeric_match,
    regex_match,
)
from canopy_entropy.scoring.code_exec import code_passes

BUILTIN_SCORERS: dict[str, Callable[..., Any]] = {
    fn.__name__: fn for fn in (numeric_match, choice_match, exact_match, regex_match, code_passes)
}
# options that change how a scorer runs, never its verdicts
_UNVERSIONED_OPTIONS = frozenset({"execute_code"})


def load_scorer(spec: str) -> Callable[..., Any]:
    """The scorer named ``spec``: a built-in name (``numeric_match``, ...) or a custom one as
    ``module:function`` (``function`` may be dotted, e.g. ``mypkg.scorers:Grader.score``),
    imported like a Python entry point. It must accept ``(response, reference)``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ScoringError(f"scorer {spec!r} is not a name; give a built-in or 'module:function'")
    spec = spec.strip()
    if ":" not in spec:
        if spec in BUILTIN_SCORERS:
            return BUILTIN_SCORERS[spec]
        raise ScoringError(
            f"unknown scorer '{spec}'; use one of {sorted(BUILTIN_SCORERS)} or a custom "
            "scorer as 'module:function'"
        )
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ScoringError(
            f"scorer '{spec}' is not of the form 'module:function' (e.g. 'mypkg.grade:is_right')"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ScoringError(
            f"cannot import '{module_name}' for scorer '{spec}' ({exc}); install it or put its "
            "folder on PYTHONPATH"
        ) from None
    except Exception as exc:
        raise ScoringError(
            f"importing '{module_name}' for scorer '{spec}' failed ({type(exc).__name__}: "
            f"{_first_line(exc)}); fix that module"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ScoringError(
                f"'{module_name}' has no '{attr}' for scorer '{spec}'; check the name after ':'"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ScoringError(f"scorer '{spec}' is a {type(obj).__name__}, not a function")
    try:
        inspect.signature(obj).bind("response", "reference")
    except TypeError:
        raise ScoringError(
            f"scorer '{spec}' cannot be called as f(response, reference); give it that signature"
        ) from None
    except ValueError:  # no signature to inspect (some builtins): trust it
        pass
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def _unwrap(scorer: Callable[..., Any]) -> tuple[Callable[..., Any], dict[str, Any]]:
    options: dict[str, Any] = {}
    while isinstance(scorer, functools.partial):
        if scorer.args:
            raise ScoringError(
                "a functools.partial scorer may fix keyword options only; the response and "
                "reference stay positional"
            )
        options = {**scorer.keywords, **options}
        scorer = scorer.func
    return scorer, options


def scorer_name(scorer: Callable[..., Any]) -> str:
    """``module:qualname`` of a scorer (a partial names the function it wraps)."""
    fn, _ = _unwrap(scorer)
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def scorer_version(scorer: Callable[..., Any], **options: Any) -> str:
    """A string that changes whenever the scorer's verdicts may change, stored with the scores
    so that a changed scorer invalidates them (and nothing else).

    ``module:qualname@<version>[+<options as JSON>]``; the version is the scorer's
    ``__canopy_version__`` attribute when set, else a hash of its module's source (any edit of
    that module counts as a change).
    """
    fn, bound = _unwrap(scorer)
    name = scorer_name(fn)
    version = getattr(fn, "__canopy_version__", None)
    if version is None:
        try:
            source = inspect.getsource(inspect.getmodule(fn))  # type: ignore[arg-type]
        except (TypeError, OSError):
            raise ScoringError(
                f"cannot version scorer {name}: its source is not readable; set its "
                "__canopy_version__ attribute to a string you change with its logic"
            ) from None
        version = hashlib.sha256(source.encode()).hexdigest()[:12]
    params = {k: v for k, v in {**bound, **options}.items() if k not in _UNVERSIONED_OPTIONS}
    suffix = "+" + json.dumps(params, sort_keys=True, default=repr) if params else ""
    return f"{name}@{version}{suffix}"
