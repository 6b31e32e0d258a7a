"""Models that ship inside the package, each with its recipe and card (torchvision's ``WeightsEnum``
idea: one record says what the weights are, how they were made and how well they do).

Every shipped model lives in ``alignkit/methods/models/`` as three files:

* ``<name>.pt``: an alignkit checkpoint (:mod:`alignkit.train.checkpoint`: tensors and a JSON
  skeleton, never a pickle) with the method record, the network specs and float16 weights, at most
  :data:`MAX_BYTES`;
* ``<name>.recipe.json``: the training configuration that produced it (``alignkit train --recipe
  <name> -o RUN`` trains it again; ``benchmarks/ship_model.py --recipe <name>`` also exports and scores it);
* ``<name>.card.json``: training data and licence, command, commit, training time, size, held-out scores.

``alignkit.register(..., method="voxelmorph")`` (or ``method="avsm"``) without a checkpoint uses the
shipped model for the images' dimension; ``alignkit methods`` lists them with their cards' scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from alignkit.errors import ConfigError, InputError

#: the largest model file that may ship in the package
MAX_BYTES = 2 * 1024 * 1024


def models_dir() -> Path:
    """The folder of shipped models inside the installed package."""
    return Path(str(resources.files("alignkit.methods"))) / "models"


@dataclass(frozen=True)
class ShippedModel:
    """One shipped model: its ``name`` (file stem), the ``method`` it is a model of, and ``ndim``."""

    name: str
    method: str
    ndim: int
    summary: str

    def path(self) -> Path:
        return models_dir() / f"{self.name}.pt"

    def recipe_path(self) -> Path:
        return models_dir() / f"{self.name}.recipe.json"

    def card_path(self) -> Path:
        return models_dir() / f"{self.name}.card.json"

    def available(self) -> bool:
        return self.path().is_file()

    def card(self) -> dict[str, Any]:
        """The card's record (empty when the card is missing)."""
        path = self.card_path()
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"corrupt model card ({exc.msg})", path) from None

    def recipe(self) -> dict[str, Any]:
        path = self.recipe_path()
        if not path.is_file():
            raise InputError("the recipe of this shipped model is missing", path)
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"corrupt recipe ({exc.msg})", path) from None


SHIPPED: tuple[ShippedModel, ...] = (
    ShippedModel(
        name="voxelmorph_oasis3d",
        method="voxelmorph",
        ndim=3,
        summary="3D VoxelMorph, OASIS-TRT-20 skull-stripped T1 brains, 64x64x40 network grid, affine pre-alignment",
    ),
    # Ships as a fast start for native-space pairs, not as a rival of the classical affine: trained by its
    # recipe on two CPU threads (60/20/2 epochs with pose_augment, 23 min; session 16, chosen by validation Dice
    # among four recipes: 0.338 against 0.333, 0.327 and 0.307), it scores a held-out mean Dice of 0.363 on OASIS
    # 11 <-> 12 against 0.427 for the classical affine (its card; the three others: 0.364, 0.360, 0.363; the
    # 6/1/1-epoch model before: 0.349; the shipped voxelmorph's card: 0.444; benchmarks/README.md, avsm.py section).
    # Its vSVF steps add nothing yet.
    ShippedModel(
        name="avsm_oasis3d",
        method="avsm",
        ndim=3,
        summary="3D AVSM (learned affine + vSVF), OASIS-TRT-20 skull-stripped T1 brains, 40x40x24 network grid, "
        "no pre-alignment (native-space pairs; the affine steps start at the centre-of-mass shift)",
    ),
    ShippedModel(
        name="dio_oasis3d",
        method="dio",
        ndim=3,
        summary="3D DIO (LKU features, 8 channels at 1/4, 1/2, 1 of a 64x64x40 grid), OASIS-TRT-20 skull-stripped T1 "
        "brains, affine pre-alignment; the solver's transform chosen at test time",
    ),
    ShippedModel(
        name="c2f_multimodal2d",
        method="c2f",
        ndim=2,
        summary="2D c2f chain of three half-width A.1 blocks (scales 1, 2, 4), OASIS-TRT-20 T1 slices <-> label edges "
        "with random synthetic contrasts from their labels, VIS-NIR for the scale-4 block; eq.-3 deformations of at "
        "most 2 px; 33,600 CPU steps; held-out EPE 1.24 px / PCK@5 0.990 (fast), 0.99 / 0.989 (accurate) from the "
        "identity's 8.58 / 0.084; ANTs SyN 1.55 / 0.989 (see its card)",
    ),
    ShippedModel(
        name="stereo_net_synthetic2d",
        method="stereo-net",
        ndim=2,
        summary="2D stereo-net (MC-CNN-fast matching cost mixed 1:1 with census, for SGM), synthetic layered scenes from scikit-image "
        "photographs + the Middlebury motorcycle pair; benchmarks/ship_stereo_net.py",
    ),
    # Trained by its recipe on one CPU thread (52 'country' pairs harvested by weak-homography in 8 min, 40
    # epochs in 23 min): on the 60 held-out vis-nir test pairs (benchmarks/ship_descriptor.py, its card)
    # success@3 px 0.833 against SIFT+RANSAC's 0.883 and descriptor mAP 0.664 against SIFT's 0.715 -- a
    # working automatic-data-set descriptor (§6.2), not yet better than SIFT on these pairs.
    ShippedModel(
        name="descriptor_visnir2d",
        method="learned-descriptor-ransac",
        ndim=2,
        summary="2D pseudo-siamese patch descriptor trained on VIS-NIR 'country' patches harvested by weak-homography "
        "(no ground truth); SIFT keypoints + MAGSAC++; benchmarks/ship_descriptor.py",
    ),
    # The default flownet-c model (listed first): flownet_c_synthetic2d continued on one CPU thread for 5 x 2048
    # synthetic 256x256 pairs with motions up to 40 px, trained through the coarse-to-fine inference users run
    # (train_coarse_levels 2; 25 min). Better than its start on the tuning pairs (Middlebury stereo as flow,
    # 384x512 synthetic pairs) and on every scored data set (its card; benchmarks/README.md, learned_flow).
    ShippedModel(
        name="flownet_c_pyramid2d",
        method="flownet-c",
        ndim=2,
        summary="2D narrow FlowNetC (0.73 M parameters), flownet_c_synthetic2d continued through the coarse-to-fine "
        "inference on 256x256 synthetic pairs with motions up to 40 px; benchmarks/ship_flownet.py --name "
        "flownet_c_pyramid2d",
    ),
    # Trained on a lent H200 (benchmarks/gpu_session.py: 7 x 4096 synthetic 128x128 pairs, 160 s): mean EPE
    # 0.633 px on Middlebury (Farneback 0.523, zero flow 2.53) and 5.97 on the Sintel samples (Farneback 2.70,
    # zero flow 9.05), 0.12-0.23 s per pair on one CPU thread (benchmarks/ship_flownet.py, its card) -- figures of
    # the single-scale inference of that time; run coarse to fine (now the default) it beats Farneback.
    ShippedModel(
        name="flownet_c_synthetic2d",
        method="flownet-c",
        ndim=2,
        summary="2D narrow FlowNetC (0.73 M parameters), synthetic FlyingChairs-style pairs from scikit-image "
        "photographs (128x128 crops, 28,672 pairs on a GPU); the start of flownet_c_pyramid2d (the default); "
        "benchmarks/ship_flownet.py",
    ),
)


def shipped_models(method: str | None = None) -> list[ShippedModel]:
    """The shipped models (of ``method``) whose weights are present in this installation."""
    return [m for m in SHIPPED if (method is None or m.method == method) and m.available()]


def shipped_for(method: str, ndim: int) -> ShippedModel | None:
    """The shipped model of ``method`` for ``ndim``-D images, or None."""
    for model in shipped_models(method):
        if model.ndim == ndim:
            return model
    return None


def get_shipped(name: str) -> ShippedModel:
    """The shipped model (or recipe) called ``name``; a one-line error naming the known ones."""
    for model in SHIPPED:
        if model.name == name:
            return model
    raise ConfigError(f"unknown shipped model or recipe {name!r}; known: {', '.join(m.name for m in SHIPPED)}")
