"""The iterative engine: any transform model × any objective, multi-scale, stages chained by composition.

For each stage the engine builds a Gaussian pyramid of both images (or takes the per-level feature
images it is given, see :meth:`Engine.run`), and at each level minimises

    similarity(moving ∘ prior ∘ T_stage, fixed) + λ · regulariser(T_stage) + prompt terms

over the stage's parameters, where ``prior`` is the composition of the stages already fitted. The
moving image is always sampled once from the original data through the whole chain, so nothing is
resampled twice however many stages ran (Shen et al. 2019 §1).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from alignkit.errors import ConfigError
from alignkit.image import Image, common_channels
from alignkit.solve.config import RegistrationConfig, StageConfig
from alignkit.solve.greedy import (
    LNCCForce,
    compose_displacement,
    normalised_step,
    smooth_field,
    update_displacement,
)
from alignkit.solve.optim import PlainAdam
from alignkit.spatial import Grid, apply_matrix, downsample, gaussian_blur, sample_voxels
from alignkit.spatial.compiled import available as compiled_available
from alignkit.spatial.compiled import fits as compiled_fits
from alignkit.spatial.filters import median_filter
from alignkit.spatial.points import (
    homogeneous_grid,
    sample_affine,
    sample_projective,
    sample_voxels_with_inside,
)
from alignkit.transforms import (
    ComposedTransform,
    DisplacementField,
    FieldTransform,
    MatrixTransform,
    StationaryVelocityField,
    Transform,
    VectorMomentumSVF,
    build_transform,
    resample_field,
)

ProgressFactory = Callable[..., Any]


@dataclass
class StageLog:
    transform: str
    #: one list per level that ran, in order: a level skipped by ``Engine._fit_stage`` (same grid as a
    #: converged previous level) or not reached after a divergence has none
    losses: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0
    #: indices of the stage's levels that were not run (see ``Engine._fit_stage``)
    skipped: list[int] = field(default_factory=list)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available")
    return device


def tail_quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q, dim=-1, keepdim=True)`` (linear interpolation), bit for bit, for
    ``q`` in a tail: the two order
    statistics around ``q (n - 1)`` come from ``topk`` of the few smallest (or largest) values
    instead of a full sort -- measured on 3 x 696k pixels, one thread: 0.45 s for
    ``torch.quantile``, 0.02 s this way (a 1 Mpx photo is normalised three times per registration).
    Falls back to ``torch.quantile`` when ``q`` is not in a tail (the reference it is tested against)."""
    count = values.shape[-1]
    # the rank and weight as torch.quantile computes them (in the values' dtype), so that the two agree
    # to the last bit: a registration amplifies a 1e-7 change of the normalisation into a different
    # optimisation path (up to 1 px on the golden flow case)
    rank = torch.tensor(q, dtype=values.dtype) * (count - 1)
    below = int(rank)
    weight = (rank - below).to(values.device)
    if count < 2 or 0.1 < q < 0.9:
        return torch.quantile(values, q, dim=-1, keepdim=True)
    if q <= 0.1:  # order statistics `below` and `below + 1`, counted from the smallest
        # below + 1 < count: q (n - 1) <= 0.1 (n - 1) < n - 1 for n >= 2
        ordered = _extremes(values, below + 2, largest=False)
        first, second = ordered[..., below : below + 1], ordered[..., below + 1 : below + 2]
    else:  # the same two, counted from the largest
        from_top = count - 1 - below  # rank of `below` from the top (0 = largest)
        ordered = _extremes(values, from_top + 1, largest=True)
        first = ordered[..., from_top : from_top + 1]
        above = max(from_top - 1, 0)  # q = 1: position is the last index and its weight is 0
        second = ordered[..., above : above + 1]
    return torch.lerp(first, second, weight)


def _extremes(values: Tensor, count: int, *, largest: bool, stride: int = 32) -> Tensor:
    """``torch.topk(values, count, dim=-1, largest=largest, sorted=True).values`` of finite values, the
    same numbers: on a long last axis of a CPU tensor, ``topk`` runs on the values at or beyond a
    threshold that a strided subsample puts about twice ``count`` values beyond (every value not
    selected lies strictly inside it, so the ``count`` extremes are among those selected; ``topk`` of
    the whole row when the threshold selects too few). The selection is numpy's boolean indexing (~2x
    torch's). 3 x 370k pixels of an 8-bit photo, ``count`` ~1850, one thread: ~0.8 ms against ~4.5."""
    length = values.shape[-1]
    if values.device.type != "cpu" or length < 1 << 16 or count * 16 > length:
        return torch.topk(values, count, dim=-1, largest=largest, sorted=True).values
    rows = values.detach().reshape(-1, length)
    sample = rows[:, ::stride]
    reach = min(sample.shape[-1], 2 * count // stride + 8)
    thresholds = torch.topk(sample, reach, dim=-1, largest=largest, sorted=True).values[:, -1].tolist()
    out = []
    for row, threshold in zip(rows.numpy(), thresholds):
        chosen = row[row >= threshold] if largest else row[row <= threshold]
        if chosen.size < count:
            return torch.topk(values, count, dim=-1, largest=largest, sorted=True).values
        out.append(torch.topk(torch.from_numpy(chosen), count, largest=largest, sorted=True).values)
    return torch.stack(out).reshape(*values.shape[:-1], count)


def normalize_intensity(tensor: Tensor, low: float = 0.5, high: float = 99.5) -> Tensor:
    """Map robust percentiles to [0, 1] per channel so one learning rate and one set of loss
    weights serve images of any intensity scale (CT in HU, MR in arbitrary units, 8-bit photos)."""
    flat = tensor.flatten(2)
    count = flat.shape[-1]
    if count > 2_000_000:  # percentiles of a strided subsample are plenty and much cheaper
        flat = flat[..., :: count // 1_000_000]
    lo = tail_quantile(flat.float(), low / 100)
    hi = tail_quantile(flat.float(), high / 100)
    scale = (hi - lo).clamp(min=1e-6)
    shape = (*tensor.shape[:2],) + (1,) * (tensor.dim() - 2)
    return ((tensor - lo.view(shape)) / scale.view(shape)).clamp(-0.5, 1.5)


def center_of_mass(tensor: Tensor, grid: Grid) -> Tensor:
    """Intensity-weighted centre (world, float64) of ``tensor (1, C, *S)`` (values shifted to be >= 0)."""
    weights = tensor.double().sum(1, keepdim=True)
    weights = weights - weights.amin()
    total = weights.sum()
    if float(total) <= 0:
        return grid.center_world()
    voxel = grid.voxel_points(dtype=torch.float64, device=tensor.device)
    centre_voxel = (voxel * weights).flatten(2).sum(-1)[0] / total
    return (grid.world_from_voxel @ torch.cat([centre_voxel.cpu(), torch.ones(1, dtype=torch.float64)]))[: grid.ndim]


def initial_translation(fixed: Tensor, fixed_grid: Grid, moving: Tensor, moving_grid: Grid, mode: str) -> Tensor | None:
    """Moving-from-fixed matrix that aligns centres (of the grids or of intensity mass), like ANTs'
    ``--initial-moving-transform`` with geometric centre (1) or centre of mass (0)."""
    if mode == "none":
        return None
    if mode == "center":
        shift = moving_grid.center_world() - fixed_grid.center_world()
    else:
        shift = center_of_mass(moving, moving_grid) - center_of_mass(fixed, fixed_grid)
    matrix = torch.eye(fixed_grid.ndim + 1, dtype=torch.float64)
    matrix[: fixed_grid.ndim, fixed_grid.ndim] = shift
    return matrix


#: a pyramid level keeps at least this many voxels along the fixed image's shortest axis: a preset's
#: shrink factors are chosen for typical sizes (a 1/8 level of a 256-voxel brain is 32 wide), and on a
#: small volume -- e.g. 44x59x41 prostate crops -- the same factor leaves a 5-voxel level on which
#: mutual information and the first stages' fits are meaningless (measured: mean Dice 0.27 with the
#: brain-sized factors vs 0.46 with levels capped this way, multimodal preset, 4 MR-US pairs)
MIN_LEVEL_SIZE = 16


def level_factor(factor: float, shape: tuple[int, ...], max_voxels: int = 0) -> float:
    """A preset's shrink ``factor``, capped so the level is at least :data:`MIN_LEVEL_SIZE` voxels wide,
    and raised (when ``max_voxels`` > 0) so that the level has at most ``max_voxels`` voxels."""
    factor = float(min(factor, max(1.0, min(shape) / MIN_LEVEL_SIZE)))
    if max_voxels > 0:
        numel = math.prod(shape)
        factor = max(factor, (numel / max_voxels) ** (1.0 / len(shape)))
    return factor


#: a stage after a feature start is kept only while the keypoint inliers stay statistically compatible
#: with it: the rise of their summed squared residuals, in units of the feature fit's noise variance
#: (``Engine._inlier_chi2_rise``), may not pass the 0.999 quantile of a chi-square with 8 degrees of
#: freedom (a homography's parameters; 26.1). Measured with the photo preset's affine NCC refinement of
#: the GRIC feature start (``/tmp`` probe of session 5, one run): on the 80 vis-nir pairs every
#: refinement the former corner/weak-gain rules kept (field/0011, forest/0006, forest/0007,
#: forest/0020, mountain/0005, mountain/0007-0009) raised the inliers' chi-square by 35 to 20 000 and
#: took the corner error from 0.07-1.0 px to 0.23-2.1 px; on homogr the one refinement kept (city's
#: affine, 20.6) changed the TRE by 0.01 px. Visible/near-infrared NCC and SIFT's localisation both
#: have biases; the threshold trusts the matches wherever they are many and precise, and lets the
#: intensities move a start whose matches are few or noisy (its noise estimate is then large).
INLIER_CHI2_LIMIT = 26.12

#: a stage whose objective at its finest level ends above its start by more than this (relative to the
#: start, or absolute below 1) is rejected by the never-worse rule (see ``Engine._judge_stage``)
OBJECTIVE_TOLERANCE = 1e-5


#: a level with at least this many voxels keeps every thread (fewer: one); see :func:`_threads_for`
PARALLEL_LEVEL_VOXELS = 1 << 18
#: ... and for a greedy level whose iteration is the compiled loops (:mod:`alignkit.spatial.compiled`)
PARALLEL_COMPILED_LEVEL_VOXELS = 1 << 15


@contextlib.contextmanager
def _threads_for(voxels: int, device: torch.device, threshold: int = PARALLEL_LEVEL_VOXELS) -> Iterator[None]:
    """Run small CPU levels on one thread.

    Below ~250k voxels a torch op is over in well under a millisecond, and waking a second OpenMP
    thread costs more than it saves -- up to 30x more when another process holds the other core
    (measured: a 9-tap box filter on 128², 0.3 ms on one thread vs 11 ms on two under load). The
    compiled greedy iteration is a dozen long loops instead of hundreds of short ops, so it pays from
    ``PARALLEL_COMPILED_LEVEL_VOXELS`` (the numba kernels follow torch's thread count).
    """
    previous = torch.get_num_threads()
    if device.type != "cpu" or voxels >= threshold or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _record_loss(value: Tensor, losses: list[float], bar: Any, level: float) -> float:
    """Append one iteration's objective to ``losses`` and show it on the progress ``bar`` (or None);
    a non-finite objective stops the stage (:class:`_Diverged`, judged by the never-worse rule)."""
    loss_value = float(value.detach())
    if not math.isfinite(loss_value):
        raise _Diverged(f"the objective became {loss_value} at level 1/{level:g}")
    losses.append(loss_value)
    if bar is not None:
        bar.update(1)
        bar.set_postfix(level=f"1/{level:g}", loss=f"{loss_value:.4g}", refresh=False)
    return loss_value


@torch.no_grad()
def _median_filter_parameters(transform: Transform, window: int) -> None:
    """Replace each field parameter ``(1, C, *S)`` by its ``window``-wide median (edge-replicated),
    component by component -- Sun et al.'s flow median filter (see ``StageConfig.field_median``)."""
    for p in transform.parameters():
        if p.dim() != transform.ndim + 2 or min(p.shape[2:]) < window:
            continue
        p.copy_(median_filter(p.detach(), window))


def crop_to_foreground(tensor: Tensor, grid: Grid, *, threshold: float = 0.01, margin: float = 0.08) -> tuple[Tensor, Grid]:
    """Crop ``tensor (1, C, *S)`` (normalised to [0, 1]) to the box holding every voxel above
    ``threshold``, widened by ``margin`` of each axis (at least 4 voxels); the grid is moved so
    world positions are unchanged. Images without an empty background come back whole."""
    mask = tensor.abs().amax(dim=(0, 1)) > threshold
    if not bool(mask.any()):
        return tensor, grid
    slices = []
    for axis, size in enumerate(grid.shape):
        other = tuple(d for d in range(grid.ndim) if d != axis)
        hits = torch.nonzero(mask.any(dim=other) if other else mask).flatten()
        pad = max(4, round(margin * size))
        start, stop = max(0, int(hits[0]) - pad), min(size, int(hits[-1]) + pad + 1)
        slices.append(slice(start, stop))
    if all(s.stop - s.start == n for s, n in zip(slices, grid.shape)):
        return tensor, grid
    shift = torch.eye(grid.ndim + 1, dtype=torch.float64)
    shift[: grid.ndim, grid.ndim] = torch.tensor([float(s.start) for s in slices], dtype=torch.float64)
    cropped = tensor[(slice(None), slice(None), *slices)].contiguous()
    return cropped, Grid(tuple(s.stop - s.start for s in slices), grid.world_from_voxel @ shift)


class _Diverged(Exception):
    """A stage's objective became NaN or infinite: the stage stops and the never-worse rule drops it."""


class _Stopper:
    """Stop when the loss has not improved by a relative ``tolerance`` for ``patience`` iterations."""

    def __init__(self, tolerance: float, patience: int) -> None:
        self.tolerance, self.patience = tolerance, patience
        self.best = math.inf
        self.stale = 0

    def update(self, loss: float) -> bool:
        if not math.isfinite(self.best) or loss < self.best - self.tolerance * max(abs(self.best), 1e-12):
            self.best = loss
            self.stale = 0
        else:
            self.stale += 1
        return self.tolerance > 0 and self.stale >= self.patience


@dataclass
class _Level:
    fixed: Tensor
    grid: Grid
    moving: Tensor
    moving_grid: Grid
    world: Tensor
    fixed_onehot: Tensor | None = None
    moving_onehot: Tensor | None = None
    #: the shrink factor the stage asked for this level over the one it got (< 1 where max_level_voxels
    #: made the level coarser; see StageConfig.capped_smoothing_physical)
    asked_over_used: float = 1.0


@dataclass
class LevelRecord:
    """One optimised level of one stage, kept when the engine is built with ``keep_levels=True``: what
    :meth:`Engine.level_energy` needs to evaluate that level's objective again at the optimum -- with
    other fixed/moving tensors, e.g. feature images that carry an autograd graph (the optimisation
    layer of :mod:`alignkit.solve.implicit`). ``transform`` is a copy of the model at the level's end
    (parameters detached), ``prior`` the chain before the stage."""

    stage: int
    index: int
    config: StageConfig
    level: _Level
    transform: Transform
    prior: Transform | None
    prompts: dict[str, Any]


class Engine:
    """Fits a :class:`RegistrationConfig` to one pair of images.

    Images are normalised to [0, 1] by robust percentiles before fitting. ``progress`` is a
    tqdm-like factory (or None for silence).
    """

    def __init__(
        self,
        config: RegistrationConfig,
        *,
        device: str | torch.device | None = None,
        seed: int | None = 0,
        progress: ProgressFactory | None = None,
        keep_levels: bool = False,
    ) -> None:
        self.config = config
        self.device = resolve_device(device)
        self.seed = seed
        self.progress = progress
        self.logs: list[StageLog] = []
        self.init_info: dict[str, Any] = {}
        #: one record per stage of the last run: kept or rejected by the never-worse rule, and why
        self.stage_checks: list[dict[str, Any]] = []
        self._feature_fit: Any = None
        self._diverged: str | None = None
        self._start_objective: float | None = None  # the fitted stage's objective at its start (_fit_stage)
        #: world displacement on the fixed grid that the first stage's field starts from (init "dis")
        self._field_start: Tensor | None = None
        self._start_grid: Grid | None = None
        self._grids_spacing = 1.0
        self._pyramid: dict[tuple[str, float, float | None], tuple[Tensor, Grid]] = {}
        #: injected per-level (fixed, fixed grid, moving, moving grid), coarse first (see ``run``)
        self._features: list[tuple[Tensor, Grid, Tensor, Grid]] | None = None
        self.keep_levels = keep_levels
        #: every optimised level of the last run (only with ``keep_levels``), in the order fitted
        self.level_records: list[LevelRecord] = []
        #: the last run's pair as normalised for fitting (``normalize_intensity`` then ``common_channels`` of
        #: the inputs, before any crop): what ``compute_metrics`` would compute again, handed to it instead
        self.normalised: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------------------------------
    def run(
        self,
        fixed: Image,
        moving: Image,
        *,
        fixed_labels: Image | None = None,
        moving_labels: Image | None = None,
        fixed_points: Tensor | None = None,
        moving_points: Tensor | None = None,
        initial: Transform | None = None,
        fixed_features: Sequence[Image] | None = None,
        moving_features: Sequence[Image] | None = None,
    ) -> ComposedTransform:
        """Register ``moving`` to ``fixed``: the chain of fitted stages (fixed-world -> moving-world points).

        ``fixed_features`` / ``moving_features`` (both or neither; coarse first, one per pyramid level of
        every stage) replace the intensity pyramid: level ``i`` of each stage compares
        ``fixed_features[i]`` with ``moving_features[i]`` -- multi-channel images, each on its own
        world-placed grid (fixed and moving may differ in size, spacing and orientation; nothing is
        resampled onto the other's grid) -- and are used as given (no normalisation, cropping or
        grey conversion). The images themselves still place linear models and start them (``init``).
        This is how learned feature images (Jena et al., Deep Implicit Optimization for Robust and
        Flexible Image Registration, §3.3: each feature scale feeds one level) are registered.
        """
        if fixed.ndim != moving.ndim:
            raise ConfigError(f"fixed is {fixed.ndim}D but moving is {moving.ndim}D")
        self._features = self._check_features(fixed.ndim, fixed_features, moving_features)
        self.level_records = []
        if self.seed is not None:
            torch.manual_seed(self.seed)
        self._pyramid = {}
        self._feature_fit = None
        self.init_info, self.stage_checks, self.logs = {}, [], []
        self._field_start = None
        fixed_t = normalize_intensity(fixed.batch(device=self.device))
        moving_t = normalize_intensity(moving.batch(device=self.device))
        fixed_t, moving_t = common_channels(fixed_t, moving_t)  # grey against RGB(A): compare luminance
        self.normalised = (fixed_t, moving_t)

        raw_fixed, raw_moving = fixed, moving  # stereo matching takes the pair as given (init "sgm")
        fixed_grid, moving_grid = fixed.grid, moving.grid
        if self.config.crop_foreground and self._features is None:
            fixed_t, fixed_grid = crop_to_foreground(fixed_t, fixed_grid)
            moving_t, moving_grid = crop_to_foreground(moving_t, moving_grid)
        fixed = Image(fixed_t[0], fixed_grid, path=fixed.path)
        moving = Image(moving_t[0], moving_grid, path=moving.path)

        stages: list[Transform] = []
        if initial is not None:
            stages.append(initial.to(self.device))
        elif self.config.stages[0].is_linear:
            init = self.config.init
            matrix = None
            if init == "features":
                self._grids_spacing = float(fixed.grid.spacing.min())
                matrix = self._feature_init(fixed_t, fixed.grid, moving_t, moving.grid)
                init = "center"
            if matrix is None:
                matrix = initial_translation(fixed_t, fixed.grid, moving_t, moving.grid, init)
            if matrix is not None:
                start = MatrixTransform(matrix.float()).to(self.device)
                start.kind = f"init:{self.config.init}"  # manifests name it by how it was found
                stages.append(start)
        elif self.config.init == "dis":
            self._field_start = self._dis_init(fixed_t, fixed.grid, moving_t, moving.grid)
            self._start_grid = fixed.grid
        elif self.config.init == "sgm":
            # on the images as given, not the per-image normalised ones: stretching each image's
            # channels on its own changes their grey mix differently in left and right, which the
            # census sees (motorcycle bad-2 0.0737 against 0.0727, EPE 1.38 against 1.33)
            stages.append(self._sgm_init(raw_fixed.batch(device=self.device), raw_fixed.grid,
                                         raw_moving.batch(device=self.device), raw_moving.grid))

        prompts = self._prompts(fixed_labels, moving_labels, fixed_points, moving_points)
        if self._feature_fit is not None:
            start = ComposedTransform(stages).transform_points
            self.init_info["inlier_median_px_features"] = self._inlier_median_px(start)
        for stage_config in self.config.stages:
            prior = ComposedTransform(stages) if stages else None
            started = time.perf_counter()
            log = StageLog(stage_config.transform)
            transform = self._fit_stage(stage_config, fixed_t, fixed.grid, moving_t, moving.grid, prior, prompts, log)
            for p in transform.parameters():
                p.requires_grad_(False)
            check = self._judge_stage(stage_config, fixed_t, fixed.grid, moving_t, moving.grid, prior, prompts, transform)
            log.seconds = time.perf_counter() - started
            self.logs.append(log)
            self.stage_checks.append(check)
            if check["kept"]:
                stages.append(transform)
            elif self._field_start is not None and stage_config is self.config.stages[0]:
                # the rejected field started from the dense start: keep that start, not nothing
                start = self._new_transform(stage_config, fixed.grid, fixed.grid)
                for p in start.parameters():
                    p.requires_grad_(False)
                start.kind = "init:dis"
                stages.append(start)
        self._pyramid = {}  # free the levels
        if not stages:  # every stage rejected and no start: the identity
            stages.append(MatrixTransform(torch.eye(fixed.ndim + 1)).to(self.device))
        if self._feature_fit is not None:
            self.init_info["inlier_median_px_refined"] = self._inlier_median_px(ComposedTransform(stages).transform_points)
            if len(stages) == 1:
                self.init_info["refinement_dropped"] = 1.0
        return ComposedTransform(stages)

    def _check_features(
        self, ndim: int, fixed_features: Sequence[Image] | None, moving_features: Sequence[Image] | None
    ) -> list[tuple[Tensor, Grid, Tensor, Grid]] | None:
        if fixed_features is None and moving_features is None:
            return None
        if fixed_features is None or moving_features is None:
            raise ConfigError("give feature images for both fixed and moving, or for neither")
        if len(fixed_features) != len(moving_features):
            raise ConfigError(f"{len(fixed_features)} fixed but {len(moving_features)} moving feature levels")
        for stage in self.config.stages:
            if len(stage.levels) != len(fixed_features):
                raise ConfigError(
                    f"stage {stage.transform} has {len(stage.levels)} levels but {len(fixed_features)} feature "
                    "levels were given (one feature scale per level, coarse first)"
                )
        levels = []
        for i, (f, m) in enumerate(zip(fixed_features, moving_features)):
            if f.ndim != ndim or m.ndim != ndim:
                raise ConfigError(f"feature level {i}: expected {ndim}D feature images, got {f.ndim}D and {m.ndim}D")
            if f.channels != m.channels:
                raise ConfigError(f"feature level {i}: fixed has {f.channels} channels but moving has {m.channels}")
            levels.append((f.batch(device=self.device), f.grid, m.batch(device=self.device), m.grid))
        return levels

    # ------------------------------------------------------------------------------------------
    def _feature_init(self, fixed_t: Tensor, fixed_grid: Grid, moving_t: Tensor, moving_grid: Grid) -> Tensor | None:
        """Matrix fitted to keypoint matches, or None (then the centres are aligned) when OpenCV is
        missing or the fit is not trustworthy; ``self.init_info`` records which and why."""
        from alignkit.solve.features import feature_fit

        model = "homography" if any(s.transform == "homography" for s in self.config.stages) else "affine"
        try:
            fit = feature_fit(fixed_t, fixed_grid, moving_t, moving_grid, model=model, seed=self.seed or 0)
        except (ConfigError, ValueError) as exc:
            self.init_info = {"init": "center", "features_failed": str(exc)}
            return None
        self.init_info = {"init": "features", **fit.stats}
        self._feature_fit = fit
        return fit.matrix

    def _sgm_init(self, fixed_t: Tensor, fixed_grid: Grid, moving_t: Tensor, moving_grid: Grid) -> Transform:
        """Semi-global matching's disparity (a rectified pair: fixed = left, moving = right) as the start
        the disparity stages refine; options from ``config.init_options`` (:func:`alignkit.stereo.sgm_start`)."""
        from alignkit.stereo import sgm_start

        start, self.init_info = sgm_start(fixed_t, fixed_grid, moving_t, moving_grid, progress=self.progress,
                                          **self.config.init_options)
        return start.to(self.device)

    def _dis_init(self, fixed_t: Tensor, fixed_grid: Grid, moving_t: Tensor, moving_grid: Grid) -> Tensor | None:
        """DIS optical flow as the first field's start, or None (zero start) without OpenCV or when the
        first stage is not a displacement field; ``self.init_info`` records which and why."""
        from alignkit.solve.features import dis_displacement

        if self.config.stages[0].transform != "displacement":
            self.init_info = {"init": "none", "dis_failed": "init 'dis' starts a displacement stage"}
            return None
        try:
            start = dis_displacement(fixed_t, fixed_grid, moving_t, moving_grid).to(self.device)
        except ConfigError as exc:
            self.init_info = {"init": "none", "dis_failed": str(exc)}
            return None
        voxels = start / fixed_grid.spacing.to(start).view(1, -1, *([1] * fixed_grid.ndim))
        self.init_info = {"init": "dis", "dis_max_px": float(voxels.norm(dim=1).max())}
        return start

    def _corner_motion_px(self, grid: Grid, prior: Transform | None, chain: Transform) -> float:
        """Largest distance, in fixed pixels, between where ``prior`` (or the identity) and ``chain`` send
        the corners of ``grid`` -- how far a stage moved the image where the matches are sparsest."""
        corners = torch.cartesian_prod(*[torch.tensor([0.0, n - 1.0], dtype=torch.float64) for n in grid.shape])
        world = apply_matrix(grid.world_from_voxel, corners.T.unsqueeze(0)).float().to(self.device)
        start = prior.transform_points(world) if prior is not None else world
        moved = (chain.transform_points(world) - start).norm(dim=1).max()
        return float(moved) / float(self._grids_spacing)

    def _inlier_median_px(self, transform_points: Callable[[Tensor], Tensor]) -> float:
        """Median distance, in fixed pixels, between the keypoint inliers' matches and where
        ``transform_points`` carries the fixed inliers."""
        return self._feature_fit.median_residual_px(transform_points, self._grids_spacing)

    def _inlier_chi2_rise(self, prior: Transform | None, chain: Transform) -> float:
        """How much worse ``chain`` explains the keypoint inliers than ``prior`` (or the identity), in
        noise variances (:meth:`~alignkit.solve.features.FeatureFit.chi2_rise`)."""
        return self._feature_fit.chi2_rise(prior.transform_points if prior is not None else (lambda x: x),
                                           chain.transform_points, self._grids_spacing)

    @torch.no_grad()
    def _judge_stage(
        self,
        cfg: StageConfig,
        fixed: Tensor,
        fixed_grid: Grid,
        moving: Tensor,
        moving_grid: Grid,
        prior: Transform | None,
        prompts: dict[str, Any],
        transform: Transform,
    ) -> dict[str, Any]:
        """The never-worse rule: keep a fitted stage only if it beats its own starting point.

        1. By the stage's own objective at its finest level: the fitted stage against the same stage
           at its start (identity on the chain before it, or the dense DIS start of a flow field).
           Coarse-to-fine optimisation can end worse than it began -- a coarse level lands in another
           basin, a step size diverges (non-finite parameters stop the stage) -- and then the stage
           is dropped, as ANTs and elastix keep the best metric value rather than the last.
        2. By the keypoint inliers of a feature start: intensity similarity can prefer an alignment the
           matches rule out (NCC between visible and near-infrared photographs, where vegetation
           inverts its contrast). A stage whose chain explains the inliers worse than the chain before
           it by more than ``INLIER_CHI2_LIMIT`` noise variances (a chi-square test at 0.999 against
           the feature fit's own noise scale) is dropped.

        Returns the record written to ``metrics.json`` (``stage_checks``).
        """
        similarity, regularizer, fold = self._terms(cfg)
        index = len(cfg.levels) - 1
        level = self._level(cfg, index, fixed, fixed_grid, moving, moving_grid)
        # values only: no autograd graph (on a 3D brain the graph of one objective set the peak memory)
        with _threads_for(level.grid.numel, self.device), torch.no_grad():
            start = self._start_objective
            if start is None:
                identity = self._new_transform(cfg, fixed_grid, level.grid)
                start = float(self._objective(cfg, index, level, identity, prior, similarity, regularizer, fold, prompts)())
            end = float(self._objective(cfg, index, level, transform, prior, similarity, regularizer, fold, prompts)())
        check: dict[str, Any] = {  # JSON has no NaN: a diverged objective is recorded as null
            "stage": cfg.transform,
            "kept": True,
            "objective_start": start if math.isfinite(start) else None,
            "objective_end": end if math.isfinite(end) else None,
        }
        reasons = []
        if self._diverged:
            reasons.append(f"diverged: {self._diverged}")
        # equal within float32 evaluation noise counts as not worse: a stage that starts at the optimum
        # (identical images) ends a few 1e-7 above it, and dropping it would only add noise of its own
        elif not math.isfinite(end) or end > start + OBJECTIVE_TOLERANCE * max(abs(start), 1.0):
            reasons.append(f"its objective rose from {start:.6g} to {end:.6g} at the finest level")
        if self._feature_fit is not None and not self._diverged:
            chain = ComposedTransform([prior, transform]) if prior is not None else transform
            before = self._inlier_median_px(prior.transform_points if prior is not None else (lambda x: x))
            after = self._inlier_median_px(chain.transform_points)
            rise = self._inlier_chi2_rise(prior, chain)
            check.update(inlier_median_px_start=before, inlier_median_px_end=after, inlier_chi2_rise=rise,
                         corner_motion_px=self._corner_motion_px(fixed_grid, prior, chain))
            if rise > INLIER_CHI2_LIMIT:
                reasons.append(
                    f"the keypoint inliers rule it out: their squared residuals rose by {rise:.3g} noise variances "
                    f"(limit {INLIER_CHI2_LIMIT}; median {before:.3g} -> {after:.3g} px)"
                )
        if reasons:
            check.update(kept=False, reason="; ".join(reasons))
        return check

    def _prompts(self, fixed_labels, moving_labels, fixed_points, moving_points) -> dict[str, Any]:
        prompts: dict[str, Any] = {}
        if self.config.dice_weight > 0 and fixed_labels is not None and moving_labels is not None:
            from alignkit.losses import DiceLoss, one_hot

            values = sorted(set(torch.unique(fixed_labels.data).tolist()) - {0})
            prompts["dice"] = (
                DiceLoss(),
                one_hot(fixed_labels.batch(dtype=None, device=self.device).long(), values).float(),
                one_hot(moving_labels.batch(dtype=None, device=self.device).long(), values).float(),
                fixed_labels.grid,
                moving_labels.grid,
            )
        if self.config.landmark_weight > 0 and fixed_points is not None and moving_points is not None:
            from alignkit.losses import LandmarkDistance

            prompts["landmarks"] = (LandmarkDistance(), fixed_points.to(self.device), moving_points.to(self.device))
        return prompts

    def _downsample(self, role: str, tensor: Tensor, grid: Grid, factor: float, sigma: float | None,
                    grey: bool = False) -> tuple[Tensor, Grid]:
        """Pyramid levels are shared by every stage of a run (the affine and deformable stages
        usually visit the same shrink factors). ``grey`` averages the channels *before* the blur and
        resampling: all three are linear, so the level is the same as averaging after, for a third of
        the work on a colour photograph."""
        key = (role, grey, round(float(factor), 6), None if sigma is None else round(float(sigma), 6))
        if key not in self._pyramid:
            if grey and tensor.shape[1] > 1:
                tensor = tensor.mean(1, keepdim=True)
            self._pyramid[key] = downsample(tensor, grid, factor, sigma)
        return self._pyramid[key]

    def _level(self, cfg: StageConfig, index: int, fixed: Tensor, fixed_grid: Grid, moving: Tensor, moving_grid: Grid) -> _Level:
        if self._features is not None:  # injected feature images: level i is feature scale i, as given
            fixed_l, grid_l, moving_l, moving_grid_l = self._features[index]
            return _Level(fixed_l, grid_l, moving_l, moving_grid_l, grid_l.world_points(device=self.device))
        factor = level_factor(cfg.levels[index], fixed_grid.shape, cfg.max_level_voxels)
        asked = level_factor(cfg.levels[index], fixed_grid.shape)
        sigma = None if cfg.smoothing is None else cfg.smoothing[index]
        fixed_l, grid_l = self._downsample("fixed", fixed, fixed_grid, factor, sigma, cfg.grey)
        # Shrink the moving image to about the level's spacing, never upsampling it.
        ratio = float(grid_l.spacing.mean() / moving_grid.spacing.mean())
        moving_factor = max(1.0, ratio)
        moving_sigma = None if sigma is None else sigma * moving_factor / max(factor, 1.0)
        moving_l, moving_grid_l = self._downsample("moving", moving, moving_grid, moving_factor, moving_sigma, cfg.grey)
        world = grid_l.world_points(device=self.device)
        return _Level(fixed_l, grid_l, moving_l, moving_grid_l, world, asked_over_used=asked / factor)

    def _terms(self, cfg: StageConfig) -> tuple[Any, Any, Any]:
        """The stage's similarity, regulariser (or None) and fold penalty (or None)."""
        from alignkit.losses import JacobianFoldPenalty, build_regularizer, build_similarity

        similarity = build_similarity(cfg.similarity, **cfg.similarity_options).to(self.device)
        regularizer = (
            build_regularizer(cfg.regularizer, **cfg.regularizer_options).to(self.device)
            if cfg.regularizer and cfg.regularizer != "energy" and cfg.regularizer_weight > 0
            else None
        )
        fold = JacobianFoldPenalty().to(self.device) if cfg.fold_weight > 0 else None
        return similarity, regularizer, fold

    def _new_transform(self, cfg: StageConfig, fixed_grid: Grid, level_grid: Grid) -> Transform:
        """The stage's model at identity: linear ones about the fixed grid's centre, fields on the level."""
        if cfg.is_linear:
            return build_transform(
                cfg.transform,
                fixed_grid,
                center=fixed_grid.center_world(),
                length_scale=float(fixed_grid.extent().mean() / 2),
                **cfg.transform_options,
            ).to(self.device)
        field_grid = level_grid.downsampled(cfg.field_shrink) if cfg.field_shrink > 1 else level_grid
        options = dict(cfg.transform_options)
        if cfg.optimizer == "greedy" and cfg.transform == "svf":
            # Greedy's -sv is the exactly diffeomorphic setting: as many squarings as the velocity
            # needs (transforms.dense.squarings_needed), unless the stage fixes a count
            options.setdefault("steps", "auto")
        transform = build_transform(cfg.transform, field_grid, **options).to(self.device)
        if self._field_start is not None and cfg is self.config.stages[0] and isinstance(transform, DisplacementField):
            # the first field starts from the dense start (DIS), the never-worse rule's yardstick too
            with torch.no_grad():
                transform.field.copy_(resample_field(self._field_start, self._start_grid, field_grid))
        return transform

    def _fit_stage(
        self,
        cfg: StageConfig,
        fixed: Tensor,
        fixed_grid: Grid,
        moving: Tensor,
        moving_grid: Grid,
        prior: Transform | None,
        prompts: dict[str, Any],
        log: StageLog,
    ) -> Transform:
        similarity, regularizer, fold = self._terms(cfg)
        transform: Transform | None = None
        self._diverged = None
        self._start_objective = None
        bar = self.progress(total=sum(cfg.iterations), desc=f"{cfg.transform:>11}", unit="it") if self.progress else None
        previous: _Level | None = None  # the last level that ran, if its stopping rule fired
        try:
            for index in range(len(cfg.levels)):
                level = self._level(cfg, index, fixed, fixed_grid, moving, moving_grid)
                if previous is not None and self._same_problem(cfg, previous, level):
                    # level_factor can give several levels one grid (the max_level_voxels cap raises fine
                    # levels to the cap's factor; MIN_LEVEL_SIZE lowers coarse ones on small images). When
                    # the level before converged (its stopping rule fired before its budget ran out), this
                    # one would only restart the optimiser (full step, fresh moments) at that optimum of
                    # the same objective and spend up to its budget returning there: skip it (no loss list,
                    # no level record). A previous level that used its whole budget was still improving,
                    # so the next one runs: more iterations at that grid are useful.
                    log.skipped.append(index)
                    if bar is not None:
                        bar.update(cfg.iterations[index])
                    continue
                if transform is None:
                    transform = self._new_transform(cfg, fixed_grid, level.grid)
                elif not cfg.is_linear:
                    if not isinstance(transform, FieldTransform):
                        raise ConfigError(f"stage {cfg.transform}: expected a field model")
                    field_grid = level.grid.downsampled(cfg.field_shrink) if cfg.field_shrink > 1 else level.grid
                    transform = transform.resampled(field_grid).to(self.device)
                # named ranges for torch.profiler (benchmarks/speed3d.py --profile): free when not profiling
                compiled_level = (cfg.optimizer == "greedy" and level.fixed.shape[1] == 1
                                  and compiled_fits(level.fixed, level.moving) and compiled_available())
                threshold = PARALLEL_COMPILED_LEVEL_VOXELS if compiled_level else PARALLEL_LEVEL_VOXELS
                with _threads_for(level.grid.numel, self.device, threshold), torch.profiler.record_function(
                    f"level {cfg.transform} 1/{cfg.levels[index]:g}"
                ):
                    try:
                        losses = self._optimise_level(
                            cfg, index, level, transform, prior, similarity, regularizer, fold, prompts, bar
                        )
                    except _Diverged as exc:
                        self._diverged = str(exc)  # _judge_stage rejects the stage and says why
                        break
                log.losses.append(losses)
                if len(cfg.levels) == 1 and losses and cfg.optimizer in ("adam", "sgd") and not (
                        0 < cfg.sample_points < level.grid.numel):
                    # a one-level stage's first loss is its objective at its start on its finest level,
                    # evaluated before the first step: the never-worse rule's start value (_judge_stage)
                    self._start_objective = losses[0]
                previous = level if len(losses) < cfg.iterations[index] else None
                if cfg.field_median > 1 and isinstance(transform, FieldTransform):
                    _median_filter_parameters(transform, cfg.field_median)
                if self.keep_levels:
                    snapshot = copy.deepcopy(transform)
                    for p in snapshot.parameters():
                        p.requires_grad_(False)
                    stage = next(i for i, s in enumerate(self.config.stages) if s is cfg)
                    self.level_records.append(LevelRecord(stage, index, cfg, level, snapshot, prior, prompts))
        finally:
            if bar is not None:
                bar.close()
        if transform is None:
            raise ConfigError("stage has no levels")
        return transform

    @staticmethod
    def _same_problem(cfg: StageConfig, before: _Level, after: _Level) -> bool:
        """Whether level ``after`` poses level ``before``'s problem again: the same fixed and moving
        tensors (the pyramid hands back the same objects for the same shrink factor and smoothing; fed
        feature images are compared the same way) on the same grids, with every voxel compared (a
        sampled metric draws another subset for each level, so that level's objective differs)."""
        return (
            before.fixed is after.fixed
            and before.moving is after.moving
            and before.grid.same_as(after.grid)
            and before.moving_grid.same_as(after.moving_grid)
            and not 0 < cfg.sample_points < after.grid.numel
        )

    def _objective(self, cfg, index: int, level: _Level, transform, prior, similarity, regularizer, fold, prompts) -> Callable[[], Tensor]:
        """The stage's loss at one level as a closure over ``transform``'s current parameters (the
        optimiser's objective, and the never-worse rule's yardstick)."""
        size = torch.tensor(level.moving.shape[2:], dtype=torch.float32, device=self.device)
        size = size.view(1, -1, *([1] * (level.moving.dim() - 2)))
        voxel_from_world = level.moving_grid.voxel_from_world
        ndim = level.grid.ndim
        # Linear chains (translation ... affine) collapse into one voxel-to-voxel matrix and use
        # the fused affine_grid path; projective and field models map points explicitly.
        linear_chain = transform.is_linear and (prior is None or prior.is_linear)
        prior_matrix = prior.matrix().to(self.device) if (linear_chain and prior is not None) else None
        field_on_level = isinstance(transform, FieldTransform) and transform.grid.same_as(level.grid)
        # the level's homogeneous sampling grid, built once rather than at every step
        base = homogeneous_grid(level.grid.shape, dtype=level.moving.dtype, device=self.device) if linear_chain else None
        uses_energy = isinstance(transform, VectorMomentumSVF) and cfg.regularizer == "energy" and cfg.regularizer_weight > 0

        fixed_level = level.fixed
        world_level = level.world
        sampled = 0 < cfg.sample_points < level.grid.numel
        if sampled:
            # a fixed random subset of voxels for the whole level (ITK's metric sampling), kept as a
            # (B, C, N, 1[, 1]) "image" so every voxel-wise similarity takes it unchanged
            generator = torch.Generator().manual_seed((self.seed or 0) * 1009 + index)
            chosen = torch.randperm(level.grid.numel, generator=generator)[: cfg.sample_points].to(self.device)
            as_points = (cfg.sample_points,) + (1,) * (ndim - 1)
            fixed_level = level.fixed.flatten(2)[..., chosen].reshape(*level.fixed.shape[:2], *as_points)
            world_level = level.world.flatten(2)[..., chosen].reshape(*level.world.shape[:2], *as_points)

        # one float32 3D image on the CPU with numba: the samples of a linear chain or of a voxel sample and
        # their gradient by the compiled sampler (grid_sample's backward was two thirds of the brain
        # preset's affine stage); fields and 2D images keep grid_sample (faster in 2D: see the sampler)
        compiled_sampling = ((linear_chain or sampled) and ndim == 3 and level.moving.shape[:2] == (1, 1)
                             and compiled_fits(level.moving) and compiled_available())
        voxel_points = (level.grid.voxel_points(dtype=level.moving.dtype, device=self.device)
                        if compiled_sampling and linear_chain and not sampled else None)

        def warp_level(displacement: Tensor | None) -> tuple[Tensor, Tensor]:
            if linear_chain and not sampled:
                matrix = transform.matrix().double()
                if prior_matrix is not None:
                    matrix = prior_matrix @ matrix
                voxel_matrix = voxel_from_world.to(matrix) @ matrix @ level.grid.world_from_voxel.to(matrix)
                if bool((matrix[ndim, :ndim] == 0).all()):
                    if voxel_points is not None:
                        return sample_voxels_with_inside(level.moving, apply_matrix(voxel_matrix, voxel_points))
                    return sample_affine(level.moving, voxel_matrix, level.grid.shape)
                # a homography, or a chain through a projective feature start: one matrix, one division
                return sample_projective(level.moving, voxel_matrix, level.grid.shape, base=base)
            if field_on_level:
                # The field lives on the level grid itself: identity + displacement, no resampling.
                points = level.world + (transform.displacement() if displacement is None else displacement)
            else:
                points = transform.transform_points(world_level)
            if prior is not None:
                points = prior.transform_points(points)
            voxel = apply_matrix(voxel_from_world, points)
            if sampled and compiled_sampling:
                return sample_voxels_with_inside(level.moving, voxel)
            inside = ((voxel >= 0) & (voxel <= size - 1)).all(dim=1, keepdim=True).to(level.fixed.dtype)
            return sample_voxels(level.moving, voxel, padding="border"), inside

        def objective(displacement: Tensor | None = None) -> Tensor:
            # ``displacement``: the field on the level to evaluate in place of the model's own (the
            # greedy update differentiates with respect to it, not the model's parameters)
            if displacement is not None and not field_on_level:
                raise ConfigError("a displacement override needs a field model on the level grid")
            with torch.profiler.record_function("term warp"):
                warped, inside = warp_level(displacement)
            with torch.profiler.record_function(f"term {cfg.similarity}"):
                loss = similarity(warped, fixed_level, inside)
            if uses_energy:
                loss = loss + cfg.regularizer_weight * transform.energy()
            if regularizer is not None or fold is not None:
                field_and_grid = transform.regularizer_field()
                if field_and_grid is not None:
                    field_tensor, field_grid = field_and_grid
                    if regularizer is not None:
                        loss = loss + cfg.regularizer_weight * regularizer(field_tensor, field_grid.spacing)
                    if fold is not None and isinstance(transform, FieldTransform):
                        loss = loss + cfg.fold_weight * fold(transform.displacement(), transform.grid)
            if "landmarks" in prompts:
                term, fixed_pts, moving_pts = prompts["landmarks"]
                chain = ComposedTransform([prior, transform]) if prior is not None else transform
                loss = loss + self.config.landmark_weight * term(chain, fixed_pts, moving_pts) / float(
                    level.grid.extent().mean()
                )
            if "dice" in prompts:
                term, fixed_onehot, moving_onehot, fixed_label_grid, moving_label_grid = prompts["dice"]
                loss = loss + self.config.dice_weight * self._dice_term(
                    term, transform, prior, level, fixed_onehot, moving_onehot, fixed_label_grid, moving_label_grid,
                    displacement,
                )
            return loss

        # the parts the greedy update's closed-form path uses: the warp (differentiable in the
        # displacement it is given) and the level's fixed image
        objective.warp = warp_level  # type: ignore[attr-defined]
        objective.fixed = fixed_level  # type: ignore[attr-defined]
        return objective

    def level_energy(self, record: LevelRecord, fixed: Tensor | None = None, moving: Tensor | None = None,
                     transform: Transform | None = None) -> Tensor:
        """The objective of the optimised level ``record`` (see ``keep_levels``), evaluated for
        ``transform`` (default: the level's optimum) with ``fixed`` / ``moving`` in place of the level's
        images (same shapes and grids; e.g. feature images that carry a graph): autograd can then
        differentiate it with respect to the parameters, the images, or both."""
        level = record.level
        if fixed is not None or moving is not None:
            level = dataclasses.replace(
                level, fixed=level.fixed if fixed is None else fixed, moving=level.moving if moving is None else moving
            )
        similarity, regularizer, fold = self._terms(record.config)
        model = record.transform if transform is None else transform
        return self._objective(record.config, record.index, level, model, record.prior, similarity, regularizer, fold,
                               record.prompts)()

    def _optimise_level(self, cfg, index: int, level: _Level, transform, prior, similarity, regularizer, fold, prompts, bar) -> list[float]:
        if cfg.optimizer == "greedy":
            return self._greedy_level(cfg, index, level, transform, prior, similarity, regularizer, fold, prompts, bar)
        params = [p for p in transform.parameters() if p.requires_grad]
        lr = cfg.learning_rate
        if isinstance(transform, FieldTransform):
            # Field parameters are in world units: express the step in voxels of the level so one
            # learning rate serves every resolution and spacing.
            lr = lr * float(level.grid.spacing.mean())
        optimiser: torch.optim.Optimizer | PlainAdam
        if cfg.optimizer == "adam":
            optimiser = PlainAdam(params, lr=lr)  # torch.optim.Adam's update without its 1.3 s import
        elif cfg.optimizer == "sgd":
            optimiser = torch.optim.SGD(params, lr=lr, momentum=0.9)
        else:
            # max_eval must leave the line search room: its default (1.25 x max_iter = 1) never moves
            optimiser = torch.optim.LBFGS(
                params, lr=1.0, max_iter=1, max_eval=10, history_size=20, line_search_fn="strong_wolfe"
            )

        objective = self._objective(cfg, index, level, transform, prior, similarity, regularizer, fold, prompts)
        losses: list[float] = []
        stopper = _Stopper(cfg.tolerance, cfg.patience)
        reductions = 0
        for _ in range(cfg.iterations[index]):
            if cfg.optimizer == "lbfgs":

                def closure() -> Tensor:
                    optimiser.zero_grad()
                    value = objective()
                    value.backward()
                    return value

                value = optimiser.step(closure)
            else:
                optimiser.zero_grad()
                value = objective()
                value.backward()
                if cfg.gradient_smoothing > 0 and isinstance(transform, FieldTransform):
                    with torch.no_grad():
                        for p in params:
                            if p.grad is not None and p.dim() == transform.ndim + 2:
                                p.grad.copy_(gaussian_blur(p.grad, cfg.gradient_smoothing))
                optimiser.step()  # type: ignore[call-arg]
            self._post_step(cfg, transform)
            if not all(bool(torch.isfinite(p).all()) for p in params):
                # stop before the next objective: grid_sample's backward crashes the process (a
                # segmentation fault, torch 2.x) on NaN sampling coordinates with border padding
                raise _Diverged(f"a step made the parameters non-finite at level 1/{cfg.levels[index]:g}")
            loss_value = _record_loss(value, losses, bar, cfg.levels[index])
            if stopper.update(loss_value):
                if cfg.optimizer != "lbfgs" and reductions < cfg.lr_reductions:
                    # A plateau at this step size: shrink the step so Adam settles on the optimum
                    # instead of jittering around it, then go on.
                    reductions += 1
                    for group in optimiser.param_groups:
                        group["lr"] *= 0.5
                    stopper.stale = 0
                    continue
                if bar is not None:
                    bar.update(cfg.iterations[index] - len(losses))
                break
        return losses

    def _greedy_level(self, cfg, index: int, level: _Level, transform, prior, similarity, regularizer, fold, prompts,
                      bar) -> list[float]:
        """One level of PICSL Greedy's update (:mod:`alignkit.solve.greedy`): the objective's gradient with
        respect to the displacement, smoothed (``gradient_smoothing``), scaled to ``learning_rate`` voxels,
        composed with the displacement or added to the velocity, the field smoothed (``field_smoothing``);
        the step halves on a plateau (``tolerance``/``patience``, up to ``lr_reductions`` times), then the
        level stops."""
        if not isinstance(transform, (DisplacementField, StationaryVelocityField)) or not transform.grid.same_as(level.grid):
            raise ConfigError(f"stage {cfg.transform}: the greedy update needs a displacement or svf field on the level grid")
        objective = self._objective(cfg, index, level, transform, prior, similarity, regularizer, fold, prompts)
        field = transform.field if isinstance(transform, DisplacementField) else transform.velocity
        step_voxels = float(cfg.learning_rate)
        scale = level.asked_over_used if cfg.capped_smoothing_physical else 1.0
        sigma_pre, sigma_post = cfg.gradient_smoothing * scale, cfg.field_smoothing * scale
        losses: list[float] = []
        stopper = _Stopper(cfg.tolerance, cfg.patience)
        reductions = 0
        # the similarity's closed-form gradient (LNCC) when it is the whole objective: autograd then
        # runs through the warp only; otherwise (prompt terms, other similarities) through everything
        closed_form = hasattr(similarity, "value_and_gradient") and not prompts
        # ... and, with numba, the warp and the LNCC force as fused compiled loops (the same objective)
        compiled_force = None
        if closed_form and not 0 < cfg.sample_points < level.grid.numel and (prior is None or prior.is_linear):
            prior_matrix = None if prior is None else prior.matrix().detach()
            if LNCCForce.applies(similarity, level.fixed, level.moving, prior_matrix):
                compiled_force = LNCCForce(level.fixed, level.grid, level.moving, level.moving_grid, prior_matrix, similarity)
        # a displacement then takes the whole update in compiled loops too, its checks on the objective
        fused = compiled_force is not None and isinstance(transform, DisplacementField)
        for _ in range(cfg.iterations[index]):
            with torch.no_grad():
                current = transform.displacement()
            if fused:
                with torch.profiler.record_function(f"term {cfg.similarity} (compiled)"):
                    force_value, chained = compiled_force.chained(current)
                with torch.profiler.record_function("greedy update (compiled)"):
                    update_displacement(field, chained, level.grid, sigma_pre, step_voxels, sigma_post)
                # a non-finite field makes the next objective non-finite (_record_loss stops there); the
                # level's last field is checked after the loop
                value = torch.tensor(force_value)
            elif compiled_force is not None:
                with torch.profiler.record_function(f"term {cfg.similarity} (compiled)"):
                    value, gradient = compiled_force(current)
            elif closed_form:
                current.requires_grad_(True)
                with torch.profiler.record_function("term warp"):
                    warped, inside = objective.warp(current)
                with torch.profiler.record_function(f"term {cfg.similarity} (closed form)"):
                    value, d_warped = similarity.value_and_gradient(warped.detach(), objective.fixed, inside)
                (gradient,) = torch.autograd.grad(warped, current, grad_outputs=d_warped)
            else:
                current.requires_grad_(True)
                value = objective(current)
                (gradient,) = torch.autograd.grad(value, current)
            if not fused:
                with torch.no_grad():
                    step = normalised_step(gradient, level.grid, sigma_pre, step_voxels)
                    if isinstance(transform, DisplacementField):
                        updated = compose_displacement(field, step, level.grid)
                    else:  # Greedy -sv: the update joins the stationary velocity
                        updated = field + step
                    field.copy_(smooth_field(updated, sigma_post))
                if not bool(torch.isfinite(field).all()):
                    raise _Diverged(f"a greedy step made the field non-finite at level 1/{cfg.levels[index]:g}")
            loss_value = _record_loss(value, losses, bar, cfg.levels[index])
            if stopper.update(loss_value):
                if reductions < cfg.lr_reductions:
                    reductions += 1
                    step_voxels *= 0.5
                    stopper.stale = 0
                    continue
                if bar is not None:
                    bar.update(cfg.iterations[index] - len(losses))
                break
        if fused and not bool(torch.isfinite(field).all()):
            raise _Diverged(f"a greedy step made the field non-finite at level 1/{cfg.levels[index]:g}")
        return losses

    @torch.no_grad()
    def _post_step(self, cfg: StageConfig, transform: Transform) -> None:
        """Greedy-style regularisation: smooth the field parameters after each step (the
        "diffusion-like" update smoothing of demons / ANTs SyN's total-field sigma)."""
        if cfg.field_smoothing > 0 and isinstance(transform, FieldTransform):
            for p in transform.parameters():
                if p.dim() == transform.ndim + 2:
                    # with numba, the greedy update's compiled Gaussian: the same as gaussian_blur's
                    # convolution (the reference, which the golden results pin) to float rounding, 0.3
                    # against ~1-6 ms on the multimodal preset's 229x287 velocity at every Adam step
                    # (measured)
                    compiled = compiled_fits(p) and compiled_available()
                    p.copy_(smooth_field(p, cfg.field_smoothing) if compiled else gaussian_blur(p, cfg.field_smoothing))

    def _dice_term(self, term, transform, prior, level, fixed_onehot, moving_onehot, fixed_label_grid, moving_label_grid,
                   displacement=None):
        from alignkit.spatial import resize_image, sample_world

        target = resize_image(fixed_onehot, level.grid.shape) if not fixed_label_grid.same_as(level.grid) else fixed_onehot
        points = transform.transform_points(level.world) if displacement is None else level.world + displacement
        if prior is not None:
            points = prior.transform_points(points)
        warped = sample_world(moving_onehot, moving_label_grid, points)
        return term(warped, target)
