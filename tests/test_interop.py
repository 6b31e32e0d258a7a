"""Transforms written by `alignkit register` reproduce alignkit's warped image in ANTsPy and SimpleITK."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import alignkit
from alignkit.solve import RegistrationConfig, StageConfig


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from conftest import data_path

    fixed = data_path("brain2d", "r16slice.jpg")
    moving = data_path("brain2d", "r64slice.jpg")
    config = RegistrationConfig(
        stages=[
            StageConfig(transform="affine", similarity="ncc", levels=(8, 4), iterations=(60, 30)),
            StageConfig(transform="svf", similarity="lncc", regularizer="diffusion", regularizer_weight=0.5,
                        levels=(4, 2), iterations=(30, 15), learning_rate=0.5),
        ]
    )
    result = alignkit.register(fixed, moving, config=config, seed=0)
    out = result.save(tmp_path_factory.mktemp("interop") / "out", moving_suffix=".nii.gz")
    return fixed, moving, result, out


def _interior(a: np.ndarray, b: np.ndarray, margin: int = 6) -> float:
    sl = (slice(margin, -margin),) * a.ndim
    return float(np.abs(a[sl] - b[sl]).max() / max(np.abs(b).max(), 1e-6))


def test_ants_apply_transforms_reproduces_warped(saved):
    ants = pytest.importorskip("ants")
    fixed, moving, result, out = saved
    fixed_ants = ants.image_read(str(fixed))
    moving_ants = ants.image_read(str(moving))
    warped = ants.apply_transforms(
        fixed_ants, moving_ants, [str(out / "transform" / "warp.nii.gz"), str(out / "transform" / "affine.txt")]
    ).numpy()
    # ANTs' numpy arrays are in ITK index order (x = column first) for 2D images: transpose to (row, col)
    ours = result.warped.data[0].numpy()
    assert _interior(warped.T, ours) < 1e-3  # the reversed list [affine, warp] is off by ~0.7


def test_simpleitk_composite_reproduces_warped(saved):
    sitk = pytest.importorskip("SimpleITK")
    fixed, moving, result, out = saved
    fixed_img = sitk.ReadImage(str(fixed), sitk.sitkFloat32)
    moving_img = sitk.ReadImage(str(moving), sitk.sitkFloat32)
    affine = sitk.ReadTransform(str(out / "transform" / "affine.txt"))
    field = sitk.ReadImage(str(out / "transform" / "warp.nii.gz"), sitk.sitkVectorFloat64)
    # ITK applies the last-added transform to a point first: warp, then affine.
    composite = sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(field)])
    warped = sitk.GetArrayFromImage(sitk.Resample(moving_img, fixed_img, composite, sitk.sitkLinear, 0.0))
    ours = result.warped.data[0].numpy()
    assert _interior(warped, ours) < 1e-3
    assert torch.isfinite(result.warped.data).all()
