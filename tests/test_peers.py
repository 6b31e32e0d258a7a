"""Peer adapters (alignkit.evaluate.peers): each reproduces a known transform on a small case.

Cases are built so that the ground truth is exact and in alignkit's frame (fixed -> moving world):

* 3D: an analytic phantom (a sum of Gaussian blobs evaluated at world points) on a fixed grid with
  permuted and flipped axes, anisotropic spacing and an origin, and a moving grid of another shape,
  spacing and origin; the moving image is the phantom at ``M^-1(y)``, so ``M`` is the truth and
  the blob centres are landmarks (TRE). Any slip in an adapter's frame conversion (axis order,
  LPS/RAS, ITK vs numpy layout, direction) shows up as a TRE of millimetres.
* 2D: real images (the ANTs brain slice, skimage's camera) resampled through a known affine,
  homography or smooth deformation (dense ground-truth flow; EPE over the image content).

Every test asserts that the error is small in absolute terms *and* a small fraction of the error
before registration. Tests skip with the reason when the tool is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignkit.data.case import Case
from alignkit.evaluate.method import Method, MethodUnavailable
from alignkit.evaluate.peers import PEERS
from alignkit.evaluate.peers._common import apply_homogeneous, itk_layout, world_from_pixel, world_points
from alignkit.evaluate.scoring import score_case
from alignkit.image import Image
from alignkit.spatial import Grid, sample_world, world_to_voxel_vectors

THREADS = 2
CROP = 32  # 2D matrix cases are cut from the centre of a larger image (see matrix_case_2d)


def _method(name: str, **options) -> Method:
    method = PEERS[name](**options)
    try:
        method.check_available()
    except MethodUnavailable as exc:
        pytest.skip(f"{name}: {exc}")
    return method


# ------------------------------------------------------------------------------------------------
# case builders
# ------------------------------------------------------------------------------------------------
def _rotation3(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _blobs(world: np.ndarray, centres: np.ndarray, sigmas: np.ndarray, amps: np.ndarray) -> np.ndarray:
    out = np.zeros(world.shape[1:])
    for c, s, a in zip(centres, sigmas, amps):
        out += a * np.exp(-sum((world[i] - c[i]) ** 2 for i in range(3)) / (2 * s * s))
    return out


def phantom_case_3d(seed: int = 0) -> Case:
    """Analytic 3D phantom; fixed and moving on different, non-trivial grids; truth = rigid ``M``."""
    # array axis 0 -> world +z, axis 1 -> world -x, axis 2 -> world -y (a permuted, flipped grid)
    direction = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    fixed_grid = Grid.from_spacing((36, 40, 44), (1.5, 1.2, 1.0), origin=(30.0, 20.0, -10.0), direction=direction)
    moving_grid = Grid.from_spacing((44, 40, 36), (1.0, 1.2, 1.5), origin=(-18.0, -28.0, -12.0))
    centre = fixed_grid.center_world().numpy()
    matrix = np.eye(4)
    rot = _rotation3(0.05, -0.04, 0.08)
    matrix[:3, :3] = rot
    matrix[:3, 3] = centre - rot @ centre + np.array([2.0, -1.5, 1.0])

    rng = np.random.default_rng(seed)
    x = world_points(fixed_grid)
    lo, hi = x.reshape(3, -1).min(1), x.reshape(3, -1).max(1)
    centres = lo + (hi - lo) * rng.uniform(0.25, 0.75, (14, 3))
    sigmas = (hi - lo).min() * rng.uniform(0.05, 0.12, 14)
    amps = rng.uniform(0.5, 1.0, 14) * rng.choice([1.0, 1.0, 1.0, -0.5], 14)
    fixed = _blobs(x, centres, sigmas, amps)
    moving = _blobs(apply_homogeneous(np.linalg.inv(matrix), world_points(moving_grid)), centres, sigmas, amps)
    return Case(
        "phantom3d",
        Image(torch.as_tensor(fixed, dtype=torch.float32)[None], fixed_grid),
        Image(torch.as_tensor(moving, dtype=torch.float32)[None], moving_grid),
        kind="affine",
        matrix=matrix,
        fixed_points=centres,
        moving_points=apply_homogeneous(matrix, centres.T.copy()).T,
    )


def case_grid(image: Image) -> Grid:
    """The grid of a 2D matrix case cut from ``image``: its central part, ``CROP`` voxels in from each
    side (see :func:`matrix_case_2d`)."""
    shift = torch.eye(3, dtype=torch.float64)
    shift[:2, 2] = CROP
    return Grid(tuple(s - 2 * CROP for s in image.shape), image.grid.world_from_voxel @ shift)


def _sample(image: Image, world: torch.Tensor) -> torch.Tensor:
    """``image`` (bilinear, zeros outside) at world points ``(1, ndim, *S)`` -> ``(C, *S)``."""
    return sample_world(image.batch(dtype=torch.float64), image.grid, world, padding="zeros")[0].float()


def matrix_case_2d(image: Image, matrix: np.ndarray, kind: str) -> Case:
    """Fixed and moving cut from the centre of ``image`` on :func:`case_grid`, with
    ``moving(y) = fixed(M^-1 y)``: ``M`` (world, fixed -> moving) is the truth. Cutting both from a
    larger image gives the moving image real content where a warp of the fixed image alone would
    have a black border (which biases intensity methods such as ECC)."""
    grid = case_grid(image)
    points = grid.world_points(dtype=torch.float64)
    moving = _sample(image, torch.as_tensor(apply_homogeneous(np.linalg.inv(matrix), points[0].numpy()))[None])
    return Case(f"{kind}2d", Image(_sample(image, points), grid), Image(moving, grid), kind=kind, matrix=matrix)


def similarity_2d(grid: Grid, angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """Rotation + scale about the grid centre, then a shift (world units)."""
    c, s = np.cos(angle), np.sin(angle)
    centre = grid.center_world().numpy()
    a = scale * np.array([[c, -s], [s, c]])
    m = np.eye(3)
    m[:2, :2] = a
    m[:2, 2] = centre - a @ centre + np.asarray(shift)
    return m


def homography_2d(grid: Grid, corner_shift: float, seed: int = 0) -> np.ndarray:
    """A homography moving each image corner by up to ``corner_shift`` pixels, as a world matrix."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(seed)
    h, w = grid.shape
    src = np.float32([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]])
    dst = (src + rng.uniform(-corner_shift, corner_shift, src.shape)).astype(np.float32)
    pixel = cv2.getPerspectiveTransform(src, dst).astype(np.float64)
    world = world_from_pixel(grid) @ pixel @ np.linalg.inv(world_from_pixel(grid))
    return world / world[2, 2]


def smooth_case_2d(image: Image, amplitude: float, sigma: float, seed: int = 0, margin: int = 6) -> Case:
    """A smooth random deformation ``y = x + u(x)`` (``u`` up to ``amplitude`` pixels); ``moving`` is
    ``fixed`` at the inverse map (fixed-point iteration). ``valid``: the image content (dilated
    foreground), away from the border where the moving image has no data."""
    from scipy import ndimage

    grid = image.grid
    spacing = float(grid.spacing[0])
    rng = np.random.default_rng(seed)
    u = np.stack([ndimage.gaussian_filter(rng.standard_normal(grid.shape), sigma) for _ in range(2)])
    u = u / np.abs(u).max() * amplitude * spacing  # world units
    displacement = torch.as_tensor(u)[None]
    target = grid.world_points(dtype=torch.float64)
    source = target.clone()
    for _ in range(30):  # x + u(x) = y  =>  x = y - u(x)
        source = target - sample_world(displacement, grid, source, padding="border")
    moving = Image(_sample(image, source), grid)
    f = image.data.float().mean(0).numpy()
    valid = ndimage.binary_dilation(f > 0.1 * f.max(), iterations=3)
    valid[:margin] = valid[-margin:] = False
    valid[:, :margin] = valid[:, -margin:] = False
    flow = world_to_voxel_vectors(displacement, grid)[0].numpy().astype(np.float32)  # alignkit's flow
    return Case("smooth2d", image, moving, kind="deformable", flow=flow, valid=valid)


def epe_before(case: Case) -> float:
    assert case.flow is not None and case.valid is not None
    return float(np.linalg.norm(case.flow, axis=0)[case.valid].mean())


@pytest.fixture(scope="module")
def camera() -> Image:
    """skimage's camera at 256x256 on a raster grid placed so that :func:`case_grid` is exactly the
    192x192 raster grid (world = pixels)."""
    data = pytest.importorskip("skimage.data")
    transform = pytest.importorskip("skimage.transform")
    array = transform.resize(data.camera().astype(np.float32), (256, 256), anti_aliasing=True)
    affine = Grid.raster_2d((256, 256)).world_from_voxel.clone()
    affine[:2, 2] = -CROP
    image = Image(torch.from_numpy(array)[None], Grid((256, 256), affine))
    assert case_grid(image).same_as(Grid.raster_2d((192, 192)))
    return image


@pytest.fixture(scope="module")
def camera_offgrid(camera: Image) -> Image:
    """The same pixels on a non-raster 2D grid (spacing 0.5, an origin): pixel-tool answers must be
    converted through the grid, not taken as world coordinates."""
    affine = camera.grid.world_from_voxel.clone()
    affine[:2, :2] *= 0.5
    affine[:2, 2] = torch.tensor([-20.0, 7.5], dtype=torch.float64)
    return Image(camera.data, Grid(camera.shape, affine))


@pytest.fixture(scope="module")
def phantom() -> Case:
    return phantom_case_3d()


def _assert_tre(case: Case, method: Method, limit: float, ratio: float = 0.25) -> dict:
    prediction = method.register(case, seed=0, threads=THREADS)
    scores = score_case(case, prediction)
    assert prediction.seconds > 0
    assert scores["tre_before"] > 2.5
    assert scores["tre_mean"] < limit and scores["tre_mean"] < ratio * scores["tre_before"], scores
    return scores


def _assert_epe(case: Case, method: Method, limit: float, ratio: float = 0.5, folds: bool = False) -> dict:
    """EPE over ``case.valid``; with ``folds=False`` the map must also have no non-positive Jacobian
    (optical flow is no diffeomorphism and may fold)."""
    prediction = method.register(case, seed=0, threads=THREADS)
    scores = score_case(case, prediction)
    before = epe_before(case)
    assert before > 1.0
    assert scores["epe"] < limit and scores["epe"] < ratio * before, (scores, before)
    if not folds:
        assert scores["folds"] == 0, scores
    return scores


def _assert_corners(case: Case, method: Method, limit: float, ratio: float = 0.1) -> dict:
    prediction = method.register(case, seed=0, threads=THREADS)
    scores = score_case(case, prediction)
    assert scores["corner_error_before"] > 2.0
    assert scores["corner_error"] < limit and scores["corner_error"] < ratio * scores["corner_error_before"], scores
    return scores


# ------------------------------------------------------------------------------------------------
# registry and frames (no registration)
# ------------------------------------------------------------------------------------------------
EXPECTED = {
    "ants:syn", "ants:synquick", "ants:affine", "ants:syncc", "greedy:affine", "greedy:deformable", "convexadam",
    "dipy:syn", "dipy:affine", "sitk:demons", "elastix:bspline",
    "elastix:affine", "fireants:greedy", "opencv:farneback", "opencv:dis", "opencv:sift-ransac", "opencv:ecc",
    "opencv:sift-magsac", "opencv:tvl1", "kornia:registrator", "kornia:sift-ransac",
}


def test_registry_names_factories_and_availability():
    assert set(PEERS) == EXPECTED
    for name, factory in PEERS.items():
        method = factory()
        assert isinstance(method, Method) and method.name == name
        try:
            method.check_available()
        except MethodUnavailable as exc:
            assert "not installed" in str(exc) or "no SIFT" in str(exc) or "contrib" in str(exc)


def test_unknown_options_are_refused():
    for name in ("dipy:syn", "sitk:demons", "fireants:greedy", "opencv:ecc", "opencv:farneback", "opencv:tvl1",
                 "opencv:sift-magsac", "kornia:registrator"):
        with pytest.raises(ValueError, match="unknown options"):
            PEERS[name](not_an_option=1)


def test_missing_package_is_method_unavailable(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ants" else real(name, *a))
    with pytest.raises(MethodUnavailable, match="antspyx not installed"):
        PEERS["ants:syn"]().check_available()


def test_pixel_methods_refuse_3d_and_mismatched_sizes(phantom, camera):
    assert PEERS["opencv:farneback"]().applicable(phantom) is not None
    small = Image.from_array(camera.data[0, :100, :120])
    case = Case("c", camera, small, kind="flow")
    assert "one size" in (PEERS["opencv:dis"]().applicable(case) or "")
    assert "one size" in (PEERS["kornia:registrator"]().applicable(Case("c", camera, small, kind="homography")) or "")
    assert PEERS["opencv:sift-ransac"]().applicable(Case("c", camera, small, kind="homography")) is None


def test_itk_layout_places_voxels_where_alignkit_does(phantom, camera):
    """SimpleITK (and ANTsPy) images built by the adapters put every voxel at alignkit's world point."""
    sitk = pytest.importorskip("SimpleITK")
    from alignkit.evaluate.peers._common import sitk_image

    for image in (phantom.fixed, phantom.moving, camera):
        layout = itk_layout(image.grid)
        img = sitk_image(image, layout)
        world = world_points(image.grid)
        array = image.data[0].numpy()
        rng = np.random.default_rng(0)
        for _ in range(5):
            voxel = tuple(int(rng.integers(0, s)) for s in image.shape)
            index = [voxel[a] for a in layout.perm]  # ITK index axis d is alignkit array axis perm[d]
            point = img.TransformIndexToPhysicalPoint(index)
            np.testing.assert_allclose(point, world[(slice(None), *voxel)], atol=1e-9)
            assert img.GetPixel(index) == pytest.approx(float(array[voxel]))
        # the layout keeps ITK's direction close to the identity (a raster becomes x = column)
        assert np.all(np.abs(np.diag(layout.direction)) > 0.99)
        back = layout.from_sitk_order(sitk.GetArrayFromImage(img))
        np.testing.assert_array_equal(back, array.astype(np.float32))
    try:
        import ants
    except ImportError:
        return
    from alignkit.evaluate.peers.ants import ants_image

    layout = itk_layout(phantom.fixed.grid)
    img = ants_image(phantom.fixed, layout)
    voxel = (3, 17, 29)
    index = [voxel[a] for a in layout.perm]
    point = ants.transform_index_to_physical_point(img, index)
    np.testing.assert_allclose(point, world_points(phantom.fixed.grid)[(slice(None), *voxel)], atol=1e-4)


# ------------------------------------------------------------------------------------------------
# ITK family and dipy: 3D phantom (frames) and 2D deformation
# ------------------------------------------------------------------------------------------------
def test_ants_affine_3d(phantom):
    scores = _assert_tre(phantom, _method("ants:affine"), limit=0.6)
    assert scores["folds"] == 0


def test_ants_syn_2d_deformation(brain_slice):
    _assert_epe(smooth_case_2d(brain_slice, amplitude=4.0, sigma=10.0), _method("ants:syn"), limit=0.6)


def test_ants_synquick_3d(phantom):
    _assert_tre(phantom, _method("ants:synquick"), limit=0.5)


def test_dipy_affine_3d(phantom):
    _assert_tre(phantom, _method("dipy:affine", level_iters=[50, 25, 10]), limit=0.6)


def test_dipy_syn_3d(phantom):
    """The SyN map goes through dipy's RAS frame and back (the affine-only test checks the matrix path)."""
    _assert_tre(phantom, _method("dipy:syn", level_iters=[50, 25, 10], syn_level_iters=[10, 5, 0]), limit=0.5)


def test_dipy_syn_2d_deformation(brain_slice):
    _assert_epe(smooth_case_2d(brain_slice, amplitude=4.0, sigma=10.0), _method("dipy:syn"), limit=0.6)


def test_dipy_affine_2d_similarity(brain_slice):
    case = matrix_case_2d(brain_slice, similarity_2d(case_grid(brain_slice), 0.1, 1.05, (6.0, -4.0)), "affine")
    _assert_corners(case, _method("dipy:affine"), limit=2.0)


def test_sitk_demons_3d(phantom):
    _assert_tre(phantom, _method("sitk:demons"), limit=0.5)


def test_sitk_demons_2d_deformation(brain_slice):
    _assert_epe(smooth_case_2d(brain_slice, amplitude=4.0, sigma=10.0), _method("sitk:demons"), limit=0.8, ratio=0.6)


def test_elastix_affine_3d(phantom):
    _assert_tre(phantom, _method("elastix:affine"), limit=0.6)


def test_elastix_bspline_2d_deformation(brain_slice):
    case = smooth_case_2d(brain_slice, amplitude=4.0, sigma=10.0)
    _assert_epe(case, _method("elastix:bspline", MaximumNumberOfIterations=128), limit=0.8, ratio=0.6)


@pytest.mark.slow
def test_elastix_bspline_3d(phantom):
    method = _method("elastix:bspline", MaximumNumberOfIterations=64, NumberOfSpatialSamples=1024)
    _assert_tre(phantom, method, limit=1.0, ratio=0.4)


def test_fireants_greedy_2d_deformation(brain_slice):
    method = _method("fireants:greedy", scales=[2, 1], iterations=[40, 20], affine_iterations=[30, 15])
    _assert_epe(smooth_case_2d(brain_slice, amplitude=4.0, sigma=10.0), method, limit=0.8, ratio=0.6)


@pytest.mark.slow
def test_fireants_greedy_3d(phantom):
    method = _method("fireants:greedy", scales=[2, 1], iterations=[60, 30], affine_iterations=[60, 30])
    _assert_tre(phantom, method, limit=0.5)


# ------------------------------------------------------------------------------------------------
# pixel tools: OpenCV and kornia, 2D
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["opencv:farneback", "opencv:dis", "opencv:tvl1"])
def test_opencv_dense_flow(camera, name):
    case = smooth_case_2d(camera, amplitude=5.0, sigma=20.0, margin=12)
    case.kind = "flow"
    _assert_epe(case, _method(name), limit=0.8, ratio=0.5, folds=True)


@pytest.mark.parametrize("name", ["opencv:sift-ransac", "opencv:sift-magsac"])
@pytest.mark.parametrize("grid", ["raster", "offgrid"])
def test_opencv_sift_ransac_homography_and_affine(camera, camera_offgrid, grid, name):
    image = camera if grid == "raster" else camera_offgrid
    method = _method(name)
    homography = matrix_case_2d(image, homography_2d(case_grid(image), 12.0), "homography")
    _assert_corners(homography, method, limit=1.0 if grid == "raster" else 0.5)
    affine = matrix_case_2d(image, similarity_2d(case_grid(image), 0.15, 1.1, (6.0, -4.0)), "affine")
    prediction = method.register(affine, seed=0, threads=THREADS)
    assert np.allclose(prediction.matrix[2], [0.0, 0.0, 1.0])  # an affine model for an affine case
    scores = score_case(affine, prediction)
    assert scores["corner_error"] < 0.1 * scores["corner_error_before"]


def test_opencv_ecc_homography_and_affine(camera, camera_offgrid):
    method = _method("opencv:ecc")
    _assert_corners(matrix_case_2d(camera, homography_2d(case_grid(camera), 8.0), "homography"), method, limit=1.0)
    grid = case_grid(camera_offgrid)
    affine = matrix_case_2d(camera_offgrid, similarity_2d(grid, 0.08, 1.05, (3.0, -2.0)), "affine")
    _assert_corners(affine, method, limit=0.5)


def test_kornia_registrator_homography(camera):
    case = matrix_case_2d(camera, homography_2d(case_grid(camera), 8.0), "homography")
    _assert_corners(case, _method("kornia:registrator"), limit=1.5)


def test_kornia_sift_ransac_homography(camera_offgrid):
    case = matrix_case_2d(camera_offgrid, homography_2d(case_grid(camera_offgrid), 12.0), "homography")
    _assert_corners(case, _method("kornia:sift-ransac", num_features=1000), limit=0.5)
