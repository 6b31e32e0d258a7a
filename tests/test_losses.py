"""Tests of alignkit.losses: gradchecks, analytic golden values, half precision, references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.losses import (
    L1,
    LNCC,
    MSE,
    NCC,
    AffineInverseConsistency,
    AffinePrior,
    BendingEnergy,
    Charbonnier,
    DiceLoss,
    Diffusion,
    InverseConsistency,
    JacobianFoldPenalty,
    LandmarkDistance,
    Laplacian,
    MattesMI,
    MultiKernelLNCC,
    TotalVariation,
    build_regularizer,
    build_similarity,
    one_hot,
)
from alignkit.spatial import Grid, gaussian_blur, sample_world
from alignkit.transforms.base import Transform

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class _Translation(Transform):
    """Minimal test transform ``y = x + t`` (world units), independent of other modules."""

    def __init__(self, shift: Tensor) -> None:
        super().__init__(shift.numel())
        self.shift = nn.Parameter(shift.clone())

    def transform_points(self, world: Tensor) -> Tensor:
        return world + self.shift.view(1, -1, *([1] * (world.dim() - 2)))


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The tensors here are tiny: on a loaded 2-core runner, intra-op threads only add
    contention (gradchecks ran 10x slower). Restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _smooth_image(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1, 1, *shape), generator=g, dtype=torch.float64)
    return gaussian_blur(x, 1.5).to(dtype)


def _coords(shape: tuple[int, ...], spacing: tuple[float, ...], dtype=torch.float64) -> list[Tensor]:
    """World coordinate of each array axis (axis-aligned grid)."""
    axes = [torch.arange(n, dtype=dtype) * h for n, h in zip(shape, spacing)]
    return list(torch.meshgrid(*axes, indexing="ij"))


# -- gradchecks -------------------------------------------------------------------------------
SIMILARITIES = [
    MSE(),
    L1(),
    Charbonnier(),
    NCC(),
    LNCC(window=3),
    LNCC(window=3, squared=False, dilation=2),
    MultiKernelLNCC(windows=(3, 5), weights=(0.4, 0.6), dilation=1),
    MattesMI(bins=10, fixed_range=(0.0, 1.0), moving_range=(0.0, 1.0)),
    MattesMI(bins=10, fixed_kernel="gaussian", samples=20, fixed_range=(0.0, 1.0), moving_range=(0.0, 1.0)),
]


@pytest.mark.parametrize("loss", SIMILARITIES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("shape", [(5, 6), (4, 3, 5)], ids=["2d", "3d"])
def test_similarity_gradcheck(loss: nn.Module, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    warped = (0.1 + 0.8 * torch.rand((2, 1, *shape), generator=g, dtype=torch.float64)).requires_grad_()
    fixed = 0.1 + 0.8 * torch.rand((2, 1, *shape), generator=g, dtype=torch.float64)
    mask = torch.rand((2, 1, *shape), generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w: loss(w, fixed, mask), (warped,))
    assert torch.autograd.gradcheck(lambda w: loss(w, fixed), (warped,))


FIELD_REGULARIZERS = [Diffusion(), BendingEnergy(), Laplacian(), TotalVariation(eps=1e-3)]


@pytest.mark.parametrize("reg", FIELD_REGULARIZERS, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("shape", [(5, 6), (4, 3, 5)], ids=["2d", "3d"])
def test_field_regularizer_gradcheck(reg: nn.Module, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(1)
    field = torch.randn((2, len(shape), *shape), generator=g, dtype=torch.float64, requires_grad=True)
    spacing = [0.5, 1.5, 2.0][: len(shape)]
    assert torch.autograd.gradcheck(lambda u: reg(u, spacing), (field,))


def test_other_regularizers_gradcheck() -> None:
    g = torch.Generator().manual_seed(2)
    grid = Grid.from_spacing((4, 5, 3), (1.0, 0.7, 1.3), origin=(2.0, -1.0, 0.5))
    u = (0.3 * torch.randn((1, 3, *grid.shape), generator=g, dtype=torch.float64)).requires_grad_()
    v = (0.3 * torch.randn((1, 3, *grid.shape), generator=g, dtype=torch.float64)).requires_grad_()
    # eps = 2 makes most voxels active so the check exercises the determinant's gradient.
    assert torch.autograd.gradcheck(lambda d: JacobianFoldPenalty(eps=2.0)(d, grid), (u,))
    assert torch.autograd.gradcheck(lambda a, b: InverseConsistency()(a, b, grid), (u, v))
    m = (
        torch.eye(4, dtype=torch.float64) + 0.1 * torch.randn((4, 4), generator=g, dtype=torch.float64)
    ).requires_grad_()
    m_ts = torch.eye(4, dtype=torch.float64) + 0.1 * torch.randn((4, 4), generator=g, dtype=torch.float64)
    centre = grid.center_world()
    assert torch.autograd.gradcheck(lambda a: AffinePrior(translation_scale=3.0)(a, centre), (m,))
    assert torch.autograd.gradcheck(lambda a: AffineInverseConsistency()(a, m_ts), (m,))


def test_prompt_gradcheck() -> None:
    g = torch.Generator().manual_seed(3)
    warped = torch.rand((2, 3, 4, 5), generator=g, dtype=torch.float64, requires_grad=True)
    fixed = one_hot(torch.randint(0, 3, (2, 1, 4, 5), generator=g), [0, 1, 2], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w: DiceLoss()(w, fixed), (warped,))
    t = _Translation(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
    p = torch.randn((6, 3), generator=g, dtype=torch.float64)
    q = torch.randn((6, 3), generator=g, dtype=torch.float64)

    def f(shift: Tensor) -> Tensor:
        t.shift.data.copy_(shift)  # gradcheck perturbs the input; route it into the parameter
        return LandmarkDistance()(t, p, q)

    loss = LandmarkDistance()(t, p, q)
    (grad,) = torch.autograd.grad(loss, t.shift)
    shift0 = t.shift.detach().clone()
    eps = 1e-6
    numeric = torch.stack(
        [(f(shift0 + eps * e) - f(shift0 - eps * e)) / (2 * eps) for e in torch.eye(3, dtype=torch.float64)]
    )
    torch.testing.assert_close(grad, numeric.detach(), atol=1e-6, rtol=1e-6)


# -- similarity golden values -----------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 10), (6, 7, 5)], ids=["2d", "3d"])
def test_identical_images_score_perfectly(shape: tuple[int, ...]) -> None:
    x = _smooth_image(shape, 0)
    assert MSE()(x, x).item() == 0.0
    assert L1()(x, x).item() == 0.0
    assert NCC()(x, x).item() == pytest.approx(0.0, abs=1e-12)
    assert LNCC(window=5)(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert LNCC(window=5, squared=False)(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert MultiKernelLNCC()(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert Charbonnier(eps=1e-3, alpha=0.45)(x, x).item() == pytest.approx(1e-6**0.45, rel=1e-9)
    # sanity: a different image scores worse on every loss
    y = _smooth_image(shape, 1)
    for loss in (MSE(), L1(), NCC(), LNCC(window=5), MultiKernelLNCC()):
        assert loss(y, x).item() > 1e-3


def test_ncc_of_negation_and_affine_invariance() -> None:
    x = _smooth_image((9, 11), 4)
    assert NCC()(-x, x).item() == pytest.approx(2.0, abs=1e-9)
    assert NCC()(3.0 * x + 7.0, x).item() == pytest.approx(0.0, abs=1e-9)
    # signed local NCC also sees the anti-correlation; squared local NCC does not
    assert LNCC(window=5, squared=False)(-x, x).item() == pytest.approx(2.0, abs=1e-6)
    assert LNCC(window=5)(-x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_mse_and_mask_weighting() -> None:
    x = torch.zeros((2, 1, 4, 4), dtype=torch.float64)
    y = torch.ones_like(x)
    y[:, :, :, 2:] = 3.0  # squared error 1 on the left half, 9 on the right half
    assert MSE()(y, x).item() == pytest.approx(5.0)
    mask = torch.zeros((1, 1, 4, 4), dtype=torch.float64)
    mask[..., :2] = 1.0
    assert MSE()(y, x, mask).item() == pytest.approx(1.0)
    assert L1()(y, x, mask).item() == pytest.approx(1.0)


@pytest.mark.parametrize("w", [5, 9], ids=["box_sum", "window-longer-than-axes"])
def test_lncc_matches_dense_convolution_reference(w: int) -> None:
    """3D LNCC with separable box sums vs a naive dense 3D convolution with a ones kernel."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand((2, 1, 7, 6, 8), generator=g, dtype=torch.float64)
    y = 0.5 * x + 0.5 * torch.rand((2, 1, 7, 6, 8), generator=g, dtype=torch.float64)
    eps = 1e-5
    kernel = torch.ones((1, 1, w, w, w), dtype=torch.float64)

    def dense(t: Tensor) -> Tensor:
        return F.conv3d(t, kernel, padding=w // 2)

    n = dense(torch.ones_like(x[:1]))
    sx, sy, sxx, syy, sxy = dense(x), dense(y), dense(x * x), dense(y * y), dense(x * y)
    cross = sxy - sx * sy / n
    vx = (sxx - sx * sx / n).clamp_min(eps)
    vy = (syy - sy * sy / n).clamp_min(eps)
    expected = 1.0 - (cross * cross / (vx * vy)).mean()
    torch.testing.assert_close(LNCC(window=w, eps=eps)(x, y), expected)


def test_mk_lncc_paper_defaults_and_weights() -> None:
    loss = MultiKernelLNCC()
    assert loss.weights == (0.3, 0.7)
    assert loss.window_sizes((40, 64, 48)) == [11, 21]  # S/4 = 10 -> 11, S/2 = 20 -> 21 (odd)
    x, y = _smooth_image((16, 16), 6), _smooth_image((16, 16), 7)
    mk = MultiKernelLNCC(windows=(3, 7), weights=(0.25, 0.75), dilation=1, squared=True)
    expected = 0.25 * LNCC(window=3)(x, y) + 0.75 * LNCC(window=7)(x, y)
    torch.testing.assert_close(mk(x, y), expected)
    with pytest.raises(ConfigError):
        MultiKernelLNCC(weights=(0.5, 0.7))
    with pytest.raises(ConfigError):
        LNCC(window=4)


def test_mi_identical_beats_shuffled_and_is_deterministic() -> None:
    x = _smooth_image((24, 20), 8, torch.float32)
    g = torch.Generator().manual_seed(0)
    shuffled = x.flatten()[torch.randperm(x.numel(), generator=g)].view_as(x)
    mi = MattesMI(bins=32)
    same, other = mi(x, x).item(), mi(shuffled, x).item()
    assert same < other - 0.5  # -MI: lower is better
    assert other < 0.3  # shuffled images share almost no information (small-sample bias only)
    # MI is invariant to a monotone intensity change of one image (robust min/max rescaling)
    assert mi(2.0 * x + 5.0, x).item() == pytest.approx(same, abs=1e-4)
    sampled = MattesMI(bins=32, samples=200, seed=3)
    assert sampled(x, x).item() == sampled(x, x).item()
    a = sampled(shuffled, x, generator=torch.Generator().manual_seed(1)).item()
    b = sampled(shuffled, x, generator=torch.Generator().manual_seed(2)).item()
    assert a != b  # the generator really drives the sampling
    assert sampled(x, x).item() < sampled(shuffled, x).item()


def test_mi_sparse_histogram_matches_dense_soft_assignment() -> None:
    """The 4 x 4-bin sparse Parzen histogram (B-spline kernels on both sides) gives the same value
    and gradient as the dense (N, bins) soft-assignment product it replaces; a fixed image that
    requires grad (learned features) takes the dense path, so it serves as the reference here."""
    gen = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 17, 19), (1, 1, 9, 10, 11)]:
        warped = torch.rand(shape, dtype=torch.float64, generator=gen, requires_grad=True)
        fixed = warped.detach() ** 2 + 0.1 * torch.rand(shape, dtype=torch.float64, generator=gen)
        mask = (torch.rand(shape[0], 1, *shape[2:], generator=gen) > 0.3).double()
        mi = MattesMI(bins=16)
        sparse = mi(warped, fixed, mask)
        (grad_sparse,) = torch.autograd.grad(sparse, warped)
        dense = mi(warped, fixed.clone().requires_grad_(True), mask)
        (grad_dense,) = torch.autograd.grad(dense, warped)
        assert sparse.item() == pytest.approx(dense.item(), abs=1e-12)
        assert torch.allclose(grad_sparse, grad_dense, atol=1e-14)


@pytest.mark.parametrize("shape", [(2, 3, 170, 190), (1, 1, 29, 30, 31)])
def test_mi_compiled_histogram_matches_the_torch_form(shape, monkeypatch) -> None:
    """float32 on the CPU takes the compiled joint histogram and gather (numba); with
    ``ALIGNKIT_COMPILED=0`` the torch bincounts and gathers: the same value and gradient to float32
    rounding (sums of 16 float32 products per sample, in another order)."""
    from alignkit.spatial import compiled

    if not compiled.available():
        pytest.skip("numba is not installed")
    gen = torch.Generator().manual_seed(1)
    warped = torch.rand(shape, generator=gen)
    fixed = warped ** 2 + 0.1 * torch.rand(shape, generator=gen)
    mask = (torch.rand(shape[0], 1, *shape[2:], generator=gen) > 0.3).float()
    mi = MattesMI(bins=32)
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv("ALIGNKIT_COMPILED", switch)
        x = warped.clone().requires_grad_(True)
        value = mi(x, fixed, mask)
        (gradient,) = torch.autograd.grad(value, x)
        results.append((value.item(), gradient))
    (value, gradient), (expected, expected_gradient) = results
    assert value == pytest.approx(expected, abs=1e-5)
    scale = float(expected_gradient.abs().max())
    assert scale > 0 and torch.allclose(gradient, expected_gradient, atol=1e-3 * scale)


@pytest.mark.parametrize("shape", [(2, 2, 17, 19), (1, 1, 9, 10, 11)])
@pytest.mark.parametrize("samples", [None, 300])
@pytest.mark.parametrize("masked", [False, True])
def test_mi_closed_form_gradient_matches_autograd(shape, samples, masked) -> None:
    """MattesMI.value_and_gradient (the greedy update's fast path) against autograd through forward,
    in float64: full and sampled voxels, with and without a mask, clipped intensities included (the
    robust range leaves the 0.5 % tails flat, with no gradient)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(shape, dtype=torch.float64, generator=gen)
    y = torch.sin(3.0 * x - 1.0) + 0.1 * torch.rand(shape, dtype=torch.float64, generator=gen)
    mask = (torch.rand(shape[0], 1, *shape[2:], generator=gen) > 0.3).double() if masked else None
    mi = MattesMI(bins=16, samples=samples)
    leaf = x.clone().requires_grad_(True)
    value = mi(leaf, y, mask)
    (reference,) = torch.autograd.grad(value, leaf)
    fast_value, fast = mi.value_and_gradient(x, y, mask)
    assert fast.shape == x.shape
    torch.testing.assert_close(fast_value, value.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-14)
    assert reference.abs().max() > 1e-4  # not a comparison of zeros


def test_mi_multimodal_inverted_contrast() -> None:
    """MI rewards aligned images with a non-linear contrast change; MSE/NCC would not."""
    x = _smooth_image((24, 24), 9, torch.float32)
    y = torch.cos(6.0 * x)  # non-monotone intensity mapping of the same anatomy
    shifted = torch.roll(y, shifts=5, dims=3)
    mi = MattesMI()
    assert mi(y, x).item() < mi(shifted, x).item() - 0.3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "loss", [LNCC(), MultiKernelLNCC(), MattesMI(), NCC(), Charbonnier()], ids=lambda m: type(m).__name__
)
def test_half_precision_constant_and_zero_images_are_finite(dtype: torch.dtype, loss: nn.Module) -> None:
    for value in (0.0, 1.0):
        warped = torch.full((1, 1, 12, 10, 8), value, dtype=dtype, requires_grad=True)
        fixed = torch.zeros((1, 1, 12, 10, 8), dtype=dtype)
        out = loss(warped, fixed)
        (grad,) = torch.autograd.grad(out, warped)
        assert out.dtype == dtype
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    # and on a real-valued image the half result agrees with float32
    x = _smooth_image((12, 10, 8), 10, torch.float32)
    y = _smooth_image((12, 10, 8), 11, torch.float32)
    torch.testing.assert_close(loss(x.to(dtype), y.to(dtype)).float(), loss(x, y), atol=0.03, rtol=0.03)


def test_similarities_peak_at_alignment_on_real_t1_pd_slices() -> None:
    """Real multimodal pair (ITK T1 and PD slices, aligned): shifting PD in either direction by
    1-6 pixels makes every similarity worse, the multimodal MI by a clear margin."""
    folder = DATA / "multimodal" / "itk-t1-pd-slices"
    if not folder.is_dir():
        pytest.skip(f"real data not found at {folder}")
    pil = pytest.importorskip("PIL.Image")
    t1 = torch.from_numpy(np.asarray(pil.open(folder / "BrainT1Slice.png").convert("L"), dtype=np.float32))[
        None, None
    ]
    pd = torch.from_numpy(
        np.asarray(pil.open(folder / "BrainProtonDensitySlice.png").convert("L"), dtype=np.float32)
    )[None, None]
    losses = {"mi": MattesMI(samples=4000), "ncc": NCC(), "lncc": LNCC(), "mk-lncc": MultiKernelLNCC()}
    for name, loss in losses.items():
        aligned = loss(pd, t1).item()
        for axis in (2, 3):
            for shift in (-6, -2, 2, 6):
                moved = loss(torch.roll(pd, shifts=shift, dims=axis), t1).item()
                assert moved > aligned, (name, axis, shift)
    mi = losses["mi"]
    assert mi(torch.roll(pd, shifts=6, dims=3), t1).item() > mi(pd, t1).item() + 0.3


def test_similarity_registry_and_shape_errors() -> None:
    assert isinstance(build_similarity("lncc", window=5), LNCC)
    assert isinstance(build_similarity("mk-lncc"), MultiKernelLNCC)
    assert isinstance(build_similarity("mi", bins=16), MattesMI)
    with pytest.raises(ConfigError, match="mse"):
        build_similarity("nmi")
    with pytest.raises(ConfigError):
        build_similarity("lncc", windw=5)
    with pytest.raises(ShapeError):
        MSE()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ShapeError):
        LNCC()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), torch.ones(1, 2, 4, 4))


def test_charbonnier_and_l1_rgb() -> None:
    g = torch.Generator().manual_seed(12)
    x = torch.rand((2, 3, 8, 9), generator=g, dtype=torch.float64)
    y = x + 0.1
    assert L1()(y, x).item() == pytest.approx(0.1)
    assert Charbonnier(eps=1e-3, alpha=0.5)(y, x).item() == pytest.approx((0.01 + 1e-6) ** 0.5)


# -- regulariser golden values ----------------------------------------------------------------
SPACINGS = {2: (0.5, 2.0), 3: (0.5, 2.0, 1.25)}


@pytest.mark.parametrize("ndim", [2, 3])
def test_diffusion_of_linear_field(ndim: int) -> None:
    shape, spacing = (6, 5, 4)[:ndim], SPACINGS[ndim]
    coords = _coords(shape, spacing)
    a, b = 0.7, -1.3
    field = torch.zeros((1, ndim, *shape), dtype=torch.float64)
    field[:, 0] = a * coords[0]
    assert Diffusion()(field, spacing).item() == pytest.approx(a * a)
    field[:, ndim - 1] = b * coords[1]  # another component varying along another axis
    assert Diffusion()(field, torch.tensor(spacing)).item() == pytest.approx(a * a + b * b)
    # the field's world derivative is what counts: the wrong spacing gives the wrong value
    assert Diffusion()(field).item() != pytest.approx(a * a + b * b)
    # TV of the same kind of linear field: |grad u|_F
    assert TotalVariation()(field, spacing).item() == pytest.approx((a * a + b * b) ** 0.5, abs=1e-5)
    field.zero_()
    assert TotalVariation()(field, spacing).item() == 0.0


@pytest.mark.parametrize("ndim", [2, 3])
def test_bending_energy_and_laplacian_of_quadratic(ndim: int) -> None:
    """u_0 = al x0^2 + be x0 x1 + ga x1^2 (+ de x2^2 in 3D): Hessian [[2al, be], [be, 2ga]] (+2de).
    Stencils are evaluated only where they fit (no padding), so the discrete value is exact."""
    shape, spacing = (7, 6, 5)[:ndim], SPACINGS[ndim]
    c = _coords(shape, spacing)
    al, be, ga, de = 0.3, -0.5, 0.2, 0.4
    field = torch.zeros((2, ndim, *shape), dtype=torch.float64)
    field[:, 0] = al * c[0] ** 2 + be * c[0] * c[1] + ga * c[1] ** 2
    bending = (2 * al) ** 2 + (2 * ga) ** 2 + 2 * be**2
    laplacian = 2 * al + 2 * ga
    if ndim == 3:
        field[:, 0] += de * c[2] ** 2
        bending += (2 * de) ** 2
        laplacian += 2 * de
    field[:, 1] = 5.0 * c[0] - 2.0 * c[1] + 1.0  # linear component: no bending, no Laplacian
    assert BendingEnergy()(field, spacing).item() == pytest.approx(bending)
    assert Laplacian()(field, spacing).item() == pytest.approx(laplacian**2)
    # affine fields are in the null space of both
    field[:, 0] = 3.0 * c[0] + 1.0
    assert BendingEnergy()(field, spacing).item() == pytest.approx(0.0, abs=1e-20)
    assert Laplacian()(field, spacing).item() == pytest.approx(0.0, abs=1e-20)


def test_laplacian_matches_paper_neighbour_average_form() -> None:
    """Zampieri et al. 2018: in 2D, unit spacing, Laplacian = 4 * (average of 4 neighbours - u)."""
    g = torch.Generator().manual_seed(13)
    u = torch.randn((1, 2, 6, 7), generator=g, dtype=torch.float64)
    avg = (u[..., :-2, 1:-1] + u[..., 2:, 1:-1] + u[..., 1:-1, :-2] + u[..., 1:-1, 2:]) / 4.0
    expected = ((4.0 * (avg - u[..., 1:-1, 1:-1])) ** 2).sum(1).mean()
    torch.testing.assert_close(Laplacian()(u), expected)


def test_diffusion_penalises_checkerboard() -> None:
    checker = ((torch.arange(6).view(6, 1) + torch.arange(6).view(1, 6)) % 2).double()
    field = torch.stack([checker, checker]).unsqueeze(0)
    assert Diffusion()(field).item() > 1.0


def test_jacobian_fold_penalty() -> None:
    grid = Grid.from_spacing((8, 9), (1.5, 0.5), origin=(10.0, -3.0))
    zero = torch.zeros((1, 2, *grid.shape), dtype=torch.float64)
    assert JacobianFoldPenalty()(zero, grid).item() == 0.0
    # u_x = -2 x: map x -> -x along world x (a reflection, det = -1 everywhere)
    world = grid.world_points(dtype=torch.float64)
    fold = torch.zeros_like(zero)
    fold[:, 0] = -2.0 * world[:, 0]
    assert JacobianFoldPenalty()(fold, grid).item() == pytest.approx(1.0)
    # a smooth expansion does not fold but is below a margin eps = 2.5 by 1
    expand = torch.zeros_like(zero)
    expand[:, 0] = 0.5 * world[:, 0]  # det = 1.5
    assert JacobianFoldPenalty()(expand, grid).item() == 0.0
    assert JacobianFoldPenalty(eps=2.5)(expand, grid).item() == pytest.approx(1.0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_inverse_consistency(ndim: int) -> None:
    grid = Grid.from_spacing((6, 5, 4)[:ndim], (1.0, 2.0, 0.5)[:ndim], origin=(3.0, -2.0, 1.0)[:ndim])
    t = torch.tensor([0.7, -1.1, 0.4][:ndim], dtype=torch.float64).view(1, ndim, *([1] * ndim))
    forward = t.expand(1, ndim, *grid.shape).clone()
    backward = -forward
    ic = InverseConsistency()
    assert ic(forward, backward, grid).item() == pytest.approx(0.0, abs=1e-20)
    # a non-inverse pair: residual is the constant 2t on every voxel, in both terms
    expected = 2 * (2 * t).pow(2).sum().item()
    assert ic(forward, forward, grid).item() == pytest.approx(expected)
    assert InverseConsistency(symmetric=False)(forward, forward, grid).item() == pytest.approx(expected / 2)
    # Transforms compose point-wise; mixing a Transform and a field works too
    fwd_t, bwd_t = _Translation(t.flatten()), _Translation(-t.flatten())
    assert ic(fwd_t, bwd_t, grid).item() == pytest.approx(0.0, abs=1e-20)
    assert ic(fwd_t, backward, grid).item() == pytest.approx(0.0, abs=1e-20)
    assert ic(fwd_t, fwd_t, grid).item() == pytest.approx(expected)


def test_inverse_consistency_of_nonlinear_pair() -> None:
    """A smooth field and its numerical inverse (fixed-point iteration) are nearly consistent;
    perturbing the inverse increases the penalty."""
    grid = Grid.from_spacing((20, 18), 1.0)
    g = torch.Generator().manual_seed(14)
    u = gaussian_blur(torch.randn((1, 2, *grid.shape), generator=g, dtype=torch.float64), 3.0)
    u = u / u.abs().max()  # |u| <= 1 voxel, smooth: invertible
    x = grid.world_points(dtype=torch.float64)
    v = -u.clone()
    for _ in range(30):  # v(x) = -u(x + v(x))
        v = -sample_world(u, grid, x + v, padding="border")
    ic = InverseConsistency()
    exact = ic(u, v, grid).item()
    assert exact < 1e-3
    assert ic(u, -u * 0.5, grid).item() > 10 * exact


def test_affine_prior_and_affine_inverse_consistency() -> None:
    eye = torch.eye(4, dtype=torch.float64)
    assert AffinePrior()(eye).item() == 0.0
    m = eye.clone()
    m[:3, :3] = torch.tensor([[1.1, 0.2, 0.0], [0.0, 0.9, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    m[:3, 3] = torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64)
    assert AffinePrior()(m).item() == pytest.approx(0.01 + 0.04 + 0.01 + 5.0)
    assert AffinePrior(translation_scale=2.0)(m).item() == pytest.approx(0.06 + 5.0 / 4)
    # a rotation about a centre costs no translation when measured at that centre
    rot = torch.eye(3, dtype=torch.float64)
    cos, sin = 0.8, 0.6
    rot[:2, :2] = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
    centre = torch.tensor([5.0, -2.0], dtype=torch.float64)
    rot[:2, 2] = centre - rot[:2, :2] @ centre
    linear_only = ((rot[:2, :2] - torch.eye(2, dtype=torch.float64)) ** 2).sum().item()
    assert AffinePrior()(rot, centre).item() == pytest.approx(linear_only)
    assert AffinePrior()(rot).item() > linear_only + 1.0
    # eq. 5: exact inverse gives 0; a batch is averaged
    aic = AffineInverseConsistency()
    assert aic(m, torch.linalg.inv(m)).item() == pytest.approx(0.0, abs=1e-20)
    assert aic(m, m).item() > 0.1
    assert aic(torch.stack([m, m]), torch.stack([torch.linalg.inv(m), m])).item() == pytest.approx(
        aic(m, m).item() / 2
    )


def test_regularizer_registry_and_errors() -> None:
    assert isinstance(build_regularizer("bending"), BendingEnergy)
    assert isinstance(build_regularizer("tv", eps=1e-3), TotalVariation)
    assert isinstance(build_regularizer("inverse-consistency", symmetric=False), InverseConsistency)
    with pytest.raises(ConfigError, match="diffusion"):
        build_regularizer("elastic")
    with pytest.raises(ShapeError):
        Diffusion()(torch.zeros(1, 3, 4, 4))  # 3 components on a 2D grid
    with pytest.raises(ShapeError):
        BendingEnergy()(torch.zeros(1, 2, 2, 4))  # too small for a second difference
    with pytest.raises(ShapeError):
        Diffusion()(torch.zeros(1, 2, 4, 4), [1.0, 2.0, 3.0])


def test_regularizers_keep_dtype() -> None:
    field = torch.randn((1, 3, 5, 5, 5), dtype=torch.float32)
    for reg in FIELD_REGULARIZERS:
        assert reg(field, (1.0, 1.0, 2.0)).dtype == torch.float32


# -- prompts ----------------------------------------------------------------------------------
def test_one_hot_and_dice() -> None:
    labels = torch.tensor([[[[0, 1, 1], [2, 5, 0]]]])
    oh = one_hot(labels, [1, 2, 5])
    assert oh.shape == (1, 3, 2, 3)
    expected = torch.tensor(
        [[[0, 1, 1], [0, 0, 0]], [[0, 0, 0], [1, 0, 0]], [[0, 0, 0], [0, 1, 0]]], dtype=torch.float32
    )
    torch.testing.assert_close(oh[0], expected)
    assert DiceLoss()(oh, oh).item() == pytest.approx(0.0, abs=1e-7)
    # disjoint labels: Dice 0 per present label (up to smooth) -> loss ~1
    other = one_hot(torch.tensor([[[[1, 0, 0], [0, 0, 2]]]]), [1, 2, 5])
    loss = DiceLoss()(other, oh).item()
    # labels 1 and 2 disjoint (Dice ~0); label 5 present only in oh (Dice ~0)
    assert loss == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ShapeError):
        one_hot(torch.zeros(1, 2, 3, 3, dtype=torch.long), [0])


def test_dice_of_linearly_warped_one_hot() -> None:
    """Warp one-hot moving labels by a known shift with linear interpolation: exact shift -> 0."""
    grid = Grid.from_spacing((16, 16), 1.0)
    labels = torch.zeros((1, 1, 16, 16), dtype=torch.long)
    labels[..., 4:10, 5:11] = 1
    labels[..., 11:14, 2:6] = 2
    moving = torch.roll(labels, shifts=(2,), dims=(2,))  # moving content is 2 voxels further
    fixed_oh, moving_oh = one_hot(labels, [1, 2]), one_hot(moving, [1, 2])
    world = grid.world_points()
    dice = DiceLoss()
    aligned = sample_world(moving_oh, grid, world + torch.tensor([2.0, 0.0]).view(1, 2, 1, 1))
    half = sample_world(moving_oh, grid, world + torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
    assert dice(aligned, fixed_oh).item() == pytest.approx(0.0, abs=1e-6)
    assert dice(half, fixed_oh).item() > 0.05


def test_landmark_distance_of_translation() -> None:
    g = torch.Generator().manual_seed(15)
    fixed = torch.randn((7, 3), generator=g, dtype=torch.float64)
    shift = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    moving = fixed + shift
    assert LandmarkDistance()(
        _Translation(torch.zeros(3, dtype=torch.float64)), fixed, moving
    ).item() == pytest.approx(5.0, abs=1e-6)
    assert LandmarkDistance()(_Translation(shift), fixed, moving).item() == pytest.approx(0.0, abs=1e-6)
    # the gradient at the match is finite (eps-smoothed norm)
    t = _Translation(shift)
    (grad,) = torch.autograd.grad(LandmarkDistance()(t, fixed, moving), t.shift)
    assert torch.isfinite(grad).all()
    with pytest.raises(ShapeError):
        LandmarkDistance()(t, fixed[:, :2], moving[:, :2])


# -- registries accept only what their callers can call ------------------------------------------
def _one_line_config_error(match: str):
    """``pytest.raises(ConfigError)`` that also requires a one-line message."""

    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(ConfigError, match=match)
            self.info = self._ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self._ctx.__exit__(*exc)
            assert "\n" not in str(self.info.value), str(self.info.value)
            return handled

    return _Check()


def test_build_loss_refuses_unknown_names_and_options_in_one_line() -> None:
    with _one_line_config_error(r"'windw'.*similarity 'lncc'.*window, dilation"):
        build_similarity("lncc", windw=5)
    with _one_line_config_error(r"'eps'.*similarity 'mse'.*valid options: none"):
        build_similarity("mse", eps=1.0)
    with _one_line_config_error(r"'symetric'.*regularizer 'inverse-consistency'.*symmetric"):
        build_regularizer("inverse-consistency", symetric=True)
    with _one_line_config_error(r"unknown regularizer 'elastic'.*diffusion"):
        build_regularizer("elastic")
    with _one_line_config_error(r"unknown similarity 'nmi'.*lncc"):
        build_similarity("nmi")


def test_stage_config_checks_every_option_name_when_built() -> None:
    from alignkit.solve.config import RegistrationConfig, StageConfig

    with _one_line_config_error(r"'inverse-consistency'.*not one the solver can call.*learned method.*diffusion, bending"):
        StageConfig(transform="svf", regularizer="inverse-consistency", regularizer_weight=1.0)
    for name in ("affine", "affine-inverse-consistency", "jacobian-fold"):
        with _one_line_config_error(repr(name)):
            StageConfig(transform="svf", regularizer=name)
    with _one_line_config_error(r"'elastic'.*choose one of diffusion"):
        StageConfig(transform="svf", regularizer="elastic")
    with _one_line_config_error(r"unknown transform 'spline'.*bspline"):
        StageConfig(transform="spline")
    with _one_line_config_error(r"unknown similarity 'nmi'.*mk-lncc"):
        StageConfig(similarity="nmi")
    with _one_line_config_error(r"'windw'.*window"):
        StageConfig(similarity="lncc", similarity_options={"windw": 5})
    with _one_line_config_error(r"'energy'.*vsvf"):
        StageConfig(transform="svf", regularizer="energy")
    with _one_line_config_error(r"unknown optimizer 'rmsprop'.*lbfgs"):
        StageConfig(optimizer="rmsprop")  # type: ignore[arg-type]
    with _one_line_config_error(r"unknown init 'moments'.*features"):
        RegistrationConfig(stages=[StageConfig()], init="moments")  # type: ignore[arg-type]
    assert StageConfig(transform="vsvf", regularizer="energy", regularizer_weight=1.0).regularizer == "energy"


def test_every_choice_a_stage_accepts_is_callable_the_way_the_engine_calls_it() -> None:
    """The engine calls ``similarity(warped, fixed, inside)`` and ``regularizer(field, spacing)``."""
    from typing import get_args

    from alignkit.losses import FieldRegularizerName, SimilarityName
    from alignkit.solve.config import FIELD_MODELS, LINEAR_MODELS, StageConfig, StageRegularizerName
    from alignkit.transforms import TransformName

    assert set(LINEAR_MODELS + FIELD_MODELS) == set(get_args(TransformName))
    assert set(get_args(StageRegularizerName)) == set(get_args(FieldRegularizerName)) | {"energy"}
    warped, fixed = torch.rand(1, 1, 9, 8), torch.rand(1, 1, 9, 8)
    inside = torch.ones(1, 1, 9, 8)
    for name in get_args(SimilarityName):
        StageConfig(transform="svf", similarity=name)
        assert torch.isfinite(build_similarity(name)(warped, fixed, inside)), name
    field = torch.randn(1, 2, 9, 8)
    for name in get_args(FieldRegularizerName):
        StageConfig(transform="svf", regularizer=name, regularizer_weight=1.0)
        assert torch.isfinite(build_regularizer(name)(field, torch.tensor([1.0, 2.0]))), name


@pytest.mark.parametrize("n", [7, 200, 100_000])
@pytest.mark.parametrize("percentile", [0.0, 0.5, 10.0])
def test_mattes_mi_bounds_are_kthvalues(n: int, percentile: float) -> None:
    # the tails by topk (the fast path) give kthvalue's order statistics exactly
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(n))
    mi = MattesMI(percentile=percentile)
    lo, hi = mi._bounds(x)
    k_lo = min(n, round(percentile / 100.0 * (n - 1)) + 1)
    k_hi = min(n, round((1.0 - percentile / 100.0) * (n - 1)) + 1)
    assert torch.equal(lo, x.kthvalue(k_lo, dim=-1, keepdim=True).values)
    assert torch.equal(hi, x.kthvalue(k_hi, dim=-1, keepdim=True).values)


def test_mattes_mi_fixed_side_cache_follows_the_fixed_image() -> None:
    generator = torch.Generator().manual_seed(3)
    fixed, warped = torch.rand(1, 1, 24, 20, generator=generator), torch.rand(1, 1, 24, 20, generator=generator)
    cached = MattesMI(samples=200)
    for _ in range(2):  # the second call reads the cache
        assert torch.equal(cached(warped, fixed), MattesMI(samples=200)(warped, fixed))
        value, gradient = cached.value_and_gradient(warped, fixed)
        fresh_value, fresh_gradient = MattesMI(samples=200).value_and_gradient(warped, fixed)
        assert torch.equal(value, fresh_value) and torch.equal(gradient, fresh_gradient)
    fixed.mul_(3.0).add_(fixed.square())  # modified in place: a new range, a new value
    assert torch.equal(cached(warped, fixed), MattesMI(samples=200)(warped, fixed))
    other = torch.rand(1, 1, 24, 20, generator=generator)  # another fixed image
    assert torch.equal(cached(warped, other), MattesMI(samples=200)(warped, other))
