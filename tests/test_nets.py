"""alignkit.nets: shapes (2D and 3D, odd sizes, low-resolution outputs), identity at init, gradient
flow, the correlation layer against a brute-force loop, composition conventions of the affine head
and the scale chain, descriptor geometry, and rebuilding every network from its config."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.nets import (
    NETWORKS,
    Correlation,
    FeatureEncoder,
    LargeKernelBlock,
    LKUNet,
    PseudoSiameseDescriptor,
    PyramidUNet,
    RecurrentAffineHead,
    ScaleChain,
    SiameseDescriptor,
    UNet,
    apply_symmetry,
    build_network,
    compose_affine,
    compose_displacements,
    correlation,
    correlation_displacements,
    network_config,
    symmetry_group,
    symmetry_pull_field,
    symmetry_push_field,
    warp_affine,
    warp_voxels,
)
from alignkit.spatial import Grid, rescale_voxel_displacement, sample_voxels

SMALL = {2: (32, 29), 3: (16, 15, 13)}  # odd sizes on purpose: down-sampling must round up


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: on a shared 2-core runner extra intra-op threads only add contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _pair(ndim: int, channels: int = 1, batch: int = 2) -> tuple[Tensor, Tensor]:
    shape = SMALL[ndim]
    return torch.randn(batch, channels, *shape), torch.randn(batch, channels, *shape)


def _assert_all_grads(module: nn.Module, loss: Tensor) -> None:
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reached: {missing}"


# -- U-Nets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("output_scale", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("residual", [True, False])
def test_unet_shape_rule_and_identity_init(ndim, output_scale, residual):
    fixed, moving = _pair(ndim)
    net = UNet(ndim=ndim, in_channels=2, out_channels=ndim, output_scale=output_scale, residual=residual)
    out = net(fixed, moving)
    expected = tuple(math.ceil(s * output_scale) for s in SMALL[ndim])
    assert out.shape == (2, ndim, *expected)
    assert net.output_shape(SMALL[ndim]) == expected
    # near-zero output layer: the untrained network is (almost) the identity...
    assert out.abs().max() < 1e-3
    # ...which is the init's doing, not an accident of the architecture.
    torch.manual_seed(0)
    loud = UNet(ndim=ndim, in_channels=2, out_channels=ndim, output_scale=output_scale, final_zero_init=False)
    assert loud(fixed, moving).abs().max() > 1e-2


def test_unet_single_and_concatenated_inputs_agree():
    fixed, moving = _pair(2)
    net = UNet(ndim=2, in_channels=2, out_channels=2, final_zero_init=False)
    torch.testing.assert_close(net(fixed, moving), net(torch.cat([fixed, moving], dim=1)))


@pytest.mark.parametrize("bad", [0.3, 2.0, 2.0**-4])
def test_unet_rejects_scales_it_cannot_output(bad):
    with pytest.raises(ConfigError):
        UNet(ndim=2, in_channels=1, out_channels=2, features=(8, 8, 8, 8), output_scale=bad)


def test_unet_checks_input_shape_by_name():
    net = UNet(ndim=3, in_channels=2, out_channels=3)
    with pytest.raises(ShapeError, match="expected"):
        net(torch.zeros(1, 3, 8, 8, 8))
    with pytest.raises(ShapeError):
        net(torch.zeros(1, 2, 8, 8))


@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
def test_unet_norms_and_other_down_up_modes(norm):
    net = UNet(
        ndim=2,
        in_channels=1,
        out_channels=2,
        features=(8, 16, 16),
        norm=norm,
        downsample="maxpool",
        upsample="transpose",
    )
    out = net(torch.randn(2, 1, 23, 18))
    assert out.shape == (2, 2, 23, 18)


@pytest.mark.parametrize("ndim", [2, 3])
def test_lkunet_shapes_and_init(ndim):
    fixed, moving = _pair(ndim)
    net = LKUNet(ndim=ndim, in_channels=2, out_channels=ndim, output_scale=0.5, large_kernel=5)
    out = net(fixed, moving)
    assert out.shape == (2, ndim, *(math.ceil(s / 2) for s in SMALL[ndim]))
    assert out.abs().max() < 1e-3


def test_large_kernel_block_sums_branches_with_identity():
    block = LargeKernelBlock(ndim=2, channels=3, large_kernel=5, activation="none")
    x = torch.randn(1, 3, 12, 12)
    # With every branch silenced the block is the identity branch alone.
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()
    torch.testing.assert_close(block(x), x)
    # The 5x5 branch reaches two voxels away in one block (a 3x3 block only reaches one).
    torch.manual_seed(1)
    block = LargeKernelBlock(ndim=2, channels=3, large_kernel=5, activation="none")
    impulse = torch.zeros(1, 3, 12, 12)
    impulse[..., 6, 6] = 1.0
    response = (block(impulse) - block(torch.zeros_like(impulse)) - impulse).abs().sum(dim=1)[0]  # no biases
    assert response[6, 8] > 0 and response[8, 8] > 0
    assert response[6, 9] == 0  # and no further: the kernel is 5 wide


# -- feature extractors (Jena et al. 2024 Fig. 9) ---------------------------------------------------------------
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"independent": True},
        {"independent": False},
        {"independent": False, "decoder": True},
        {"independent": True, "block": "lk"},
    ],
)
def test_feature_encoder_levels(ndim, kwargs):
    x = torch.randn(1, 1, *SMALL[ndim])
    net = FeatureEncoder(
        ndim=ndim, in_channels=1, levels=(0, 1, 2), out_channels=8, features=(8, 8, 16), **kwargs
    )
    feats = net(x)
    assert len(feats) == 3
    for level, f in zip((0, 1, 2), feats):
        assert f.shape == (1, 8, *(math.ceil(s / 2**level) for s in SMALL[ndim]))


def test_feature_encoder_encoder_only_has_independent_scales():
    net = FeatureEncoder(ndim=2, in_channels=1, levels=2, out_channels=4, features=(8, 8))
    x = torch.randn(1, 1, 16, 16)
    before = [f.detach().clone() for f in net(x)]
    with torch.no_grad():
        for p in net.encoders[1].parameters():
            p.add_(1.0)
    after = net(x)
    torch.testing.assert_close(after[0], before[0])  # level 0 does not use level 1's encoder
    assert not torch.allclose(after[1], before[1])
    with pytest.raises(ConfigError):
        FeatureEncoder(ndim=2, in_channels=1, levels=2, independent=True, decoder=True)
    with pytest.raises(ConfigError):
        FeatureEncoder(ndim=2, in_channels=1, levels=(0, 4), features=(8, 8, 8))


# -- correlation (the deep-learning registration survey §2.1) ------------------------------------------------------------------------
def _brute_force_correlation(
    f1: np.ndarray, f2: np.ndarray, max_d: int, stride: int, patch: int
) -> np.ndarray:
    """c(x, d) = sum_a <f1(x + a), f2(x + d + a)> / (C * patch^n), f2 (and f1) zero outside."""
    _, c, *spatial = f1.shape
    ndim = len(spatial)
    k = patch // 2
    r = max_d // stride
    displacements = list(itertools.product(range(-r * stride, r * stride + 1, stride), repeat=ndim))
    out = np.zeros((f1.shape[0], len(displacements), *spatial))

    def at(f: np.ndarray, b: int, p: tuple[int, ...]) -> np.ndarray:
        if all(0 <= q < s for q, s in zip(p, spatial)):
            return f[(b, slice(None), *p)]
        return np.zeros(c)

    for b in range(f1.shape[0]):
        for x in itertools.product(*(range(s) for s in spatial)):
            for i, d in enumerate(displacements):
                total = 0.0
                for a in itertools.product(range(-k, k + 1), repeat=ndim):
                    p1 = tuple(xi + ai for xi, ai in zip(x, a))
                    p2 = tuple(xi + di + ai for xi, di, ai in zip(x, d, a))
                    total += float(at(f1, b, p1) @ at(f2, b, p2))
                out[(b, i, *x)] = total / (c * patch**ndim)
    return out


@pytest.mark.parametrize(
    ("shape", "max_d", "stride", "patch"),
    [((6, 7), 3, 1, 1), ((6, 7), 4, 2, 1), ((5, 6), 2, 1, 3), ((4, 5, 3), 1, 1, 1), ((4, 3, 3), 2, 2, 3)],
)
def test_correlation_matches_brute_force(shape, max_d, stride, patch):
    f1 = torch.randn(2, 3, *shape, dtype=torch.float64)
    f2 = torch.randn(2, 3, *shape, dtype=torch.float64)
    out = correlation(f1, f2, max_d, stride, patch_size=patch)
    expected = _brute_force_correlation(f1.numpy(), f2.numpy(), max_d, stride, patch)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-12)


def test_correlation_channel_order_is_array_axis_displacement():
    """f2 is f1 moved by d (f2(x + d) = f1(x)): the peak channel must be the one labelled d."""
    d = (2, -1)
    f1 = torch.randn(1, 64, 20, 20)  # enough channels that the true match stands out
    f2 = torch.roll(f1, shifts=d, dims=(2, 3))
    module = Correlation(max_displacement=3)
    out = module(f1, f2)
    assert out.shape[1] == module.out_channels(2) == 49
    peak = out[0, :, 10, 10].argmax().item()
    assert tuple(module.displacements(2)[peak].tolist()) == d
    assert tuple(correlation_displacements(3, 1, 2)[peak].tolist()) == d


def test_correlation_gradient_float64():
    f1 = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: correlation(a, b, 2, 1, patch_size=3), (f1, f2))


# -- recurrent affine head (Shen et al. 2019 §2.1) --------------------------------------------------------------
@pytest.mark.parametrize("ndim", [2, 3])
def test_recurrent_affine_head_starts_at_identity(ndim):
    fixed = torch.randn(2, 1, *SMALL[ndim])
    moving = torch.randn(2, 1, *(s + 3 for s in SMALL[ndim]))  # shapes may differ: unit frame
    head = RecurrentAffineHead(ndim=ndim, features=(8, 8, 16), num_steps=3, hidden=16)
    matrices = head(fixed, moving)
    assert len(matrices) == 3
    identity = torch.eye(ndim, ndim + 1).expand(2, -1, -1)
    for m in matrices:
        assert m.shape == (2, ndim, ndim + 1)
        torch.testing.assert_close(m, identity, rtol=0, atol=0)
    assert len(head(fixed, moving, steps=5)) == 5


def test_recurrent_affine_head_gradients_reach_everything():
    fixed, moving = _pair(2)
    head = RecurrentAffineHead(ndim=2, features=(8, 8, 16), num_steps=2, hidden=16)
    # At init only the zeroed last layer gets a gradient (the encoder's is multiplied by zero
    # weights); one small nudge, as the first optimiser step gives, opens the path to all.
    with torch.no_grad():
        head.out.weight.normal_(std=1e-2)
    _assert_all_grads(head, sum((m * torch.randn_like(m)).sum() for m in head(fixed, moving)))


def test_warp_affine_frame_is_array_axis_unit_coordinates():
    moving = torch.arange(9 * 7, dtype=torch.float32).view(1, 1, 9, 7)
    theta = torch.eye(2, 3).unsqueeze(0).clone()
    theta[0, 0, 2] = 2.0 / (9 - 1)  # one voxel along array axis 0, in unit coordinates
    warped = warp_affine(moving, theta, (9, 7), padding="border")
    torch.testing.assert_close(warped[0, 0, :-1], moving[0, 0, 1:])  # warped(x) = moving(x + e_0)


@pytest.mark.parametrize("order", ["right", "left"])
def test_recurrent_affine_composition_order(order, monkeypatch):
    fixed, moving = torch.randn(1, 1, 12, 10), torch.randn(1, 1, 12, 10)
    head = RecurrentAffineHead(ndim=2, features=(4, 4), num_steps=2, hidden=4, update_order=order)
    u1 = torch.tensor([[[1.1, 0.2, 0.1], [0.0, 0.9, -0.2]]])
    u2 = torch.tensor([[[0.8, -0.1, 0.05], [0.3, 1.2, 0.0]]])
    seen: list[Tensor] = []
    updates = iter([u1, u2])

    def fake_update(fixed: Tensor, warped: Tensor) -> Tensor:
        seen.append(warped)
        return next(updates)

    monkeypatch.setattr(head, "update", fake_update)
    m1, m2 = head(fixed, moving)
    torch.testing.assert_close(m1, u1)
    expected = compose_affine(u1, u2) if order == "right" else compose_affine(u2, u1)
    torch.testing.assert_close(m2, expected)
    # compose_affine(a, b) is the map x -> a(b(x)), checked on a point
    point = torch.tensor([0.3, -0.5, 1.0])
    torch.testing.assert_close(
        compose_affine(u1, u2)[0] @ point, u1[0] @ torch.cat([u2[0] @ point, torch.ones(1)])
    )
    # step 2 resamples the *original* moving image once through the composed map
    torch.testing.assert_close(seen[1], warp_affine(moving, m1, (12, 10)))


# -- two-stream pyramid U-Net and the scale chain (Zampieri et al. 2018) --------------------------------------------
def test_pyramid_unet_follows_appendix_a1():
    net = PyramidUNet(ndim=2, shared_streams=True)  # one stream counted once: the A.1 table
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    deconvs = [m for m in net.modules() if isinstance(m, nn.ConvTranspose2d)]
    stream, merge = [16, 32, 32, 32, 64, 64], [32, 32, 64, 64, 64, 64]  # conv-1..6, conv-7..12
    decoder, head = [64, 64, 64, 64], [32, 2]  # conv-11/12 (level 1), conv-13/14; conv-15, conv-16
    assert [c.out_channels for c in convs] == stream + merge + decoder + head
    assert [c.kernel_size for c in convs[:2]] == [(5, 5), (5, 5)]
    assert [d.out_channels for d in deconvs] == [64, 32]
    two = PyramidUNet(ndim=2)
    n_shared = sum(p.numel() for p in net.parameters())
    n_two = sum(p.numel() for p in two.parameters())
    n_stream = sum(p.numel() for p in net.stream_fixed.parameters())
    assert n_two - n_shared == n_stream


@pytest.mark.parametrize("ndim", [2, 3])
def test_pyramid_unet_two_modalities_shapes_and_init(ndim):
    shape = SMALL[ndim]
    rgb, label = torch.randn(2, 3, *shape), torch.randn(2, 1, *shape)
    kw = {"stream_features": (8, 8, 16), "merge_features": (8, 16, 16), "decoder_features": (16, 16)}
    net = PyramidUNet(ndim=ndim, in_channels=(3, 1), head_features=8, **kw)
    out = net(rgb, label)
    assert out.shape == (2, ndim, *shape)
    assert out.abs().max() < 1e-3
    with pytest.raises(ShapeError):
        net(label, rgb)  # each stream has its own channel count
    _assert_all_grads(net, (out * torch.randn_like(out)).sum())


class _Constant(nn.Module):
    """A stand-in level network answering a fixed displacement (voxels of its level grid)."""

    def __init__(self, value: tuple[float, ...]) -> None:
        super().__init__()
        self.value = torch.tensor(value)
        self.seen: list[tuple[Tensor, Tensor]] = []

    def forward(self, fixed: Tensor, moving: Tensor) -> Tensor:
        self.seen.append((fixed, moving))
        ndim = fixed.dim() - 2
        return self.value.view(1, ndim, *([1] * ndim)).expand(fixed.shape[0], ndim, *fixed.shape[2:]).clone()


class _Gradient(nn.Module):
    """An equivariant stand-in: the spatial gradient of the warped moving image, which transforms
    under axis permutations and flips exactly like a displacement field."""

    def forward(self, fixed: Tensor, moving: Tensor) -> Tensor:
        dims = tuple(range(2, moving.dim()))
        return torch.cat(torch.gradient(moving, dim=dims), dim=1)


def _tiny_pyramid(ndim: int) -> dict:
    net = PyramidUNet(
        ndim=ndim, stream_features=(4, 8), merge_features=(8, 8), decoder_features=(8,), head_features=4
    )
    return network_config(net)


def test_scale_chain_rescales_units_between_levels():
    shape = (33, 25)
    fixed, moving = torch.randn(1, 1, *shape), torch.randn(1, 1, *shape)
    chain = ScaleChain(networks=[_tiny_pyramid(2)] * 3, factors=(4, 2, 1))
    chain.networks = nn.ModuleList([_Constant((1.0, -0.5)), _Constant((0.25, 0.5)), _Constant((0.5, 0.0))])
    levels = chain.levels(fixed, moving)
    shapes = [Grid.from_spacing(shape).downsampled(f).shape for f in (4, 2, 1)]
    assert [tuple(u.shape[2:]) for u in levels] == shapes
    # translations compose by adding, each converted from its level's voxels to the finest one
    expected = torch.zeros(2)
    for value, level_shape in zip(((1.0, -0.5), (0.25, 0.5), (0.5, 0.0)), shapes):
        scale = torch.tensor([(s - 1) / (ls - 1) for s, ls in zip(shape, level_shape)])
        expected += torch.tensor(value) * scale
    out = chain(fixed, moving)
    assert out.shape == (1, 2, *shape)
    torch.testing.assert_close(out.mean(dim=(2, 3))[0], expected)
    torch.testing.assert_close(out.std(dim=(2, 3))[0], torch.zeros(2), atol=1e-5, rtol=0)
    # "fast": the finest network everywhere
    fast = chain(fixed, moving, mode="fast").mean(dim=(2, 3))[0]
    scales = [torch.tensor([(s - 1) / (ls - 1) for s, ls in zip(shape, level)]) for level in shapes]
    torch.testing.assert_close(fast, sum(torch.tensor([0.5, 0.0]) * s for s in scales))


def test_scale_chain_warps_each_level_with_the_previous_estimate():
    shape = (17, 17)
    ramp = torch.arange(shape[0], dtype=torch.float32).view(1, 1, -1, 1).expand(1, 1, *shape).contiguous()
    chain = ScaleChain(networks=[_tiny_pyramid(2)] * 2, factors=(2, 1), padding="border")
    first, second = _Constant((1.0, 0.0)), _Constant((0.0, 0.0))
    chain.networks = nn.ModuleList([first, second])
    chain(ramp, ramp)
    _, warped = second.seen[0]
    # level 0 has 9 voxels per axis: one of its voxels is 2 of the full grid, so the ramp reads +2
    torch.testing.assert_close(warped[0, 0, 1:-3, 4], ramp[0, 0, 1:-3, 4] + 2.0)


@pytest.mark.parametrize("combine", ["compose", "add"])
def test_scale_chain_combines_the_residual_as_configured(combine):
    shape = (15, 12)
    fixed, moving = torch.randn(1, 1, *shape), torch.randn(1, 1, *shape)
    chain = ScaleChain(networks=[_tiny_pyramid(2)] * 2, factors=(2, 1), combine=combine)
    chain.networks = nn.ModuleList([_Gradient(), _Gradient()])  # non-constant residuals
    coarse, fine = chain.levels(fixed, moving)
    previous = rescale_voxel_displacement(coarse, shape)
    residual = _Gradient()(fixed, warp_voxels(moving, previous))
    expected = compose_displacements(previous, residual) if combine == "compose" else previous + residual
    torch.testing.assert_close(fine, expected)
    assert not torch.allclose(compose_displacements(previous, residual), previous + residual, atol=1e-3)


def test_compose_displacements_is_map_composition():
    shape = (11, 12)
    ident = Grid.from_spacing(shape).voxel_points()
    a = torch.tensor([[0.05, -0.02], [0.03, 0.04]])
    outer = torch.einsum("ij,bj...->bi...", a, ident)  # u(x) = A x, linear: interpolation is exact
    inner = torch.tensor([0.7, -0.4]).view(1, 2, 1, 1).expand(1, 2, *shape)  # r(x) = c
    composed = compose_displacements(outer, inner)
    expected = inner + torch.einsum("ij,bj...->bi...", a, ident + inner)  # c + A (x + c)
    torch.testing.assert_close(composed[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1])
    # and it is what warping twice does (on a linear image, so that resampling twice is exact)
    image = (torch.tensor([0.6, -1.3]).view(1, 2, 1, 1) * ident).sum(dim=1, keepdim=True) + 2.0
    twice = warp_voxels(warp_voxels(image, outer), inner)
    once = warp_voxels(image, composed)
    torch.testing.assert_close(twice[..., 2:-2, 2:-2], once[..., 2:-2, 2:-2], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("shape", "kind"), [((9, 7), "full"), ((5, 6, 4), "flips"), ((4, 5, 3), "full")])
def test_symmetry_field_rules(shape, kind):
    ndim = len(shape)
    group = symmetry_group(ndim, kind)
    assert len(group) == (2**ndim) * (math.factorial(ndim) if kind == "full" else 1)
    image = torch.randn(1, 2, *shape)
    u = 0.8 * torch.randn(1, ndim, *shape)
    for g in group:
        pushed = symmetry_push_field(u, g)
        torch.testing.assert_close(symmetry_pull_field(pushed, g), u)
        # T(image ∘ (id + u)) == T(image) ∘ (id + push(u))
        lhs = apply_symmetry(warp_voxels(image, u), g)
        rhs = warp_voxels(apply_symmetry(image, g), pushed)
        torch.testing.assert_close(lhs, rhs, atol=1e-5, rtol=0)


def test_scale_chain_accurate_mode_averages_over_symmetries():
    shape = (14, 11)
    fixed, moving = torch.randn(1, 1, *shape), torch.randn(1, 1, *shape)
    chain = ScaleChain(networks=[_tiny_pyramid(2)] * 2, factors=(2, 1))
    # An equivariant network gives the same answer in every frame, so averaging changes nothing...
    chain.networks = nn.ModuleList([_Gradient(), _Gradient()])
    standard = chain(fixed, moving)
    torch.testing.assert_close(chain(fixed, moving, mode="accurate"), standard, atol=1e-5, rtol=0)
    assert standard.abs().max() > 0.1
    # ...while a constant answer is pointed every way in turn and averages out.
    chain.networks = nn.ModuleList([_Constant((1.0, 2.0)), _Constant((1.0, 2.0))])
    torch.testing.assert_close(
        chain(fixed, moving, mode="accurate"), torch.zeros(1, 2, *shape), atol=1e-6, rtol=0
    )
    assert len(chain.networks[0].seen) == 8  # the 8 rotations and reflections of Zampieri et al. 2018


@pytest.mark.parametrize("ndim", [2, 3])
def test_scale_chain_of_pyramid_unets_starts_near_identity_and_trains(ndim):
    fixed, moving = _pair(ndim, batch=1)
    chain = ScaleChain(networks=[_tiny_pyramid(ndim)] * 2, factors=(2, 1))
    out = chain(fixed, moving)
    assert out.shape == (1, ndim, *SMALL[ndim])
    assert out.abs().max() < 1e-3
    _assert_all_grads(chain, (out * torch.randn_like(out)).sum())


def test_rescale_displacement_keeps_physical_length():
    u = torch.full((1, 2, 5, 9), 1.0)
    out = rescale_voxel_displacement(u, (9, 17))  # corner-aligned: voxels are half as large
    torch.testing.assert_close(out, torch.full((1, 2, 9, 17), 2.0))


# -- descriptors (Dong et al. 2018) -----------------------------------------------------------------------------
@pytest.mark.parametrize("ndim", [2, 3])
def test_descriptors_unit_norm_and_dense_equals_patches(ndim):
    net = SiameseDescriptor(ndim=ndim, patch_size=10 if ndim == 3 else 16, descriptor_dim=32)
    p = net.patch_size
    image = torch.randn(1, 1, *([p + 5] * ndim))
    dense = net.dense(image)
    assert dense.shape == (1, 32, *image.shape[2:])
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(1, *image.shape[2:]))
    c = (p - 1) // 2
    for pos in [(c,) * ndim, (c + 3,) * ndim, tuple(c + i for i in range(ndim))]:
        patch = image[(0, slice(None), *(slice(q - c, q - c + p) for q in pos))].unsqueeze(0)
        descriptor = net(patch)
        assert descriptor.shape == (1, 32)
        torch.testing.assert_close(descriptor.norm(dim=1), torch.ones(1))
        torch.testing.assert_close(descriptor[0], dense[(0, slice(None), *pos)], atol=1e-5, rtol=1e-4)
    with pytest.raises(ShapeError, match="dense"):
        net(image)


def test_siamese_is_the_paper_architecture_and_shares_everything():
    net = SiameseDescriptor(ndim=2, in_channels=3)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (5, 5)), (64, (3, 3)), (256, (4, 4))]
    patches = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(net(patches, stream=0), net(patches, stream=1))


def test_pseudo_siamese_unshares_only_the_first_layer():
    siamese = SiameseDescriptor(ndim=2, in_channels=1)
    pseudo = PseudoSiameseDescriptor(ndim=2, in_channels=(3, 1))  # RGB and NIR
    first_rgb = sum(p.numel() for p in pseudo.layers[0][0].parameters())
    assert (
        sum(p.numel() for p in pseudo.parameters())
        == sum(p.numel() for p in siamese.parameters()) + first_rgb
    )
    rgb, nir = torch.randn(5, 3, 16, 16), torch.randn(5, 1, 16, 16)
    d_rgb, d_nir = pseudo(rgb, stream=0), pseudo(nir, stream=1)
    assert d_rgb.shape == d_nir.shape == (5, 256)
    torch.testing.assert_close(d_rgb.norm(dim=1), torch.ones(5))
    _assert_all_grads(pseudo, (d_rgb * d_nir).sum())
    same = PseudoSiameseDescriptor(ndim=2, in_channels=1, unshared_layers=1)
    assert not torch.allclose(same(nir, stream=0), same(nir, stream=1))
    with pytest.raises(ShapeError):
        pseudo(nir, stream=0)


# -- gradients, registry, determinism --------------------------------------------------------------
def _all_networks(ndim: int) -> list[tuple[nn.Module, tuple[Tensor, ...]]]:
    shape = SMALL[ndim]
    x, y = torch.randn(1, 1, *shape), torch.randn(1, 1, *shape)
    small = {"features": (4, 8, 8)}
    return [
        (UNet(ndim=ndim, in_channels=2, out_channels=ndim, output_scale=0.5, **small), (x, y)),
        (LKUNet(ndim=ndim, in_channels=2, out_channels=ndim, **small), (x, y)),
        (FeatureEncoder(ndim=ndim, in_channels=1, levels=(0, 2), out_channels=4, **small), (x,)),
        (
            FeatureEncoder(ndim=ndim, in_channels=1, levels=(1,), independent=False, decoder=True, **small),
            (x,),
        ),
        (build_network(_tiny_pyramid(ndim)), (x, y)),
        (ScaleChain(networks=[_tiny_pyramid(ndim)], factors=(2, 1)), (x, y)),
        (RecurrentAffineHead(ndim=ndim, features=(4, 8), num_steps=2, hidden=8), (x, y)),
        (Correlation(max_displacement=2, stride=2), (x, y)),
        (SiameseDescriptor(ndim=ndim, patch_size=10, descriptor_dim=8), (torch.randn(2, 1, *[10] * ndim),)),
        (
            PseudoSiameseDescriptor(ndim=ndim, patch_size=10, descriptor_dim=8, unshared_layers=2),
            (torch.randn(2, 1, *[10] * ndim),),
        ),
    ]


def _flat_output(out: Tensor | list[Tensor]) -> Tensor:
    return torch.cat([o.flatten() for o in out]) if isinstance(out, list) else out.flatten()


@pytest.mark.parametrize("ndim", [2, 3])
def test_gradients_flow_to_every_parameter(ndim):
    for net, inputs in _all_networks(ndim):
        if isinstance(net, RecurrentAffineHead):
            with torch.no_grad():
                net.out.weight.normal_(std=1e-2)  # see test_recurrent_affine_head_gradients_reach_everything
        if isinstance(net, PseudoSiameseDescriptor):
            out = torch.cat([net(inputs[0], stream=0), net(inputs[0], stream=1)])
        else:
            out = _flat_output(net(*inputs))
        if not list(net.parameters()):
            continue  # the correlation layer has none
        net.zero_grad()
        _assert_all_grads(net, (out * torch.randn_like(out)).sum())


@pytest.mark.parametrize("ndim", [2, 3])
def test_build_network_round_trip(ndim):
    for net, inputs in _all_networks(ndim):
        config = network_config(net)
        assert config["name"] in NETWORKS and NETWORKS[config["name"]] is type(net)
        assert json.loads(json.dumps(config)) == config  # plain data: JSON and weights_only safe
        rebuilt = build_network(json.loads(json.dumps(config)))
        assert type(rebuilt) is type(net) and network_config(rebuilt) == config
        rebuilt.load_state_dict(net.state_dict())  # same architecture, parameter for parameter
        net.eval()
        rebuilt.eval()
        torch.testing.assert_close(_flat_output(rebuilt(*inputs)), _flat_output(net(*inputs)))


def test_every_registered_network_is_covered_and_bad_configs_fail():
    covered = {type(net) for net, _ in _all_networks(2)}
    # the networks of one method each, tested in that method's file (test_flownet, test_stereo_net,
    # test_stereo_volume)
    elsewhere = {"flow_decoder", "flownet_s", "flownet_c", "flownet_stack", "mccnn_fast", "stereo_volume"}
    assert elsewhere <= set(NETWORKS)
    ours = {
        cls for name, cls in NETWORKS.items() if cls.__module__.startswith("alignkit.nets.") and name not in elsewhere
    }  # others may register
    assert len(ours) == 9 and ours <= covered
    with pytest.raises(ConfigError, match="unknown network"):
        build_network({"name": "no_such_net"})
    with pytest.raises(ConfigError, match="unet"):
        build_network({"name": "unet", "ndim": 2, "in_channels": 1, "out_channels": 2, "depth": 3})
    with pytest.raises(ConfigError, match="name"):
        build_network({"ndim": 2})
    with pytest.raises(ConfigError):
        network_config(nn.Conv2d(1, 1, 3))


def test_seeded_construction_and_forward_are_deterministic():
    fixed, moving = _pair(2)
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        net = UNet(ndim=2, in_channels=2, out_channels=2, final_zero_init=False)
        outputs.append(net(fixed, moving))
        outputs.append(net(fixed, moving))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    torch.testing.assert_close(outputs[0], outputs[2], rtol=0, atol=0)
    torch.manual_seed(124)
    other = UNet(ndim=2, in_channels=2, out_channels=2, final_zero_init=False)
    assert not torch.allclose(other(fixed, moving), outputs[0])


def test_sample_voxels_is_the_warp_used_by_the_nets():
    """The chain's warp is alignkit's sampler on ``identity + u`` (not a private grid_sample)."""
    image = torch.randn(1, 1, 7, 6)
    u = 0.5 * torch.randn(1, 2, 7, 6)
    expected = sample_voxels(image, Grid.from_spacing((7, 6)).voxel_points() + u, padding="border")
    torch.testing.assert_close(warp_voxels(image, u), expected)
