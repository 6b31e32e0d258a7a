"""Transform models behind one interface (see :mod:`alignkit.transforms.base` for the contract).

Every model maps fixed-world points to moving-world points; ``warped = moving ∘ map``.
:func:`build_transform` is the one place where a model is looked up by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from alignkit.errors import ConfigError
from alignkit.spatial.grid import Grid
from alignkit.transforms.base import ComposedTransform, FieldTransform, Transform, flatten_stages, stage_kinds
from alignkit.transforms.bspline import (
    BSplineFFD,
    ControlPointBSpline,
    basis_matrices,
    control_grid_for,
    cubic_bspline,
)
from alignkit.transforms.dense import (
    VSVF_SIGMAS,
    VSVF_TIME_STEPS,
    VSVF_WEIGHTS,
    DisplacementField,
    InverseVelocityTransform,
    StationaryVelocityField,
    VectorMomentumSVF,
    advect_map,
    resample_field,
    scaling_and_squaring,
    voxel_to_world_vectors,
    world_to_voxel_vectors,
)
from alignkit.transforms.disparity import DisparityField, epipolar_direction
from alignkit.transforms.linear import (
    Affine,
    Homography,
    InverseLinearTransform,
    LinearTransform,
    MatrixTransform,
    ParametricLinearTransform,
    Rigid,
    Similarity,
    Translation,
    projective_apply,
)

TransformName = Literal[
    "translation", "rigid", "similarity", "affine", "homography", "displacement", "svf", "vsvf", "bspline",
    "disparity",
]

_LINEAR: dict[str, type[ParametricLinearTransform]] = {
    "translation": Translation,
    "rigid": Rigid,
    "similarity": Similarity,
    "affine": Affine,
    "homography": Homography,
}
_FIELD: dict[str, type[FieldTransform]] = {
    "displacement": DisplacementField,
    "svf": StationaryVelocityField,
    "vsvf": VectorMomentumSVF,
    "bspline": BSplineFFD,
    "disparity": DisparityField,
}


def build_transform(
    name: TransformName | str,
    grid: Grid,
    *,
    center: Tensor | Sequence[float] | None = None,
    length_scale: float | None = None,
    **options: object,
) -> Transform:
    """The identity-initialised model ``name`` for registering onto ``grid`` (the fixed grid, or the
    grid a dense model lives on).

    Linear models get ``center`` (default: ``grid.center_world()``) and ``length_scale`` (default:
    half the mean extent of ``grid``); dense models get ``grid`` and ``options`` (e.g. ``steps`` for
    ``svf``, ``time_steps`` for ``vsvf``, ``control_spacing`` for ``bspline``).
    Raises :class:`ConfigError` for an unknown name, an unknown option, or a 3D homography.
    """
    valid = get_args(TransformName)
    key = str(name).lower()
    if key not in valid:
        raise ConfigError(f"unknown transform {name!r}; valid names: {', '.join(valid)}")
    if key in _LINEAR:
        cls: type[Transform] = _LINEAR[key]
        if center is None:
            center = grid.center_world()
        if length_scale is None:
            length_scale = 0.5 * float(grid.extent().mean())
        kwargs: dict[str, Any] = {
            "center": torch.as_tensor(center),
            "length_scale": length_scale,
            **options,
        }
        args: tuple[Any, ...] = (grid.ndim,)
    else:
        cls = _FIELD[key]
        if center is not None or length_scale is not None:
            raise ConfigError(f"center/length_scale apply to linear models, not to {key!r}")
        kwargs = dict(options)
        args = (grid,)
    accepted = {
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind == inspect.Parameter.KEYWORD_ONLY
    }
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(f"transform {key!r} does not take option(s) {unknown}; it takes {sorted(accepted)}")
    return cls(*args, **kwargs)


__all__ = [
    "VSVF_SIGMAS",
    "VSVF_TIME_STEPS",
    "VSVF_WEIGHTS",
    "Affine",
    "BSplineFFD",
    "ComposedTransform",
    "ControlPointBSpline",
    "DisparityField",
    "DisplacementField",
    "FieldTransform",
    "Homography",
    "InverseLinearTransform",
    "InverseVelocityTransform",
    "LinearTransform",
    "MatrixTransform",
    "ParametricLinearTransform",
    "Rigid",
    "Similarity",
    "StationaryVelocityField",
    "Transform",
    "TransformName",
    "Translation",
    "VectorMomentumSVF",
    "advect_map",
    "basis_matrices",
    "build_transform",
    "control_grid_for",
    "cubic_bspline",
    "epipolar_direction",
    "flatten_stages",
    "projective_apply",
    "resample_field",
    "scaling_and_squaring",
    "stage_kinds",
    "voxel_to_world_vectors",
    "world_to_voxel_vectors",
]
