"""Multi-step (recurrent) affine network of AVSM (Shen et al., Networks for Joint Affine and
Non-parametric Image Registration, CVPR 2019, §2.1), 2D and 3D.

Frame of the matrices
---------------------
Matrices are ``(B, ndim, ndim + 1)`` ``[A | b]`` acting on **unit coordinates**: array-axis order,
each axis scaled so the first voxel centre is at -1 and the last at +1 (the ``align_corners=True``
geometry of :mod:`alignkit.spatial`, but *not* ``grid_sample``'s reversed component order). They
map a fixed-image point to the moving-image point to sample (``warped = moving ∘ (A x + b)``), the
direction of every map in alignkit. Unit coordinates do not depend on the image size, so one
network serves any resolution and fixed and moving may have different shapes;
:func:`alignkit.spatial.frames.voxel_matrix_from_unit_matrix` converts to a
``moving_voxel_from_fixed_voxel`` matrix (the unit frame is :func:`alignkit.spatial.frames.unit_from_voxel`), from which
:mod:`alignkit.transforms` builds world transforms with the images' grids.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.nets.blocks import Activation, ConvBlock, Norm, check_choice, check_ndim, make_activation
from alignkit.nets.registry import plain, register_network
from alignkit.nets.unet import check_input
from alignkit.spatial.frames import apply_matrix, homogeneous, voxel_identity, voxel_matrix_from_unit_matrix
from alignkit.spatial.points import PaddingMode, sample_voxels

UpdateOrder = Literal["right", "left"]
_ADAPTIVE_POOL = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def warp_affine(
    moving: Tensor, theta: Tensor, fixed_shape: Sequence[int], *, padding: PaddingMode = "zeros"
) -> Tensor:
    """Resample ``moving (B, C, *S_m)`` on a grid of ``fixed_shape`` through unit-coordinate matrices
    ``theta (B, ndim, ndim+1)`` (differentiable in both). Uses :func:`alignkit.spatial.sample_voxels`."""
    fixed_shape = tuple(int(s) for s in fixed_shape)
    voxel = voxel_identity(fixed_shape, like=moving)
    voxel = voxel.expand(theta.shape[0], *voxel.shape[1:])  # apply_matrix pairs batch items one to one
    matrix = voxel_matrix_from_unit_matrix(theta.to(moving.dtype), fixed_shape, tuple(moving.shape[2:]))
    return sample_voxels(moving, apply_matrix(matrix, voxel), padding=padding)


def compose_affine(outer: Tensor, inner: Tensor) -> Tensor:
    """``outer ∘ inner`` for ``(B, n, n+1)`` matrices: the map ``x -> outer(inner(x))``."""
    return (homogeneous(outer) @ homogeneous(inner))[..., :-1, :]


@register_network("recurrent_affine")
class RecurrentAffineHead(nn.Module):
    """Multi-step affine network (Shen et al. 2019 §2.1, Fig. 2): one encoder, shared by all steps, refines an affine map.

    Step ``t`` feeds ``[fixed, moving ∘ Φ_{t-1}]`` (the moving image resampled *once* from the
    original through the composed map, never from the previous warped image: Shen et al. 2019 avoids
    "numerical dissipation due to successive trilinear interpolations") to a strided conv encoder,
    an adaptive average pool to ``pool_size^ndim`` cells (keeps a coarse layout, which rotations and
    scalings need), and two linear layers giving ``U_t = [I + ΔA | Δb]``. The last linear layer is
    zero-initialised, so every ``U_t`` -- and the result -- is exactly the identity at init.

    Composition order (``update_order``), with ``Φ_t(x) = M_t x`` (fixed -> moving, unit frame):

    * ``"right"`` (default): ``M_t = M_{t-1} @ U_t``, i.e. ``Φ_t = Φ_{t-1} ∘ U_t``. The network sees
      ``moving ∘ Φ_{t-1}`` next to ``fixed``, so the map it can estimate is the residual ``U_t`` with
      ``(moving ∘ Φ_{t-1}) ∘ U_t ≈ fixed``; this order makes that residual exact.
    * ``"left"``: ``M_t = U_t @ M_{t-1}`` -- Shen et al. 2019 eq. (1) verbatim (``A_t = Ã_t A_{t-1}``,
      ``b_t = Ã_t b_{t-1} + b̃_t``).

    Both agree to first order near the identity and reach the same transforms; "left" reproduces
    the paper literally, "right" is the composition its inputs imply.

    ``forward(fixed, moving)`` returns the list of the *composed* matrices ``M_1 .. M_T``
    (``(B, ndim, ndim+1)``, unit frame; see the module docstring), so a loss can supervise every step;
    the last one is the result. ``in_channels`` is per image (the encoder sees ``2 * in_channels``).
    """

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int = 1,
        features: Sequence[int] = (16, 32, 32, 32, 32),
        num_steps: int = 5,
        pool_size: int = 4,
        hidden: int = 128,
        norm: Norm = "none",
        activation: Activation = "leaky_relu",
        update_order: UpdateOrder = "right",
        padding: PaddingMode = "zeros",
    ) -> None:
        super().__init__()
        self.ndim = check_ndim(ndim)
        check_choice(update_order, UpdateOrder, "update_order")
        features = list(features)
        if num_steps < 1 or pool_size < 1 or hidden < 1 or not features:
            raise ConfigError(
                f"need num_steps, pool_size, hidden >= 1 and features, got {num_steps}, {pool_size}, {hidden}"
            )
        self.in_channels = in_channels
        self.num_steps = num_steps
        self.update_order = update_order
        self.padding = padding
        layers: list[nn.Module] = [
            ConvBlock(
                ndim=ndim,
                in_channels=2 * in_channels,
                out_channels=features[0],
                norm=norm,
                activation=activation,
            )
        ]
        for prev, cur in itertools.pairwise(features):
            layers.append(
                ConvBlock(
                    ndim=ndim, in_channels=prev, out_channels=cur, stride=2, norm=norm, activation=activation
                )
            )
        layers.append(_ADAPTIVE_POOL[ndim](pool_size))
        self.encoder = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(features[-1] * pool_size**ndim, hidden),
            make_activation(activation, hidden),
        )
        self.out = nn.Linear(hidden, ndim * (ndim + 1))
        # Exactly zero (not just small): every update is the identity until training moves it,
        # the spatial-transformer-network initialisation. The gradient still reaches self.out.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.config: dict[str, Any] = plain(
            {
                "ndim": ndim,
                "in_channels": in_channels,
                "features": features,
                "num_steps": num_steps,
                "pool_size": pool_size,
                "hidden": hidden,
                "norm": norm,
                "activation": activation,
                "update_order": update_order,
                "padding": padding,
            }
        )

    def update(self, fixed: Tensor, warped: Tensor) -> Tensor:
        """One step's update ``U = [I + ΔA | Δb]`` ``(B, ndim, ndim+1)`` from fixed and warped moving."""
        delta = self.out(self.fc(self.encoder(torch.cat([fixed, warped], dim=1))))
        eye = torch.eye(self.ndim, self.ndim + 1, dtype=delta.dtype, device=delta.device)
        return eye + delta.view(-1, self.ndim, self.ndim + 1)

    def forward(self, fixed: Tensor, moving: Tensor, *, steps: int | None = None, initial: Tensor | None = None) -> list[Tensor]:
        """``initial`` ``(B, ndim, ndim+1)``: the map the steps start from (default the identity), e.g.
        a centre-of-mass shift; the first step already sees ``moving ∘ initial``."""
        check_input(fixed, self.ndim, self.in_channels, "RecurrentAffineHead fixed")
        check_input(moving, self.ndim, self.in_channels, "RecurrentAffineHead moving")
        if fixed.shape[0] != moving.shape[0]:
            raise ShapeError(
                f"RecurrentAffineHead: batch {fixed.shape[0]} (fixed) vs {moving.shape[0]} (moving)"
            )
        fixed_shape = tuple(fixed.shape[2:])
        theta = torch.eye(self.ndim, self.ndim + 1, dtype=fixed.dtype, device=fixed.device).expand(
            fixed.shape[0], -1, -1
        )
        if initial is not None:
            if tuple(initial.shape) != tuple(theta.shape):
                raise ShapeError(f"RecurrentAffineHead initial: expected {tuple(theta.shape)}, got {tuple(initial.shape)}")
            theta = initial.to(fixed.dtype)
        matrices = []
        for _ in range(self.num_steps if steps is None else steps):
            warped = warp_affine(moving, theta, fixed_shape, padding=self.padding)
            step = self.update(fixed, warped)
            theta = (
                compose_affine(theta, step) if self.update_order == "right" else compose_affine(step, theta)
            )
            matrices.append(theta)
        return matrices
