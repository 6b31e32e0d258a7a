"""``dio``: learned feature images registered by the iterative solver used as a differentiable layer.

Jena, Chaudhari and Gee, Deep Implicit Optimization for Robust and Flexible Image Registration (2024).
The whole system in one screen:

* **feature network** (:class:`~alignkit.nets.FeatureEncoder`), applied to the fixed and the moving
  image *independently* -- so they may differ in size, spacing and orientation -- returns one dense
  multi-channel feature image per scale, each read out by one convolution (§3.1, §4.2); the four
  variants of §4.2 are :func:`feature_network` ``"unet"``, ``"lku"``, ``"unet-e"``, ``"lku-e"``;
* **optimisation layer** (:class:`alignkit.solve.implicit.OptimisationLayer`): the classical engine
  registers the feature images coarse to fine, each scale one pyramid level (§3.3), with any transform
  model and optimiser it has; the gradient through its optimum is Jacobian-free backprop by default,
  the exact implicit-function-theorem gradient as an option (``gradient="ift"``; §3.2);
* **training loss** (Eq. 2): ``image_weight * similarity(moving ∘ φ*, fixed) + dice_weight *
  soft-Dice(labels_moving ∘ φ*, labels_fixed)`` summed over the levels' optima with
  ``level_weights`` (a level's optimum depends only on that level's features, so every scale needs
  its own term to learn); Adam (the training loop's);
* **test-time flexibility** (§4.3): the same network with another transform model (``svf``,
  ``displacement``, ``bspline``, ``affine`` ...), regulariser, iterations, and label / landmark
  "prompts" added to the solver's objective -- :class:`DIOMethod`'s options.

Units: training works on the network grid in its own voxel frame (world = voxel), like every learned
method here; inference places each image's features on that image's own world grid.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.image import Image
from alignkit.methods.base import MethodInfo, MethodOutput, ProgressFactory
from alignkit.methods.heads import voxel_grid
from alignkit.methods.learned import LearnedMethod, LearnedModel, learned_method
from alignkit.registration import Inputs
from alignkit.solve import Engine, RegistrationConfig, StageConfig
from alignkit.solve.config import FIELD_MODELS, LINEAR_MODELS
from alignkit.solve.implicit import GradientMode, OptimisationLayer
from alignkit.spatial import Grid, resize_image
from alignkit.transforms import ComposedTransform, Transform, flatten_stages

FeatureVariant = Literal["unet", "lku", "unet-e", "lku-e"]
LossSimilarity = Literal["lncc", "ncc", "mse"]


def feature_network(
    variant: FeatureVariant = "lku-e",
    *,
    ndim: int,
    channels: int = 8,
    features: Sequence[int] = (8, 16, 16),
    levels: Sequence[int] = (2, 1),
    large_kernel: int = 5,
) -> dict[str, Any]:
    """The network spec of one of DIO's feature networks (Jena et al. §4.2, Fig. 9): ``"unet"`` (U-Net,
    heads on the decoder), ``"lku"`` (large-kernel U-Net), ``"unet-e"`` / ``"lku-e"`` (encoder only,
    one encoder per scale). ``levels`` are the scales (``l``: ``2**-l`` of the input), coarse first;
    ``channels`` the feature channels of each scale's one-convolution read-out."""
    if variant not in get_args(FeatureVariant):
        raise ConfigError(f"unknown DIO feature network {variant!r}; choose one of {', '.join(get_args(FeatureVariant))}")
    levels = [int(v) for v in levels]
    if levels != sorted(levels, reverse=True) or len(set(levels)) != len(levels):
        raise ConfigError(f"DIO feature levels must be distinct and coarse first, e.g. [2, 1, 0]; got {levels}")
    encoder_only = variant.endswith("-e")
    return {
        "name": "feature_encoder", "ndim": ndim, "in_channels": 1, "levels": levels, "out_channels": int(channels),
        "features": [int(f) for f in features], "independent": encoder_only, "decoder": not encoder_only,
        "block": "lk" if variant.startswith("lku") else "conv", "large_kernel": int(large_kernel),
    }


def variant_of(spec: Mapping[str, Any]) -> str:
    """The §4.2 name of a feature network spec (``"lku-e"`` ...)."""
    base = "lku" if spec.get("block") == "lk" else "unet"
    return f"{base}-e" if spec.get("independent", True) else base


def feature_grid(grid: Grid, level: int, shape: Sequence[int]) -> Grid:
    """Where level ``level`` of a feature network run on ``grid`` sits: a stride-2 convolution keeps
    the first voxel centre and doubles the spacing, ``level`` times (shape ``ceil(s / 2**level)``)."""
    scale = torch.eye(grid.ndim + 1, dtype=torch.float64)
    scale[: grid.ndim, : grid.ndim] *= 2.0**level
    return Grid(tuple(int(s) for s in shape), grid.world_from_voxel @ scale)


def solver_config(
    *,
    levels: int,
    transform: str = "displacement",
    similarity: str = "mse",
    regularizer: str | None = "diffusion",
    regularizer_weight: float = 1.0,
    iterations: Sequence[int] | int = 40,
    learning_rate: float | None = None,
    optimizer: str = "adam",
    dice_weight: float = 0.0,
    landmark_weight: float = 0.0,
    steps: int = 5,
    field_smoothing: float = 1.0,
) -> RegistrationConfig:
    """The engine configuration DIO registers feature images with: one stage of ``transform``, one
    level per feature scale, no intensity start (``init="none"``: the features are registered as
    given, after any linear pre-alignment). Linear models take no regulariser."""
    iterations = [int(iterations)] * levels if isinstance(iterations, int) else [int(v) for v in iterations]
    if len(iterations) != levels:
        raise ConfigError(f"iterations needs one count per feature level ({levels}), got {iterations}")
    linear = transform in LINEAR_MODELS
    if not linear and transform not in FIELD_MODELS:
        raise ConfigError(f"unknown transform {transform!r}; choose one of {', '.join(FIELD_MODELS + LINEAR_MODELS)}")
    options: dict[str, Any] = {"steps": int(steps)} if transform == "svf" else {}
    if learning_rate is None:
        learning_rate = 0.01 if linear else 0.2
    stage = StageConfig(
        transform=transform, similarity=similarity, levels=tuple(2.0 ** (levels - 1 - k) for k in range(levels)),
        iterations=tuple(iterations), optimizer=optimizer, learning_rate=learning_rate,
        regularizer=None if linear or regularizer in (None, "none") else regularizer,
        regularizer_weight=0.0 if linear or regularizer in (None, "none") else float(regularizer_weight),
        transform_options=options, tolerance=1e-5, patience=10, lr_reductions=0,
        # Adam's steps do not shrink with the gradient: where the features agree (background) a field
        # would random-walk; smoothing it after each step (the brain preset's field_smoothing, demons'
        # diffusion-like regularisation) keeps those voxels with their neighbours
        field_smoothing=0.0 if linear else float(field_smoothing),
    )
    return RegistrationConfig(stages=[stage], init="none", crop_foreground=False, dice_weight=float(dice_weight),
                              landmark_weight=float(landmark_weight), name="dio")


class DIOMethod(LearnedMethod):
    """Registers a pair with a trained DIO model (Jena et al., §4.3's test-time flexibility).

    ``transform``: the solver's transform model at test time (``svf``, ``displacement``, ``bspline``,
    ``affine`` ...; default: the one it was trained with); ``regularizer`` / ``regularizer_weight``,
    ``iterations`` (per feature level), ``learning_rate``, ``optimizer``: the solver's; ``prealign``:
    the linear pre-alignment before it (``affine``, ``rigid,affine``, ``none``; default: the model's
    training pre-alignment); ``dice_weight`` / ``landmark_weight``: weights of label and landmark
    prompts added to the solver's objective when the pair comes with label maps / landmarks
    (``--fixed-labels`` ... ``--option dice_weight=1``); 0 (the default) = they are only scored, as
    with every other method, so an evaluation never feeds the labels it scores to the solver. ``feature_spacing``: the world spacing each image is
    resampled to (on its own grid) before the network; default: the model's. ``checkpoint``: a run
    folder or checkpoint file; default: the shipped model. ``similarity``: a refinement's (``refine=K``).
    """

    def __init__(
        self,
        *,
        checkpoint: LearnedModel | str | os.PathLike | None = None,
        transform: str | None = None,
        prealign: str | list[str] | None = None,
        regularizer: str | None = None,
        regularizer_weight: float | None = None,
        iterations: int | Sequence[int] | None = None,
        learning_rate: float | None = None,
        optimizer: str = "adam",
        dice_weight: float = 0.0,
        landmark_weight: float = 0.0,
        feature_spacing: float | None = None,
        similarity: str | None = None,
    ) -> None:
        super().__init__(checkpoint=checkpoint, transform=prealign, similarity=similarity)
        if transform is not None and transform not in FIELD_MODELS + LINEAR_MODELS:
            raise ConfigError(f"dio transform must be one of {', '.join(FIELD_MODELS + LINEAR_MODELS)}, got {transform!r}")
        if dice_weight < 0 or landmark_weight < 0:
            raise ConfigError("dice_weight and landmark_weight must be >= 0")
        self.solver_transform = transform
        self.solver_options = {"regularizer": regularizer, "regularizer_weight": regularizer_weight,
                               "iterations": iterations, "learning_rate": learning_rate, "optimizer": optimizer}
        self.dice_weight, self.landmark_weight = float(dice_weight), float(landmark_weight)
        self.feature_spacing = feature_spacing

    def run(self, inputs: Inputs, *, device: torch.device, seed: int | None, progress: ProgressFactory) -> MethodOutput:
        learned, source = self.model(inputs.ndim, device)
        assert isinstance(learned, DIO)
        models, stages, names, stage_seconds = self.prealign(
            inputs, learned.config.get("prealign"), device=device, seed=seed, progress=progress)
        prior = ComposedTransform(stages) if stages else None
        tic = time.perf_counter()
        with torch.no_grad():
            fixed_net, fixed_features = learned.image_features(inputs.fixed, device=device, spacing=self.feature_spacing)
            moving_net, moving_features = learned.image_features(inputs.moving, device=device,
                                                                 spacing=self.feature_spacing)
        stage_seconds["features"] = round(time.perf_counter() - tic, 3)
        labels: dict[str, Image | None] = {"fixed_labels": None, "moving_labels": None}
        with_labels = self.dice_weight > 0 and inputs.fixed_labels is not None and inputs.moving_labels is not None
        if with_labels:  # label prompts on the network grids (one-hot maps of a full-size volume are GBs)
            labels = {"fixed_labels": _labels_on(inputs.fixed_labels, fixed_net.grid),
                      "moving_labels": _labels_on(inputs.moving_labels, moving_net.grid)}
        with_points = self.landmark_weight > 0 and inputs.fixed_points is not None
        config = learned.solver(transform=self.solver_transform, dice_weight=self.dice_weight if with_labels else 0.0,
                                landmark_weight=self.landmark_weight if with_points else 0.0,
                                **{k: v for k, v in self.solver_options.items() if v is not None})
        tic = time.perf_counter()
        engine = Engine(config, device=device, seed=seed, progress=progress)
        result = engine.run(fixed_net, moving_net, initial=prior, fixed_features=fixed_features,
                            moving_features=moving_features, fixed_points=inputs.fixed_points if with_points else None,
                            moving_points=inputs.moving_points if with_points else None, **labels)
        stage_seconds["dio-solver"] = round(time.perf_counter() - tic, 3)
        fitted = flatten_stages(result)[len(stages):]
        names += [f"dio:{s.kind}" for s in fitted]
        description = {"method": "dio", "prealign": models, "model": learned.config, "networks": learned.network_specs(),
                       "checkpoint": source, "solver": config.to_dict(), "stage_checks": engine.stage_checks,
                       "prompts": [k for k, on in (("labels", with_labels), ("landmarks", with_points)) if on]}
        extra: dict[str, Any] = {"method": "dio", "feature_network": variant_of(learned.network_specs()["features"])}
        if source is not None:
            extra["checkpoint"] = source
        return MethodOutput(transform=ComposedTransform(stages + fitted), name="dio", stages=names,
                            description=description, stage_seconds=stage_seconds, extra=extra)


def _labels_on(labels: Image, grid: Grid) -> Image:
    """A label map read nearest-neighbour on ``grid`` (same field of view, fewer voxels)."""
    data = resize_image(labels.batch(dtype=torch.float32), grid.shape, mode="nearest").round()
    return Image(data[0], grid)


@learned_method(MethodInfo(
    name="dio",
    kind="learned",
    summary="learned multi-scale feature images registered by the iterative solver as a differentiable layer "
    "(implicit / Jacobian-free backprop); transform model, regulariser and label/landmark prompts chosen at test time",
    ndims=(2, 3),
    modalities=("mono",),
    case_kinds=("deformable", "affine"),
    needs_checkpoint=False,
    reference="Jena, Chaudhari and Gee, Deep Implicit Optimization for Robust and Flexible Image Registration, 2024",
), runner=DIOMethod)
class DIO(LearnedModel):
    """DIO (module docstring). Options (stored in checkpoints):

    ``transform``, ``solver_similarity``, ``regularizer``, ``regularizer_weight``, ``iterations``,
    ``learning_rate``, ``optimizer``: the training-time solver (:func:`solver_config`; the paper trains
    with a plain displacement field and SGD-like steps and switches at test time); ``gradient``:
    ``"jfb"`` or ``"ift"`` (with ``cg_iterations``); ``image_similarity`` (``lncc`` with ``window``,
    ``ncc`` or ``mse``) and ``image_weight``, ``dice_weight``, ``level_weights`` (one per feature
    level, coarse first; default 1 each): the training loss; ``label_ids``: the Dice labels (set from
    the data); ``prealign``: the data's linear pre-alignment; ``feature_spacing``: the world spacing of
    the network grid at inference (None: each image is resized to ``size``, as in training);
    ``normalize_features``: remove each channel's mean and divide by the root mean square (per image and
    level).
    """

    @classmethod
    def default_networks(cls, ndim: int) -> dict[str, dict[str, Any]]:
        return {"features": feature_network("lku-e", ndim=ndim)}

    def __init__(
        self,
        *,
        networks: Mapping[str, nn.Module],
        ndim: int,
        size: Sequence[int],
        transform: str = "displacement",
        solver_similarity: str = "mse",
        regularizer: str | None = "diffusion",
        regularizer_weight: float = 1.0,
        iterations: int | Sequence[int] = 40,
        learning_rate: float | None = None,
        optimizer: str = "adam",
        gradient: GradientMode = "jfb",
        cg_iterations: int = 20,
        image_similarity: LossSimilarity = "lncc",
        window: int = 9,
        image_weight: float = 1.0,
        dice_weight: float = 1.0,
        level_weights: Sequence[float] | None = None,
        label_ids: Sequence[int] | None = None,
        prealign: str | None = None,
        feature_spacing: float | None = None,
        normalize_features: bool = True,
    ) -> None:
        super().__init__(networks=networks, ndim=ndim, size=size)
        from alignkit.losses import DiceLoss, build_similarity

        spec = self.network_specs()["features"]
        if spec.get("name") != "feature_encoder" or int(spec.get("in_channels", 1)) != 1:
            raise ConfigError("dio's features network must be a one-channel feature_encoder (see dio.feature_network)")
        self.levels = [int(v) for v in spec["levels"]]
        if self.levels != sorted(self.levels, reverse=True):
            raise ConfigError(f"dio's feature levels must be coarse first, e.g. [2, 1]; got {self.levels}")
        if image_similarity not in get_args(LossSimilarity):
            raise ConfigError(f"image_similarity must be one of {', '.join(get_args(LossSimilarity))}")
        if gradient not in get_args(GradientMode):
            raise ConfigError(f"gradient must be one of {', '.join(get_args(GradientMode))}, got {gradient!r}")
        weights = [1.0] * len(self.levels) if level_weights is None else [float(w) for w in level_weights]
        if len(weights) != len(self.levels) or min(weights) < 0 or image_weight < 0 or dice_weight < 0:
            raise ConfigError(f"level_weights needs {len(self.levels)} values >= 0, and loss weights must be >= 0")
        if prealign not in (None, "affine", "rigid"):
            raise ConfigError(f"prealign must be affine, rigid or None, got {prealign!r}")
        if feature_spacing is not None and feature_spacing <= 0:
            raise ConfigError(f"feature_spacing must be > 0, got {feature_spacing}")
        self.options = {
            "transform": transform, "solver_similarity": solver_similarity, "regularizer": regularizer,
            "regularizer_weight": float(regularizer_weight),
            "iterations": int(iterations) if isinstance(iterations, int) else [int(v) for v in iterations],
            "learning_rate": learning_rate, "optimizer": optimizer, "gradient": gradient,
            "cg_iterations": int(cg_iterations), "image_similarity": image_similarity, "window": int(window),
            "image_weight": float(image_weight), "dice_weight": float(dice_weight), "level_weights": weights,
            "label_ids": None if label_ids is None else [int(v) for v in label_ids], "prealign": prealign,
            "feature_spacing": None if feature_spacing is None else float(feature_spacing),
            "normalize_features": bool(normalize_features),
        }
        self.solver()  # check the solver options now, not at the first step
        self.similarity = build_similarity(image_similarity, **({"window": int(window)} if image_similarity == "lncc" else {}))
        self.dice = DiceLoss()

    @property
    def label_ids(self) -> list[int] | None:
        return self.options["label_ids"]

    @label_ids.setter
    def label_ids(self, values: Sequence[int] | None) -> None:
        self.options["label_ids"] = None if values is None else [int(v) for v in values]

    def solver(self, *, transform: str | None = None, **overrides: Any) -> RegistrationConfig:
        """The solver configuration: the training one, with test-time ``overrides``."""
        options = {"transform": transform or self.options["transform"], "similarity": self.options["solver_similarity"],
                   "regularizer": self.options["regularizer"], "regularizer_weight": self.options["regularizer_weight"],
                   "iterations": self.options["iterations"], "learning_rate": self.options["learning_rate"],
                   "optimizer": self.options["optimizer"]}
        if transform is not None and transform != self.options["transform"] and "learning_rate" not in overrides:
            options["learning_rate"] = None  # another model: its own default step
        options.update(overrides)
        return solver_config(levels=len(self.levels), **options)

    def layer(self, *, progress: Any = None) -> OptimisationLayer:
        return OptimisationLayer(self.solver(), gradient=self.options["gradient"],
                                 cg_iterations=self.options["cg_iterations"], progress=progress,
                                 device=next(self.parameters()).device)

    # -- features ---------------------------------------------------------------------------------
    def feature_pyramid(self, image: Tensor, grid: Grid) -> tuple[list[Tensor], list[Grid]]:
        """The feature images of ``image (B, 1, *S)`` on ``grid`` (coarse first), float32, and their grids."""
        if image.dim() != self.ndim + 2 or image.shape[1] != 1:
            raise ShapeError(f"dio features: expected (B, 1, *spatial) with {self.ndim} spatial axes, got {tuple(image.shape)}")
        maps = [m.float() for m in self.features(image)]
        if self.options["normalize_features"]:
            # one scale per image and level (root mean square over channels and voxels): the solver's
            # objective is then O(1) whatever scale the network drifts to, so one regulariser weight
            # and one step size serve an untrained and a trained network (an untrained one's features
            # differ by ~1e-7 in MSE, and Adam's scale-free steps then only grow the regulariser)
            # (channel means removed first: an untrained network's maps are mostly its biases)
            maps = [m - m.mean(dim=tuple(range(2, m.dim())), keepdim=True) for m in maps]
            maps = [m / m.pow(2).mean(dim=tuple(range(1, m.dim())), keepdim=True).add(1e-12).sqrt() for m in maps]
        return maps, [feature_grid(grid, level, m.shape[2:]) for level, m in zip(self.levels, maps)]

    def network_grid(self, grid: Grid, spacing: float | None = None) -> Grid:
        """The grid an image on ``grid`` is resampled to before the network: ``size`` voxels over the same
        field of view, or (``spacing``, default the model's ``feature_spacing``) that world spacing."""
        spacing = spacing if spacing is not None else self.options["feature_spacing"]
        if spacing is None:
            return grid.resized(self.size)
        shape = [max(2, round(float(e) / spacing) + 1) if n > 1 else 1 for e, n in zip(grid.extent(), grid.shape)]
        return grid.resized(shape)

    def image_features(self, image: Image, *, device: torch.device | str = "cpu",
                       spacing: float | None = None) -> tuple[Image, list[Image]]:
        """(``image`` on its network grid, normalised as in training; its feature images, coarse first),
        computed on the image's own grid: nothing is resampled onto the other image's grid."""
        from alignkit.train.subjects import to_network_grid

        if image.ndim != self.ndim:
            raise ShapeError(f"this dio model is {self.ndim}D; got a {image.ndim}D image")
        net_grid = self.network_grid(image.grid, spacing)
        tensor, grid = to_network_grid(image.batch(device=device), image.grid, net_grid.shape,
                                       percentiles=self.intensity_percentiles)
        was_training = self.training
        self.eval()
        try:
            maps, grids = self.feature_pyramid(tensor, grid)
        finally:
            self.train(was_training)
        return Image(tensor[0], grid), [Image(m[0], g) for m, g in zip(maps, grids)]

    # -- training ---------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Any]:
        fixed, moving = batch["fixed"].float(), batch["moving"].float()
        if fixed.shape != moving.shape:
            raise ShapeError(f"training pairs share the network grid; got {tuple(fixed.shape)} and {tuple(moving.shape)}")
        grid = voxel_grid(fixed.shape[2:])
        fixed_maps, grids = self.feature_pyramid(fixed, grid)
        moving_maps, _ = self.feature_pyramid(moving, grid)
        layer = self.layer()
        world = grid.world_points(device=fixed.device)
        per_level: list[list[Tensor]] = [[] for _ in self.levels]
        for b in range(fixed.shape[0]):
            out = layer(Image(fixed[b], grid), Image(moving[b], grid), [m[b : b + 1] for m in fixed_maps], grids,
                        [m[b : b + 1] for m in moving_maps], grids)
            found: dict[int, Tensor] = {optimum.index: optimum.map(world) - world for optimum in out.levels}
            last = torch.zeros_like(world)  # a level the solver stopped before (it diverged) keeps the coarser result
            for k in range(len(self.levels)):
                last = found.get(k, last)
                per_level[k].append(last)
        displacements = [torch.cat(d) for d in per_level]  # network-grid voxels (world = voxel here)
        return {"displacement": displacements[-1], "level_displacements": displacements,
                "warped": self.warp(moving, displacements[-1])}

    def similarity_score(self, warped: Tensor, fixed: Tensor) -> Tensor:
        return self.similarity(warped, fixed.float())

    def loss(self, batch: Mapping[str, Tensor], output: Mapping[str, Any], *, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """(total, parts): Σ_levels weight · (image_weight · similarity + dice_weight · soft-Dice)."""
        from alignkit.losses import one_hot

        fixed, moving = batch["fixed"].float(), batch["moving"].float()
        parts: dict[str, Tensor] = {}
        total = fixed.new_zeros(())
        use_dice = self.options["dice_weight"] > 0 and "fixed_labels" in batch and bool(self.label_ids)
        if use_dice:
            fixed_onehot = one_hot(batch["fixed_labels"], self.label_ids)
            moving_onehot = one_hot(batch["moving_labels"], self.label_ids)
        for k, (weight, displacement) in enumerate(zip(self.options["level_weights"], output["level_displacements"])):
            if weight == 0:
                continue
            similarity = self.similarity(self.warp(moving, displacement), fixed)
            parts[f"similarity_l{self.levels[k]}"] = similarity
            total = total + weight * self.options["image_weight"] * similarity
            if use_dice:
                dice = self.dice(self.warp(moving_onehot, displacement), fixed_onehot)
                parts[f"dice_l{self.levels[k]}"] = dice
                total = total + weight * self.options["dice_weight"] * dice
        if not total.requires_grad:  # e.g. validation, or every weight 0: still a tensor the loop can log
            total = total.detach()
        return total, {k: v.detach() for k, v in parts.items()}

    def predict_transform(self, grid: Grid, fixed: Tensor, moving: Tensor) -> Transform:
        """The finest level's optimum for one pair already on the network grid ``grid`` (the trained solver)."""
        fixed_maps, grids = self.feature_pyramid(fixed, grid)
        moving_maps, _ = self.feature_pyramid(moving, grid)
        out = self.layer()(Image(fixed[0], grid), Image(moving[0], grid), fixed_maps, grids, moving_maps, grids)
        stages = flatten_stages(out.result)
        return stages[-1] if len(stages) == 1 else out.result


__all__ = ["DIO", "DIOMethod", "feature_grid", "feature_network", "solver_config", "variant_of"]
