"""``avsm``: a multi-step affine network and a vector-momentum SVF network with symmetric losses.

Shen, Han, Xu, Niethammer, "Networks for Joint Affine and Non-parametric Image Registration", CVPR
2019. The whole system, wired from parts that exist elsewhere:

* **affine** (§2.1): :class:`~alignkit.nets.affine.RecurrentAffineHead` -- one encoder shared by
  all steps, each step seeing the moving image resampled once through the composed map so far,
  updates composed as eq. 1. Trained first with one step (stage ``affine-1step``), then, from those
  weights, with ``affine_train_steps`` (5) steps (stage ``affine``); ``affine_test_steps`` (7) at
  test time. Loss, in both directions (eq. 6): mk-LNCC + ``λ_ar(epoch) ||A - I||² + ||b||²`` with
  eq. 13's ``λ_ar = C_ar K_ar / (K_ar + exp(n / K_ar))`` (``C_ar`` 10, ``K_ar`` 4; ``n`` the paper's
  epoch, ``ar_epoch_scale`` of ours for a short run: :meth:`AVSM.affine_regularizer_weight`) + the symmetry
  loss of eq. 5 (``λ_as`` 10); matrices in the unit frame of the network grid (the paper's
  normalised coordinates).
* **vSVF** (§2.2, stage ``vsvf``, affine part frozen): a residual U-Net without its last decoder
  level (``output_scale=0.5``) outputs the momentum ``m`` at half resolution; ``v = K ⋆ m`` with the
  multi-Gaussian kernel (σ 0.05…0.25 of the extent, weights 0.067…0.333); the map is advected by RK4
  with 10 time steps on the low-resolution grid and upsampled (the map, not the image). Loss:
  mk-LNCC + ``λ_vr <m, v>`` (10) in both directions, plus the symmetry loss of eq. 10 (``λ_vs``
  1e-4) -- eq. 11, ``l_v(I0, I1) + l_v(I1, I0) + L_sym`` (``vsvf_both_directions``; False scores the
  forward direction alone, as before 2026-12-03, when the reverse pass fed only the 1e-4 symmetry
  term) -- measured in the unit cube ``[0, 1]^d`` as in the paper (:meth:`AVSM.unit_extent`). Multi-step (eq. 12):
  ``vsvf_train_steps`` (2) in training, ``vsvf_test_steps`` (2, or 3; 0 = the affine network alone)
  at test time; each step starts from the previous map, and maps are composed so the moving image is interpolated once.

The prediction is ``y = A(Q(x))``: the vSVF map ``Q`` acts first, then the affine ``A`` -- an ITK
affine plus an ANTs/ITK displacement field when saved. Conventions of :mod:`alignkit.methods.heads`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError
from alignkit.losses import AffineInverseConsistency, AffinePrior, InverseConsistency, MultiKernelLNCC
from alignkit.methods.base import MethodInfo
from alignkit.methods.heads import (
    LearnedDisplacement,
    matrix_displacement,
    voxel_grid,
    voxel_matrix_transform,
)
from alignkit.methods.learned import LearnedModel, learned_method
from alignkit.spatial import (
    Grid,
    apply_matrix,
    homogeneous,
    resize_field,
    sample_voxels,
    voxel_matrix_from_unit_matrix,
)
from alignkit.train.protocol import TrainingStage
from alignkit.transforms import VSVF_SIGMAS, VSVF_TIME_STEPS, VSVF_WEIGHTS, ComposedTransform, Transform
from alignkit.transforms.dense import VectorMomentumSVF

AFFINE_STAGES = ("affine-1step", "affine")


def affine_regularizer_weight(epoch: float, *, c_ar: float = 10.0, k_ar: float = 4.0) -> float:
    """Shen et al. 2019 eq. 13: ``λ_ar = C_ar K_ar / (K_ar + exp(n / K_ar))`` at epoch ``n`` -- large at
    the start of training (it keeps early affine predictions near the identity), decaying to 0."""
    return float(c_ar * k_ar / (k_ar + math.exp(epoch / k_ar)))


@learned_method(MethodInfo(
    name="avsm",
    kind="learned",
    summary="multi-step affine network + vector-momentum SVF network with symmetric losses "
    "(affine then diffeomorphic; for pairs that are not pre-aligned)",
    ndims=(2, 3),
    modalities=("mono",),
    case_kinds=("deformable", "affine"),
    needs_checkpoint=True,
    reference="Shen, Han, Xu, Niethammer, Networks for Joint Affine and Non-parametric Image Registration, CVPR 2019",
))
class AVSM(LearnedModel):
    """See the module docstring; every option is the paper's value by default."""

    #: §3: intensities clipped to the 0.1 and 99.9 percentiles and scaled to [0, 1]
    intensity_percentiles = (0.1, 99.9)

    @classmethod
    def default_networks(cls, ndim: int) -> dict[str, dict[str, Any]]:
        return {
            "affine": {"name": "recurrent_affine", "ndim": ndim, "in_channels": 1,
                       "features": [16, 32, 32, 32, 32], "num_steps": 5},
            "vsvf": {"name": "unet", "ndim": ndim, "in_channels": 2, "out_channels": ndim,
                     "features": [16, 32, 32, 32], "residual": True, "output_scale": 0.5},
        }

    def __init__(
        self,
        *,
        networks: Mapping[str, nn.Module],
        ndim: int,
        size: Sequence[int],
        affine_train_steps: int = 5,
        affine_test_steps: int = 7,
        vsvf_train_steps: int = 2,
        vsvf_test_steps: int = 2,
        c_ar: float = 10.0,
        k_ar: float = 4.0,
        lambda_as: float = 10.0,
        lambda_vr: float = 10.0,
        lambda_vs: float = 1e-4,
        ar_epoch_scale: float = 1.0,
        ar_epoch_offset: float = 0.0,
        centre_of_mass_start: bool = False,
        time_steps: int = VSVF_TIME_STEPS,
        sigmas: Sequence[float] = VSVF_SIGMAS,
        weights: Sequence[float] = VSVF_WEIGHTS,
        label_ids: Sequence[int] | None = None,
        vsvf_both_directions: bool = True,
    ) -> None:
        super().__init__(networks=networks, ndim=ndim, size=size)
        for name, value in (("affine_train_steps", affine_train_steps), ("affine_test_steps", affine_test_steps),
                            ("vsvf_train_steps", vsvf_train_steps), ("time_steps", time_steps)):
            if int(value) < 1:
                raise ConfigError(f"avsm {name} must be >= 1, got {value}")
        if int(vsvf_test_steps) < 0:
            raise ConfigError(f"avsm vsvf_test_steps must be >= 0 (0: the affine network alone), got {vsvf_test_steps}")
        for name, value in (("c_ar", c_ar), ("k_ar", k_ar), ("lambda_as", lambda_as), ("lambda_vr", lambda_vr),
                            ("lambda_vs", lambda_vs), ("ar_epoch_scale", ar_epoch_scale),
                            ("ar_epoch_offset", ar_epoch_offset)):
            if float(value) < 0 or (name == "k_ar" and float(value) == 0):
                raise ConfigError(f"avsm {name} must be >= 0 (k_ar > 0), got {value}")
        self.options = {
            "affine_train_steps": int(affine_train_steps), "affine_test_steps": int(affine_test_steps),
            "vsvf_train_steps": int(vsvf_train_steps), "vsvf_test_steps": int(vsvf_test_steps),
            "c_ar": float(c_ar), "k_ar": float(k_ar), "lambda_as": float(lambda_as), "lambda_vr": float(lambda_vr),
            "lambda_vs": float(lambda_vs), "ar_epoch_scale": float(ar_epoch_scale),
            "ar_epoch_offset": float(ar_epoch_offset), "centre_of_mass_start": bool(centre_of_mass_start),
            "time_steps": int(time_steps),
            "sigmas": [float(s) for s in sigmas], "weights": [float(w) for w in weights],
            "label_ids": None if label_ids is None else [int(v) for v in label_ids],
            "vsvf_both_directions": bool(vsvf_both_directions),
        }
        self.similarity = MultiKernelLNCC()  # (0.3, S/4), (0.7, S/2), dilation 2
        self.affine_prior = AffinePrior()
        self.affine_symmetry = AffineInverseConsistency()
        self.symmetry = InverseConsistency()
        self._vsvf_units: dict[tuple[int, ...], VectorMomentumSVF] = {}

    @property
    def label_ids(self) -> list[int] | None:
        return self.options["label_ids"]

    @label_ids.setter
    def label_ids(self, values: Sequence[int] | None) -> None:
        self.options["label_ids"] = None if values is None else [int(v) for v in values]

    def training_stages(self) -> list[TrainingStage]:
        return [TrainingStage("affine-1step", networks=("affine",)), TrainingStage("affine", networks=("affine",)),
                TrainingStage("vsvf", networks=("vsvf",))]

    # -- parts ------------------------------------------------------------------------------------
    def affine_regularizer_weight(self, epoch: int) -> float:
        """Eq. 13's ``λ_ar`` at training epoch ``epoch``, which counts as the paper's epoch
        ``n = ar_epoch_offset + ar_epoch_scale * epoch``. The defaults (1, 0) are the paper's own
        count, meant for its long schedule (80,000 iterations per part). In a short run they pin
        the affine: on OASIS at 40x40x24, the free affine minimising mk-LNCC + λ_ar ||θ - I||² on
        the pair 12 <- 11 reaches network-grid Dice 0.11 at λ_ar 8 (epochs 0-1) and 0.19 at 3.5
        (epoch 8), against 0.33 unregularised; a network trained 150 steps at the paper's count
        learns the translation and no rotation. ``ar_epoch_scale`` compresses the schedule into
        the run's epochs; ``ar_epoch_offset`` continues it in a run that starts from an earlier one
        (the multi-step stage trained on top of a 1-step run)."""
        options = self.options
        n = options["ar_epoch_offset"] + options["ar_epoch_scale"] * float(epoch)
        return affine_regularizer_weight(n, c_ar=options["c_ar"], k_ar=options["k_ar"])

    def affine_steps(self) -> int:
        if not self.training:
            return self.options["affine_test_steps"]
        return 1 if self.stage == "affine-1step" else self.options["affine_train_steps"]

    def affine_start(self, fixed: Tensor, moving: Tensor) -> Tensor | None:
        """``(B, ndim, ndim+1)`` unit-frame translation taking the fixed image's intensity centre of
        mass to the moving one's (``centre_of_mass_start``; ITK's moments initialiser), or None.
        Native-space subjects are tens of millimetres apart: on OASIS 11 <-> 12 this start alone
        scores Dice 0.32 at full resolution against 0.03 for the identity, and the network then
        learns the rest of the affine instead of the bulk translation."""
        if not self.options["centre_of_mass_start"]:
            return None
        unit = voxel_grid(fixed.shape[2:]).voxel_points(dtype=fixed.dtype, device=fixed.device)
        scale = torch.tensor([2.0 / max(n - 1, 1) for n in fixed.shape[2:]], dtype=fixed.dtype, device=fixed.device)
        unit = unit * scale.view(1, -1, *([1] * self.ndim)) - 1.0  # voxels -> unit frame, [-1, 1] per axis

        def centre(image: Tensor) -> Tensor:
            weight = image.clamp_min(0).flatten(2)  # (B, 1, N); images are in [0, 1]
            return (unit.flatten(2) * weight).sum(2) / weight.sum(2).clamp_min(1e-6)  # (B, ndim)

        shift = (centre(moving) - centre(fixed)).detach()
        eye = torch.eye(self.ndim, dtype=fixed.dtype, device=fixed.device).expand(fixed.shape[0], -1, -1)
        return torch.cat([eye, shift[..., None]], dim=2)

    def unit_matrix(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """The composed affine ``(B, ndim+1, ndim+1)`` in the unit frame (fixed → moving), from
        :meth:`affine_start` when it is on."""
        start = self.affine_start(fixed, moving)
        return homogeneous(self.affine(fixed, moving, steps=self.affine_steps(), initial=start)[-1])

    def learned_part(self, unit: Tensor, fixed: Tensor, moving: Tensor) -> Tensor:
        """``unit`` less the centre-of-mass start (``start⁻¹ ∘ unit``): what eq. 4's prior measures,
        so the prior keeps the network's own steps near the identity, not the start it was given."""
        start = self.affine_start(fixed, moving)
        return unit if start is None else torch.linalg.inv(homogeneous(start)) @ unit

    def vsvf_unit(self, low_shape: tuple[int, ...]) -> VectorMomentumSVF:
        """The vSVF integrator on the low-resolution grid (world = voxels of the network grid)."""
        if low_shape not in self._vsvf_units:
            low = voxel_grid(self.size).resized(low_shape)
            self._vsvf_units[low_shape] = VectorMomentumSVF(
                low, time_steps=self.options["time_steps"], sigmas=self.options["sigmas"],
                weights=self.options["weights"],
            )
        return self._vsvf_units[low_shape]

    @staticmethod
    def unit_extent(size: Sequence[int], like: Tensor) -> Tensor:
        """``(1, ndim, 1, ...)``: the extent of each axis of the network grid in its voxels. The paper
        (and mermaid) work in the unit cube ``[0, 1]^d``: the momentum, ``<m, v>`` and the symmetry
        loss are measured there, so their weights (λ_vr 10, λ_vs 1e-4) mean the same at every grid
        size -- measured in voxels, ``<m, v>`` would be ``(S - 1)^2`` times larger and, at λ_vr = 10,
        pins the map to the identity."""
        extent = [max(int(n) - 1, 1) for n in size]
        return torch.tensor(extent, dtype=like.dtype, device=like.device).view(1, -1, *([1] * len(extent)))

    def vsvf_map(self, fixed: Tensor, moving: Tensor, matrix: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``Q`` (voxel points ``(B, ndim, *S)``, before the affine ``matrix``) after the vSVF steps,
        and each step's ``<m, v>`` per pair (unit cube, :meth:`unit_extent`). Each step sees
        ``moving ∘ A ∘ Q`` sampled once; the network outputs the momentum in unit-cube coordinates."""
        size = tuple(fixed.shape[2:])
        extent = self.unit_extent(size, fixed)
        identity = self._identity_on(fixed)
        points = identity.expand(fixed.shape[0], *identity.shape[1:])
        steps = self.options["vsvf_train_steps"] if self.training else self.options["vsvf_test_steps"]
        energies = []
        for _ in range(steps):
            warped = sample_voxels(moving, apply_matrix(matrix, points), padding="border")
            momentum = self.vsvf(torch.cat([warped, fixed], 1)).float()  # unit cube
            unit = self.vsvf_unit(tuple(momentum.shape[2:]))
            velocity = unit.smooth(momentum)  # K is linear: the same in either unit
            energies.append((momentum * velocity).sum(1).flatten(1).mean(1))
            low = unit.integrate(velocity * extent)  # displacement of the advected map, network voxels
            step = resize_field(low, size)  # the map is upsampled, not the image
            # compose: the new step acts first, Q <- Q(x + d(x))
            points = sample_voxels(points, identity + step, padding="border")
        return points, energies

    # -- the contract -------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        fixed, moving = batch["fixed"].float(), batch["moving"].float()
        size = tuple(fixed.shape[2:])
        out: dict[str, Tensor] = {}
        affine_only = self.training and self.stage in AFFINE_STAGES
        with torch.set_grad_enabled(torch.is_grad_enabled() and affine_only):
            unit = self.unit_matrix(fixed, moving)
            if affine_only:
                out["unit_matrix_ts"] = self.unit_matrix(moving, fixed)
        out["unit_matrix"] = unit
        matrix = voxel_matrix_from_unit_matrix(unit, size, size)
        out["matrix"] = matrix
        if affine_only:
            out["displacement"] = matrix_displacement(matrix, size)
            out["warped"] = self.warp(moving, out["displacement"])
            matrix_ts = voxel_matrix_from_unit_matrix(out["unit_matrix_ts"], size, size)
            out["warped_ts"] = self.warp(fixed, matrix_displacement(matrix_ts, size))
            return out
        points, energies = self.vsvf_map(fixed, moving, matrix)
        identity = self._identity_on(fixed)
        out["field"] = points - identity
        out["energy"] = torch.stack(energies).sum(0) if energies else fixed.new_zeros(fixed.shape[0])
        out["displacement"] = apply_matrix(matrix, points) - identity
        out["warped"] = self.warp(moving, out["displacement"])
        return out

    def loss(self, batch: Mapping[str, Tensor], output: Mapping[str, Tensor], *, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        fixed, moving = batch["fixed"].float(), batch["moving"].float()
        options = self.options
        parts: dict[str, Tensor] = {"similarity": self.similarity(output["warped"], fixed)}
        if "warped_ts" in output:  # an affine stage: eq. 6, both directions
            parts["similarity"] = parts["similarity"] + self.similarity(output["warped_ts"], moving)
            weight = self.affine_regularizer_weight(epoch)
            parts["affine_prior"] = (self.affine_prior(self.learned_part(output["unit_matrix"], fixed, moving))
                                     + self.affine_prior(self.learned_part(output["unit_matrix_ts"], moving, fixed)))
            parts["affine_symmetry"] = self.affine_symmetry(output["unit_matrix"], output["unit_matrix_ts"])
            total = parts["similarity"] + weight * parts["affine_prior"] + options["lambda_as"] * parts["affine_symmetry"]
            return total, {k: v.detach() for k, v in parts.items()}
        parts["momentum_energy"] = output["energy"].mean()
        total = parts["similarity"] + options["lambda_vr"] * parts["momentum_energy"]
        both = self.training and options["vsvf_both_directions"]
        if both or (options["lambda_vs"] > 0 and self.training):
            reverse = self({"fixed": moving, "moving": fixed})
        if both:  # eq. 11: l_v(I0, I1) + l_v(I1, I0) + the symmetry term
            parts["similarity"] = parts["similarity"] + self.similarity(reverse["warped"], moving)
            parts["momentum_energy"] = parts["momentum_energy"] + reverse["energy"].mean()
            total = parts["similarity"] + options["lambda_vr"] * parts["momentum_energy"]
        if options["lambda_vs"] > 0 and self.training:
            size = tuple(fixed.shape[2:])
            extent = self.unit_extent(size, fixed)
            unit_grid = Grid.from_spacing(size, [1.0 / float(e) for e in extent.flatten()])  # the unit cube
            parts["symmetry"] = self.symmetry(output["displacement"] / extent, reverse["displacement"] / extent,
                                              unit_grid)
            total = total + options["lambda_vs"] * parts["symmetry"]
        return total, {k: v.detach() for k, v in parts.items()}

    def similarity_score(self, warped: Tensor, fixed: Tensor) -> Tensor:
        return self.similarity(warped, fixed.float())

    def predict_transform(self, grid: Grid, fixed: Tensor, moving: Tensor) -> Transform:
        output = self({"fixed": fixed, "moving": moving})
        affine = voxel_matrix_transform(output["matrix"][0], grid, kind="affine")
        if self.options["vsvf_test_steps"] == 0:  # the affine network alone (Shen et al.'s Table 2 rows I-V)
            return affine
        field = LearnedDisplacement(grid, output["field"])
        field.kind = "vsvf"
        return ComposedTransform([affine, field])
