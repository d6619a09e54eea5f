"""Token-level verification rules: one registry behind one small interface.

    >>> from hf_globalres import verifiers
    >>> verifiers.available()          # doctest: +SKIP
    ['rrs', 'rrs_without_replacement', 'single', 'spectr', ...]
    >>> rule = verifiers.get("spectr")
    >>> result = rule.verify(target_probs, draft_probs, draft_tokens)  # doctest: +SKIP

Each rule lives in its own module of this package and registers itself with
:func:`register`; modules are discovered on first use, so adding a rule is
adding one file. These modules are pure tensor math and never import
transformers.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TypeVar

from .base import DraftScheme, EmissionPlan, SparseRows, VerificationResult, Verifier

_REGISTRY: dict[str, type[Verifier]] = {}
_DISCOVERED = False
_NON_RULE_MODULES = {"base"}

V = TypeVar("V", bound=type[Verifier])


def register(cls: V) -> V:
    """Class decorator: make ``cls`` available as ``get(cls.name)``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a non-empty class attribute 'name'")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a verifier named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
    _REGISTRY[name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _NON_RULE_MODULES and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    _DISCOVERED = True


def available() -> list[str]:
    """Names of every registered verifier, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get(name: str | Verifier, **options) -> Verifier:
    """A verifier instance by registered name (options go to its constructor).

    A :class:`Verifier` instance is returned unchanged (options must be empty).
    """
    if isinstance(name, Verifier):
        if options:
            raise ValueError("options cannot be applied to an existing verifier instance")
        return name
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown verifier {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name](**options)


__all__ = [
    "DraftScheme",
    "EmissionPlan",
    "SparseRows",
    "VerificationResult",
    "Verifier",
    "available",
    "get",
    "register",
]
