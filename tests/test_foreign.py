"""Reading other tools' transform files (alignkit.io.foreign, alignkit.transforms.files): each format
is checked against the tool that wrote it -- SimpleITK, ANTsPy, Greedy, elastix (transformix) --
and FSL FLIRT against a hand-computed case."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkit.errors import InputError, NotInvertibleError
from alignkit.io.foreign import detect_format, fsl_from_voxel, inverse_warp_path, read_foreign_transform, split_format
from alignkit.spatial import Grid
from alignkit.transforms import ComposedTransform, ControlPointBSpline, DisplacementField, MatrixTransform
from alignkit.transforms.files import read_transform, read_transform_chain


def rotation3(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def points(ndim: int, n: int = 50, scale: float = 40.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-scale, scale, size=(n, ndim))


def ours(transform, pts: np.ndarray) -> np.ndarray:
    """Map (N, ndim) world points through an alignkit transform (float64)."""
    t = torch.as_tensor(pts.T[None], dtype=torch.float64)
    with torch.no_grad():
        return transform.double().transform_points(t)[0].T.numpy()


def sitk_points(tx, pts: np.ndarray) -> np.ndarray:
    return np.array([tx.TransformPoint(p.tolist()) for p in pts])


# ------------------------------------------------------------------------------------------------
# ITK / SimpleITK files
# ------------------------------------------------------------------------------------------------
def _sitk_linear(name: str):
    sitk = pytest.importorskip("SimpleITK")
    if name == "affine2":
        tx = sitk.AffineTransform(2)
        tx.SetMatrix([1.05, 0.1, -0.07, 0.95])
        tx.SetTranslation([2.0, -3.0])
        tx.SetCenter([4.0, 5.0])
    elif name == "affine3":
        tx = sitk.AffineTransform(3)
        tx.SetMatrix((rotation3(0.1, -0.2, 0.15) @ np.diag([1.1, 0.9, 1.05])).ravel().tolist())
        tx.SetTranslation([2.0, -3.0, 1.5])
        tx.SetCenter([4.0, 5.0, -6.0])
    elif name == "translation3":
        tx = sitk.TranslationTransform(3, [1.0, -2.0, 3.5])
    elif name == "scale3":
        tx = sitk.ScaleTransform(3, [1.1, 0.9, 1.2])
        tx.SetCenter([1.0, 2.0, 3.0])
    elif name == "euler2":
        tx = sitk.Euler2DTransform([3.0, -1.0], 0.3, [1.5, -2.5])
    elif name == "similarity2":
        tx = sitk.Similarity2DTransform(1.2, 0.3, [1.5, -2.5], [3.0, -1.0])
    elif name in ("euler3", "euler3zyx"):
        tx = sitk.Euler3DTransform([3.0, -1.0, 2.0], 0.1, -0.25, 0.3, [1.5, -2.5, 4.0])
        tx.SetComputeZYX(name == "euler3zyx")
    elif name == "versorrigid3":
        tx = sitk.VersorRigid3DTransform()
        tx.SetParameters([0.1, -0.2, 0.15, 1.0, 2.0, -3.0])
        tx.SetCenter([3.0, -1.0, 2.0])
    elif name == "similarity3":
        tx = sitk.Similarity3DTransform(1.15, [0.2, 0.3, -0.5], 0.4, [1.0, 2.0, -3.0], [3.0, -1.0, 2.0])
    elif name == "scaleskewversor3":  # a type only SimpleITK knows: the fallback path
        tx = sitk.ScaleSkewVersor3DTransform()
        tx.SetParameters([0.1, -0.2, 0.15, 1.0, 2.0, -3.0, 1.1, 0.9, 1.05, 0.01, 0.02, -0.03, 0.0, 0.01, 0.02])
        tx.SetCenter([3.0, -1.0, 2.0])
    else:
        raise ValueError(name)
    return tx


LINEAR_TYPES = ["affine2", "affine3", "translation3", "scale3", "euler2", "similarity2", "euler3", "euler3zyx",
                "versorrigid3", "similarity3", "scaleskewversor3"]


@pytest.mark.parametrize("suffix", [".txt", ".tfm", ".mat"])
@pytest.mark.parametrize("name", LINEAR_TYPES)
def test_itk_linear_files_match_simpleitk(tmp_path: Path, name: str, suffix: str) -> None:
    sitk = pytest.importorskip("SimpleITK")
    tx = _sitk_linear(name)
    path = tmp_path / f"t{suffix}"
    sitk.WriteTransform(tx, str(path))
    assert detect_format(path) == "itk"
    transform = read_transform(path)
    assert isinstance(transform, MatrixTransform)
    pts = points(tx.GetDimension())
    np.testing.assert_allclose(ours(transform, pts), sitk_points(tx, pts), atol=1e-9)
    inverse = read_transform(path, invert=True)
    np.testing.assert_allclose(ours(inverse, sitk_points(tx, pts)), pts, atol=1e-8)


def test_itk_parsed_without_simpleitk(tmp_path: Path, monkeypatch) -> None:
    """The common types (and ANTs' binary .mat) are parsed here, not by SimpleITK."""
    sitk = pytest.importorskip("SimpleITK")
    written = {}
    for name in ("affine3", "euler3zyx", "similarity3", "versorrigid3"):
        tx = _sitk_linear(name)
        for suffix in (".txt", ".mat"):
            path = tmp_path / f"{name}{suffix}"
            sitk.WriteTransform(tx, str(path))
            written[path] = tx
    import alignkit.io.foreign as foreign

    monkeypatch.setattr(foreign, "_sitk_pieces", lambda path: pytest.fail(f"SimpleITK used for {path}"))
    for path, tx in written.items():
        pts = points(3)
        np.testing.assert_allclose(ours(read_transform(path), pts), sitk_points(tx, pts), atol=1e-9)
