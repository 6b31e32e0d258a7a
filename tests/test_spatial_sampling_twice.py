"""The twice-differentiable linear sampler (alignkit.spatial.linear_sampling) against grid_sample, and the
implicit gradient of the solver layer that uses it (CUDA's grid_sampler_3d_backward has no derivative)."""

from __future__ import annotations

import pytest
import torch

from alignkit.image import Image
from alignkit.methods import build_model
from alignkit.methods.dio import feature_network
from alignkit.methods.heads import voxel_grid
from alignkit.solve import implicit
from alignkit.spatial import (
    apply_matrix,
    points,
    sample_affine,
    sample_voxels,
    sample_voxels_twice_differentiable,
    twice_differentiable_sampling,
    twice_differentiable_sampling_active,
    voxel_identity,
)
from alignkit.spatial.points import sample_projective

SHAPES = {2: (7, 6), 3: (7, 6, 5)}
OUT = {2: (4, 5), 3: (4, 5, 3)}


def _size(ndim: int) -> torch.Tensor:
    return torch.tensor(SHAPES[ndim], dtype=torch.float64).view(1, ndim, *([1] * ndim))


def _problem(ndim: int, *, seed: int = 0, margin: float = 1.0, batch: int = 2):
    """Random float64 image (batch, 3, *S) and voxel points reaching ``margin`` voxels beyond every side."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, *SHAPES[ndim], generator=generator, dtype=torch.float64)
    unit = torch.rand(batch, ndim, *OUT[ndim], generator=generator, dtype=torch.float64)
    voxel = unit * (_size(ndim) - 1 + 2 * margin) - margin
    return image, voxel


def _grid_sample_twice_differentiable(ndim: int) -> bool:
    """Whether this torch's CPU grid_sample has a double backward in ``ndim`` dimensions (the reference the
    sampler is compared with): torch 2.13 has it; torch 2.11 raises "derivative for
    aten::grid_sampler_3d_backward is not implemented" in 3D on the CPU as well."""
    image = torch.rand(1, 1, *([3] * ndim), dtype=torch.float64, requires_grad=True)
    grid = (torch.rand(1, *([2] * ndim), ndim, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    first = torch.autograd.grad(torch.nn.functional.grid_sample(image, grid, align_corners=True).sum(), grid,
                                create_graph=True)[0]
    try:
        torch.autograd.grad(first.sum(), [image, grid])
    except RuntimeError:
        return False
    return True


def _interior(voxel: torch.Tensor) -> torch.Tensor:
    """The points moved so that each coordinate's fractional part is in [0.2, 0.8]: away from voxel
    centres, where linear interpolation is smooth and finite differences apply."""
    return voxel.floor() + 0.2 + 0.6 * (voxel - voxel.floor())


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_values_and_first_derivatives_equal_grid_sample(ndim, padding):
    random_image, voxel = _problem(ndim)
    # identity points too, on the grid's bounds (grid_sample passes no gradient there with border
    # padding) and on voxel centres (one-sided derivatives); sizes 5, 9, 3 make grid_sample's round trip
    # through its normalised frame exact (n - 1 a power of two), so both read the same cell
    grid_image = torch.randn(2, 3, *(5, 9, 3)[:ndim], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    identity = voxel_identity(grid_image.shape[2:], like=grid_image).expand(2, *([-1] * (ndim + 1)))
    for image, where in ((random_image, voxel), (grid_image, identity)):
        expected_leaves = [image.clone().requires_grad_(True), where.clone().requires_grad_(True)]
        leaves = [image.clone().requires_grad_(True), where.clone().requires_grad_(True)]
        expected = sample_voxels(*expected_leaves, padding=padding)
        found = sample_voxels_twice_differentiable(*leaves, padding=padding)
        torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-12)
        weights = torch.randn_like(expected)
        for e, f in zip(torch.autograd.grad((expected * weights).sum(), expected_leaves),
                        torch.autograd.grad((found * weights).sum(), leaves)):
            torch.testing.assert_close(f, e, rtol=1e-12, atol=1e-12)


def test_point_lists_batches_and_size_one_axes_sample_as_sample_voxels():
    image, voxel = _problem(3, batch=1)
    listed = voxel.reshape(1, 3, -1)  # (B, ndim, N): a point list
    torch.testing.assert_close(sample_voxels_twice_differentiable(image, listed, padding="border"),
                               sample_voxels(image, listed, padding="border"), rtol=1e-12, atol=1e-12)
    many = voxel.expand(4, -1, -1, -1, -1)  # one image, four batches of points
    torch.testing.assert_close(sample_voxels_twice_differentiable(image, many), sample_voxels(image, many),
                               rtol=1e-12, atol=1e-12)
    flat = image[:, :, :, :, :1]  # a last axis of size 1: every point reads its only voxel
    torch.testing.assert_close(sample_voxels_twice_differentiable(flat, voxel), sample_voxels(flat, voxel),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_second_derivatives_equal_grid_sample_and_finite_differences(ndim):
    """The mixed ∂²/∂image∂points (what Jacobian-free backprop needs) and ∂²/∂points² (the exact
    option's Hessian-vector products), contracted with random vectors: equal to the CPU grid_sample's
    double backward to float64 round-off (where this torch has one), and to central differences of the
    first derivative."""
    image, voxel = _problem(ndim, seed=1)
    voxel = _interior(voxel)
    weights = torch.randn(2, 3, *OUT[ndim], dtype=torch.float64)
    direction = torch.randn_like(voxel)

    def point_gradient(sampler, img, pts, create_graph=False):
        return torch.autograd.grad((sampler(img, pts, padding="border") * weights).sum(), pts,
                                   create_graph=create_graph)[0]

    second = {}
    reference = _grid_sample_twice_differentiable(ndim)
    for name, sampler in (("grid_sample", sample_voxels), ("twice", sample_voxels_twice_differentiable)):
        if name == "grid_sample" and not reference:
            continue
        img, pts = image.clone().requires_grad_(True), voxel.clone().requires_grad_(True)
        gradient = point_gradient(sampler, img, pts, create_graph=True)
        second[name] = torch.autograd.grad((gradient * direction).sum(), [img, pts])
    if reference:
        for e, f in zip(second["grid_sample"], second["twice"]):
            torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-12)

    # finite differences of <direction, ∂E/∂points> in the image (linear in it: exact up to round-off) ...
    image_step = torch.randn_like(image)
    eps = 1e-3

    def directional(img, pts):
        return float((point_gradient(sample_voxels_twice_differentiable, img, pts.clone().requires_grad_(True))
                      * direction).sum())

    fd_image = (directional(image + eps * image_step, voxel) - directional(image - eps * image_step, voxel)) / (2 * eps)
    assert fd_image == pytest.approx(float((second["twice"][0] * image_step).sum()), rel=1e-8, abs=1e-10)
    # ... and in the points (a step that stays inside every voxel cell)
    point_step = torch.randn_like(voxel)
    eps = 1e-6
    fd_points = (directional(image, voxel + eps * point_step) - directional(image, voxel - eps * point_step)) / (2 * eps)
    assert fd_points == pytest.approx(float((second["twice"][1] * point_step).sum()), rel=1e-5, abs=1e-8)


def test_the_context_routes_every_linear_sampler_and_restores_on_exit():
    """Inside twice_differentiable_sampling, sample_voxels, sample_affine and sample_projective take the
    new sampler (same values); nearest and reflection keep grid_sample; the flag is gone afterwards."""
    image, voxel = _problem(3, batch=1)
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, :3] += 0.05 * torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    matrix[:3, 3] = torch.tensor([0.3, -0.7, 0.4], dtype=torch.float64)
    projective = matrix.clone()
    projective[3, :3] = torch.tensor([0.01, -0.02, 0.015], dtype=torch.float64)
    shape = (6, 5, 4)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return sample_voxels_twice_differentiable(*args, **kwargs)

    def run():
        return [sample_voxels(image, voxel, padding="border"), sample_voxels(image, voxel),
                *sample_affine(image, matrix, shape), *sample_projective(image, projective, shape),
                sample_voxels(image, voxel, mode="nearest"), sample_voxels(image, voxel, padding="reflection")]

    plain = run()
    mp = pytest.MonkeyPatch()
    mp.setattr(points, "sample_voxels_twice_differentiable", counted)
    try:
        assert not twice_differentiable_sampling_active()
        with twice_differentiable_sampling():
            assert twice_differentiable_sampling_active()
            routed = run()
            with twice_differentiable_sampling(False):
                assert not twice_differentiable_sampling_active()
        assert not twice_differentiable_sampling_active()
    finally:
        mp.undo()
    assert len(calls) == 4
    for e, f in zip(plain, routed):
        torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-10)
    # the affine path equals sampling its mapped identity
    identity = voxel_identity(shape, like=image)
    torch.testing.assert_close(routed[2], sample_voxels(image, apply_matrix(matrix, identity), padding="border"))


def _dio_3d(transform: str, gradient: str, device: str = "cpu"):
    torch.manual_seed(0)
    network = feature_network("unet", ndim=3, channels=3, features=[4, 8], levels=[1, 0])
    model = build_model("dio", ndim=3, size=(12, 12, 10), network=network, iterations=[6, 4], transform=transform,
                        gradient=gradient, cg_iterations=5).to(device)
    generator = torch.Generator().manual_seed(3)
    fixed = torch.rand(1, 1, 12, 12, 10, generator=generator).to(device)
    moving = torch.roll(fixed, shifts=(1, -1, 1), dims=(2, 3, 4)) + 0.05 * torch.rand(
        1, 1, 12, 12, 10, generator=generator).to(device)
    return model, {"fixed": fixed, "moving": moving}


def _implicit_gradients(out, gradient: str) -> list[torch.Tensor]:
    """(dL/dfixed, dL/dmoving) of every level for a fixed random ∇_φ L."""
    options = implicit.ImplicitOptions(gradient, cg_iterations=5)
    generator = torch.Generator().manual_seed(4)
    found = []
    for record in out.engine.level_records:
        grad_params = [torch.randn(p.shape, generator=generator).to(p) for p in record.transform.parameters()]
        found += implicit.implicit_image_gradients(out.engine, record, record.level.fixed, record.level.moving,
                                                   grad_params, options)
    return found


@pytest.mark.parametrize(("transform", "gradient"), [("displacement", "jfb"), ("svf", "jfb"), ("affine", "jfb"),
                                                     ("displacement", "ift")])
def test_dio_implicit_image_gradients_are_the_same_with_either_sampler(transform, gradient):
    """DIO's solver on small 3D feature images (CPU, where torch 2.13's grid_sample has a double backward): the
    implicit image gradients of every level with the twice-differentiable sampler (the default) equal
    those through grid_sample, and the new sampler is the one used."""
    model, batch = _dio_3d(transform, gradient)
    grid = voxel_grid(batch["fixed"].shape[2:])
    with torch.no_grad():
        fixed_maps, grids = model.feature_pyramid(batch["fixed"], grid)
        moving_maps, _ = model.feature_pyramid(batch["moving"], grid)
    out = model.layer()(Image(batch["fixed"][0], grid), Image(batch["moving"][0], grid), fixed_maps, grids,
                        moving_maps, grids)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return sample_voxels_twice_differentiable(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(points, "sample_voxels_twice_differentiable", counted)
        new = _implicit_gradients(out, gradient)
        assert calls, "the implicit gradient did not use the twice-differentiable sampler"
        if not _grid_sample_twice_differentiable(3):
            pytest.skip("this torch's CPU grid_sample has no 3D double backward: nothing to compare with")
        mp.setattr(implicit, "twice_differentiable_sampling", lambda: twice_differentiable_sampling(False))
        calls.clear()
        old = _implicit_gradients(out, gradient)
        assert not calls
    finally:
        mp.undo()
    assert any(float(g.abs().max()) > 0 for g in new)
    for n, o in zip(new, old):
        torch.testing.assert_close(n, o, rtol=1e-4, atol=1e-5 * float(o.abs().max()) + 1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (grid_sampler_3d_backward's derivative)")
@pytest.mark.parametrize("gradient", ["jfb", "ift"])
def test_dio_training_step_backpropagates_through_the_solver_on_cuda(gradient):
    """The failure this sampler fixes: DIO's first backward on CUDA raised "derivative for
    aten::grid_sampler_3d_backward is not implemented". One training step in 3D on the GPU now gives
    every feature head a finite, non-zero gradient."""
    model, batch = _dio_3d("displacement", gradient, device="cuda")
    output = model(batch)
    loss, _ = model.loss(batch, output)
    loss.backward()
    for head in model.features.heads:
        grad = head.weight.grad
        assert grad is not None and grad.device.type == "cuda"
        assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_normalized_to_voxel_inverts_voxel_to_normalized():
    from alignkit.spatial.frames import normalized_to_voxel, voxel_to_normalized

    shape = (7, 8, 9)
    voxel = torch.rand(2, 3, 4, 5, 6, dtype=torch.float64) * torch.tensor([6.0, 7.0, 8.0], dtype=torch.float64).view(1, 3, 1, 1, 1)
    assert torch.allclose(normalized_to_voxel(voxel_to_normalized(voxel, shape), shape), voxel, atol=1e-12)
