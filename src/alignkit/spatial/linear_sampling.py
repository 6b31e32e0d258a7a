"""Linear sampling made of plain differentiable torch ops: twice differentiable on every device.

Why it exists: the implicit gradient of the solver layer (:mod:`alignkit.solve.implicit`) needs second
derivatives of the warp ``moving ∘ φ`` -- the mixed ``∂²E/∂φ∂F`` (Jacobian-free backprop) and, for the
exact option, ``∂²E/∂φ²`` (Hessian-vector products). On CUDA ``aten::grid_sampler_3d_backward`` has no
derivative (torch 2.11, H200: "derivative for aten::grid_sampler_3d_backward is not implemented"), so DIO
could not train on a GPU; torch 2.11 lacks it on the CPU too in 3D (torch 2.13's CPU kernel has it).
:func:`sample_voxels_twice_differentiable` computes the same samples from ``floor``, a ``gather`` of the
``2**ndim`` corners and products of the weights; ``gather``'s backward is a scatter-add, whose own
backward is a gather, so autograd differentiates it as many times as asked, in the image and in the
coordinates, on any device.

What it costs: it keeps ``2**ndim`` corner values and weights per sample for the backward pass (a few
times the memory of ``grid_sample``), and a first-order pass is slower than the fused kernel (numbers in
:func:`sample_voxels_twice_differentiable`). So it is not the default: :func:`twice_differentiable_sampling`
is a context manager under which :func:`alignkit.spatial.sample_voxels`, ``sample_affine`` and
``sample_projective`` (linear mode, zeros or border padding) take it instead of ``grid_sample``; the
implicit gradient evaluates its objective under it.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

from alignkit.errors import ShapeError

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("alignkit_twice_differentiable_sampling", default=False)


@contextlib.contextmanager
def twice_differentiable_sampling(enabled: bool = True) -> Iterator[None]:
    """Within this block (in this thread or task), linear sampling by :func:`alignkit.spatial.sample_voxels`,
    :func:`~alignkit.spatial.sample_affine` and :func:`~alignkit.spatial.points.sample_projective` with zeros
    or border padding goes through :func:`sample_voxels_twice_differentiable` (same values, derivatives of
    any order on every device). ``enabled=False`` turns it off inside an enclosing block."""
    token = _ACTIVE.set(bool(enabled))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def twice_differentiable_sampling_active() -> bool:
    """Whether the caller is inside :func:`twice_differentiable_sampling` (enabled)."""
    return _ACTIVE.get()


def _clip_like_grid_sample(x: Tensor, n: int) -> Tensor:
    """``x`` clamped to ``[0, n - 1]`` with ``grid_sample``'s gradient: zero where ``x`` is at or beyond a
    bound (torch's ``clamp`` passes it at the bound itself, where border voxels of an identity map sit)."""
    if n == 1:
        return torch.zeros_like(x)
    return torch.where(x <= 0, torch.zeros_like(x), torch.where(x >= n - 1, torch.full_like(x, n - 1), x))


def sample_voxels_twice_differentiable(
    tensor: Tensor,
    voxel: Tensor,
    *,
    padding: Literal["zeros", "border"] = "zeros",
) -> Tensor:
    """Linear sampling of ``tensor (B, C, *S_in)`` at voxel coordinates ``voxel (B, ndim, *S_out)``: the
    values of :func:`alignkit.spatial.sample_voxels` (``grid_sample``, ``align_corners=True``), and
    derivatives of every order with respect to both ``tensor`` and ``voxel`` on every device.

    Convention: ``voxel`` is in the voxel frame of ``tensor``'s grid, components in array-axis order,
    voxel centres on integers; ``S_out`` may have any number of dimensions; a batch of 1 on either side
    is broadcast. ``padding="border"`` clamps the coordinates to ``[0, n - 1]`` (no gradient in a
    coordinate at or beyond a bound, as ``grid_sample``); ``"zeros"`` gives corners outside the grid
    the value 0. An axis of size 1 reads its only voxel, as ``grid_sample`` does. The caller's
    ``inside`` mask is not this function's business.

    Cost: ``2**ndim`` gathered corners and weights per sample kept for the backward pass (memory
    ``~2**ndim`` times the samples'). Time, measured on the CPU (two threads, float32, 64x64x40 volume
    sampled at every voxel, forward + gradient in the coordinates with a graph + double backward to image
    and coordinates; torch 2.13, whose CPU ``grid_sample`` has that double backward): 0.07 s against
    0.13 s for ``grid_sample`` with one channel, 0.16 against 0.29 s with eight -- faster, because
    ``grid_sample``'s double backward is itself unfused there. A first-order pass alone (forward +
    gradient in the coordinates) is where the fused kernel wins: 0.036 against 0.012 s. Hence the
    engine's optimiser keeps ``grid_sample``; :mod:`alignkit.solve.implicit` says where this one is used.
    On an H200 (torch 2.11, where ``grid_sample`` has no double backward at all) the same pass takes
    7.6 ms with one channel and 6.5 ms with eight.
    """
    ndim = voxel.shape[1]
    if tensor.dim() != ndim + 2:
        raise ShapeError(
            f"sample_voxels_twice_differentiable: tensor {tuple(tensor.shape)} is not (B, C, *spatial) with "
            f"{ndim} spatial dims (voxel {tuple(voxel.shape)})"
        )
    if padding not in ("zeros", "border"):
        raise ShapeError(f"sample_voxels_twice_differentiable: padding must be 'zeros' or 'border', got {padding!r}")
    batch = max(tensor.shape[0], voxel.shape[0])
    if tensor.shape[0] != voxel.shape[0] and 1 not in (tensor.shape[0], voxel.shape[0]):
        raise ShapeError(f"sample_voxels_twice_differentiable: batch {tensor.shape[0]} vs {voxel.shape[0]}")
    shape_in = tuple(tensor.shape[2:])
    shape_out = tuple(voxel.shape[2:])
    channels = tensor.shape[1]
    points = voxel.to(tensor.dtype).reshape(voxel.shape[0], ndim, -1).expand(batch, ndim, -1)  # (B, ndim, P)
    flat = tensor.reshape(tensor.shape[0], channels, -1).expand(batch, channels, -1)  # (B, C, N_in)

    strides = [1] * ndim
    for a in range(ndim - 2, -1, -1):
        strides[a] = strides[a + 1] * shape_in[a + 1]
    # per axis: the lower corner's index, the weights of the lower and upper corners, their indices
    lower_upper: list[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]] = []
    for a, n in enumerate(shape_in):
        x = points[:, a]
        x = _clip_like_grid_sample(x, n) if padding == "border" or n == 1 else x
        x0 = torch.floor(x.detach())
        frac = x - x0
        i0 = x0.long()
        i1 = i0 + 1
        w0, w1 = 1.0 - frac, frac
        if padding == "zeros":
            w0 = w0 * ((i0 >= 0) & (i0 <= n - 1)).to(w0.dtype)
            w1 = w1 * ((i1 >= 0) & (i1 <= n - 1)).to(w1.dtype)
        lower_upper.append(((i0.clamp(0, n - 1), w0), (i1.clamp(0, n - 1), w1)))

    indices, weights = [], []
    for corner in itertools.product((0, 1), repeat=ndim):
        index, weight = None, None
        for a, bit in enumerate(corner):
            i, w = lower_upper[a][bit]
            index = i * strides[a] if index is None else index + i * strides[a]
            weight = w if weight is None else weight * w
        indices.append(index)
        weights.append(weight)
    corners = len(indices)
    index = torch.stack(indices, dim=1).reshape(batch, 1, -1)  # (B, 1, K * P)
    values = flat.gather(2, index.expand(batch, channels, index.shape[-1]))
    values = values.reshape(batch, channels, corners, -1)
    out = (values * torch.stack(weights, dim=1).unsqueeze(1)).sum(dim=2)
    return out.reshape(batch, channels, *shape_out)
