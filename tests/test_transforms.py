"""Tests of the transform models (alignkit.transforms): identity, conventions, matrices, inverses,
gradients, B-spline evaluation, resampling between grids and the name lookup."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from torch.func import functional_call

from alignkit.errors import ConfigError, ShapeError
from alignkit.image import Image
from alignkit.spatial import Grid, gaussian_blur, sample_world
from alignkit.transforms import (
    Affine,
    BSplineFFD,
    ComposedTransform,
    DisplacementField,
    Homography,
    MatrixTransform,
    Rigid,
    Similarity,
    StationaryVelocityField,
    Translation,
    VectorMomentumSVF,
    build_transform,
    cubic_bspline,
)

ALL_NAMES = [
    "translation",
    "rigid",
    "similarity",
    "affine",
    "homography",
    "displacement",
    "svf",
    "vsvf",
    "bspline",
]
SWAP_2D = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)


def grid_2d() -> Grid:
    """Asymmetric raster-style 2D grid: rows -> world y (spacing 1.5), columns -> world x (1.0)."""
    return Grid.from_spacing((12, 17), (1.5, 1.0), origin=(3.0, -2.0), direction=SWAP_2D)


def grid_3d() -> Grid:
    return Grid.from_spacing((7, 9, 8), (2.0, 0.5, 1.5), origin=(-4.0, 1.0, 10.0))


def smooth_field(grid: Grid, amplitude: float, sigma: float = 2.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    f = gaussian_blur(torch.randn(1, grid.ndim, *grid.shape, generator=gen), sigma)
    return f / f.abs().max() * amplitude


def set_param(t: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    with torch.no_grad():
        getattr(t, name).copy_(value)


# -- identity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_init_is_noop(name: str, ndim: int) -> None:
    grid = grid_2d() if ndim == 2 else grid_3d()
    if name == "homography" and ndim == 3:
        with pytest.raises(ConfigError):
            build_transform(name, grid)
        return
    t = build_transform(name, grid)
    assert all(p.requires_grad for p in t.parameters())
    pts = grid.world_points()
    assert torch.allclose(t.transform_points(pts), pts, atol=1e-5)
    scattered = torch.randn(2, ndim, 11) * 5 + grid.center_world().float().view(1, ndim, 1)
    assert torch.allclose(t.transform_points(scattered), scattered, atol=1e-5)


# -- convention: integer translations ----------------------------------------------------------
def test_translation_warp_2d_raster_shifts_columns() -> None:
    grid = grid_2d()
    data = torch.arange(grid.numel, dtype=torch.float32).reshape(1, *grid.shape)
    moving = Image(data, grid)
    t = Translation(2, length_scale=3.0)
    # world x is the column axis (spacing 1.0), world y the row axis (spacing 1.5)
    set_param(t, "translation", torch.tensor([2.0 * 1.0, -1.0 * 1.5]) / 3.0)
    warped = t.warp(moving, grid)[0, 0]
    # warped(r, c) = moving(r - 1, c + 2) wherever that voxel exists
    assert torch.allclose(warped[1:, :-2], data[0, :-1, 2:], atol=1e-4)
    assert torch.all(warped[0] == 0) and torch.all(warped[:, -2:] == 0)


def test_translation_warp_3d_anisotropic() -> None:
    grid = grid_3d()
    data = torch.rand(1, *grid.shape)
    moving = Image(data, grid)
    shift_vox = torch.tensor([2.0, 0.0, -1.0])
    t = Translation(3, center=grid.center_world(), length_scale=5.0)
    set_param(t, "translation", shift_vox * grid.spacing.float() / 5.0)
    warped = t.warp(moving, grid)[0, 0]
    assert torch.allclose(warped[:-2, :, 1:], data[0, 2:, :, :-1], atol=1e-5)
    # the same through spatial.sample_world with the transform's map
    again = sample_world(data.unsqueeze(0), grid, t.map_on(grid))[0, 0]
    assert torch.allclose(again, warped)


# -- matrices ----------------------------------------------------------------------------------
def centred(a: np.ndarray, t: np.ndarray, c: np.ndarray, p: np.ndarray | None = None) -> np.ndarray:
    n = len(c)
    m0 = np.eye(n + 1)
    m0[:n, :n] = a
    m0[:n, n] = t
    if p is not None:
        m0[n, :n] = p
    tc, tmc = np.eye(n + 1), np.eye(n + 1)
    tc[:n, n], tmc[:n, n] = c, -c
    return tc @ m0 @ tmc


def test_rigid_2d_matrix() -> None:
    c = np.array([3.0, -1.0])
    t = Rigid(2, center=c, length_scale=4.0)
    theta = 0.3
    set_param(t, "rotation", torch.tensor([theta]))
    set_param(t, "translation", torch.tensor([0.5, -0.25]))
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    expected = centred(rot, np.array([2.0, -1.0]), c)
    assert np.allclose(t.matrix().detach().double().numpy(), expected, atol=1e-6)
    # the centre goes exactly to centre + translation
    y = t.transform_points(torch.tensor(c, dtype=torch.float32).view(1, 2, 1))
    assert torch.allclose(y[0, :, 0], torch.tensor([5.0, -2.0]), atol=1e-5)


def test_rigid_similarity_3d_match_scipy_rotvec() -> None:
    c = np.array([1.0, 2.0, -3.0])
    omega = np.array([0.2, -0.1, 0.35])
    t = Similarity(3, center=c, length_scale=10.0)
    set_param(t, "rotation", torch.tensor(omega, dtype=torch.float32))
    set_param(t, "log_scale", torch.tensor([math.log(1.2)]))
    set_param(t, "translation", torch.tensor([0.1, 0.0, -0.2]))
    a = 1.2 * Rotation.from_rotvec(omega).as_matrix()
    expected = centred(a, np.array([1.0, 0.0, -2.0]), c)
    assert np.allclose(t.matrix().detach().double().numpy(), expected, atol=1e-4)
    r = Rigid(3)
    set_param(r, "rotation", torch.tensor(omega, dtype=torch.float32))
    assert np.allclose(
        r.matrix().detach().numpy()[:3, :3], Rotation.from_rotvec(omega).as_matrix(), atol=1e-4
    )


def test_affine_and_homography_matrices() -> None:
    c = np.array([4.0, 2.0])
    lin = np.array([[0.1, -0.2], [0.05, 0.3]])
    aff = Affine(2, center=c, length_scale=2.0)
    set_param(aff, "linear", torch.tensor(lin, dtype=torch.float32))
    set_param(aff, "translation", torch.tensor([1.0, -0.5]))
    expected = centred(np.eye(2) + lin, np.array([2.0, -1.0]), c)
    assert np.allclose(aff.matrix().detach().double().numpy(), expected, atol=1e-6)

    hom = Homography(2, center=c, length_scale=2.0)
    set_param(hom, "linear", torch.tensor(lin, dtype=torch.float32))
    set_param(hom, "translation", torch.tensor([1.0, -0.5]))
    set_param(hom, "perspective_param", torch.tensor([0.02, -0.04]))
    h = centred(np.eye(2) + lin, np.array([2.0, -1.0]), c, p=np.array([0.01, -0.02]))
    h = h / h[2, 2]
    assert np.allclose(hom.matrix().detach().double().numpy(), h, atol=1e-6)
    pts = torch.tensor([[0.0, 5.0, -3.0], [1.0, 2.0, 7.0]]).unsqueeze(0)
    ph = np.vstack([pts[0].numpy(), np.ones(3)])
    proj = h @ ph
    assert np.allclose(hom.transform_points(pts)[0].detach().numpy(), proj[:2] / proj[2], atol=1e-5)
    with pytest.raises(ConfigError):
        Homography(3)


def test_homography_perspective_has_gradient_at_identity() -> None:
    hom = Homography(2, length_scale=10.0)
    pts = torch.tensor([[1.0, 5.0, -3.0], [1.0, 2.0, 7.0]]).unsqueeze(0)
    hom.transform_points(pts).sum().backward()
    assert hom.perspective_param.grad is not None and hom.perspective_param.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [Translation, Rigid, Similarity, Affine, Homography])
def test_from_matrix_round_trip(cls: type) -> None:
    ndims = [2] if cls is Homography else [2, 3]
    for ndim in ndims:
        source = cls(ndim, center=torch.arange(ndim, dtype=torch.float32), length_scale=3.0)
        gen = torch.Generator().manual_seed(ndim)
        with torch.no_grad():
            for p in source.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        m = source.matrix().detach()
        rebuilt = cls.from_matrix(m, center=torch.ones(ndim) * 2, length_scale=7.0)
        assert torch.allclose(rebuilt.matrix().detach(), m, atol=1e-5)


def test_translation_rejects_projective_matrix() -> None:
    m = torch.eye(3)
    m[2, 0] = 0.1
    with pytest.raises(ConfigError):
        Affine.from_matrix(m)


# -- inverses ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Affine, Homography])
def test_linear_compose_inverse_is_identity(cls: type) -> None:
    t = cls(2, center=[3.0, 4.0], length_scale=5.0)
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    pts = torch.randn(1, 2, 50) * 5
    y = ComposedTransform([t, t.inverse()]).transform_points(pts)
    assert torch.allclose(y, pts, atol=1e-4)
    inv = t.inverse()
    assert inv.inverse() is t
    # live: changing t afterwards keeps inv correct
    with torch.no_grad():
        t.translation.add_(0.3)
    assert torch.allclose(inv.transform_points(t.transform_points(pts)), pts, atol=1e-4)
    frozen = MatrixTransform(inv.matrix().detach())
    assert torch.allclose(frozen.transform_points(t.transform_points(pts)), pts, atol=1e-4)
    assert torch.allclose(frozen.inverse().transform_points(pts), t.transform_points(pts), atol=1e-4)


def test_affine_3d_compose_inverse_is_identity() -> None:
    t = Affine(3, center=[1.0, 2.0, 3.0], length_scale=4.0)
    set_param(t, "linear", 0.1 * torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))
    set_param(t, "translation", torch.tensor([0.2, -0.1, 0.3]))
    pts = torch.randn(2, 3, 4, 5) * 10
    assert torch.allclose(ComposedTransform([t.inverse(), t]).transform_points(pts), pts, atol=1e-4)


def _interior(x: torch.Tensor, margin: int) -> torch.Tensor:
    ndim = x.dim() - 2
    return x[(slice(None), slice(None)) + (slice(margin, -margin),) * ndim]


@pytest.mark.parametrize(
    "cls,param,amp", [(StationaryVelocityField, "velocity", 3.0), (VectorMomentumSVF, "momentum", 5.0)]
)
def test_velocity_models_compose_inverse_is_identity(cls: type, param: str, amp: float) -> None:
    grid = Grid.from_spacing((40, 48), (1.5, 1.0), origin=(3.0, -2.0))
    t = cls(grid)
    set_param(t, param, smooth_field(grid, amp, sigma=4.0))
    pts = grid.world_points()
    disp = t.transform_points(pts) - pts
    assert disp.abs().max() > 1.0  # a real deformation, not a near-identity
    err = ComposedTransform([t, t.inverse()]).transform_points(pts) - pts
    assert _interior(err, 5).abs().max() < 0.01 * disp.abs().max()
    err2 = ComposedTransform([t.inverse(), t]).transform_points(pts) - pts
    assert _interior(err2, 5).abs().max() < 0.01 * disp.abs().max()


def test_svf_inverse_is_live_view() -> None:
    grid = Grid.from_spacing((20, 24), 1.0)
    svf = StationaryVelocityField(grid)
    inv = svf.inverse()
    assert inv.inverse() is svf
    set_param(svf, "velocity", smooth_field(grid, 2.0, sigma=4.0))
    pts = grid.world_points()
    scale = (svf.transform_points(pts) - pts).abs().max()
    err = inv.transform_points(svf.transform_points(pts)) - pts
    assert _interior(err, 4).abs().max() < 0.01 * scale
    # replacing the parameter object is also followed; a deep copy freezes the inverse
    frozen = copy.deepcopy(svf).inverse()
    svf.velocity = torch.nn.Parameter(smooth_field(grid, 2.0, sigma=4.0, seed=5))
    err = inv.transform_points(svf.transform_points(pts)) - pts
    assert _interior(err, 4).abs().max() < 0.01 * scale
    assert not torch.allclose(frozen.displacement(), inv.displacement())
    # gradients flow to the source's parameter
    inv.displacement().sum().backward()
    assert svf.velocity.grad is not None


def test_svf_constant_velocity_is_translation() -> None:
    grid = grid_3d()
    svf = StationaryVelocityField(grid, steps=5)
    v = torch.tensor([0.7, -0.3, 1.1])
    set_param(svf, "velocity", v.view(1, 3, 1, 1, 1).expand(1, 3, *grid.shape))
    assert torch.allclose(svf.displacement(), v.view(1, 3, 1, 1, 1).expand(1, 3, *grid.shape), atol=1e-5)
    assert torch.allclose(svf.inverse().displacement(), -svf.displacement(), atol=1e-5)


def test_vsvf_constant_momentum_energy_and_advection() -> None:
    grid = grid_2d()
    t = VectorMomentumSVF(grid, time_steps=4)
    c = torch.tensor([0.5, -2.0])
    set_param(t, "momentum", c.view(1, 2, 1, 1).expand(1, 2, *grid.shape))
    # normalised Gaussians with weights summing to 1 leave a constant unchanged
    assert math.isclose(sum(t.weights), 1.0, abs_tol=1e-9)
    assert torch.allclose(t.velocity_field(), t.momentum, atol=1e-5)
    assert torch.allclose(t.energy(), (c**2).sum(), rtol=1e-5)
    # phi^-1 of a constant velocity moves every point by -v (Shen et al. 2019, eq. 8)
    assert torch.allclose(t.displacement(), -t.momentum, atol=1e-5)
    set_param(t, "momentum", smooth_field(grid, 1.0))
    assert t.energy() > 0


def test_vsvf_sigmas_in_world_units() -> None:
    grid = Grid.from_spacing((10, 20), (2.0, 0.5))
    t = VectorMomentumSVF(grid, sigmas=[1.0], weights=[1.0], sigma_unit="world")
    assert t.kernel_sigmas_voxels() == [[0.5, 2.0]]
    f = VectorMomentumSVF(grid)
    assert f.kernel_sigmas_voxels()[0] == pytest.approx([0.05 * 9, 0.05 * 19])
    with pytest.raises(ConfigError):
        VectorMomentumSVF(grid, sigmas=[1.0, 2.0], weights=[1.0])


# -- gradients ---------------------------------------------------------------------------------
def _gradcheck_params(t: torch.nn.Module, points: torch.Tensor) -> None:
    t = t.double()
    names = [n for n, _ in t.named_parameters()]
    gen = torch.Generator().manual_seed(7)
    values = tuple(
        (0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)).requires_grad_()
        for _, p in t.named_parameters()
    )

    def fn(*params: torch.Tensor) -> torch.Tensor:
        return functional_call(t, dict(zip(names, params)), (points,))

    assert torch.autograd.gradcheck(fn, values, eps=1e-6, atol=1e-5)


def test_gradcheck_affine() -> None:
    pts = torch.randn(1, 3, 6, dtype=torch.float64) * 3
    _gradcheck_params(Affine(3, center=[1.0, 0.0, -1.0], length_scale=2.0), pts)
    _gradcheck_params(
        Homography(2, center=[1.0, 2.0], length_scale=3.0), torch.randn(1, 2, 6, dtype=torch.float64)
    )


def test_gradcheck_svf() -> None:
    grid = Grid.from_spacing((5, 6), (1.0, 0.8))
    # grid points nudged off the voxel centres so linear interpolation is differentiable there
    pts = grid.world_points(dtype=torch.float64) + 0.13
    _gradcheck_params(StationaryVelocityField(grid, steps=3), pts)


def test_gradcheck_bspline() -> None:
    grid = Grid.from_spacing((7, 6), (1.0, 2.0))
    pts = grid.world_points(dtype=torch.float64) + 0.11
    _gradcheck_params(BSplineFFD(grid, control_spacing=3), pts)


# -- B-spline ----------------------------------------------------------------------------------
def test_bspline_constant_coefficients_give_constant_field() -> None:
    grid = grid_3d()
    t = BSplineFFD(grid, control_spacing=(3, 4, 2.5))
    c = torch.tensor([1.5, -0.5, 2.0])
    set_param(t, "coefficients", c.view(1, 3, 1, 1, 1).expand_as(t.coefficients))
    assert torch.allclose(t.displacement(), c.view(1, 3, 1, 1, 1).expand(1, 3, *grid.shape), atol=1e-5)


def test_bspline_matches_direct_sum() -> None:
    grid = Grid.from_spacing((9, 11), (1.0, 0.5))
    t = BSplineFFD(grid, control_spacing=(4, 3))
    set_param(
        t, "coefficients", torch.randn(t.coefficients.shape, generator=torch.Generator().manual_seed(0))
    )
    coef = t.coefficients.detach()
    expected = torch.zeros(1, 2, *grid.shape)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            for k in range(coef.shape[2]):
                for m in range(coef.shape[3]):
                    w = cubic_bspline(torch.tensor(i / 4 + 1 - k)) * cubic_bspline(
                        torch.tensor(j / 3 + 1 - m)
                    )
                    expected[0, :, i, j] += w * coef[0, :, k, m]
    assert torch.allclose(t.displacement(), expected, atol=1e-5)


def test_bspline_rejects_bad_spacing() -> None:
    with pytest.raises(ConfigError):
        BSplineFFD(grid_2d(), control_spacing=0)
    with pytest.raises(ConfigError):
        BSplineFFD(grid_2d(), control_spacing=(2, 3, 4))


# -- resampling between grids ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["displacement", "svf", "vsvf", "bspline"])
def test_resampled_keeps_the_map(name: str) -> None:
    coarse = Grid.from_spacing((11, 13), (2.0, 1.0), origin=(1.0, 2.0))
    fine = coarse.resized((21, 25))
    t = build_transform(name, coarse)
    param = next(iter(t.parameters()))
    amp = {"displacement": 2.0, "svf": 1.5, "vsvf": 3.0, "bspline": 2.0}[name]
    with torch.no_grad():
        param.copy_(smooth_field(Grid(param.shape[2:], torch.eye(3, dtype=torch.float64)), amp, sigma=2.0))
    moved = t.resampled(fine)
    assert type(moved) is type(t) and moved.grid is fine
    pts = coarse.world_points()  # coarse voxel centres are also fine voxel centres
    a, b = t.transform_points(pts), moved.transform_points(pts)
    disp = (a - pts).abs().max()
    assert disp > 0.5
    tol = {"displacement": 1e-5, "bspline": 1e-5, "svf": 0.05, "vsvf": 0.05}[name]
    assert (a - b).abs().max() < tol * disp
    # a grid with another field of view: the field is sampled in world space (translated grid)
    shifted = Grid.from_spacing((11, 13), (2.0, 1.0), origin=(3.0, 2.0))
    if name in ("displacement", "bspline"):
        other = t.resampled(shifted)
        inner = shifted.world_points()[..., :-1, :]  # points inside both grids
        assert torch.allclose(other.transform_points(inner), t.transform_points(inner), atol=1e-4)


# -- build_transform ---------------------------------------------------------------------------
def test_build_transform_defaults_and_errors() -> None:
    grid = grid_3d()
    t = build_transform("affine", grid)
    assert isinstance(t, Affine)
    assert torch.allclose(t.center.double(), grid.center_world(), atol=1e-5)
    assert t.length_scale == pytest.approx(0.5 * float(grid.extent().mean()))
    assert isinstance(build_transform("bspline", grid, control_spacing=4), BSplineFFD)
    assert isinstance(build_transform("displacement", grid), DisplacementField)
    with pytest.raises(ConfigError, match="translation.*bspline"):
        build_transform("elastic", grid)
    with pytest.raises(ConfigError):
        build_transform("homography", grid)
    with pytest.raises(ConfigError, match="steps"):
        build_transform("svf", grid, stepz=3)
    with pytest.raises(ConfigError):
        build_transform("svf", grid, length_scale=2.0)


def test_bad_point_shapes_raise() -> None:
    with pytest.raises(ShapeError):
        Affine(2).transform_points(torch.zeros(1, 3, 5))
    with pytest.raises(ShapeError):
        Rigid(3, center=[0.0, 0.0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to check device placement")
@pytest.mark.parametrize("name", ALL_NAMES)
def test_models_follow_the_device_of_their_parameters(name: str) -> None:
    grid = grid_2d()
    t = build_transform(name, grid).to("cuda")
    pts = grid.world_points(device="cuda")
    out = t.transform_points(pts)
    assert out.device.type == "cuda" and torch.allclose(out, pts, atol=1e-5)
    if name in ("affine", "svf", "vsvf"):
        assert t.inverse().transform_points(pts).device.type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to check device placement")
def test_composed_matrix_of_stages_on_two_devices() -> None:
    # a chain fitted on a GPU after a stage made on the CPU (the brain preset's affine then field)
    cpu_stage = MatrixTransform(torch.eye(4, dtype=torch.float64) * 2.0)
    gpu_stage = Affine(3).to("cuda")
    matrix = ComposedTransform([gpu_stage, cpu_stage]).matrix()
    assert matrix.device.type == "cuda" and torch.allclose(matrix.cpu(), cpu_stage.matrix())
