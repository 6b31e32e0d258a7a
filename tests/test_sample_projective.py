"""The projective sampling fast path of the engine (issue 18) against its reference: world -> voxel
points mapped with projective_apply, then sample_voxels."""

from __future__ import annotations

import torch

from alignkit.spatial.points import sample_projective, sample_voxels
from alignkit.transforms.linear import projective_apply


def _reference(tensor, matrix, shape):  # type: ignore[no-untyped-def]
    axes = [torch.arange(n, dtype=tensor.dtype) for n in shape]
    voxel = torch.stack(torch.meshgrid(*axes, indexing="ij")).unsqueeze(0)
    mapped = projective_apply(matrix, voxel)
    size = torch.tensor(tensor.shape[2:], dtype=tensor.dtype).view(1, -1, *([1] * len(shape)))
    inside = ((mapped >= 0) & (mapped <= size - 1)).all(dim=1, keepdim=True).to(tensor.dtype)
    return sample_voxels(tensor, mapped, padding="border"), inside


def test_sample_projective_matches_the_reference():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 23, 31, generator=generator)  # asymmetric, batch and channels
    # voxel-to-voxel homography in array-axis order (row, column): rotation, shear, shift, perspective
    matrix = torch.tensor(
        [[0.95, 0.12, 1.5], [-0.08, 1.05, -2.0], [0.004, -0.003, 1.0]], dtype=torch.float64, requires_grad=True
    )
    shape = (19, 27)  # output grid differs from the input's
    fast, fast_inside = sample_projective(image, matrix, shape)
    slow, slow_inside = _reference(image, matrix, shape)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    # inside/outside may differ only on points within rounding of the border
    assert (fast_inside != slow_inside).float().mean() < 0.01
    assert 0.2 < float(fast_inside.mean()) < 1.0  # the test covers both kinds of points



def test_sample_projective_gradients_match_the_reference():
    # a smooth image, every point strictly inside: bilinear interpolation has kinks on the pixel lines,
    # and on a noise image a coordinate that rounds to the other side of one (or of the border) in one
    # of two equally valid computations changes its gradient a lot (the values agree to 1e-14 anyway)
    generator = torch.Generator().manual_seed(2)
    rows, cols = torch.meshgrid(torch.arange(23.0), torch.arange(31.0), indexing="ij")
    image = torch.stack([torch.sin(rows / 3) * torch.cos(cols / 4), torch.cos(rows / 5 + cols / 7)])[None].double()
    matrix = torch.tensor(
        [[0.8, 0.05, 2.5], [-0.04, 0.85, 3.0], [0.002, -0.001, 1.0]], dtype=torch.float64, requires_grad=True
    )
    fast, inside = sample_projective(image, matrix, (19, 27))
    assert bool(inside.all())
    weights = torch.rand(fast.shape, generator=generator, dtype=torch.float64)
    (grad_fast,) = torch.autograd.grad((fast * weights).sum(), matrix)
    slow, _ = _reference(image, matrix, (19, 27))
    (grad_slow,) = torch.autograd.grad((slow * weights).sum(), matrix)
    torch.testing.assert_close(grad_fast, grad_slow, rtol=1e-4, atol=1e-6)


def test_sample_projective_of_an_affine_matrix_is_sample_affine():
    from alignkit.spatial.points import sample_affine

    image = torch.rand(1, 1, 16, 20, generator=torch.Generator().manual_seed(1))
    matrix = torch.tensor([[1.1, 0.1, -1.0], [0.05, 0.9, 2.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    projective, _ = sample_projective(image, matrix, (16, 20))
    affine, _ = sample_affine(image, matrix, (16, 20))
    torch.testing.assert_close(projective, affine, rtol=1e-5, atol=1e-5)
