"""Learned registration methods: a network, a transform head and a training loss, looked up by name.

Convention
----------
A method's network sees ``concat(moving, fixed)`` on the **network grid** (see
:mod:`alignkit.train.pairs`) and outputs a field in **voxels of that grid, array-axis order**,
possibly at a lower resolution (the U-Net's ``output_scale``; read corner-aligned). The method turns
it into a displacement ``u`` on the network grid, fixed → moving: ``warped(p) = moving(p + u(p))``.

At inference (:meth:`LearnedMethod.predict`) the same displacement becomes an alignkit
:class:`~alignkit.transforms.Transform` in world units on ``fixed.grid.resized(size)``, so the
result is used, saved and refined exactly like the classical engine's (``warped = moving ∘ map``).

Loss reduction: every term is a mean over the batch of a per-pair value (similarity, diffusion,
Dice, flow error), so the gradient of a batch of ``B`` equals the average of the gradients of its
pairs. DistributedDataParallel averages gradients over processes, so ``N`` processes with batch
``b`` step exactly like one process with batch ``N b`` (up to float summation order).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.image import Image
from alignkit.spatial import Grid, resize_field, sample_voxels, sample_world
from alignkit.transforms import FieldTransform, Transform, scaling_and_squaring
from alignkit.transforms.dense import voxel_to_world_vectors

METHODS: dict[str, type[LearnedMethod]] = {}


def register_method(name: str) -> Callable[[type[LearnedMethod]], type[LearnedMethod]]:
    """Class decorator: make a :class:`LearnedMethod` available by ``name`` (``--method NAME``)."""

    def decorate(cls: type[LearnedMethod]) -> type[LearnedMethod]:
        if name in METHODS and METHODS[name] is not cls:
            raise ConfigError(f"method name {name!r} is already registered to {METHODS[name].__name__}")
        METHODS[name] = cls
        cls.method_name = name
        return cls

    return decorate


def method_names() -> list[str]:
    return sorted(METHODS)


# -- networks ------------------------------------------------------------------------------------
def network_spec(network: nn.Module) -> dict[str, Any]:
    """``{"name": ..., **constructor arguments}`` of a registered :mod:`alignkit.nets` network."""
    from alignkit.nets import network_config

    return network_config(network)


def make_network(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild a network from :func:`network_spec` output (no class is unpickled)."""
    from alignkit.nets import build_network

    return build_network(dict(spec))


# -- the predicted transform ---------------------------------------------------------------------
def voxel_grid(size: Sequence[int]) -> Grid:
    """The network grid in its own voxel frame (world = voxel): training works in voxel units."""
    return Grid.from_spacing(tuple(int(s) for s in size), 1.0)


def integrate_velocity(velocity: Tensor, size: Sequence[int], steps: int) -> Tensor:
    """Displacement ``exp(v) - id`` on the network grid of ``size``, voxels, array-axis order.

    ``velocity (B, ndim, *S_out)`` is in voxels of the network grid and may be coarser than ``size``
    (corner-aligned): it is integrated on its own grid by scaling and squaring and the displacement
    is then resized to ``size`` -- VoxelMorph's ``int_downsize``. ``steps = 0`` uses ``v`` as the
    displacement (no diffeomorphism, a plain displacement head).
    """
    size = tuple(int(s) for s in size)
    low = voxel_grid(size).resized(tuple(velocity.shape[2:]))
    disp = scaling_and_squaring(velocity, low, steps) if steps > 0 else velocity
    return resize_field(disp, size)


class LearnedSVF(FieldTransform):
    """The transform a learned SVF method predicts: a stationary velocity in voxels of the network
    grid ``grid`` (world-placed, the fixed image's field of view), integrated like at training time.

    ``displacement()`` is in world units on ``grid``; outside it the border value is kept (like every
    :class:`~alignkit.transforms.FieldTransform`). The velocity is a buffer, not a parameter: the
    prediction is frozen; refinement (``--refine``) fits a new field on top of it.
    """

    velocity: Tensor

    def __init__(self, grid: Grid, velocity: Tensor, *, steps: int = 7) -> None:
        super().__init__(grid)
        if velocity.dim() != grid.ndim + 2 or velocity.shape[:2] != (1, grid.ndim):
            raise ShapeError(f"velocity must be (1, {grid.ndim}, *S), got {tuple(velocity.shape)}")
        self.steps = int(steps)
        self.register_buffer("velocity", velocity.detach().clone())
        self._cache: tuple[tuple[Any, ...], Tensor] | None = None

    def displacement(self) -> Tensor:
        key = (self.velocity.device, self.velocity.dtype, self.velocity._version)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        with torch.no_grad():  # a frozen prediction: the engine calls this every iteration
            disp_voxels = integrate_velocity(self.velocity, self.grid.shape, self.steps)
            disp = voxel_to_world_vectors(disp_voxels, self.grid)
        self._cache = (key, disp)
        return disp

    def inverse(self) -> Transform:
        """``exp(-v)``: the inverse map (the SVF's group property)."""
        return LearnedSVF(self.grid, -self.velocity, steps=self.steps)

    def regularizer_field(self) -> tuple[Tensor, Grid]:
        low = self.grid.resized(tuple(self.velocity.shape[2:]))
        return voxel_to_world_vectors(self.velocity, self.grid), low

    def resampled(self, grid: Grid) -> FieldTransform:
        from alignkit.transforms import DisplacementField, resample_field

        out = DisplacementField(grid).to(self.velocity.device)
        with torch.no_grad():
            out.field.copy_(resample_field(self.displacement(), self.grid, grid))
        out.requires_grad_(False)
        return out

    def extra_repr(self) -> str:
        return f"grid={self.grid!r}, velocity={tuple(self.velocity.shape[2:])}, steps={self.steps}"


# -- methods -------------------------------------------------------------------------------------
class LearnedMethod(nn.Module):
    """Base class: ``network`` plus options (JSON-safe, :attr:`config`) that rebuild the method.

    Subclasses implement :meth:`forward` (training-time tensors on the network grid), :meth:`loss`
    and :meth:`predict_transform`.
    """

    method_name: ClassVar[str] = ""
    #: what the default network of a method is (``{"name": ..., options}`` without the channel counts)
    default_network: ClassVar[dict[str, Any]] = {}

    def __init__(self, *, network: nn.Module, ndim: int, size: Sequence[int]) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ConfigError(f"learned methods are 2D or 3D, got ndim={ndim}")
        size = tuple(int(s) for s in size)
        if len(size) != ndim:
            raise ConfigError(f"size {size} does not fit ndim={ndim}")
        self.network = network
        self.ndim = ndim
        self.size = size
        self.options: dict[str, Any] = {}
        # the identity map of the training grid, built once per size and device (not per step)
        self._identity: dict[tuple[Any, ...], Tensor] = {}

    @property
    def config(self) -> dict[str, Any]:
        """Everything but the network that :func:`build_method` needs (plain, JSON-safe values)."""
        return {"ndim": self.ndim, "size": list(self.size), **copy.deepcopy(self.options)}

    @classmethod
    def network_for(cls, ndim: int, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The network spec of this method for ``ndim``: the default network updated by ``overrides``,
        or, when ``overrides`` names another network, that network with its own defaults (the
        default's options, e.g. the U-Net's ``residual``, need not exist there)."""
        overrides = dict(overrides or {})
        default_name = cls.default_network.get("name")
        same = overrides.get("name", default_name) == default_name
        spec = {**(cls.default_network if same else {}), **overrides}
        spec.setdefault("ndim", ndim)
        spec.setdefault("in_channels", 2)
        spec.setdefault("out_channels", ndim)
        return spec

    # training ---------------------------------------------------------------------------------
    def forward(self, fixed: Tensor, moving: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """Training-time outputs on the network grid; at least ``displacement`` (voxels, array-axis
        order, ``(B, ndim, *size)``) and ``warped`` (the moving batch warped by it)."""
        raise NotImplementedError

    def _identity_on(self, like: Tensor) -> Tensor:
        key = (tuple(like.shape[2:]), like.device, like.dtype)
        if key not in self._identity:
            self._identity[key] = voxel_grid(like.shape[2:]).voxel_points(dtype=like.dtype, device=like.device)
        return self._identity[key]

    def warp(self, tensor: Tensor, displacement: Tensor, *, mode: Literal["linear", "nearest"] = "linear") -> Tensor:
        """``tensor ∘ (id + displacement)`` on the network grid (border values outside)."""
        points = self._identity_on(displacement) + displacement
        return sample_voxels(tensor, points, mode=mode, padding="border")

    def loss(self, batch: Mapping[str, Tensor], output: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError  # pragma: no cover - abstract

    def similarity_score(self, warped: Tensor, fixed: Tensor) -> Tensor:
        """The similarity term alone (a validation metric when there are no labels)."""
        raise NotImplementedError  # pragma: no cover - abstract

    # inference --------------------------------------------------------------------------------
    def predict_transform(self, grid: Grid, fixed: Tensor, moving: Tensor) -> FieldTransform:
        """The transform for one pair already on the network grid ``grid`` (world-placed)."""
        raise NotImplementedError  # pragma: no cover - abstract

    @torch.no_grad()
    def predict(
        self,
        fixed: Image,
        moving: Image,
        *,
        initial: Transform | None = None,
        device: str | torch.device | None = None,
    ) -> FieldTransform:
        """The fixed → moving transform of a pair of :class:`~alignkit.image.Image` s (world space).

        Both images go through :func:`~alignkit.train.pairs.to_network_grid`; the moving one is then
        sampled on the fixed network grid through ``initial`` (e.g. an affine pre-alignment;
        default: the world identity). The returned transform is meant to be composed *after*
        ``initial``: ``y = initial(T(x))``, i.e. ``ComposedTransform([initial, T])``.
        """
        from alignkit.train.subjects import to_network_grid

        if fixed.ndim != self.ndim or moving.ndim != self.ndim:
            raise ShapeError(f"this {self.method_name} model is {self.ndim}D; got {fixed.ndim}D and {moving.ndim}D images")
        if device is None:
            param = next(iter(self.parameters()), None)
            device = param.device if param is not None else torch.device("cpu")
        device = torch.device(device)
        was_training = self.training
        self.eval()
        try:
            fixed_t, grid = to_network_grid(fixed.batch(device=device), fixed.grid, self.size)
            moving_t, moving_grid = to_network_grid(moving.batch(device=device), moving.grid, self.size)
            world = grid.world_points(device=device)
            if initial is not None:
                world = initial.to(device).transform_points(world)
            if initial is not None or not moving_grid.same_as(grid):
                moving_t = sample_world(moving_t, moving_grid, world)
            return self.predict_transform(grid, fixed_t, moving_t)
        finally:
            self.train(was_training)


SimilarityChoice = Literal["lncc", "mse", "ncc"]


def landmark_errors(displacement: Tensor, fixed_points: Tensor, moving_points: Tensor, mask: Tensor) -> Tensor:
    """Per pair, the mean distance ``|p + u(p) - q|`` over the landmarks where ``mask`` is 1:
    ``displacement (B, ndim, *S)`` in voxels, points ``(B, N, ndim)`` voxel coordinates (array-axis
    order) of the same grid, ``mask (B, N)``. NaN for a pair without landmarks. ``u`` is sampled
    linearly (border values outside), so the error is differentiable in the displacement."""
    if fixed_points.shape != moving_points.shape or fixed_points.dim() != 3:
        raise ShapeError(f"landmarks must be two (B, N, ndim) tensors, got {tuple(fixed_points.shape)} and {tuple(moving_points.shape)}")
    p = fixed_points.to(displacement.dtype).transpose(1, 2)  # (B, ndim, N)
    moved = p + sample_voxels(displacement, p, padding="border")
    distance = (moved - moving_points.to(displacement.dtype).transpose(1, 2)).norm(dim=1)  # (B, N)
    weight = mask.to(distance.dtype)
    return (distance * weight).sum(1) / weight.sum(1)  # 0/0 = NaN: no landmarks in that pair


@register_method("voxelmorph")
class VoxelMorph(LearnedMethod):
    """VoxelMorph-style unsupervised registration (Balakrishnan et al. 2019; Dalca et al. 2019).

    A U-Net on ``concat(moving, fixed)`` predicts a stationary velocity (at the network's
    ``output_scale``, 0.5 = half resolution), integrated by scaling and squaring (``steps``
    squarings) into a diffeomorphic displacement that warps the moving image. Loss::

        similarity(warped, fixed) + regularizer_weight * diffusion(velocity)
            + dice_weight * soft-Dice(warped one-hot moving labels, fixed one-hot labels)
            + flow_weight * mean squared error to the true displacement (synthetic pairs)
            + landmark_weight * mean distance |p + u(p) - q| of corresponding landmarks p, q
              (network-grid voxels; data with landmark files)

    ``similarity`` is ``lncc`` (squared local NCC, ``window`` voxels), ``ncc`` or ``mse``. The
    default ``regularizer_weight`` is VoxelMorph's λ (1 with NCC, 0.01 with MSE on [0, 1]
    intensities) divided by ``ndim²``: alignkit's :class:`~alignkit.losses.Diffusion` sums the
    squared derivatives over components and axes where VoxelMorph's gradient loss averages them.
    ``label_ids`` are the one-hot channels of the Dice term (set from the training data).
    ``prealign`` (``"affine"``/``"rigid"``/None) records how the training data were aligned, and
    is what :func:`alignkit.register` runs before the network unless told otherwise.
    """

    default_network: ClassVar[dict[str, Any]] = {
        "name": "unet", "features": [16, 32, 32, 32], "residual": False, "output_scale": 1.0,
    }

    def __init__(
        self,
        *,
        network: nn.Module,
        ndim: int,
        size: Sequence[int],
        similarity: SimilarityChoice = "lncc",
        window: int = 9,
        regularizer_weight: float | None = None,
        dice_weight: float = 0.0,
        flow_weight: float = 0.0,
        landmark_weight: float = 0.0,
        steps: int = 7,
        label_ids: Sequence[int] | None = None,
        prealign: str | None = None,
    ) -> None:
        super().__init__(network=network, ndim=ndim, size=size)
        from alignkit.losses import DiceLoss, Diffusion, build_similarity

        if similarity not in ("lncc", "mse", "ncc"):
            raise ConfigError(f"voxelmorph similarity must be lncc, ncc or mse, got {similarity!r}")
        if regularizer_weight is None:
            # VoxelMorph's lambda (1 with NCC, 0.01 with MSE) in this Diffusion's units: VoxelMorph's
            # gradient loss averages over axes and components, alignkit's sums them (ndim^2 terms)
            regularizer_weight = (0.01 if similarity == "mse" else 1.0) / ndim**2
        weights = {"regularizer_weight": regularizer_weight, "dice_weight": dice_weight, "flow_weight": flow_weight,
                   "landmark_weight": landmark_weight}
        for name, value in weights.items():
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if steps < 0:
            raise ConfigError(f"steps must be >= 0, got {steps}")
        if prealign not in (None, "affine", "rigid"):
            raise ConfigError(f"prealign must be affine, rigid or None, got {prealign!r}")
        self.options = {
            "similarity": similarity,
            "window": int(window),
            "regularizer_weight": float(regularizer_weight),
            "dice_weight": float(dice_weight),
            "flow_weight": float(flow_weight),
            "landmark_weight": float(landmark_weight),
            "steps": int(steps),
            "label_ids": None if label_ids is None else [int(v) for v in label_ids],
            "prealign": prealign,
        }
        options = {"window": int(window)} if similarity == "lncc" else {}
        self.similarity = build_similarity(similarity, **options)
        self.regularizer = Diffusion()
        self.dice = DiceLoss()

    @property
    def label_ids(self) -> list[int] | None:
        return self.options["label_ids"]

    @label_ids.setter
    def label_ids(self, values: Sequence[int] | None) -> None:
        self.options["label_ids"] = None if values is None else [int(v) for v in values]

    def velocity(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """The network's velocity ``(B, ndim, *S_out)`` in network-grid voxels, float32."""
        if fixed.shape != moving.shape or fixed.dim() != self.ndim + 2:
            raise ShapeError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must be equal (B, 1, *S)")
        # float32 for the integration and losses even under autocast: repeated squaring and the
        # local variances of LNCC lose every digit in float16
        return self.network(torch.cat([moving, fixed], dim=1)).float()

    def forward(self, fixed: Tensor, moving: Tensor) -> dict[str, Tensor]:
        velocity = self.velocity(fixed, moving)
        # the transform head runs in float32 whatever autocast chose for the network
        with torch.autocast(device_type=velocity.device.type, enabled=False):
            displacement = integrate_velocity(velocity, fixed.shape[2:], self.options["steps"])
            warped = self.warp(moving.float(), displacement)
        return {"velocity": velocity, "displacement": displacement, "warped": warped}

    def similarity_score(self, warped: Tensor, fixed: Tensor) -> Tensor:
        return self.similarity(warped, fixed.float())

    def loss(self, batch: Mapping[str, Tensor], output: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """(total, parts): every part is a batch mean of per-pair values (see the module docstring)."""
        fixed = batch["fixed"].float()
        parts: dict[str, Tensor] = {"similarity": self.similarity(output["warped"], fixed)}
        total = parts["similarity"]
        weight = self.options["regularizer_weight"]
        if weight > 0:
            velocity = output["velocity"]
            low = voxel_grid(fixed.shape[2:]).resized(tuple(velocity.shape[2:]))
            parts["diffusion"] = self.regularizer(velocity, low.spacing.tolist())
            total = total + weight * parts["diffusion"]
        if self.options["dice_weight"] > 0 and "fixed_labels" in batch:
            parts["dice"] = self.dice_loss(batch, output["displacement"])
            total = total + self.options["dice_weight"] * parts["dice"]
        if self.options["landmark_weight"] > 0 and "fixed_points" in batch:
            errors = landmark_errors(output["displacement"], batch["fixed_points"], batch["moving_points"],
                                     batch["points_mask"])
            parts["landmarks"] = errors.nan_to_num(0.0).mean()  # a pair without landmarks adds 0
            total = total + self.options["landmark_weight"] * parts["landmarks"]
        if self.options["flow_weight"] > 0 and "flow" in batch:
            error = (output["displacement"] - batch["flow"].float()) ** 2
            parts["flow"] = error.sum(1).flatten(1).mean(1).mean()
            total = total + self.options["flow_weight"] * parts["flow"]
        return total, {k: v.detach() for k, v in parts.items()}

    def dice_loss(self, batch: Mapping[str, Tensor], displacement: Tensor) -> Tensor:
        from alignkit.losses import one_hot

        ids = self.label_ids
        if not ids:
            raise ConfigError("dice_weight > 0 needs label_ids (training data with labels)")
        fixed_onehot = one_hot(batch["fixed_labels"], ids)
        moving_onehot = one_hot(batch["moving_labels"], ids)
        return self.dice(self.warp(moving_onehot, displacement), fixed_onehot)

    def predict_transform(self, grid: Grid, fixed: Tensor, moving: Tensor) -> FieldTransform:
        velocity = self.velocity(fixed, moving)
        return LearnedSVF(grid, velocity, steps=self.options["steps"])


def build_method(
    name: str,
    *,
    ndim: int,
    size: Sequence[int],
    network: nn.Module | Mapping[str, Any] | None = None,
    **options: Any,
) -> LearnedMethod:
    """The method ``name`` with a network: a module, a spec ``{"name": "unet", ...}`` (missing keys
    from the method's default network), or None for the default network."""
    if name not in METHODS:
        raise ConfigError(f"unknown learned method {name!r}; known: {', '.join(method_names()) or '(none)'}")
    cls = METHODS[name]
    if not isinstance(network, nn.Module):
        network = make_network(cls.network_for(ndim, network))
    try:
        return cls(network=network, ndim=ndim, size=size, **options)
    except TypeError as exc:
        raise ConfigError(f"bad options for method {name!r}: {exc}") from None

