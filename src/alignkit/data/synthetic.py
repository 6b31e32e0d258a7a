"""Synthetic pairs with known ground truth, made from real images.

Each generator takes a real :class:`~alignkit.image.Image` (optionally its label map) and a seed and
returns a :class:`~alignkit.data.case.Case` in the contract's direction: the **moving** image is the
real image and the **fixed** image is the real image resampled through the true fixed → moving map
``φ`` (``fixed(x) = real(φ(x))``), so ``Case.matrix`` / ``Case.flow`` map fixed points to moving points
and ``moving ∘ φ`` reproduces ``fixed`` (``Case.flow`` is a flow as :mod:`alignkit.spatial` defines
it). Intensity generators (:func:`photometric`, :func:`modality_change`) change the moving image of a
case (or of an identity pair) and keep its geometry.

* :func:`random_affine` -- rotation, per-axis scale, shear and translation about the image centre;
* :func:`random_homography` -- the four image corners moved by up to ``corner_displacement`` pixels
  (the 4-point parametrisation used to make homography training pairs, as in 004);
* :func:`random_smooth_deformation` -- a translation plus a mixture of Gaussian displacement bumps
  with random amplitudes, centres and covariances (001, eq. 3): ``u(x) = t + Σ_k s_k exp(-½ (x -
  c_k)ᵀ Σ_k⁻¹ (x - c_k))``; :func:`random_mixture_field` draws the same family as a bare voxel field
  bounded in length (the scale-specific training pairs of ``c2f``);
* :func:`photometric` -- gain, bias, gamma, blur and noise;
* :func:`modality_change` -- a random non-monotonic remapping of intensities (mutual information
  still finds the alignment, squared differences and correlation do not).

Seeds: an ``int``, a :class:`numpy.random.Generator` or ``None``; the same seed gives the same case.
:class:`SyntheticDataset` makes a reproducible sequence of such cases from a list of images or a data
set (case ``i`` uses the seed ``[seed, i]``, whatever order the cases are read in).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from alignkit.data.case import Case
from alignkit.data.datasets import CaseDataset
from alignkit.errors import InputError, ShapeError
from alignkit.image import Image
from alignkit.spatial import (
    Grid,
    apply_matrix,
    gaussian_blur,
    jacobian_determinant,
    sample_world,
    world_to_voxel_vectors,
)

Seed = int | np.random.Generator | np.random.SeedSequence | Sequence[int] | None
Range = tuple[float, float]


def _rng(seed: Seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _uniform(rng: np.random.Generator, bound: float | Range, size: int | None = None) -> Any:
    """U(-b, b) for a number ``b``, U(lo, hi) for a pair."""
    lo, hi = (-float(bound), float(bound)) if isinstance(bound, (int, float)) else (float(bound[0]), float(bound[1]))
    return rng.uniform(lo, hi, size)


def _world_box(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper world coordinates of the grid's voxel centres, per world axis."""
    import itertools

    corners = np.array(list(itertools.product(*[(0.0, s - 1.0) for s in grid.shape])))
    affine = grid.world_from_voxel.numpy()
    world = corners @ affine[: grid.ndim, : grid.ndim].T + affine[: grid.ndim, grid.ndim]
    return world.min(axis=0), world.max(axis=0)


def _points(grid: Grid, matrix: np.ndarray | None = None) -> torch.Tensor:
    """World points of ``grid`` mapped through ``matrix`` (identity when ``None``), ``(1, ndim, *S)``
    float32: ``grid_sample`` reads coordinates in the image's dtype anyway, and a 256x256x160 volume
    then needs 120 MB per map instead of 240."""
    affine = grid.world_from_voxel if matrix is None else torch.from_numpy(matrix) @ grid.world_from_voxel
    return apply_matrix(affine, grid.voxel_points(dtype=torch.float32))


def _resample(image: Image, world: torch.Tensor, *, labels: bool = False, padding: str = "zeros") -> Image:
    """``image ∘ world`` on the grid of ``world`` (= ``image.grid``); nearest neighbour for labels
    (float32 holds label values up to 2**24 exactly)."""
    data = image.batch(dtype=torch.float32)
    out = sample_world(data, image.grid, world.to(data.dtype), mode="nearest" if labels else "linear",
                       padding=padding)[0]  # type: ignore[arg-type]
    if labels:
        out = out.round().to(torch.int64)
    path = f"{image.name} (resampled through the true map)"
    return Image(out, image.grid, path=path, meta=dict(image.meta))


def _geometric_case(
    kind: str,
    image: Image,
    world: torch.Tensor,
    labels: Image | None,
    name: str,
    meta: dict[str, Any],
    padding: str,
    **truth: Any,
) -> Case:
    """The case ``fixed = image ∘ world`` (world: fixed → moving map on ``image.grid``), moving = image."""
    if labels is not None and not labels.grid.same_as(image.grid):
        raise ShapeError(f"labels grid {labels.grid!r} differs from the image grid {image.grid!r}")
    return Case(
        name=name,
        fixed=_resample(image, world, padding=padding),
        moving=image,
        kind=kind,
        fixed_labels=None if labels is None else _resample(labels, world, labels=True, padding="zeros"),
        moving_labels=labels,
        meta={"source": image.name, **meta},
        **truth,
    )


def _rotation(ndim: int, angles_deg: np.ndarray) -> np.ndarray:
    """2D: one angle; 3D: rotations about x, y, z applied in that order."""
    a = np.deg2rad(angles_deg)
    if ndim == 2:
        return np.array([[math.cos(a[0]), -math.sin(a[0])], [math.sin(a[0]), math.cos(a[0])]])
    cx, cy, cz = np.cos(a)
    sx, sy, sz = np.sin(a)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_orthonormal(rng: np.random.Generator, ndim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    return q * np.sign(np.diag(r))  # the sign fix makes Q uniform (Haar) over rotations/reflections


# ------------------------------------------------------------------------------------------------
# geometric generators
# ------------------------------------------------------------------------------------------------
def random_affine(
    image: Image,
    *,
    seed: Seed = 0,
    rotation: float | Range = 10.0,
    scale: float | Range = 0.1,
    shear: float | Range = 0.05,
    translation: float | Range = 0.05,
    labels: Image | None = None,
    padding: str = "zeros",
    name: str | None = None,
) -> Case:
    """A random affine about the image centre (``kind="affine"``, ``Case.matrix`` fixed → moving).

    ``rotation`` in degrees (one angle in 2D, one per axis in 3D), ``scale`` as ``1 + U(±scale)`` per
    axis, ``shear`` as the upper off-diagonal terms, ``translation`` as a fraction of the image's world
    extent per axis; a number ``b`` means U(-b, b), a pair U(lo, hi).
    """
    rng = _rng(seed)
    ndim = image.ndim
    lo, hi = _world_box(image.grid)
    centre = (lo + hi) / 2
    angles = np.array([_uniform(rng, rotation) for _ in range(1 if ndim == 2 else 3)])
    scales = 1.0 + np.array([_uniform(rng, scale) for _ in range(ndim)])
    shear_m = np.eye(ndim)
    for i in range(ndim):
        for j in range(i + 1, ndim):
            shear_m[i, j] = _uniform(rng, shear)
    shift = np.array([_uniform(rng, translation) for _ in range(ndim)]) * (hi - lo)
    linear = _rotation(ndim, angles) @ shear_m @ np.diag(scales)
    matrix = np.eye(ndim + 1)
    matrix[:ndim, :ndim] = linear
    matrix[:ndim, ndim] = centre - linear @ centre + shift
    world = _points(image.grid, matrix)
    params = {"rotation_deg": angles.tolist(), "scale": scales.tolist(), "shear": shear_m.tolist(),
              "translation": shift.tolist()}
    return _geometric_case("affine", image, world, labels, name or "random_affine",
                           {"generator": "random_affine", "params": params}, padding, matrix=matrix)


def homography_from_points(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 3x3 homography mapping 4 (or more, least squares) 2D ``source`` points onto ``target``
    (direct linear transform on centred, scaled points), normalised so ``H[2, 2] = 1``."""
    src, dst = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 4:
        raise ShapeError(f"homography_from_points needs matching (N>=4, 2) arrays, got {src.shape} and {dst.shape}")

    def normaliser(p: np.ndarray) -> np.ndarray:
        mean, spread = p.mean(0), np.sqrt(((p - p.mean(0)) ** 2).sum(1).mean() / 2) or 1.0
        return np.array([[1 / spread, 0, -mean[0] / spread], [0, 1 / spread, -mean[1] / spread], [0, 0, 1]])

    ts, td = normaliser(src), normaliser(dst)
    s = (ts @ np.c_[src, np.ones(len(src))].T).T
    d = (td @ np.c_[dst, np.ones(len(dst))].T).T
    rows = []
    for (x, y, _), (u, v, _) in zip(s, d):
        rows.append([-x, -y, -1, 0, 0, 0, u * x, u * y, u])
        rows.append([0, 0, 0, -x, -y, -1, v * x, v * y, v])
    h = np.linalg.svd(np.asarray(rows))[2][-1].reshape(3, 3)
    out = np.linalg.inv(td) @ h @ ts
    return out / out[2, 2]


def random_homography(
    image: Image,
    *,
    seed: Seed = 0,
    corner_displacement: float = 32.0,
    labels: Image | None = None,
    padding: str = "zeros",
    name: str | None = None,
) -> Case:
    """A random homography moving each image corner by up to ``corner_displacement`` pixels per axis
    (``kind="homography"``; ``Case.matrix`` maps the fixed image's corners to the moved corners in the
    moving = real image; the corners are also ``fixed_points``/``moving_points``). 2D only."""
    if image.ndim != 2:
        raise ShapeError(f"random_homography needs a 2D image, got {image.ndim}D")
    rng = _rng(seed)
    lo, hi = _world_box(image.grid)
    corners = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])
    moved = corners + rng.uniform(-corner_displacement, corner_displacement, size=(4, 2))
    matrix = homography_from_points(corners, moved)
    world = _points(image.grid, matrix)
    params = {"corner_displacement": float(corner_displacement), "corner_offsets": (moved - corners).tolist()}
    return _geometric_case("homography", image, world, labels, name or "random_homography",
                           {"generator": "random_homography", "params": params}, padding,
                           matrix=matrix, fixed_points=corners, moving_points=moved)


def gaussian_mixture_displacement(
    points: torch.Tensor, translation: np.ndarray, shifts: np.ndarray, centres: np.ndarray, covariances: np.ndarray
) -> torch.Tensor:
    """001 eq. 3 at world ``points (1, ndim, *S)``: ``t + Σ_k s_k exp(-½ (x - c_k)ᵀ Σ_k⁻¹ (x - c_k))``,
    in the dtype of ``points``."""
    ndim = points.shape[1]
    flat = points.reshape(ndim, -1)
    out = torch.as_tensor(translation, dtype=points.dtype).view(ndim, 1).expand_as(flat).clone()
    dtype = points.dtype
    bumps = [(torch.as_tensor(s, dtype=dtype).view(ndim, 1), torch.as_tensor(c, dtype=dtype).view(ndim, 1),
              torch.as_tensor(np.linalg.inv(cov), dtype=dtype)) for s, c, cov in zip(shifts, centres, covariances)]
    chunk = 1 << 20  # bounded temporaries: a 256x256x160 volume costs ~12 MB per array, not ~120 MB
    for start in range(0, flat.shape[1], chunk):
        part = flat[:, start : start + chunk]
        for shift, centre, inv in bumps:
            d = part - centre
            out[:, start : start + chunk] += shift * torch.exp(-0.5 * (d * (inv @ d)).sum(0))
    return out.reshape(points.shape)


def _mixture_parameters(
    rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, *, translation: float | Range, n_gaussians: int,
    amplitude: float | Range, sigma: Range,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """001 eq. 3's random parameters over the box ``[lo, hi]``: translation ``t`` (uniform per axis),
    shifts ``s_k`` (uniform per component), centres ``c_k`` (uniform in the box) and SPD covariances
    ``Σ_k = Q diag(σ²) Qᵀ`` (random rotation ``Q``, σ uniform in ``sigma`` x the box's mean extent)."""
    ndim = len(lo)
    size = float(np.mean(hi - lo))
    t = np.array([_uniform(rng, translation) for _ in range(ndim)])
    shifts = np.array([[_uniform(rng, amplitude) for _ in range(ndim)] for _ in range(n_gaussians)]).reshape(-1, ndim)
    centres = rng.uniform(lo, hi, size=(n_gaussians, ndim))
    covariances = []
    for _ in range(n_gaussians):
        q = _random_orthonormal(rng, ndim)
        stds = rng.uniform(sigma[0], sigma[1], size=ndim) * size
        covariances.append(q @ np.diag(stds**2) @ q.T)
    return t, shifts, centres, np.array(covariances).reshape(-1, ndim, ndim)


def random_mixture_field(
    shape: Sequence[int],
    *,
    seed: Seed = 0,
    max_displacement: float = 2.0,
    n_gaussians: int | tuple[int, int] = (1, 4),
    sigma: Range = (0.1, 0.3),
) -> torch.Tensor:
    """A displacement field of 001 eq. 3 on a voxel grid of ``shape``: ``(1, ndim, *shape)`` float32,
    voxels, array-axis order, whose length is at most ``max_displacement`` everywhere.

    The translation and each bump's shift are drawn uniformly in ``±max_displacement`` per component
    (``n_gaussians`` bumps, or a number drawn uniformly in the inclusive range given), centres
    uniform over the grid, σ in ``sigma`` x the grid's mean extent along random principal axes; a
    field that comes out longer than ``max_displacement`` somewhere is scaled down to that bound
    (the scale-specific task of 001 §3.5: "displacements of at most a few pixels" at one scale)."""
    if max_displacement <= 0:
        raise InputError(f"max_displacement must be > 0, got {max_displacement}")
    rng = _rng(seed)
    shape = tuple(int(s) for s in shape)
    count = int(rng.integers(n_gaussians[0], n_gaussians[1] + 1)) if isinstance(n_gaussians, tuple) else int(n_gaussians)
    if count < 0:
        raise InputError(f"n_gaussians must be >= 0, got {n_gaussians}")
    lo, hi = np.zeros(len(shape)), np.array([s - 1.0 for s in shape])
    t, shifts, centres, covs = _mixture_parameters(rng, lo, hi, translation=max_displacement, n_gaussians=count,
                                                   amplitude=max_displacement, sigma=sigma)
    identity = Grid.from_spacing(shape).voxel_points(dtype=torch.float32)
    field = gaussian_mixture_displacement(identity, t, shifts, centres, covs)
    longest = float(field.norm(dim=1).max())
    return field * (max_displacement / longest) if longest > max_displacement else field


def random_smooth_deformation(
    image: Image,
    *,
    seed: Seed = 0,
    translation: float | Range = 3.0,
    n_gaussians: int = 4,
    amplitude: float | Range = 6.0,
    sigma: Range = (0.1, 0.25),
    labels: Image | None = None,
    padding: str = "zeros",
    name: str | None = None,
) -> Case:
    """A global translation plus a Gaussian mixture of displacement bumps (001 eq. 3; ``kind="deformable"``).

    ``translation`` and ``amplitude`` (each component of each bump's shift ``s_k``) in world units
    (pixels for a raster, mm for a volume); ``sigma`` the range of the bumps' standard deviations
    along their random principal axes, as a fraction of the image's mean world extent; centres
    uniform over the image. ``Case.flow`` is the displacement as a flow of the fixed grid (voxels,
    array-axis order: :func:`alignkit.spatial.world_to_voxel_vectors` of the world displacement; see
    :mod:`alignkit.spatial`) and
    ``meta["jacobian_min"]`` the smallest Jacobian determinant of the map (a bump folds when its
    amplitude exceeds ~1.6 σ; the defaults stay far below).
    """
    if n_gaussians < 0:
        raise InputError(f"n_gaussians must be >= 0, got {n_gaussians}")
    lo, hi = _world_box(image.grid)
    t, shifts, centres, covs = _mixture_parameters(_rng(seed), lo, hi, translation=translation,
                                                   n_gaussians=n_gaussians, amplitude=amplitude, sigma=sigma)
    ndim = image.ndim
    identity = _points(image.grid)
    displacement = gaussian_mixture_displacement(identity, t, shifts, centres, covs)
    world = identity + displacement
    flow = world_to_voxel_vectors(displacement, image.grid)[0].numpy()
    # the map is smooth on the scale of its bumps (σ >= a tenth of the image), so on big volumes every
    # second voxel is enough to find its smallest Jacobian, at an eighth of the cost
    stride = 2 if image.grid.numel > 1 << 21 else 1
    every: tuple[slice, ...] = (slice(None), slice(None)) + (slice(None, None, stride),) * ndim
    sparse = world[every]
    scale = torch.diag(torch.tensor([float(stride)] * ndim + [1.0], dtype=torch.float64))
    jac_min = float(jacobian_determinant(sparse, Grid(tuple(sparse.shape[2:]), image.grid.world_from_voxel @ scale)).min())
    params = {"translation": t.tolist(), "shifts": shifts.tolist(), "centres": centres.tolist(),
              "covariances": covs.tolist()}
    return _geometric_case("deformable", image, world, labels, name or "random_smooth_deformation",
                           {"generator": "random_smooth_deformation", "params": params, "jacobian_min": jac_min},
                           padding, flow=flow)


# ------------------------------------------------------------------------------------------------
# intensity generators
# ------------------------------------------------------------------------------------------------
def _identity_case(image: Image, labels: Image | None, name: str) -> Case:
    return Case(name=name, fixed=image, moving=image, kind="affine", fixed_labels=labels, moving_labels=labels,
                matrix=np.eye(image.ndim + 1), meta={"source": image.name})


def _with_moving(source: Image | Case, labels: Image | None, name: str | None, default: str,
                 change: Callable[[Image], tuple[Image, dict[str, Any]]]) -> Case:
    case = source if isinstance(source, Case) else _identity_case(source, labels, name or default)
    moving, params = change(case.moving)
    meta = dict(case.meta)
    meta.setdefault("intensity", []).append({"generator": default, "params": params})
    return dataclasses.replace(case, moving=moving, name=name or case.name, meta=meta)


def _unit_range(data: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Data rescaled to [0, 1] by its min and max (and the two numbers to undo it)."""
    lo, hi = float(data.min()), float(data.max())
    span = hi - lo if hi > lo else 1.0
    return ((data - lo) / span).clamp(0, 1), lo, span


def photometric(
    image: Image | Case,
    *,
    seed: Seed = 0,
    gain: Range = (0.8, 1.25),
    bias: Range = (-0.1, 0.1),
    gamma: Range = (0.7, 1.4),
    blur: Range = (0.0, 1.0),
    noise: Range = (0.0, 0.03),
    labels: Image | None = None,
    name: str | None = None,
) -> Case:
    """Change the moving image's intensities: ``gain · v^gamma + bias`` on intensities scaled to
    [0, 1], a Gaussian blur (σ in voxels) and additive Gaussian noise (σ as a fraction of the range),
    each drawn uniformly from its range (gamma log-uniformly). An :class:`Image` becomes the identity
    pair (real, changed real) with ``Case.matrix = I``; a :class:`Case` keeps its ground truth."""
    rng = _rng(seed)

    def change(moving: Image) -> tuple[Image, dict[str, Any]]:
        g = float(rng.uniform(*gain))
        b = float(rng.uniform(*bias))
        gm = float(np.exp(rng.uniform(np.log(gamma[0]), np.log(gamma[1]))))
        sigma = float(rng.uniform(*blur))
        std = float(rng.uniform(*noise))
        torch_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        unit, lo, span = _unit_range(moving.data.float())
        out = g * unit.pow(gm) + b
        if sigma > 0:
            out = gaussian_blur(out.unsqueeze(0), sigma)[0]
        out = out + std * torch.randn(out.shape, generator=torch_gen)
        params = {"gain": g, "bias": b, "gamma": gm, "blur_sigma": sigma, "noise_std": std}
        return moving.with_data(out * span + lo), params

    return _with_moving(image, labels, name, "photometric", change)


def random_intensity_map(rng: np.random.Generator, knots: int = 6, *, min_swing: float = 0.5) -> np.ndarray:
    """Values in [0, 1] at ``knots + 1`` equally spaced intensities: a non-monotonic lookup table
    (at least one rise and one fall, spanning at least ``min_swing``)."""
    if knots < 2:
        raise InputError(f"a non-monotonic map needs knots >= 2, got {knots}")
    for _ in range(1000):
        values = rng.uniform(0.0, 1.0, knots + 1)
        steps = np.diff(values)
        if (steps > 0).any() and (steps < 0).any() and values.max() - values.min() >= min_swing:
            return values
    raise InputError("could not draw a non-monotonic intensity map")  # pragma: no cover -- p ≈ 0


def modality_change(
    image: Image | Case,
    *,
    seed: Seed = 0,
    knots: int = 6,
    labels: Image | None = None,
    name: str | None = None,
) -> Case:
    """Remap the moving image's intensities through a random non-monotonic piecewise-linear function
    (:func:`random_intensity_map` on intensities scaled to [0, 1], per channel): the images stay
    functionally related, so mutual information peaks at the true alignment, while squared
    differences and correlation do not. Image → identity pair; Case → same ground truth."""
    rng = _rng(seed)

    def change(moving: Image) -> tuple[Image, dict[str, Any]]:
        table = random_intensity_map(rng, knots)
        unit, lo, span = _unit_range(moving.data.float())
        xs = np.linspace(0.0, 1.0, knots + 1)
        out = np.interp(unit.numpy(), xs, table).astype(np.float32)
        return moving.with_data(torch.from_numpy(out) * span + lo), {"lookup_table": table.tolist()}

    return _with_moving(image, labels, name, "modality_change", change)


# ------------------------------------------------------------------------------------------------
# data set of generated cases
# ------------------------------------------------------------------------------------------------
GENERATORS: dict[str, Callable[..., Case]] = {
    "affine": random_affine,
    "homography": random_homography,
    "deformation": random_smooth_deformation,
    "photometric": photometric,
    "modality": modality_change,
}

BaseItem = Image | tuple[Image, Image | None]


class SyntheticDataset(CaseDataset):
    """``n`` generated cases from real images: case ``i`` applies ``generator`` to base image
    ``i % len(base)`` with the seed ``[seed, i]``, so it is the same whatever order cases are read in.

    ``base``: an :class:`Image`, an ``(image, labels)`` pair, a list of those, or a
    :class:`CaseDataset` (its moving images and labels, loaded when needed). ``generator``: a name of
    :data:`GENERATORS` or a callable ``(image, *, seed, labels=None, **params) -> Case``; ``params``
    go to it (e.g. ``corner_displacement=16``).
    """

    layout = "synthetic"

    def __init__(
        self,
        base: BaseItem | Sequence[BaseItem] | CaseDataset,
        generator: str | Callable[..., Case],
        n: int,
        seed: int = 0,
        **params: Any,
    ) -> None:
        if isinstance(generator, str):
            if generator not in GENERATORS:
                raise InputError(f"unknown generator {generator!r}; known: {', '.join(GENERATORS)}")
            gen_name, gen = generator, GENERATORS[generator]
        else:
            gen_name, gen = getattr(generator, "__name__", "custom"), generator
        if n < 0:
            raise InputError(f"n must be >= 0, got {n}")
        super().__init__(None, name=f"synthetic/{gen_name}")
        if isinstance(base, (Image, tuple)):
            base = [base]  # type: ignore[list-item]
        if len(base) == 0:
            raise InputError("SyntheticDataset needs at least one base image")
        self.base = base
        self.generator = gen
        self.generator_name = gen_name
        self.seed = seed
        self.params = params
        self._takes_labels = "labels" in inspect.signature(gen).parameters
        self.names = [f"{gen_name}/{i:04d}" for i in range(n)]

    def _base_item(self, index: int) -> tuple[Image, Image | None, str]:
        item: Any = self.base[index % len(self.base)]
        if isinstance(item, Case):  # from a CaseDataset: its moving image is the real one
            return item.moving, item.moving_labels, item.name
        if isinstance(item, tuple):
            return item[0], item[1], item[0].name
        return item, None, item.name

    def _load(self, name: str) -> Case:
        index = self.names.index(name)
        image, labels, source = self._base_item(index)
        kwargs = dict(self.params)
        if labels is not None and self._takes_labels:
            kwargs["labels"] = labels
        case = self.generator(image, seed=np.random.default_rng([self.seed, index]), **kwargs)
        case.name = name
        case.meta.update(dataset=self.name, base=source, seed=[self.seed, index])
        return case
