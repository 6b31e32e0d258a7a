"""learned-descriptor-ransac: the automatic data set harvested by weak-homography (Dong et al., "Learning
to Align Images using Weak Geometric Supervision" §6.2), training through ``alignkit train --method
weak-homography``, and registration by descriptor matches + MAGSAC++."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import alignkit
from alignkit.image import Image
from alignkit.methods.descriptor_ransac import DescriptorRansacModel, folder_pairs, harvest_pair
from alignkit.methods.learned import build_model
from alignkit.metrics.homography import corner_error


def _photo(size: int = 128, offset: int = 0) -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[40 + offset : 40 + offset + size, 150 : 150 + size])


def _warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.warpPerspective(image, matrix, (image.shape[1], image.shape[0]), flags=cv2.INTER_LINEAR)


def test_folder_pairs(tmp_path):
    for name in ("0000_nir.jpg", "0000_rgb.jpg", "0001_nir.png", "0001_rgb.png", "lonely_nir.png", "cityA.png",
                 "cityB.png"):
        (tmp_path / name).write_bytes(b"")
    pairs = [(a.name, b.name) for a, b in folder_pairs(tmp_path)]
    assert pairs == [("0000_nir.jpg", "0000_rgb.jpg"), ("0001_nir.png", "0001_rgb.png"), ("cityA.png", "cityB.png")]


def test_harvested_positives_correspond_and_negatives_do_not():
    fixed = _photo(160)
    truth = np.array([[1.0, 0.03, 4.0], [-0.03, 1.0, -3.0], [0.0, 0.0, 1.0]])
    moving = _warp(fixed, truth)
    harvest = harvest_pair(Image.from_array(fixed), Image.from_array(moving), torch.as_tensor(truth),
                           keypoints=300, negative_distance=16.0, generator=torch.Generator().manual_seed(0), pair_index=3)
    a, b, negative = harvest.fixed, harvest.moving, harvest.negative
    assert a.shape[0] > 50 and a.shape == b.shape == negative.shape
    assert harvest.xy.shape == (a.shape[0], 2) and bool((harvest.pair == 3).all())
    positive_error = (a - b).pow(2).mean(dim=(1, 2, 3)).median()
    negative_error = (a - negative).pow(2).mean(dim=(1, 2, 3)).median()
    assert positive_error < 0.25 * negative_error


def test_matching_identical_images_gives_the_identity():
    """With both streams sharing their weights, identical images give identical descriptors at the same
    SIFT keypoints: the MAGSAC fit is the identity (runner plumbing: keypoints, patches, matching,
    world matrix)."""
    model = build_model("learned-descriptor-ransac", ndim=2, size=(16, 16))
    first = model.descriptor.layers[0]
    first[1].load_state_dict(first[0].state_dict())
    image = Image.from_array(_photo(160))
    result = alignkit.register(image, image, method="learned-descriptor-ransac", checkpoint=model)
    matrix = result.transform.matrix().detach().double().numpy()
    assert corner_error(matrix, np.eye(3), 160, 160) < 0.05
    assert result.metrics["matching"]["inliers"] >= 20


@pytest.mark.parametrize("method", ["weak-homography", "learned-descriptor-ransac"])
def test_train_weak_homography_trains_the_descriptor(tmp_path, method):
    """``alignkit train --method weak-homography`` (or the model's own name, as its shipped recipe says)
    harvests a folder of pairs and trains the descriptor; the checkpoint is a learned-descriptor-ransac
    model."""
    import imageio.v3 as iio

    from alignkit.methods import load_model, train_method

    folder = tmp_path / "pairs"
    folder.mkdir()
    for k, offset in enumerate((0, 60, 120)):
        fixed = _photo(128, offset)
        iio.imwrite(folder / f"{k:04d}_nir.png", fixed[..., 1])
        iio.imwrite(folder / f"{k:04d}_rgb.png", _warp(fixed, np.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [0, 0, 1.0]])))
    DescriptorRansacModel._harvests.clear()
    result = train_method({"method": method, "dataset": str(folder), "epochs": 1, "batch_size": 16,
                           "val_fraction": 0.34, "quiet": True,
                           "method_options": {"harvest_keypoints": 200,
                                              "harvest_options": {"iterations": 3, "keypoints": 128, "coarsest": 128}}},
                          tmp_path / "run")
    model = load_model(tmp_path / "run")
    assert model.method_name == "learned-descriptor-ransac"
    assert result.history[-1]["epoch"] == 1 and np.isfinite(result.history[-1]["train_loss"])


def test_bad_options():
    with pytest.raises(alignkit.errors.ConfigError):
        alignkit.register(_photo(), _photo(), method="learned-descriptor-ransac", ratio=1.5)


def test_hardest_in_batch_negative_respects_the_mask():
    """Zero when every allowed negative is at least sqrt(margin) away; a near-duplicate that the mask
    excludes (same place of the same pair) does not count; an allowed one does."""
    from alignkit.methods.patches import hardest_in_batch_negatives

    basis = torch.eye(6)[:4]  # orthonormal: squared distance 2 between different rows
    allowed = torch.ones(4, 4, dtype=torch.bool)
    assert float(hardest_in_batch_negatives(basis, basis.clone(), allowed, margin=1.0)) == 0.0
    near = basis.clone()
    near[1] = basis[0]  # b_1 coincides with a_0
    assert float(hardest_in_batch_negatives(basis, near, allowed, margin=1.0)) > 0.0
    allowed[0, 1] = allowed[1, 0] = False
    assert float(hardest_in_batch_negatives(basis, near, allowed, margin=1.0)) == 0.0


def test_model_loss_adds_the_hardest_in_batch_negative():
    model = build_model("learned-descriptor-ransac", ndim=2, size=(16, 16))
    plain = build_model("learned-descriptor-ransac", ndim=2, size=(16, 16), in_batch_negatives=False)
    plain.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(0)
    batch = {"fixed": torch.randn(8, 1, 16, 16, generator=g), "moving": torch.randn(8, 1, 16, 16, generator=g),
             "negative": torch.randn(8, 1, 16, 16, generator=g), "xy": torch.rand(8, 2, generator=g) * 500,
             "pair": torch.arange(8) % 2}
    with_hard, parts = model.loss(batch, model(batch), epoch=1)
    without, plain_parts = plain.loss(batch, plain(batch), epoch=1)
    assert "hardest_negative" in parts and "hardest_negative" not in plain_parts
    assert float(with_hard) == pytest.approx(float(without) + float(parts["hardest_negative"]), rel=1e-5)


def test_the_shipped_descriptor_registers_a_held_out_vis_nir_pair():
    """``--method learned-descriptor-ransac`` without a checkpoint uses the shipped descriptor; on a
    vis-nir test pair (the recipe trains on ``country`` only) it lands within 2 px (card: 0.54 px)."""
    from tests.conftest import data_path

    data_path("vis-nir", "indoor")
    from alignkit.data.datasets import load_dataset

    case = load_dataset("vis-nir", root=data_path())["indoor/0010"]
    rows, cols = case.fixed.shape[-2:]
    result = alignkit.register(case.fixed, case.moving, method="learned-descriptor-ransac", seed=0)
    assert result.description["checkpoint"].endswith("descriptor_visnir2d.pt")
    assert corner_error(result.transform.matrix().detach().double().numpy(), case.matrix, cols, rows) < 2.0
