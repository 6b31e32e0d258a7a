"""Checkpoints that rebuild a learned method without its config file and never unpickle objects.

Format
------
A checkpoint is one file holding *tensors* and one JSON *skeleton*:

* the skeleton is the whole payload (method name and options, network spec, training config,
  epoch, history, optimizer/scheduler/scaler/RNG states) with every tensor replaced by
  ``{"__tensor__": "t<k>"}``; tuples are ``{"__tuple__": [...]}`` and dicts with non-string keys
  (optimizer states are keyed by parameter index) ``{"__items__": [[key, value], ...]}``, so the
  round trip is exact;
* ``model.safetensors`` (when the ``safetensors`` package is installed): the tensors, with the
  skeleton in the file's string metadata under ``"alignkit"``;
* ``model.pt`` otherwise: ``torch.save({"skeleton": str, "tensors": {name: tensor}})``, read back
  with ``torch.load(weights_only=True)`` -- a dict of strings and tensors, nothing else.

Either way loading runs no pickled code. :data:`FORMAT` and :data:`VERSION` are stored in the skeleton.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignkit.errors import InputError

FORMAT = "alignkit-checkpoint"
VERSION = 1
STEM = "model"


def have_safetensors() -> bool:
    try:
        import safetensors.torch  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


def default_name() -> str:
    """``model.safetensors`` when safetensors is installed, else ``model.pt``."""
    return f"{STEM}.safetensors" if have_safetensors() else f"{STEM}.pt"


def encode(payload: Any) -> tuple[str, dict[str, Tensor]]:
    """(JSON skeleton, tensors by name) of a nest of dicts, lists, tuples, tensors and scalars."""
    tensors: dict[str, Tensor] = {}

    def walk(value: Any) -> Any:
        if isinstance(value, Tensor):
            name = f"t{len(tensors)}"
            # contiguous private copies: safetensors refuses shared or strided storage
            tensors[name] = value.detach().cpu().contiguous().clone()
            return {"__tensor__": name}
        if isinstance(value, Mapping):
            if all(isinstance(k, str) for k in value):
                return {k: walk(v) for k, v in value.items()}
            return {"__items__": [[walk(k), walk(v)] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v) for v in value]}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalars
            return value.item()
        raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")

    skeleton = walk(payload)
    return json.dumps(skeleton, allow_nan=True), tensors


def decode(skeleton: str, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of :func:`encode`."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"__tensor__"}:
                return tensors[value["__tensor__"]]
            if set(value) == {"__tuple__"}:
                return tuple(walk(v) for v in value["__tuple__"])
            if set(value) == {"__items__"}:
                return {walk(k): walk(v) for k, v in value["__items__"]}
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(json.loads(skeleton))


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` atomically (temporary file, then rename): an interrupted save never leaves
    a truncated checkpoint where a good one was. The container follows the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    skeleton, tensors = encode({"format": FORMAT, "version": VERSION, **payload})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file  # type: ignore[import-not-found]

            save_file(tensors, str(tmp), metadata={"alignkit": skeleton})
        else:
            torch.save({"skeleton": skeleton, "tensors": tensors}, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself, or the checkpoint inside a run folder (``model.safetensors``, then ``model.pt``)."""
    path = Path(path)
    if path.is_dir():
        for name in (f"{STEM}.safetensors", f"{STEM}.pt"):
            if (path / name).is_file():
                return path / name
        raise InputError("no checkpoint (model.safetensors or model.pt) in this folder", str(path))
    if not path.is_file():
        raise InputError("checkpoint not found", str(path))
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (a file or a run folder)."""
    path = find_checkpoint(path)
    try:
        if path.suffix == ".safetensors":
            try:
                from safetensors import safe_open  # type: ignore[import-not-found]
            except ImportError:
                raise InputError("this checkpoint needs the safetensors package (pip install safetensors)", str(path)) from None
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            skeleton = metadata.get("alignkit")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(raw, dict) or "skeleton" not in raw:
                raise InputError("not an alignkit checkpoint", str(path))
            skeleton, tensors = raw["skeleton"], raw["tensors"]
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign files of any kind: one line naming the file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read checkpoint ({first})", str(path)) from None
    if not isinstance(skeleton, str):
        raise InputError("not an alignkit checkpoint (no skeleton)", str(path))
    payload = decode(skeleton, tensors)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError("not an alignkit checkpoint", str(path))
    if int(payload.get("version", 0)) > VERSION:
        raise InputError(f"checkpoint version {payload.get('version')} is newer than this alignkit reads ({VERSION})", str(path))
    return payload
