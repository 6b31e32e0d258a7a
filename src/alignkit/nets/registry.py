"""Name -> network class registry, and rebuilding a network from its configuration.

Every network class in :mod:`alignkit.nets` has a keyword-only constructor and a ``config``
attribute: a plain dict of its constructor arguments (ints, floats, strings, bools, lists, nested
dicts -- JSON- and ``torch.load(weights_only=True)``-safe). A checkpoint stores
``network_config(model)`` next to the state dict, and ``build_network(that_dict)`` rebuilds the
same architecture without pickling any class (the VoxelMorph habit of saving a model with the
config that rebuilds it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from torch import nn

from alignkit.errors import ConfigError

#: registered network classes by name; filled by :func:`register_network` when the modules import.
NETWORKS: dict[str, type[nn.Module]] = {}

M = TypeVar("M", bound=type[nn.Module])


def register_network(name: str) -> Callable[[M], M]:
    """Class decorator: record ``cls`` under ``name`` in :data:`NETWORKS` and set ``cls.network_name``."""

    def decorate(cls: M) -> M:
        if name in NETWORKS and NETWORKS[name] is not cls:
            raise ConfigError(f"network name {name!r} is already registered to {NETWORKS[name].__name__}")
        NETWORKS[name] = cls
        cls.network_name = name  # type: ignore[attr-defined]
        return cls

    return decorate


def plain(value: Any) -> Any:
    """Config values as plain data: tuples become lists (so a JSON round trip is the identity),
    mappings become dicts, modules become their :func:`network_config`."""
    if isinstance(value, nn.Module):
        return network_config(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [plain(v) for v in value]
    return value


def network_config(module: nn.Module) -> dict[str, Any]:
    """``{"name": registered name, **module.config}``: everything :func:`build_network` needs."""
    name = getattr(type(module), "network_name", None)
    config = getattr(module, "config", None)
    if name is None or NETWORKS.get(name) is not type(module) or not isinstance(config, dict):
        raise ConfigError(
            f"{type(module).__name__} is not a registered alignkit network with a config "
            "(decorate it with @register_network and set self.config)"
        )
    return {"name": name, **plain(config)}


def build_network(config: Mapping[str, Any]) -> nn.Module:
    """Build a registered network from ``{"name": ..., **constructor_kwargs}``.

    Raises :class:`ConfigError` for an unknown name or arguments the constructor does not take."""
    if "name" not in config:
        raise ConfigError(
            f"network config needs a 'name' (one of {sorted(NETWORKS)}), got keys {sorted(config)}"
        )
    kwargs = dict(config)
    name = kwargs.pop("name")
    cls = NETWORKS.get(name)
    if cls is None:
        raise ConfigError(f"unknown network {name!r}; registered: {', '.join(sorted(NETWORKS))}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # wrong or missing keyword: say which network and what it got
        raise ConfigError(f"cannot build network {name!r} from {sorted(kwargs)}: {exc}") from exc


def as_network(spec: Mapping[str, Any] | nn.Module) -> nn.Module:
    """A module as is, or a config dict built with :func:`build_network` (for injected sub-networks)."""
    if isinstance(spec, nn.Module):
        network_config(spec)  # fail now, not at checkpoint time, if it cannot be rebuilt
        return spec
    if isinstance(spec, Mapping):
        return build_network(spec)
    raise ConfigError(f"expected a network config dict or an nn.Module, got {type(spec).__name__}")
