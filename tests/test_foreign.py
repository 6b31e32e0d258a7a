"""Reading other tools' transform files (alignkit.io.foreign, alignkit.transforms.files): each format
is checked against the tool that wrote it -- SimpleITK, ANTsPy, Greedy, elastix (transformix) --
and FSL FLIRT against a hand-computed case."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alignkit.errors import InputError, NotInvertibleError
from alignkit.io.foreign import (
    detect_format,
    fsl_from_voxel,
    inverse_warp_path,
    read_foreign_transform,
    split_format,
)
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
    from alignkit.io import foreign

    monkeypatch.setattr(foreign, "_sitk_pieces", lambda path: pytest.fail(f"SimpleITK used for {path}"))
    for path, tx in written.items():
        pts = points(3)
        np.testing.assert_allclose(ours(read_transform(path), pts), sitk_points(tx, pts), atol=1e-9)


def test_itk_composite_text_and_h5_with_field_match_simpleitk(tmp_path: Path) -> None:
    """A composite lists its transforms in stage order: ITK sends a point through the last first."""
    sitk = pytest.importorskip("SimpleITK")
    affine, euler = _sitk_linear("affine3"), _sitk_linear("euler3")
    text = tmp_path / "composite.txt"
    sitk.WriteTransform(sitk.CompositeTransform([affine, euler]), str(text))
    pts = points(3)
    composite = sitk.CompositeTransform([affine, euler])
    np.testing.assert_allclose(ours(read_transform(text), pts), sitk_points(composite, pts), atol=1e-9)

    # ANTs' Composite.h5: an affine and a displacement field on an oblique grid
    rng = np.random.default_rng(1)
    from scipy.ndimage import gaussian_filter

    u = np.stack([gaussian_filter(rng.normal(size=(14, 12, 10)), 2.0) * 20 for _ in range(3)], axis=-1)
    field = sitk.GetImageFromArray(u, isVector=True)  # array (z, y, x, 3)
    field.SetSpacing([4.0, 5.0, 6.0])
    field.SetOrigin([-20.0, -25.0, -30.0])
    field.SetDirection(rotation3(0.1, 0.2, -0.1).ravel().tolist())
    warp = sitk.DisplacementFieldTransform(sitk.Image(field))
    h5 = tmp_path / "Composite.h5"
    sitk.WriteTransform(sitk.CompositeTransform([affine, warp]), str(h5))
    reference = sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(sitk.Image(field))])
    # within the field's domain (ITK's field is zero outside it, alignkit's keeps its border value)
    index = np.random.default_rng(4).uniform(0, 1, size=(50, 3)) * (np.array(field.GetSize()) - 1)
    inside = np.array([field.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in index])
    transform = read_transform(h5)
    assert isinstance(transform, ComposedTransform)
    assert [type(s) for s in transform.stage_list()] == [MatrixTransform, DisplacementField]
    np.testing.assert_allclose(ours(transform, inside), sitk_points(reference, inside), atol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_itk_bspline_matches_simpleitk(tmp_path: Path, ndim: int) -> None:
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.Image([30, 26, 20][:ndim], sitk.sitkFloat32)
    image.SetSpacing([1.5, 2.0, 2.5][:ndim])
    image.SetOrigin([-10.0, 5.0, -3.0][:ndim])
    direction = rotation3(0.0, 0.0, 0.3) if ndim == 2 else rotation3(0.2, -0.1, 0.3)
    image.SetDirection(direction[:ndim, :ndim].ravel().tolist())
    tx = sitk.BSplineTransformInitializer(image, [4, 5, 3][:ndim])
    params = np.random.default_rng(2).normal(scale=3.0, size=len(tx.GetParameters()))
    tx.SetParameters(params.tolist())
    path = tmp_path / "bspline.txt"
    sitk.WriteTransform(tx, str(path))
    transform = read_transform(path)
    assert isinstance(transform, ControlPointBSpline)
    # points over the image and beyond it (where ITK leaves them in place)
    world = np.array([image.TransformContinuousIndexToPhysicalPoint(c.tolist())
                      for c in np.random.default_rng(3).uniform(-8, 36, size=(300, ndim))])
    expected = sitk_points(tx, world)
    np.testing.assert_allclose(ours(transform, world), expected, atol=1e-6)
    assert np.abs(expected - world).max() > 1.0  # the spline moves points


# ------------------------------------------------------------------------------------------------
# elastix (transformix computes the reference deformation field)
# ------------------------------------------------------------------------------------------------
def _elastix_header(ndim: int, shape: tuple[int, ...], spacing, origin, direction: np.ndarray) -> str:
    fmt = lambda v: " ".join(repr(float(x)) for x in v)
    return (
        f"(FixedImageDimension {ndim})\n(MovingImageDimension {ndim})\n"
        '(FixedInternalImagePixelType "float")\n(MovingInternalImagePixelType "float")\n'
        f"(Size {' '.join(map(str, shape))})\n(Index {' '.join(['0'] * ndim)})\n(Spacing {fmt(spacing)})\n"
        # elastix writes direction cosines column by column
        f"(Origin {fmt(origin)})\n(Direction {fmt(direction.T.ravel())})\n(UseDirectionCosines \"true\")\n"
        '(ResampleInterpolator "FinalBSplineInterpolator")\n(FinalBSplineInterpolationOrder 3)\n'
        '(Resampler "DefaultResampler")\n(DefaultPixelValue 0)\n(ResultImageFormat "nii")\n'
        '(ResultImagePixelType "float")\n(HowToCombineTransforms "Compose")\n'
    )


def _transformix_world(path: Path, ndim: int, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """(fixed world points of ``grid``, where transformix sends them), both (N, ndim)."""
    itk = pytest.importorskip("itk")
    parameters = itk.ParameterObject.New()
    parameters.ReadParameterFile(str(path))
    image = itk.image_from_array(np.zeros(grid.shape[::-1], np.float32))
    # transformix writes deformationField.nii into its output directory (the working one by default)
    field = itk.transformix_deformation_field(image, parameters, output_directory=str(path.parent))
    u = np.asarray(itk.array_view_from_image(field)).reshape(-1, ndim)  # ITK index order, x fastest
    world = grid.world_points(dtype=torch.float64)[0].permute(*range(ndim, 0, -1), 0).reshape(-1, ndim).numpy()
    return world, world + u


def _elastix_case(ndim: int) -> tuple[str, Grid]:
    shape = (12, 10, 8)[:ndim]
    spacing, origin = (2.0, 1.5, 2.5)[:ndim], (-5.0, 3.0, 1.0)[:ndim]
    direction = rotation3(0.1, -0.05, 0.2)[:ndim, :ndim] if ndim == 3 else rotation3(0, 0, 0.2)[:2, :2]
    grid = Grid.from_spacing(shape, spacing, origin, torch.tensor(direction))
    return _elastix_header(ndim, shape, spacing, origin, direction), grid


ELASTIX_LINEAR = {
    "euler3": (3, ('(Transform "EulerTransform")\n(TransformParameters 0.1 -0.2 0.3 1.0 2.0 -3.0)\n'
                  '(CenterOfRotationPoint 4.0 5.0 6.0)\n(ComputeZYX "false")\n')),
    "euler3zyx": (3, ('(Transform "EulerTransform")\n(TransformParameters 0.1 -0.2 0.3 1.0 2.0 -3.0)\n'
                     '(CenterOfRotationPoint 4.0 5.0 6.0)\n(ComputeZYX "true")\n')),
    "euler2": (2, '(Transform "EulerTransform")\n(TransformParameters 0.2 1.0 -2.0)\n(CenterOfRotationPoint 4.0 5.0)\n'),
    "similarity3": (3, ('(Transform "SimilarityTransform")\n(TransformParameters 0.1 -0.05 0.2 1.0 2.0 -3.0 1.1)\n'
                       '(CenterOfRotationPoint 4.0 5.0 6.0)\n')),
    "similarity2": (2, ('(Transform "SimilarityTransform")\n(TransformParameters 0.9 0.2 1.0 -2.0)\n'
                       '(CenterOfRotationPoint 4.0 5.0)\n')),
    "affine3": (3, ('(Transform "AffineTransform")\n'
                   '(TransformParameters 1.05 0.1 0.0 -0.05 0.95 0.02 0.03 0.0 1.1 1.0 2.0 -3.0)\n'
                   '(CenterOfRotationPoint 4.0 5.0 6.0)\n')),
    "translation2": (2, '(Transform "TranslationTransform")\n(TransformParameters 1.5 -2.5)\n'),
}


@pytest.mark.parametrize("name", sorted(ELASTIX_LINEAR))
def test_elastix_linear_matches_transformix(tmp_path: Path, name: str) -> None:
    ndim, body = ELASTIX_LINEAR[name]
    header, grid = _elastix_case(ndim)
    path = tmp_path / "TransformParameters.0.txt"
    count = len(body.split("(TransformParameters ")[1].split(")")[0].split())
    path.write_text(header + body + f"(NumberOfParameters {count})\n"
                    '(InitialTransformParametersFileName "NoInitialTransform")\n')
    assert detect_format(path) == "elastix"
    world, expected = _transformix_world(path, ndim, grid)
    transform = read_transform(path)
    assert isinstance(transform, MatrixTransform)
    np.testing.assert_allclose(ours(transform, world), expected, atol=1e-4)


def _elastix_bspline(ndim: int, seed: int) -> str:
    size = (7, 6, 5)[:ndim]
    direction = rotation3(0.05, 0.1, -0.15)[:ndim, :ndim]
    count = ndim * int(np.prod(size))
    params = np.random.default_rng(seed).normal(scale=2.0, size=count)
    fmt = lambda v: " ".join(repr(float(x)) for x in v)
    return (
        f'(Transform "BSplineTransform")\n(NumberOfParameters {count})\n(TransformParameters {fmt(params)})\n'
        f"(GridSize {' '.join(map(str, size))})\n(GridIndex {' '.join(['0'] * ndim)})\n"
        f"(GridSpacing {fmt((6.0, 5.0, 7.0)[:ndim])})\n(GridOrigin {fmt((-14.0, -6.0, -11.0)[:ndim])})\n"
        f"(GridDirection {fmt(direction.T.ravel())})\n(BSplineTransformSplineOrder 3)\n(UseCyclicTransform \"false\")\n"
    )


@pytest.mark.parametrize("ndim", [2, 3])
def test_elastix_bspline_and_initial_chain_match_transformix(tmp_path: Path, ndim: int) -> None:
    header, grid = _elastix_case(ndim)
    affine = tmp_path / "TransformParameters.0.txt"
    body = ELASTIX_LINEAR["affine3"][1] if ndim == 3 else ELASTIX_LINEAR["similarity2"][1]
    count = len(body.split("(TransformParameters ")[1].split(")")[0].split())
    affine.write_text(header + body + f"(NumberOfParameters {count})\n"
                      '(InitialTransformParametersFileName "NoInitialTransform")\n')
    bspline = tmp_path / "TransformParameters.1.txt"
    # elastix 5 spells the chain's key InitialTransformParameterFileName, elastix 4 ...ParametersFileName
    key = "InitialTransformParameterFileName" if ndim == 3 else "InitialTransformParametersFileName"
    bspline.write_text(header + _elastix_bspline(ndim, 4) + f'({key} "{affine}")\n')
    world, expected = _transformix_world(bspline, ndim, grid)
    transform = read_transform(bspline)
    assert [type(s) for s in transform.stage_list()] == [ControlPointBSpline, MatrixTransform]
    np.testing.assert_allclose(ours(transform, world), expected, atol=1e-4)
    alone = tmp_path / "bspline_alone.txt"
    alone.write_text(header + _elastix_bspline(ndim, 4) + '(InitialTransformParametersFileName "NoInitialTransform")\n')
    world, expected = _transformix_world(alone, ndim, grid)
    np.testing.assert_allclose(ours(read_transform(alone), world), expected, atol=1e-4)
    assert np.abs(expected - world).max() > 0.5


# ------------------------------------------------------------------------------------------------
# FSL FLIRT: a hand-computed case
# ------------------------------------------------------------------------------------------------
def test_fsl_flirt_hand_computed(tmp_path: Path) -> None:
    """Reference 10x12x8, RAS diag(2, 3, 4) at (10, -20, 5): positive determinant, so FSL flips x
    (x_fsl = (9 - i) * 2). Input 6x7x9, RAS diag(-1.5, 2, 2.5) at (30, 0, -10): negative, no flip.
    FLIRT matrix: x_ref = x_in + (4, -3, 2) in scaled voxels.

    Fixed voxel (2, 5, 3): RAS (14, -5, 17) = LPS (-14, 5, 17); ref FSL (14, 15, 12); input FSL
    (10, 18, 10) = input voxel (10/1.5, 9, 4); RAS (30 - 10, 18, 0) = LPS (-20, -18, 0).
    Fixed voxel (0, 0, 0): LPS (-10, 20, 5); ref FSL (18, 0, 0); input FSL (14, 3, -2) = voxel
    (14/1.5, 1.5, -0.8); RAS (16, 3, -12) = LPS (-16, -3, -12)."""
    import nibabel as nib

    ref_affine = np.diag([2.0, 3.0, 4.0, 1.0])
    ref_affine[:3, 3] = [10.0, -20.0, 5.0]
    in_affine = np.diag([-1.5, 2.0, 2.5, 1.0])
    in_affine[:3, 3] = [30.0, 0.0, -10.0]
    nib.save(nib.Nifti1Image(np.zeros((10, 12, 8), np.float32), ref_affine), str(tmp_path / "ref.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 9), np.float32), in_affine), str(tmp_path / "in.nii.gz"))
    flirt = tmp_path / "flirt.mat"
    flirt.write_text("1 0 0 4\n0 1 0 -3\n0 0 1 2\n0 0 0 1\n")
    transform = read_transform(f"fsl:{flirt}", fixed=tmp_path / "ref.nii.gz", moving=tmp_path / "in.nii.gz")
    got = ours(transform, np.array([[-14.0, 5.0, 17.0], [-10.0, 20.0, 5.0]]))
    np.testing.assert_allclose(got, [[-20.0, -18.0, 0.0], [-16.0, -3.0, -12.0]], atol=1e-9)
    # the flip is what makes it right: without it the first point lands elsewhere
    flipped = fsl_from_voxel(Grid((10, 12, 8), torch.tensor(np.diag([-1.0, -1, 1, 1]) @ ref_affine)))
    assert flipped[0, 0] == -2.0 and flipped[0, 3] == 18.0
    with pytest.raises(InputError, match="reference"):
        read_transform(flirt, format="fsl")


# ------------------------------------------------------------------------------------------------
# Greedy (its own reslicing is the reference)
# ------------------------------------------------------------------------------------------------
def _image_pair(tmp_path: Path, ndim: int) -> tuple[Path, Path]:
    """A fixed and a moving image that overlap, on different grids: 3D NIfTI (RAS headers, one of
    them with a flipped axis); 2D MetaImage (ITK reads a 2D NIfTI's orientation its own way)."""
    import nibabel as nib
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(5)
    paths = []
    if ndim == 3:
        fixed_affine = np.diag([1.5, 1.2, 2.0, 1.0])
        fixed_affine[:3, 3] = [5.0, -3.0, 7.0]
        moving_affine = np.diag([-1.3, 1.4, 1.6, 1.0])
        moving_affine[:3, 3] = [33.0, -6.0, 4.0]
        moving_data = (gaussian_filter(rng.random((24, 22, 18)), 2.0) * 10).astype(np.float32)
        moving = tmp_path / "moving.nii.gz"
        nib.save(nib.Nifti1Image(moving_data, moving_affine), str(moving))
        # the fixed image shows the same content, shifted and rotated a little: registrations converge
        from alignkit.io import read_image
        from alignkit.spatial import sample_world

        image = read_image(moving)
        fixed_grid = Grid((20, 17, 14), torch.tensor(np.diag([-1.0, -1, 1, 1]) @ fixed_affine))
        shift = torch.tensor([[1.0, 0.05, 0, 1.5], [-0.05, 1.0, 0, -1.0], [0, 0, 1.0, 0.5], [0, 0, 0, 1.0]])
        world = torch.einsum("ij,bj...->bi...", shift[:3, :3], fixed_grid.world_points()) + shift[:3, 3].view(1, 3, 1, 1, 1)
        fixed_data = sample_world(image.batch(), image.grid, world)[0, 0].numpy()
        fixed = tmp_path / "fixed.nii.gz"
        nib.save(nib.Nifti1Image(fixed_data, fixed_affine), str(fixed))
        return fixed, moving
    sitk = pytest.importorskip("SimpleITK")
    for name, shape, spacing, origin, direction in (
        ("fixed", (40, 34), (1.5, 1.2), (-5.0, 3.0), (1.0, 0.0, 0.0, 1.0)),
        ("moving", (44, 40), (1.3, 1.4), (50.0, -10.0), (-1.0, 0.0, 0.0, 1.0)),
    ):
        image = sitk.GetImageFromArray((gaussian_filter(rng.random(shape), 2.0) * 10).astype(np.float32).T)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
        sitk.WriteImage(image, str(tmp_path / f"{name}.mha"))
        paths.append(tmp_path / f"{name}.mha")
    return paths[0], paths[1]


def _inside(transform, fixed_grid: Grid, moving_grid: Grid) -> np.ndarray:
    """Fixed voxels that the transform sends inside the moving image's voxel range, where every
    tool interpolates alike (at the edge ITK clamps, alignkit blends with the zero padding)."""
    from alignkit.spatial import apply_matrix

    with torch.no_grad():
        voxel = apply_matrix(moving_grid.voxel_from_world, transform.double().map_on(fixed_grid, dtype=torch.float64))[0]
    ok = torch.ones(voxel.shape[1:], dtype=torch.bool)
    for axis, size in enumerate(moving_grid.shape):
        ok &= (voxel[axis] >= 0) & (voxel[axis] <= size - 1)
    return ok.numpy()


def _resample(chain, fixed: Path, moving: Path, **kw) -> np.ndarray:
    from alignkit.io import read_image
    from alignkit.registration import resample_image

    fixed_image, moving_image = read_image(fixed), read_image(moving)
    transform = read_transform_chain(chain, fixed=fixed_image, moving=moving_image, **kw)
    return resample_image(transform, fixed_image.grid, moving_image).data[0].numpy()


@pytest.mark.parametrize("ndim", [2, 3])
def test_greedy_matrix_and_warp_match_greedy_reslice(tmp_path: Path, ndim: int) -> None:
    greedy = pytest.importorskip("picsl_greedy")
    from alignkit.io import read_image

    fixed, moving = _image_pair(tmp_path, ndim)
    ras = np.eye(ndim + 1)
    ras[:ndim, :ndim] = rotation3(0, 0, 0.1)[:ndim, :ndim] * 1.05
    ras[:ndim, ndim] = [2.0, -1.5, 3.0][:ndim]
    matrix = tmp_path / "affine.mat"
    np.savetxt(matrix, ras)
    def tool_execute(command: str) -> None:
        # in a process of its own: Greedy's ITK finds no image IO once itk-elastix's ITK is loaded
        script = f"from picsl_greedy import Greedy{ndim}D; Greedy{ndim}D().execute({command!r})"
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)

    tool = SimpleNamespace(execute=tool_execute)
    quiet = "-threads 1"
    assert greedy is not None
    out = tmp_path / f"affine_out{fixed.name[fixed.name.index('.'):]}"
    tool.execute(f"-d {ndim} -rf {fixed} -rm {moving} {out} -r {matrix} {quiet}")
    expected = read_image(out).data[0].numpy()
    got = _resample([f"greedy:{matrix}"], fixed, moving)
    inner = (slice(3, -3),) * ndim
    assert (np.abs(expected[inner]) > 1.0).mean() > 0.5  # the images overlap
    np.testing.assert_allclose(got[inner], expected[inner], atol=1e-3)
    if ndim == 2:
        return
    warp = tmp_path / "warp.nii.gz"
    tool.execute(f"-d 3 -i {fixed} {moving} -it {matrix} -n 5x3 -m SSD -s 2vox 1vox -o {warp} {quiet}")
    tool.execute(f"-d 3 -rf {fixed} -rm {moving} {tmp_path / 'warp_out.nii.gz'} -r {warp} {matrix} {quiet}")
    expected = read_image(tmp_path / "warp_out.nii.gz").data[0].numpy()
    got = _resample([warp, f"greedy:{matrix}"], fixed, moving)
    assert np.abs(_resample([f"greedy:{matrix}"], fixed, moving) - expected)[inner].max() > 0.05  # the warp matters
    np.testing.assert_allclose(got[inner], expected[inner], atol=1e-3)


# ------------------------------------------------------------------------------------------------
# ANTs (ANTsPy writes and applies; small synthetic pair)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ants_run(tmp_path_factory):
    ants = pytest.importorskip("ants")
    tmp = tmp_path_factory.mktemp("ants")
    fixed, moving = _image_pair(tmp, 3)
    fixed_ants, moving_ants = ants.image_read(str(fixed)), ants.image_read(str(moving))
    result = ants.registration(
        fixed_ants, moving_ants, type_of_transform="SyN", outprefix=str(tmp / "ants_"),
        aff_iterations=(20, 10), aff_shrink_factors=(2, 1), aff_smoothing_sigmas=(1, 0), reg_iterations=(10, 5),
        random_seed=1,
    )
    return fixed, moving, fixed_ants, moving_ants, result


def test_ants_registration_files_match_ants_apply_transforms(ants_run) -> None:
    ants = pytest.importorskip("ants")
    fixed, moving, fixed_ants, moving_ants, result = ants_run
    forward = result["fwdtransforms"]  # [1Warp.nii.gz, 0GenericAffine.mat]
    assert forward[0].endswith("Warp.nii.gz") and forward[1].endswith(".mat")
    from alignkit.io import read_image
    from alignkit.registration import resample_image

    fixed_grid, moving_grid = read_image(fixed).grid, read_image(moving).grid
    expected = ants.apply_transforms(fixed_ants, moving_ants, transformlist=forward).numpy()
    got = _resample(forward, fixed, moving)
    inside = _inside(read_transform_chain(forward), fixed_grid, moving_grid)
    assert inside.sum() > 500
    assert np.abs(got - _resample(forward[1:], fixed, moving))[inside].max() > 0.05  # the warp matters
    np.testing.assert_allclose(got[inside], expected[inside], atol=1e-4)

    # the inverse chain, as ANTs gives it, and as alignkit builds it from the forward files
    inverse = result["invtransforms"]  # [0GenericAffine.mat, 1InverseWarp.nii.gz]
    expected = ants.apply_transforms(moving_ants, fixed_ants, transformlist=inverse, whichtoinvert=[True, False]).numpy()
    for chain, flags in ((inverse, [True, False]), (forward[::-1], [True, True])):
        transform = read_transform_chain(chain, invert=flags)
        got = resample_image(transform, moving_grid, read_image(fixed)).data[0].numpy()
        inside = _inside(transform, moving_grid, fixed_grid)
        assert inside.sum() > 500
        np.testing.assert_allclose(got[inside], expected[inside], atol=1e-4)


def test_ants_points_match_apply_transforms_to_points(ants_run) -> None:
    """Points go the way of ITK transforms: fixed -> moving with the forward list (within 0.1 voxel)."""
    ants = pytest.importorskip("ants")
    import pandas as pd

    fixed, _, fixed_ants, _, result = ants_run
    rng = np.random.default_rng(7)
    index = rng.uniform(2, 12, size=(40, 3))
    from alignkit.io import read_image

    w = read_image(fixed).grid.world_from_voxel.numpy()
    world = index @ w[:3, :3].T + w[:3, 3]
    frame = pd.DataFrame(world, columns=["x", "y", "z"])
    expected = ants.apply_transforms_to_points(3, frame, result["fwdtransforms"])[["x", "y", "z"]].to_numpy()
    got = ours(read_transform_chain(result["fwdtransforms"]), world)
    assert np.abs(expected - world).max() > 1.0
    assert np.abs(got - expected).max() < 0.1 * min(fixed_ants.spacing)


def test_inverse_warp_names() -> None:
    assert inverse_warp_path("out/ants_1Warp.nii.gz").name == "ants_1InverseWarp.nii.gz"
    assert inverse_warp_path("ants_1InverseWarp.nii.gz").name == "ants_1Warp.nii.gz"
    assert inverse_warp_path("field.nii.gz") is None


# ------------------------------------------------------------------------------------------------
# alignkit's own export, read back as a folder and as foreign files
# ------------------------------------------------------------------------------------------------
def test_alignkit_export_reads_back(tmp_path: Path) -> None:
    from alignkit.transforms import Affine, StationaryVelocityField
    from alignkit.transforms.folder import save_transform

    grid = Grid.from_spacing((18, 16, 12), (1.5, 1.2, 2.0), (5.0, -3.0, 7.0), torch.tensor(rotation3(0.2, 0, 0.3)))
    affine = Affine.from_matrix(torch.tensor([[1.05, 0.1, 0, 2.0], [-0.05, 0.97, 0.02, -1.5], [0, 0.03, 1.02, 3.0],
                                              [0, 0, 0, 1.0]]))
    svf = StationaryVelocityField(grid)
    with torch.no_grad():
        svf.velocity.copy_(torch.randn(1, 3, *grid.shape) * 0.8)
    original = ComposedTransform([affine, svf])
    save_transform(original, grid, tmp_path / "transform")
    world = grid.world_points(dtype=torch.float64)[0].reshape(3, -1).T.numpy()
    with torch.no_grad():
        expected = ours(original.float(), world)
    folder = read_transform(tmp_path / "transform")
    files = read_transform_chain([tmp_path / "transform" / "warp.nii.gz", tmp_path / "transform" / "affine.txt"])
    np.testing.assert_allclose(ours(folder, world), expected, atol=1e-3)
    np.testing.assert_allclose(ours(files, world), expected, atol=1e-3)
    with pytest.raises(NotInvertibleError, match="transform"):
        read_transform(tmp_path / "transform", invert=True)


# ------------------------------------------------------------------------------------------------
# errors: one line naming the file
# ------------------------------------------------------------------------------------------------
def test_unreadable_files_raise_one_line_naming_the_file(tmp_path: Path) -> None:
    matrix = tmp_path / "affine.mat"
    matrix.write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    cases = {
        tmp_path / "missing.txt": "not found",
        matrix: "greedy:FILE or fsl:FILE",
        tmp_path / "notes.txt": "unknown transform format",
        tmp_path / "short.txt": "needs 12 parameters",
        tmp_path / "TransformParameters.0.txt": "not supported",
        tmp_path / "folder": "no manifest.json",
    }
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "short.txt").write_text("#Insight Transform File V1.0\n#Transform 0\n"
                                        "Transform: AffineTransform_double_3_3\nParameters: 1 0 0\nFixedParameters: 0 0 0\n")
    (tmp_path / "TransformParameters.0.txt").write_text('(Transform "SplineKernelTransform")\n(TransformParameters 1)\n')
    (tmp_path / "folder").mkdir()
    import nibabel as nib

    fnirt = nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.float32), np.eye(4))
    fnirt.header["intent_code"] = 2006  # FSL_FNIRT_DISPLACEMENT_FIELD: not an ITK field
    nib.save(fnirt, str(tmp_path / "fnirt_warp.nii.gz"))
    cases[tmp_path / "fnirt_warp.nii.gz"] = "FNIRT warps are not read"
    for path, needle in cases.items():
        with pytest.raises(InputError) as info:
            read_transform(path)
        message = str(info.value)
        assert needle in message and str(path) in message and "\n" not in message, message
    with pytest.raises(NotInvertibleError, match="field.nii.gz"):
        from alignkit.io import write_displacement_field

        grid = Grid.from_spacing((5, 6, 7))
        write_displacement_field(tmp_path / "field.nii.gz", torch.zeros(3, 5, 6, 7), grid)
        read_transform(tmp_path / "field.nii.gz", invert=True)
    assert split_format("fsl:a.mat") == ("fsl", "a.mat")
    assert split_format("C:/data/a.mat") == ("auto", "C:/data/a.mat")
    with pytest.raises(InputError, match="unknown transform format"):
        read_foreign_transform(matrix, format="flirt")


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def _cli(argv, capsys) -> tuple[int, str]:
    from alignkit.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_cli_apply_ants_chain_images_labels_points_and_invert(ants_run, tmp_path: Path, capsys) -> None:
    ants = pytest.importorskip("ants")
    import nibabel as nib

    from alignkit.io import read_image, read_points, write_points

    fixed, moving, fixed_ants, moving_ants, result = ants_run
    forward = result["fwdtransforms"]
    transform = read_transform_chain(forward)
    inside = _inside(transform, read_image(fixed).grid, read_image(moving).grid)

    out = tmp_path / "warped.nii.gz"
    assert _cli(["apply", *forward, moving, "-r", fixed, "-o", out], capsys)[0] == 0
    expected = ants.apply_transforms(fixed_ants, moving_ants, transformlist=forward).numpy()
    np.testing.assert_allclose(read_image(out).data[0].numpy()[inside], expected[inside], atol=1e-4)
    # without --reference the grid of the warp listed first is the fixed grid
    assert _cli(["apply", *forward, moving, "-o", tmp_path / "noref.nii.gz"], capsys)[0] == 0
    assert read_image(tmp_path / "noref.nii.gz").grid.same_as(read_image(fixed).grid)

    # label maps: nearest neighbour, as ANTs' nearestNeighbor
    labels = (np.asarray(nib.load(str(moving)).get_fdata()) > 5.0).astype(np.int16) + 1
    labels_path = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(labels, nib.load(str(moving)).affine), str(labels_path))
    assert _cli(["apply", *forward, labels_path, "-r", fixed, "--labels", "-o", tmp_path / "wl.nii.gz"], capsys)[0] == 0
    expected = ants.apply_transforms(fixed_ants, ants.image_read(str(labels_path)), transformlist=forward,
                                     interpolator="nearestNeighbor").numpy()
    got = read_image(tmp_path / "wl.nii.gz", labels=True).data[0].numpy()
    assert (got[inside] == expected[inside]).mean() > 0.99

    # points, through the forward chain and back through the inverted one
    pts = np.array([[20.0, -8.0, 15.0], [15.0, -3.0, 20.0], [25.0, -10.0, 18.0]]) * np.array([-1, -1, 1])
    write_points(tmp_path / "pts.csv", torch.tensor(pts))
    assert _cli(["apply", *forward, "--points", tmp_path / "pts.csv", "-o", tmp_path / "mapped.csv"], capsys)[0] == 0
    mapped = read_points(tmp_path / "mapped.csv", 3).numpy()
    np.testing.assert_allclose(mapped, ours(transform, pts), atol=1e-4)
    back = forward[::-1]
    code, err = _cli(["apply", *back, "--invert", back[0], "--invert", back[1], "--points", tmp_path / "mapped.csv",
                      "-o", tmp_path / "back.csv"], capsys)
    assert code == 0, err
    assert np.abs(read_points(tmp_path / "back.csv", 3).numpy() - pts).max() < 0.3  # SyN's inverse is numerical


def test_cli_apply_errors_are_one_line(tmp_path: Path, capsys) -> None:
    fixed, moving = _image_pair(tmp_path, 3)
    matrix = tmp_path / "affine.mat"
    matrix.write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    for argv, needles in (
        (["apply", matrix, moving, "-o", tmp_path / "o.nii.gz"], [str(matrix), "greedy:FILE"]),
        (["apply", f"greedy:{matrix}", moving, "-o", tmp_path / "o.nii.gz"], ["--reference"]),
        (["apply", f"greedy:{matrix}", moving, "-r", fixed, "--invert", "other.mat", "-o", tmp_path / "o.nii.gz"],
         ["other.mat"]),
        (["apply", tmp_path / "nothing.txt", moving, "-o", tmp_path / "o.nii.gz"], ["nothing.txt", "not found"]),
    ):
        code, err = _cli(argv, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, err
        assert all(n in lines[0] for n in needles), lines[0]
    assert not (tmp_path / "o.nii.gz").exists()
    # the same matrix named as Greedy's works, inverted too
    assert _cli(["apply", f"greedy:{matrix}", moving, "-r", fixed, "--invert", matrix, "-o", tmp_path / "o.nii.gz"],
                capsys)[0] == 0


def test_cli_register_initial_transform_is_used_and_recorded(tmp_path: Path, capsys) -> None:
    import json

    sitk = pytest.importorskip("SimpleITK")
    fixed, moving = _image_pair(tmp_path, 3)
    tx = sitk.AffineTransform(3)
    tx.SetTranslation([1.5, -1.0, 0.5])
    initial = tmp_path / "0GenericAffine.mat"
    sitk.WriteTransform(tx, str(initial))
    config = tmp_path / "fast.json"
    config.write_text(json.dumps({"stages": [{"transform": "translation", "similarity": "ncc", "levels": [2],
                                              "iterations": [5]}]}))
    out = tmp_path / "out"
    code, err = _cli(["register", fixed, moving, "-o", out, "--config", config, "--initial-transform", initial,
                      "--quiet", "--no-qc"], capsys)
    assert code == 0, err
    manifest = json.loads((out / "transform" / "manifest.json").read_text())
    assert manifest["config"]["initial_transform"]["file"] == str(initial)
    assert manifest["stages"][0] == "init:file"
    np.testing.assert_allclose(np.array(manifest["config"]["initial_transform"]["matrix"])[:3, 3], [1.5, -1.0, 0.5])
    warp = tmp_path / "w.nii.gz"
    from alignkit.io import write_displacement_field

    write_displacement_field(warp, torch.zeros(3, 4, 4, 4), Grid.from_spacing((4, 4, 4)))
    code, err = _cli(["register", fixed, moving, "-o", tmp_path / "o2", "--config", config,
                      "--initial-transform", warp, "--quiet"], capsys)
    assert code == 2 and "linear" in err and str(warp) in err


# ------------------------------------------------------------------------------------------------
# real 3D brains (OASIS-TRT-20 at 3 mm): an ANTsPy registration applied by `alignkit apply`
# ------------------------------------------------------------------------------------------------
def _dice_mean(a: np.ndarray, b: np.ndarray) -> float:
    labels = sorted(set(np.unique(a).tolist()) - {0})
    return float(np.mean([2.0 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum()) for v in labels]))


@pytest.fixture(scope="module")
def brain_images(tmp_path_factory):
    """Two OASIS-TRT-20 subjects (01 fixed, 02 moving) and their label maps at 3 mm."""
    ants = pytest.importorskip("ants", reason="ANTsPy resamples the OASIS brains to 3 mm")
    from conftest import data_path

    root = data_path("brain3d-oasis-trt20")
    tmp = tmp_path_factory.mktemp("brains")
    paths = {}
    for role, subject in (("fixed", "subject01"), ("moving", "subject02")):
        image = ants.image_read(str(root / subject / "t1weighted_brain.nii.gz"))
        labels = ants.image_read(str(root / subject / "labels.all.nii.gz"))
        small = ants.resample_image(image, (3.0, 3.0, 3.0), use_voxels=False, interp_type=0)
        small_labels = ants.resample_image_to_target(labels, small, interp_type="nearestNeighbor")
        paths[role] = tmp / f"{role}.nii.gz"
        paths[f"{role}_labels"] = tmp / f"{role}_labels.nii.gz"
        ants.image_write(small, str(paths[role]))
        ants.image_write(small_labels.astype("float32"), str(paths[f"{role}_labels"]))
    return tmp, paths


@pytest.fixture(scope="module")
def brain_pair(brain_images):
    ants = pytest.importorskip("ants")
    tmp, paths = brain_images
    fixed, moving = ants.image_read(str(paths["fixed"])), ants.image_read(str(paths["moving"]))
    result = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=str(tmp / "ants_"),
                               reg_iterations=(40, 20, 0), random_seed=1)
    return tmp, paths, result


def _brain_points(fixed: Path, n: int = 60, seed: int = 7) -> np.ndarray:
    """(n, 3) LPS world points at random voxels of the fixed brain."""
    from alignkit.io import read_image

    image = read_image(fixed)
    voxels = np.argwhere(image.data[0].numpy() > 0)
    index = voxels[np.random.default_rng(seed).choice(len(voxels), n, replace=False)] + 0.25  # off the lattice
    w = image.grid.world_from_voxel.numpy()
    return index @ w[:3, :3].T + w[:3, 3]


def _check_against_peer(tmp: Path, paths: dict, chain: list, expected: np.ndarray, expected_labels: np.ndarray,
                        capsys) -> tuple[float, float]:
    """``alignkit apply CHAIN`` on the moving brain and its labels: (correlation with ``expected``
    inside the fixed brain, mean label Dice with ``expected_labels``)."""
    from alignkit.io import read_image

    out, out_labels = tmp / "alignkit_warped.nii.gz", tmp / "alignkit_labels.nii.gz"
    code, err = _cli(["apply", *chain, paths["moving"], "-r", paths["fixed"], "-o", out], capsys)
    assert code == 0, err
    code, err = _cli(["apply", *chain, paths["moving_labels"], "-r", paths["fixed"], "--labels", "-o", out_labels],
                     capsys)
    assert code == 0, err
    brain = read_image(paths["fixed"]).data[0].numpy() > 0
    got = read_image(out).data[0].numpy()
    corr = float(np.corrcoef(got[brain], expected[brain])[0, 1])
    dice = _dice_mean(read_image(out_labels, labels=True).data[0].numpy(), np.rint(expected_labels).astype(np.int64))
    return corr, dice


def _cli_points(chain: list, world: np.ndarray, tmp: Path, capsys) -> np.ndarray:
    """``alignkit apply CHAIN --points``: (N, 3) LPS world points mapped fixed -> moving."""
    from alignkit.io import read_points, write_points

    write_points(tmp / "points.csv", torch.tensor(world))
    code, err = _cli(["apply", *chain, "--points", tmp / "points.csv", "-o", tmp / "mapped.csv"], capsys)
    assert code == 0, err
    return read_points(tmp / "mapped.csv", 3).numpy()


@pytest.mark.slow
def test_real_brains_ants_files_through_alignkit_apply(brain_pair, capsys, record_property) -> None:
    ants = pytest.importorskip("ants")
    from alignkit.io import read_image

    tmp, paths, result = brain_pair
    forward = result["fwdtransforms"]
    fixed_ants = ants.image_read(str(paths["fixed"]))
    out, out_labels = tmp / "warped.nii.gz", tmp / "warped_labels.nii.gz"
    assert _cli(["apply", *forward, paths["moving"], "-r", paths["fixed"], "-o", out], capsys)[0] == 0
    assert _cli(["apply", *forward, paths["moving_labels"], "-r", paths["fixed"], "--labels", "-o", out_labels],
                capsys)[0] == 0
    expected = ants.apply_transforms(fixed_ants, ants.image_read(str(paths["moving"])), transformlist=forward).numpy()
    expected_labels = ants.apply_transforms(fixed_ants, ants.image_read(str(paths["moving_labels"])),
                                            transformlist=forward, interpolator="nearestNeighbor").numpy()
    brain = fixed_ants.numpy() > 0
    got = read_image(out).data[0].numpy()
    corr = np.corrcoef(got[brain], expected[brain])[0, 1]
    dice = _dice_mean(read_image(out_labels, labels=True).data[0].numpy(), expected_labels.round().astype(np.int64))
    record_property("ants_correlation_in_brain", float(corr))
    record_property("ants_label_dice", dice)
    assert corr > 0.99, corr
    assert dice > 0.98, dice

    # the same files as one SimpleITK composite (.h5), applied by alignkit and by sitk.Resample
    sitk = pytest.importorskip("SimpleITK")
    field = sitk.ReadImage(forward[0], sitk.sitkVectorFloat64)
    composite = sitk.CompositeTransform([sitk.ReadTransform(forward[1]), sitk.DisplacementFieldTransform(field)])
    h5 = tmp / "composite.h5"
    sitk.WriteTransform(composite, str(h5))
    assert _cli(["apply", h5, paths["moving"], "-r", paths["fixed"], "-o", tmp / "sitk.nii.gz"], capsys)[0] == 0
    reference = sitk.Resample(sitk.ReadImage(str(paths["moving"]), sitk.sitkFloat32),
                              sitk.ReadImage(str(paths["fixed"])), sitk.ReadTransform(str(h5)), sitk.sitkLinear, 0.0)
    expected = sitk.GetArrayFromImage(reference).transpose(2, 1, 0)
    corr = np.corrcoef(read_image(tmp / "sitk.nii.gz").data[0].numpy()[brain], expected[brain])[0, 1]
    record_property("sitk_composite_correlation_in_brain", float(corr))
    assert corr > 0.99, corr


@pytest.mark.slow
def test_real_brains_initial_transform_from_ants_affine(brain_pair, capsys, record_property) -> None:
    """``--initial-transform`` with ANTs' affine ends at least as well as the default start, judged by
    the registration's own objective (NCC at the finest level, as the never-worse rule judges a stage).

    The affine stage runs to convergence ([100, 100] iterations). With [40, 20] it stops at the
    iteration cap at both levels from either start, so where it ends depends on where it began:
    over five ANTs affines (ANTsPy's registration differs from run to run even with random_seed=1)
    mean Dice was 0.3797-0.3884 against 0.3818 from the default start. Converged, every start ended
    at the same objective (0.025944 to 6 digits); Dice between such equal-objective ends still differs
    by up to 5e-4 (0.3846-0.3854 against 0.3850), so Dice is recorded, not compared."""
    import json

    from alignkit.solve.config import StageConfig

    CONVERGED_TIE = 20 * StageConfig.tolerance  # 2e-4 relative: the plateau rule's resolution, with margin
    tmp, paths, result = brain_pair
    affine = result["fwdtransforms"][1]
    config = tmp / "affine.json"
    config.write_text(json.dumps({"stages": [{"transform": "affine", "similarity": "ncc", "levels": [4, 2],
                                              "iterations": [100, 100]}]}))
    scores, objectives = {}, {}
    for name, extra in (("default", []), ("initial", ["--initial-transform", affine])):
        out = tmp / f"reg_{name}"
        code, err = _cli(["register", paths["fixed"], paths["moving"], "-o", out, "--config", config, "--fixed-labels",
                          paths["fixed_labels"], "--moving-labels", paths["moving_labels"], "--quiet", "--no-qc", *extra],
                         capsys)
        assert code == 0, err
        metrics = json.loads((out / "metrics.json").read_text())
        scores[name] = metrics["dice_mean"]
        (check,) = metrics["stage_checks"]
        assert check["kept"], check
        objectives[name] = check["objective_end"]
    manifest = json.loads((tmp / "reg_initial" / "transform" / "manifest.json").read_text())
    assert manifest["stages"][0] == "init:file"
    # ANTs' affine alone, as alignkit applies it
    from alignkit.io import read_image

    code, err = _cli(["apply", affine, paths["moving_labels"], "-r", paths["fixed"], "--labels", "-o",
                      tmp / "ants_affine_labels.nii.gz"], capsys)
    assert code == 0, err
    alone = _dice_mean(read_image(paths["fixed_labels"], labels=True).data[0].numpy(),
                       read_image(tmp / "ants_affine_labels.nii.gz", labels=True).data[0].numpy())
    record_property("dice_default_start", scores["default"])
    record_property("dice_ants_affine_start", scores["initial"])
    record_property("dice_ants_affine_alone", alone)
    record_property("objective_default_start", objectives["default"])
    record_property("objective_ants_affine_start", objectives["initial"])
    # not worse by the objective. Both runs stop by the plateau rule (no relative gain of 1e-5 over
    # `patience` iterations), so two converged ends of the same basin can differ by a few times that:
    # CI measured 0.0259442 against 0.0259429 (5e-5 relative). A worse basin costs far more (the
    # iteration-capped runs above ended 1e-3 to 1e-2 apart in Dice).
    assert objectives["initial"] <= objectives["default"] + CONVERGED_TIE * abs(objectives["default"]), objectives
    assert scores["initial"] > alone, (scores, alone)  # the refinement improves on ANTs' affine


@pytest.mark.slow
def test_real_brains_ants_points_match_apply_transforms_to_points(brain_pair, capsys, record_property) -> None:
    """Points in the fixed brain through ANTs' SyN chain: ``alignkit apply --points`` against
    ``ants.apply_transforms_to_points`` (which takes the forward list fixed -> moving), within 0.1 voxel."""
    ants = pytest.importorskip("ants")
    import pandas as pd

    tmp, paths, result = brain_pair
    forward = result["fwdtransforms"]
    world = _brain_points(paths["fixed"])
    frame = pd.DataFrame(world, columns=["x", "y", "z"])
    expected = ants.apply_transforms_to_points(3, frame, forward)[["x", "y", "z"]].to_numpy()
    got = _cli_points(forward, world, tmp, capsys)
    affine_only = _cli_points(forward[1:], world, tmp, capsys)
    error = float(np.abs(got - expected).max())
    record_property("ants_points_max_error_mm", error)
    assert np.abs(expected - affine_only).max() > 1.0  # the warp moves the points
    assert error < 0.1 * 3.0, error


def _greedy_execute(ndim: int, *commands: str) -> None:
    """Run Greedy commands in a process of their own (Greedy's ITK finds no image IO once
    itk-elastix's ITK is loaded), one thread."""
    calls = "; ".join(f"g.execute({c + ' -threads 1'!r})" for c in commands)
    script = f"from picsl_greedy import Greedy{ndim}D; g = Greedy{ndim}D(); {calls}"
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def _write_vtk_points(path: Path, ras: np.ndarray) -> None:
    """A legacy ASCII VTK poly-data file of vertices (Greedy's ``-rs`` reads and writes RAS meshes)."""
    lines = ["# vtk DataFile Version 3.0", "points", "ASCII", "DATASET POLYDATA", f"POINTS {len(ras)} double"]
    lines += [" ".join(repr(float(v)) for v in p) for p in ras]
    lines += [f"VERTICES {len(ras)} {2 * len(ras)}"] + [f"1 {i}" for i in range(len(ras))]
    path.write_text("\n".join(lines) + "\n")


def _read_vtk_points(path: Path) -> np.ndarray:
    words = path.read_text().split("POINTS", 1)[1].split()
    count = int(words[0])
    return np.array([float(v) for v in words[2:2 + 3 * count]]).reshape(count, 3)


@pytest.mark.slow
def test_real_brains_greedy_files_through_alignkit_apply(brain_images, capsys, record_property) -> None:
    """PICSL Greedy's affine (RAS matrix) and deformable warp of the real pair, applied by
    ``alignkit apply warp greedy:affine`` against Greedy's own ``-rf/-rm`` reslicing (linear for the
    image, NN for the labels) and its ``-rs`` mesh warping for points (vertices fixed -> moving, RAS)."""
    pytest.importorskip("picsl_greedy")
    from alignkit.io import read_image

    tmp, paths = brain_images
    tmp = tmp / "greedy"
    tmp.mkdir(exist_ok=True)
    fixed, moving, labels = paths["fixed"], paths["moving"], paths["moving_labels"]
    affine, warp = tmp / "affine.mat", tmp / "warp.nii.gz"
    world = _brain_points(fixed)
    _write_vtk_points(tmp / "points.vtk", world * np.array([-1.0, -1.0, 1.0]))  # LPS -> RAS
    _greedy_execute(
        3,
        f"-d 3 -a -i {fixed} {moving} -o {affine} -ia-image-centers -dof 12 -n 30x20x10 -m NCC 2x2x2",
        f"-d 3 -i {fixed} {moving} -it {affine} -o {warp} -n 30x20x10 -m NCC 2x2x2 -s 2vox 1vox",
        f"-d 3 -rf {fixed} -rm {moving} {tmp / 'greedy_warped.nii.gz'} -ri NN -rm {labels} {tmp / 'greedy_labels.nii.gz'}"
        f" -rs {tmp / 'points.vtk'} {tmp / 'greedy_points.vtk'} -r {warp} {affine}",
    )
    chain = [warp, f"greedy:{affine}"]
    expected = read_image(tmp / "greedy_warped.nii.gz").data[0].numpy()
    expected_labels = read_image(tmp / "greedy_labels.nii.gz", labels=True).data[0].numpy()
    corr, dice = _check_against_peer(tmp, paths, chain, expected, expected_labels, capsys)
    record_property("greedy_correlation_in_brain", corr)
    record_property("greedy_label_dice", dice)
    assert corr > 0.99, corr
    assert dice > 0.98, dice

    expected_points = _read_vtk_points(tmp / "greedy_points.vtk") * np.array([-1.0, -1.0, 1.0])  # RAS -> LPS
    got = _cli_points(chain, world, tmp, capsys)
    error = float(np.abs(got - expected_points).max())
    record_property("greedy_points_max_error_mm", error)
    assert np.abs(_cli_points(chain[1:], world, tmp, capsys) - expected_points).max() > 1.0  # the warp matters
    assert error < 0.1 * 3.0, error


def _transformix(parameters: Path, image: Path, order: int) -> np.ndarray:
    """transformix's resampling of ``image`` (B-spline interpolation of ``order``), as an (x, y, z) array."""
    itk = pytest.importorskip("itk")
    parameter_object = itk.ParameterObject.New()
    parameter_object.ReadParameterFile(str(parameters))  # follows its InitialTransformParameterFileName
    parameter_object.SetParameter(0, "FinalBSplineInterpolationOrder", str(order))
    result = itk.transformix_filter(itk.imread(str(image), itk.F), parameter_object, log_to_console=False)
    return np.asarray(itk.array_from_image(result)).transpose(2, 1, 0)


def _transformix_points(parameters: Path, moving: Path, world: np.ndarray, out: Path) -> np.ndarray:
    """transformix's point mapping (fixed -> moving, ITK physical = LPS) of (N, 3) ``world`` points."""
    import re

    itk = pytest.importorskip("itk")
    out.mkdir(exist_ok=True)
    (out / "inputpoints.txt").write_text(f"point\n{len(world)}\n" + "".join(
        " ".join(repr(float(v)) for v in p) + "\n" for p in world))
    parameter_object = itk.ParameterObject.New()
    parameter_object.ReadParameterFile(str(parameters))
    transformix = itk.TransformixFilter.New(itk.imread(str(moving), itk.F))
    transformix.SetTransformParameterObject(parameter_object)
    transformix.SetFixedPointSetFileName(str(out / "inputpoints.txt"))
    transformix.SetOutputDirectory(str(out))
    transformix.SetLogToConsole(False)
    transformix.Update()
    found = re.findall(r"OutputPoint = \[([^\]]*)\]", (out / "outputpoints.txt").read_text())
    return np.array([[float(v) for v in match.split()] for match in found])


@pytest.mark.slow
def test_real_brains_elastix_files_through_alignkit_apply(brain_images, capsys, record_property) -> None:
    """elastix's affine + B-spline registration of the real pair (TransformParameters.1.txt names
    .0.txt as its initial transform, elastix 5's ``InitialTransformParameterFileName``), applied by
    ``alignkit apply`` against transformix: linear interpolation for the image (alignkit's, as ANTs'
    default; with elastix's default cubic the images differ by interpolation alone), order 0 for the
    labels, and transformix's point mapping."""
    itk = pytest.importorskip("itk")
    if not hasattr(itk, "elastix_registration_method"):
        pytest.skip("itk-elastix is not installed")
    tmp, paths = brain_images
    tmp = tmp / "elastix"
    tmp.mkdir(exist_ok=True)
    parameter_object = itk.ParameterObject.New()
    affine = parameter_object.GetDefaultParameterMap("affine", 2)
    affine["MaximumNumberOfIterations"] = ["64"]
    bspline = parameter_object.GetDefaultParameterMap("bspline", 2, 24.0)
    bspline["MaximumNumberOfIterations"] = ["32"]
    parameter_object.AddParameterMap(affine)
    parameter_object.AddParameterMap(bspline)
    itk.elastix_registration_method(
        itk.imread(str(paths["fixed"]), itk.F), itk.imread(str(paths["moving"]), itk.F),
        parameter_object=parameter_object, output_directory=str(tmp), log_to_console=False, number_of_threads=1,
    )
    parameters = tmp / "TransformParameters.1.txt"
    assert "InitialTransformParameterFileName" in parameters.read_text()
    expected = _transformix(parameters, paths["moving"], 1)
    expected_labels = _transformix(parameters, paths["moving_labels"], 0)
    corr, dice = _check_against_peer(tmp, paths, [parameters], expected, expected_labels, capsys)
    record_property("elastix_correlation_in_brain", corr)
    record_property("elastix_label_dice", dice)
    assert corr > 0.99, corr
    assert dice > 0.98, dice

    world = _brain_points(paths["fixed"])
    expected_points = _transformix_points(parameters, paths["moving"], world, tmp / "points")
    assert expected_points.shape == world.shape
    got = _cli_points([parameters], world, tmp, capsys)
    error = float(np.abs(got - expected_points).max())
    record_property("elastix_points_max_error_mm", error)
    affine_only = _cli_points([tmp / "TransformParameters.0.txt"], world, tmp, capsys)
    assert np.abs(affine_only - expected_points).max() > 1.0  # the B-spline matters
    assert error < 0.1 * 3.0, error
