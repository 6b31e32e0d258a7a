"""The iterative engine as a differentiable layer: gradients of a loss of the optimum with respect to
the images (feature images) it registered, by implicit differentiation.

Jena, Chaudhari and Gee, Deep Implicit Optimization for Robust and Flexible Image Registration, §3.2:
the solver minimises ``E(φ; F, M)`` over the transform parameters φ for feature images ``F`` (fixed)
and ``M`` (moving); at its optimum ``∇_φ E(φ*; F, M) = 0``, so by the implicit function theorem

    dφ*/dF = -H⁻¹ ∂²E/∂φ∂F,        H = ∇²_φ E(φ*; F, M),

and a loss ``L(φ*)`` has ``dL/dF = -(∂²E/∂F∂φ)ᵀ H⁻¹ ∇_φ L`` (the same for ``M``). Two estimates:

* ``"jfb"`` (default): Jacobian-free backprop (Fung et al., JFB: Jacobian-Free Backpropagation for
  Implicit Networks, AAAI 2022; DIO's choice) replaces ``H⁻¹`` by the identity, so the backward pass
  is one differentiable evaluation of ``∇_φ E`` at φ* and one vector-Jacobian product of it with
  respect to the images -- the mixed second derivative of the warp;
* ``"ift"``: the exact implicit-function-theorem gradient, ``H⁻¹ ∇_φ L`` solved by conjugate gradient
  on Hessian-vector products (double backward of the warp with respect to the sampling points), with
  an optional damping ``λ`` (``(H + λ I)``) for optima that are not strict minima.

Both need the warp twice differentiable. ``grid_sample``'s backward has no derivative on CUDA
(``aten::grid_sampler_3d_backward``, torch 2.11; nor on torch 2.11's CPU in 3D), so the objective of the backward pass is evaluated
under :func:`alignkit.spatial.twice_differentiable_sampling`: every linear sampling in it (the engine's
warp, fields interpolated by the transforms, label maps) is
:func:`alignkit.spatial.sample_voxels_twice_differentiable`, on every device -- the same values and
derivatives as ``grid_sample`` to float64 round-off, and on the CPU faster than ``grid_sample``'s own
double backward (64x64x40, two threads, forward + gradient with a graph + double backward: 0.07 against
0.13 s for one channel, 0.16 against 0.29 s for eight).

Either way the forward pass runs the engine without a graph and the backward pass re-evaluates the
objective once at the optimum, so memory and time do not grow with the number of solver iterations.

Conventions: the layer returns, for every optimised level of every stage (coarse first), the level's
optimum as differentiable parameter tensors plus the model they belong to; ``LevelOptimum.map(world)``
maps fixed-world points ``(B, ndim, *S)`` through the chain before the stage (held fixed: its own
optimum is not differentiated) and the level's model with those parameters. The gradient of a level's
optimum reaches only that level's feature images -- a fixed point does not depend on where the
solver started -- so a loss that should train every feature scale sums terms of every level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from alignkit.errors import ConfigError
from alignkit.image import Image
from alignkit.solve.config import RegistrationConfig
from alignkit.solve.engine import Engine, LevelRecord
from alignkit.spatial import Grid, twice_differentiable_sampling
from alignkit.transforms import ComposedTransform, Transform

GradientMode = Literal["jfb", "ift"]


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _split(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for t in like:
        out.append(flat[start : start + t.numel()].view_as(t))
        start += t.numel()
    return out


def conjugate_gradient(apply: Any, rhs: Tensor, *, iterations: int, tolerance: float) -> tuple[Tensor, int]:
    """Solve ``apply(x) = rhs`` for a symmetric positive (semi-)definite operator by conjugate gradient,
    from ``x = 0``; stops when ``|r| <= tolerance |rhs|`` or after ``iterations``, or when a direction
    of non-positive curvature appears (then the iterate so far is returned, as truncated Newton does).
    Returns (x, iterations used)."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = torch.dot(r, r)
    stop = tolerance**2 * rr
    for k in range(iterations):
        if rr <= stop or rr == 0:
            return x, k
        ap = apply(p)
        curvature = torch.dot(p, ap)
        if curvature <= 0:
            return (x if k > 0 else rhs.clone()), k
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = torch.dot(r, r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, iterations


@dataclass
class ImplicitOptions:
    """How the layer differentiates: ``gradient`` ``"jfb"`` or ``"ift"``; for ``"ift"``, at most
    ``cg_iterations`` conjugate-gradient steps to the relative residual ``cg_tolerance``, on
    ``H + damping * I``."""

    gradient: GradientMode = "jfb"
    cg_iterations: int = 50
    cg_tolerance: float = 1e-4
    damping: float = 0.0

    def __post_init__(self) -> None:
        if self.gradient not in get_args(GradientMode):
            raise ConfigError(f"unknown gradient {self.gradient!r}; choose one of {', '.join(get_args(GradientMode))}")
        if self.cg_iterations < 1 or self.cg_tolerance <= 0 or self.damping < 0:
            raise ConfigError("cg_iterations must be >= 1, cg_tolerance > 0 and damping >= 0")


def implicit_image_gradients(
    engine: Engine,
    record: LevelRecord,
    fixed: Tensor,
    moving: Tensor,
    grad_params: Sequence[Tensor],
    options: ImplicitOptions,
) -> tuple[Tensor, Tensor]:
    """``(dL/dfixed, dL/dmoving)`` of a loss whose gradient with respect to the level's optimal
    parameters is ``grad_params`` (module docstring: ``-(∂²E/∂image∂φ)ᵀ H⁻¹ grad``, ``H⁻¹`` = identity
    for JFB). One objective evaluation with a graph, plus one Hessian-vector product per CG step."""
    params = [p for p in record.transform.parameters()]
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        try:
            fixed_leaf = fixed.detach().requires_grad_(True)
            moving_leaf = moving.detach().requires_grad_(True)
            # always, not only on CUDA: faster than grid_sample's double backward on the CPU too (module docstring)
            with twice_differentiable_sampling():
                energy = engine.level_energy(record, fixed_leaf, moving_leaf)
            grads = torch.autograd.grad(energy, params, create_graph=True, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            vector = _flat([g.detach() for g in grad_params]).to(grads[0].dtype)
            if options.gradient == "ift":
                flat_grad = _flat(grads)

                def hessian_vector(v: Tensor) -> Tensor:
                    hv = torch.autograd.grad(flat_grad, params, grad_outputs=v, retain_graph=True, allow_unused=True)
                    hv = [torch.zeros_like(p) if h is None else h for p, h in zip(params, hv)]
                    return _flat(hv).detach() + options.damping * v

                vector, _ = conjugate_gradient(hessian_vector, vector, iterations=options.cg_iterations,
                                               tolerance=options.cg_tolerance)
            weights = _split(vector, params)
            inner = sum((g * w).sum() for g, w in zip(grads, weights))
            d_fixed, d_moving = torch.autograd.grad(inner, [fixed_leaf, moving_leaf], allow_unused=True)
        finally:
            for p in params:
                p.requires_grad_(False)
    d_fixed = torch.zeros_like(fixed) if d_fixed is None else -d_fixed
    d_moving = torch.zeros_like(moving) if d_moving is None else -d_moving
    return d_fixed, d_moving


class _Optimum(torch.autograd.Function):
    """Identity on the (already optimised) parameters in the forward pass; in the backward pass, the
    implicit gradient with respect to the level's feature images (the parameters get none)."""

    @staticmethod
    def forward(ctx, engine: Engine, record: LevelRecord, options: ImplicitOptions, fixed: Tensor,  # type: ignore[override]
                moving: Tensor, *params: Tensor) -> tuple[Tensor, ...]:
        ctx.engine, ctx.record, ctx.options = engine, record, options
        ctx.save_for_backward(fixed, moving)
        return tuple(p.detach().clone() for p in params)

    @staticmethod
    def backward(ctx, *grad_params: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        fixed, moving = ctx.saved_tensors
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(ctx.record.transform.parameters(), grad_params)]
        d_fixed, d_moving = implicit_image_gradients(ctx.engine, ctx.record, fixed, moving, grads, ctx.options)
        return (None, None, None, d_fixed, d_moving, *([None] * len(grad_params)))


@dataclass
class LevelOptimum:
    """One level's optimum: ``params`` (name -> tensor, differentiable with respect to the level's feature
    images), the ``model`` they parameterise and the fixed ``prior`` chain before the stage."""

    stage: int
    index: int
    grid: Grid
    model: Transform
    params: dict[str, Tensor]
    prior: Transform | None

    def map(self, world: Tensor) -> Tensor:
        """Fixed-world points ``(B, ndim, *S)`` -> moving-world points through the level's model with
        :attr:`params` and then the prior chain (differentiable in :attr:`params`)."""
        points = torch.func.functional_call(self.model, self.params, (world,))
        return self.prior.transform_points(points) if self.prior is not None else points


@dataclass
class LayerOutput:
    """``result``: the engine's registration (its never-worse rule applied: what a user gets);
    ``levels``: every optimised level, coarse first, stage by stage (the last is the finest level of
    the last stage -- the optimum that ``result`` holds when that stage was kept)."""

    result: ComposedTransform
    levels: list[LevelOptimum]
    engine: Engine

    @property
    def final(self) -> LevelOptimum:
        return self.levels[-1]


class OptimisationLayer:
    """The engine with ``config`` as a layer: ``layer(fixed, moving, fixed_features, moving_features)``
    registers the feature images (one per pyramid level, coarse first, ``(1, C, *S_l)`` tensors on the
    given world grids) without a graph, and returns every level's optimum as parameters that
    differentiate back to the feature tensors (module docstring). ``fixed`` / ``moving`` are the
    images the features came from: they place linear models and start them (the engine's ``init``).
    Label maps and landmarks are the engine's prompt terms (``dice_weight``, ``landmark_weight``)."""

    def __init__(
        self,
        config: RegistrationConfig,
        *,
        gradient: GradientMode = "jfb",
        cg_iterations: int = 50,
        cg_tolerance: float = 1e-4,
        damping: float = 0.0,
        device: str | torch.device | None = None,
        seed: int | None = 0,
        progress: Any = None,
    ) -> None:
        self.config = config
        self.options = ImplicitOptions(gradient, cg_iterations, cg_tolerance, damping)
        self.device, self.seed, self.progress = device, seed, progress

    def __call__(
        self,
        fixed: Image,
        moving: Image,
        fixed_features: Sequence[Tensor],
        fixed_grids: Sequence[Grid],
        moving_features: Sequence[Tensor],
        moving_grids: Sequence[Grid],
        *,
        initial: Transform | None = None,
        fixed_labels: Image | None = None,
        moving_labels: Image | None = None,
        fixed_points: Tensor | None = None,
        moving_points: Tensor | None = None,
    ) -> LayerOutput:
        for name, tensors, grids in (("fixed", fixed_features, fixed_grids), ("moving", moving_features, moving_grids)):
            if len(tensors) != len(grids):
                raise ConfigError(f"{len(tensors)} {name} feature tensors but {len(grids)} grids")
            for t in tensors:
                if t.dim() != fixed.ndim + 2 or t.shape[0] != 1:
                    raise ConfigError(f"{name} features must be (1, C, *spatial) with {fixed.ndim} spatial axes, "
                                      f"got {tuple(t.shape)}")
        engine = Engine(self.config, device=self.device, seed=self.seed, progress=self.progress, keep_levels=True)
        with torch.no_grad():
            detached_f = [Image(t.detach()[0], g) for t, g in zip(fixed_features, fixed_grids)]
            detached_m = [Image(t.detach()[0], g) for t, g in zip(moving_features, moving_grids)]
        with torch.enable_grad():  # the engine's own optimiser needs autograd (the caller may be in no_grad)
            result = engine.run(fixed, moving, initial=initial, fixed_features=detached_f, moving_features=detached_m,
                                fixed_labels=fixed_labels, moving_labels=moving_labels, fixed_points=fixed_points,
                                moving_points=moving_points)
        levels = []
        for record in engine.level_records:
            names = [name for name, _ in record.transform.named_parameters()]
            values = [p for p in record.transform.parameters()]
            f, m = fixed_features[record.index], moving_features[record.index]
            if torch.is_grad_enabled() and (f.requires_grad or m.requires_grad):
                outs = _Optimum.apply(engine, record, self.options, f.to(engine.device), m.to(engine.device), *values)
            else:
                outs = tuple(v.detach() for v in values)
            levels.append(LevelOptimum(record.stage, record.index, record.level.grid, record.transform,
                                       dict(zip(names, outs)), record.prior))
        return LayerOutput(result, levels, engine)
