"""Method names → :class:`~alignkit.evaluate.method.Method` objects: ``alignkit:<preset>``, the peers and
``<learned method>:<checkpoint>`` (:mod:`alignkit.evaluate.learned_methods`).

Peers come from :data:`alignkit.evaluate.peers.PEERS` (name → factory), imported only when a name
is resolved or listed, so that ``import alignkit`` never imports a peer adapter.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from alignkit.errors import ConfigError
from alignkit.evaluate.method import Method


def peer_factories() -> Mapping[str, Callable[..., Method]]:
    """``PEERS`` of :mod:`alignkit.evaluate.peers`, or ``{}`` while that module does not exist."""
    try:
        peers = importlib.import_module("alignkit.evaluate.peers")
    except ModuleNotFoundError as exc:
        # only the absence of the adapters module itself is tolerated; a missing import *inside*
        # it is a bug that must surface
        if exc.name == "alignkit.evaluate.peers":
            return {}
        raise
    # a peers/ folder without its __init__ (adapters being written) imports as an empty namespace package
    return dict(getattr(peers, "PEERS", {}))


def list_methods() -> list[str]:
    """Every name :func:`resolve_method` accepts: alignkit's presets first, then the peers, sorted, then
    the learned methods' patterns (``voxelmorph:<checkpoint>``)."""
    from alignkit.evaluate.alignkit_methods import alignkit_method_names
    from alignkit.evaluate.learned_methods import learned_method_patterns

    return alignkit_method_names() + sorted(peer_factories()) + learned_method_patterns()


def resolve_method(spec: str | Method, **options: Any) -> Method:
    """The method named ``spec`` (``"alignkit:brain"``, ``"ants:syn"``, ``"voxelmorph:RUNDIR+refine50"``);
    a Method is returned as is.

    ``options`` go to the method's constructor (e.g. ``max_iterations`` for alignkit presets).
    Raises :class:`~alignkit.errors.ConfigError` naming the known methods when ``spec`` is unknown.
    """
    if isinstance(spec, Method):
        return spec
    name = spec.strip()
    from alignkit.evaluate.alignkit_methods import PREFIX, AlignkitMethod, alignkit_method_names

    if name in alignkit_method_names():
        return AlignkitMethod(name[len(PREFIX) :], **options)
    peers = peer_factories()
    if name in peers:
        method = peers[name](**options)
        if not isinstance(method, Method):
            raise ConfigError(f"peer factory for {name!r} returned {type(method).__name__}, not a Method")
        # the factory may build a generic adapter: the table must show the name the user asked for
        method.name = name
        return method
    from alignkit.evaluate.learned_methods import learned_method_for

    learned = learned_method_for(name, **options)  # "voxelmorph:<checkpoint>[+refineK]"
    if learned is not None:
        return learned
    raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(list_methods())}")
