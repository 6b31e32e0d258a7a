"""c2f (Zampieri et al., coarse-to-fine chain of scale-specific networks): the block learns its task, the
chain composes maps and resamples once, the 8-symmetry average, tiled inference, the API and the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from alignkit.data.aligned import (
    AlignedPair,
    ScalePatchPairs,
    aligned_pairs,
    minor_class_fraction,
    segment_labels,
    split_pairs,
    synthetic_contrast,
)
from alignkit.data.synthetic import random_mixture_field
from alignkit.errors import ConfigError
from alignkit.methods import build_model
from alignkit.methods.c2f import (
    C2F,
    C2FMethod,
    block_spec,
    chain_factors,
    level_passes,
    symmetric_levels,
    translation_levels,
)
from alignkit.nets import pyramid, register_network
from alignkit.nets.pyramid import (
    STRUCTURE_FLOOR,
    ScaleChain,
    apply_symmetry,
    compose_displacements,
    invert_displacement,
    predict_residual,
    smooth_field,
    structure_confidence,
    symmetry_group,
    symmetry_push_field,
    tile_slices,
    weighted_smooth_field,
    weighted_translation,
)
from alignkit.spatial import Grid, gaussian_blur, sample_voxels
from tests.conftest import data_path

BLOCKS = ("block1", "block2", "block4")
#: the chain's raw mechanism: no residual smoothing, one pass per level (and no further ones), one direction
RAW = {"smoothing": 0.0, "passes": 1, "finest_passes": 1, "pass_tolerance": 0.0, "symmetric": "none",
       "translation_from": 0}


def small_blocks(width: float = 0.25, **extra) -> dict[str, dict]:
    return {k: {**block_spec(2, width), **extra} for k in BLOCKS}


def itk_pair() -> AlignedPair:
    data_path("multimodal", "itk-t1-pd-slices")
    return aligned_pairs("multimodal/itk-t1-pd-slices")[0]


# -- the eq.-3 field and the patch pairs ---------------------------------------------------------------
def test_mixture_field_is_bounded_smooth_and_seeded():
    a = random_mixture_field((40, 56), seed=3, max_displacement=2.0)
    b = random_mixture_field((40, 56), seed=3, max_displacement=2.0)
    assert a.shape == (1, 2, 40, 56) and torch.equal(a, b)
    assert float(a.norm(dim=1).max()) <= 2.0 + 1e-5
    assert float(a.norm(dim=1).max()) > 0.2  # not the zero field
    # smooth: neighbouring pixels differ by a small fraction of the amplitude
    assert float((a[..., 1:, :] - a[..., :-1, :]).abs().max()) < 0.5


def test_patch_pairs_truth_direction_and_bound():
    """moving ∘ (id + flow) reproduces fixed (alignkit's direction) at every block scale, on a real slice."""
    pair = itk_pair()
    mono = AlignedPair("t1", "t1", pair.fixed, pair.fixed, pair.valid, pad_is_background=True)
    identity = Grid.from_spacing((48, 48)).voxel_points()
    for factor in (1, 2, 4):
        ds = ScalePatchPairs([mono], size=48, length=4, scale_of_epoch=lambda e, f=factor: (f, False),
                             max_displacement=2.0, seed=1)
        item = ds[0]
        assert item["fixed"].shape == (1, 48, 48) and item["flow"].shape == (2, 48, 48)
        assert float(item["flow"].norm(dim=0).max()) <= 2.0 + 1e-5
        warped = sample_voxels(item["moving"][None], identity + item["flow"][None], padding="border")[0]
        inner = (slice(None), slice(3, -3), slice(3, -3))  # reads past the patch clamp at its border
        before = float((item["moving"] - item["fixed"])[inner].abs().mean())
        after = float((warped - item["fixed"])[inner].abs().mean())
        assert after < 1e-4 < before
        assert torch.equal(ds[0]["flow"], item["flow"])  # a pure function of (seed, epoch, index)


def test_minor_class_and_split():
    flat = torch.zeros(1, 20, 20)
    assert minor_class_fraction(flat) == 0.0
    half = torch.zeros(1, 20, 20)
    half[:, :10] = 1
    assert minor_class_fraction(half) == pytest.approx(0.5)
    pairs = [AlignedPair(f"s{i}/x{k}", f"s{i}", flat, flat, flat.bool()) for i in range(5) for k in range(3)]
    train, val = split_pairs(pairs, train=None, val=["s4"], val_fraction=0.2, seed=0)
    assert {p.group for p in val} == {"s4"} and "s4" not in {p.group for p in train}
    train, val = split_pairs(pairs, train=None, val=None, val_fraction=0.4, seed=0)
    assert not {p.group for p in train} & {p.group for p in val} and len({p.group for p in val}) == 2


def two_label_scene() -> tuple[Tensor, Tensor]:
    """A 64x64 scene: background, a disc (label 1) and a square (label 2); the image is a T1-like
    contrast of it (disc bright, square dark, unlabelled tissue between them mid-grey)."""
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    labels = torch.zeros(1, 64, 64, dtype=torch.int32)
    labels[0][(yy - 20) ** 2 + (xx - 20) ** 2 < 100] = 1
    labels[0, 36:56, 36:56] = 2
    image = torch.zeros(1, 64, 64)
    image[0, 8:60, 8:60] = 0.5
    image[labels == 1] = 0.9
    image[labels == 2] = 0.2
    return labels, image


def test_synthetic_contrast_keeps_structure_and_varies_contrast():
    """Each draw is a new contrast of the same anatomy: seeded, in [0, 1], flat inside each label (up to
    blur, bias and noise) with different label means from one draw to the next."""
    labels, image = two_label_scene()
    draws = [synthetic_contrast(labels, image, np.random.default_rng(k)) for k in range(6)]
    assert torch.equal(draws[0], synthetic_contrast(labels, image, np.random.default_rng(0)))
    inner_disc = torch.zeros_like(labels, dtype=torch.bool)
    inner_disc[0, 16:24, 16:24] = True
    inner_square = torch.zeros_like(inner_disc)
    inner_square[0, 40:52, 40:52] = True
    differences = []
    for out in draws:
        assert out.shape == (1, 64, 64) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        disc, square = out[inner_disc], out[inner_square]
        differences.append(float(disc.mean() - square.mean()))
        # inside a label the draw is nearly flat compared to the image's range
        assert float(disc.std()) < 0.15 and float(square.std()) < 0.15
    # the contrast between the two labels changes sign across draws: a new "modality" each time
    assert min(differences) < -0.1 and max(differences) > 0.1, differences


def test_patch_pairs_synthetic_contrast_only_in_training():
    labels, image = two_label_scene()
    edges = (labels != torch.roll(labels, 1, -1)).float()
    pair = AlignedPair("scene", "scene", image, edges, torch.ones_like(image, dtype=torch.bool), binary_moving=True,
                       pad_is_background=True, labels=labels)
    common = {"size": 24, "scale_of_epoch": lambda e: (1, False), "max_displacement": 2.0, "min_minor_class": 0.0}
    train = ScalePatchPairs([pair], length=8, synth_fraction=1.0, seed=0, **common)
    held = ScalePatchPairs([pair], length=8, synth_fraction=1.0, seed=0, held_out=True, **common)
    plain = ScalePatchPairs([pair], length=8, seed=0, **common)
    for i in range(8):
        synth_moving = train[i]["moving"]
        # the map (0/1) is replaced by a grey-level contrast; held-out patches keep the real pair
        assert ((synth_moving > 0.05) & (synth_moving < 0.95)).any()
        assert torch.equal(train[i]["moving"], synth_moving)  # a pure function of (seed, epoch, index)
        assert torch.equal(held[i]["moving"], ScalePatchPairs([pair], length=8, seed=0, held_out=True, **common)[i]["moving"])
        assert set(plain[i]["moving"].unique().tolist()) <= {0.0, 1.0}


def test_t1_pd_3d_slices_are_aligned():
    """The 3D head's T1 and its PD brought onto the T1 grid (measured rigid map): the two slices'
    gradient magnitudes correlate best at zero shift."""
    data_path("multimodal", "t1-pd-3d")
    pairs = aligned_pairs("multimodal/t1-pd-3d", slice_stride=40)
    assert pairs and all(p.group == "t1-pd-3d" and p.fixed.shape == p.moving.shape for p in pairs)

    def gradient(a: Tensor) -> Tensor:
        gy, gx = torch.gradient(a[0])
        return torch.hypot(gy, gx)[8:-8, 8:-8]

    for pair in pairs:
        g_fixed = gradient(pair.fixed)
        scores = {}
        for shift in (-3, 0, 3):
            g_moving = gradient(torch.roll(pair.moving, shift, dims=-1))
            scores[shift] = float(torch.corrcoef(torch.stack([g_fixed.flatten(), g_moving.flatten()]))[0, 1])
        assert scores[0] > max(scores[-3], scores[3]), (pair.name, scores)


# -- a block learns its scale's task -----------------------------------------------------------------------
@pytest.mark.slow
def test_block_training_reduces_field_error_on_real_slices():
    """A quarter-width A.1 block, 250 Adam steps (lr 1e-3, batches of 8) on eq.-3 deformations (<= 2 px)
    of patches of the real T1 slice at scale 2 (the block's task), brings the field error on held-out
    patches (other seeds) clearly below the identity's (measured: 0.97 px against 1.215 px)."""
    torch.manual_seed(0)
    pair = itk_pair()
    mono = AlignedPair("t1", "t1", pair.fixed, pair.fixed, pair.valid, pad_is_background=True)
    net = build_model("c2f", ndim=2, size=(32, 32), networks=small_blocks(0.25)).block2
    common = {"size": 32, "scale_of_epoch": lambda e: (2, False), "max_displacement": 2.0}
    train = ScalePatchPairs([mono], length=8 * 250, seed=0, **common)
    held = ScalePatchPairs([mono], length=32, seed=99, held_out=True, **common)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for batch in torch.utils.data.DataLoader(train, batch_size=8):
        loss = ((net(batch["fixed"], batch["moving"]) - batch["flow"]) ** 2).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    batch = next(iter(torch.utils.data.DataLoader(held, batch_size=32)))
    with torch.no_grad():
        error = (net(batch["fixed"], batch["moving"]) - batch["flow"]).norm(dim=1).mean()
    identity = batch["flow"].norm(dim=1).mean()
    assert float(error) < 0.88 * float(identity), (float(error), float(identity))


# -- the chain -------------------------------------------------------------------------------------------
@register_network("_test_affine_field")
class AffineField(nn.Module):
    """A stand-in block whose answer is known: ``a (x - centre) + t`` in pixels of its input; records
    the moving image it was given."""

    def __init__(self, *, scale: float = 0.0, shift: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift
        self.config = {"name": "_test_affine_field", "scale": scale, "shift": list(shift)}
        self.seen: list[Tensor] = []

    def forward(self, fixed: Tensor, moving: Tensor) -> Tensor:
        self.seen.append(moving.clone())
        shape = fixed.shape[2:]
        x = Grid.from_spacing(tuple(shape)).voxel_points()
        centre = torch.tensor([(s - 1) / 2 for s in shape]).view(1, 2, 1, 1)
        shift = torch.tensor(self.shift, dtype=torch.float32).view(1, 2, 1, 1)
        return (self.scale * (x - centre) + shift).expand(fixed.shape[0], -1, -1, -1)


def stub_model(coarse: AffineField, fine: AffineField) -> C2F:
    model = build_model("c2f", ndim=2, size=(32, 32),
                        networks={"block1": fine, "block2": coarse, "block4": AffineField()})
    model.trained[:] = 1
    return model


def test_chain_composes_maps_and_resamples_once():
    """Two levels (x2, x1): the coarse block answers a scaling ``a (x - c)``, the fine one a shift ``t``;
    the chain's map is their composition ``t + a (x + t - c)`` (addition would give ``t + a (x - c)``),
    and the fine block sees the moving image resampled once through the coarse map."""
    a, t = 0.04, (1.5, -2.0)
    coarse, fine = AffineField(scale=a), AffineField(shift=t)
    model = stub_model(coarse, fine)
    gen = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, 65, 65, generator=gen)
    moving = torch.rand(1, 1, 65, 65, generator=gen)
    assert chain_factors((65, 65), 32) == [2, 1]
    u = model.align(fixed, moving, mode="per-scale", tile=None, min_level=32, **RAW)
    x = Grid.from_spacing((65, 65)).voxel_points()
    c = torch.full((1, 2, 1, 1), 32.0)
    shift = torch.tensor(t).view(1, 2, 1, 1)
    expected = shift + a * (x + shift - c)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))  # away from the border clamp
    assert torch.allclose(u[inner], expected[inner], atol=1e-4)
    added = shift + a * (x - c)
    assert float((u - added)[inner].abs().max()) > 0.05
    # what the fine block saw: the moving image resampled once through the coarse map
    coarse_map = x + a * (x - c)
    once = sample_voxels(moving, coarse_map, padding="border")
    assert torch.allclose(fine.seen[-1], once, atol=1e-5)
    # the same chain in nets.pyramid.ScaleChain (an independent implementation) agrees everywhere
    reference = ScaleChain(networks=[coarse, fine], factors=(2, 1), combine="compose")(fixed, moving)
    assert torch.allclose(u, reference, atol=1e-4)


def test_coarsest_passes_compose_again_from_the_level_image():
    """A second pass at the coarsest level composes one more residual: a block answering a shift ``t``
    twice gives ``2 t`` there (the composition of two shifts); its second look is the level's own
    moving image resampled once through the first pass's map; passes must be >= 1, one per level."""
    t = (1.0, -0.5)
    coarse, fine = AffineField(shift=t), AffineField()
    model = stub_model(coarse, fine)
    gen = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, 65, 65, generator=gen)
    moving = torch.rand(1, 1, 65, 65, generator=gen)
    once = model.align(fixed, moving, mode="per-scale", tile=None, min_level=32, **RAW)
    twice = model.align(fixed, moving, mode="per-scale", tile=None, min_level=32, coarsest_passes=2, **RAW)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    assert torch.allclose(twice[inner], 2 * once[inner], atol=1e-4)
    assert len(coarse.seen) == 3  # one pass, then two
    level_moving = coarse.seen[1]  # the first pass of the second chain saw the level image itself
    x = Grid.from_spacing(tuple(level_moving.shape[2:])).voxel_points()
    first_pass = torch.tensor(t).view(1, 2, 1, 1)  # the block answers in pixels of its level
    expected = sample_voxels(level_moving, x + first_pass, padding="border")
    assert torch.allclose(coarse.seen[2], expected, atol=1e-5)
    with pytest.raises(ConfigError, match="passes"):
        ScaleChain(networks=[coarse, fine], factors=(2, 1), passes=[0, 1])


def test_symmetry_average_of_symmetric_pair_is_symmetric():
    """``accurate``: for a pair symmetric under a grid symmetry g, the 8-symmetry average of even an
    untrained block is g-equivariant (``push(u, g) == u``); the block's plain answer is not."""
    torch.manual_seed(0)
    net = build_model("c2f", ndim=2, size=(32, 32), networks=small_blocks(0.25, final_zero_init=False)).block1
    gen = torch.Generator().manual_seed(1)
    base = torch.rand(1, 1, 40, 40, generator=gen)
    fixed = base + base.transpose(2, 3)  # symmetric under the transpose
    other = torch.rand(1, 1, 40, 40, generator=gen)
    moving = other + other.transpose(2, 3)
    transpose = next(g for g in symmetry_group(2) if g == ((1, 0), (False, False)))
    assert torch.equal(apply_symmetry(fixed, transpose), fixed)
    with torch.no_grad():
        averaged = predict_residual(net, fixed, moving, symmetries="full")
        plain = predict_residual(net, fixed, moving)
    assert torch.allclose(symmetry_push_field(averaged, transpose), averaged, atol=1e-5)
    assert float((symmetry_push_field(plain, transpose) - plain).abs().max()) > 1e-3
    # and through the whole chain in accurate mode, for a left-right mirror symmetric pair
    model = build_model("c2f", ndim=2, size=(32, 32), networks=small_blocks(0.25, final_zero_init=False))
    model.trained[:] = 1
    mirror = ((0, 1), (False, True))
    fixed2, moving2 = base + base.flip(3), other + other.flip(3)
    u = model.align(fixed2, moving2, mode="accurate", tile=None, min_level=16)
    assert torch.allclose(symmetry_push_field(u, mirror), u, atol=1e-4)


def test_accurate_averages_the_chosen_blocks():
    """``accurate`` averages the scale-1 block's answers at every level by default (``accurate_blocks``
    ``shared``) and the scale-specific blocks' with ``per-scale``: 8 symmetric calls per level either way."""
    coarse, fine = AffineField(), AffineField()
    model = stub_model(coarse, fine)
    gen = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, 65, 65, generator=gen)
    moving = torch.rand(1, 1, 65, 65, generator=gen)
    model.align(fixed, moving, mode="accurate", tile=None, min_level=32, **RAW)
    assert (len(coarse.seen), len(fine.seen)) == (0, 16)
    model.align(fixed, moving, mode="accurate", tile=None, min_level=32, accurate_blocks="per-scale", **RAW)
    assert (len(coarse.seen), len(fine.seen)) == (8, 24)
    from alignkit.methods.registry import get_method

    with pytest.raises(ConfigError, match="accurate_blocks"):
        get_method("c2f").create(accurate_blocks="all")


def test_tiled_equals_untiled_away_from_seams():
    """Tiles of 128 pixels with a 32-pixel halo against one tile, random (untrained, non-zero) blocks on
    a real 221x257 slice: the fields agree to 0.02 px everywhere (the blocks see ~34 pixels around a
    pixel, the halo 32: what differs is zero padding at the halo's far edge), and to 1e-3 px on
    average."""
    torch.manual_seed(0)
    pair = itk_pair()
    model = build_model("c2f", ndim=2, size=(32, 32), networks=small_blocks(0.25, final_zero_init=False))
    model.trained[:] = 1
    fixed, moving = pair.fixed[None], torch.roll(pair.moving, (2, -1), (1, 2))[None]
    whole = model.align(fixed, moving, tile=None)
    tiled = model.align(fixed, moving, tile=128, halo=32)
    assert len(tile_slices(fixed.shape[2:], 128, 32)) > 1
    difference = (whole - tiled).norm(dim=1)
    assert float(whole.norm(dim=1).mean()) > 0.05  # the blocks do answer something
    assert float(difference.max()) < 0.02 and float(difference.mean()) < 1e-3
    # smoothing acts on each level's whole residual, after the tiles: it keeps the agreement
    whole = model.align(fixed, moving, tile=None, smoothing=8.0)
    tiled = model.align(fixed, moving, tile=128, halo=32, smoothing=8.0)
    difference = (whole - tiled).norm(dim=1)
    assert float(difference.max()) < 0.02 and float(difference.mean()) < 1e-3


def test_tiles_cover_once_and_start_aligned():
    shape = (301, 190)
    cover = torch.zeros(shape)
    for core, ext in tile_slices(shape, 128, 32):
        cover[core] += 1
        assert all(e.start % 4 == 0 for e in ext)
        assert all(e.start <= c.start and e.stop >= c.stop for c, e in zip(core, ext))
    assert torch.equal(cover, torch.ones(shape))
    with pytest.raises(ConfigError):
        tile_slices(shape, 64, 32)


def test_fast_uses_scale1_block_and_untrained_blocks_fall_back():
    model = build_model("c2f", ndim=2, size=(32, 32), networks=small_blocks(0.25))
    model.trained[:] = 0
    model.trained[0] = 1  # only block1 trained
    assert model.block_for(4, "per-scale") is model.block1
    model.trained[:] = 1
    assert model.block_for(8, "per-scale") is model.block4
    assert model.block_for(8, "fast") is model.block1
    assert model.block_for(2, "accurate") is model.block2


# -- API, training hook and CLI --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A c2f run trained for one short epoch per block by the training loop (through training_data)."""
    data_path("multimodal", "itk-t1-pd-slices")
    from alignkit.methods import train_method

    out = tmp_path_factory.mktemp("c2f_run")
    networks = {k: {kk: v for kk, v in block_spec(2, 0.25).items() if kk not in ("name", "ndim", "in_channels")}
                for k in BLOCKS}
    result = train_method({"method": "c2f", "dataset": "multimodal/itk-t1-pd-slices,multimodal/ct-mr-2d",
                           "val_subjects": ["ct-mr"], "size": 32, "batch_size": 4, "synthetic_length": 8,
                           "epochs": 1, "networks": networks, "device": "cpu", "quiet": True,
                           "method_options": {"warmup": 1, "edge_weight": 2.0}}, out)
    assert [row["stage"] for row in result.history] == ["block1", "block1", "block2", "block4"]
    assert "val_pck1" in result.history[-1]
    return out


def test_register_api_and_modes(tiny_run):
    import alignkit
    from alignkit.io import read_image

    folder = data_path("multimodal", "itk-t1-pd-slices")
    fixed, moving = folder / "BrainT1SliceBorder20.png", folder / "BrainProtonDensitySliceBorder20.png"
    result = alignkit.register(fixed, moving, method="c2f", checkpoint=tiny_run, mode="fast", tile=128)
    assert result.stages == ["c2f"] and result.metrics["c2f"]["mode"] == "fast"
    assert result.metrics["c2f"]["levels"][-1] == 1
    field = result.transform.stages[-1].voxels
    assert field.shape == (1, 2, *read_image(fixed).shape)
    with pytest.raises(ConfigError):
        alignkit.register(fixed, moving, method="c2f", checkpoint=tiny_run, mode="slow")


@pytest.mark.slow
def test_cli_register_and_bad_mode(tiny_run, tmp_path):
    folder = data_path("multimodal", "itk-t1-pd-slices")
    fixed, moving = folder / "BrainT1SliceBorder20.png", folder / "BrainProtonDensitySliceBorder20.png"
    base = [sys.executable, "-m", "alignkit", "register", str(fixed), str(moving), "--method", "c2f",
            "--checkpoint", str(tiny_run), "--quiet"]
    ok = subprocess.run([*base, "--mode", "fast", "--tile", "128", "-o", str(tmp_path / "out")],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert any((tmp_path / "out").iterdir())
    bad = subprocess.run([*base, "--mode", "slow", "-o", str(tmp_path / "bad")], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "mode" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_c2f_refuses_3d_and_bad_options():
    with pytest.raises(ConfigError):
        C2F.default_networks(3)
    with pytest.raises(ConfigError):
        build_model("c2f", ndim=2, size=(32, 32), networks=small_blocks(), max_displacement=0)
    from alignkit.methods import get_method

    with pytest.raises(ConfigError):
        get_method("c2f").create(tile=10)
    with pytest.raises(ConfigError):
        get_method("c2f").create(halo=30)
    assert np.isfinite(chain_factors((5000, 5000), 16)[0]) and chain_factors((5000, 5000), 16)[0] == 256


def test_shipped_model_registers_out_of_the_box():
    """``--method c2f`` with no checkpoint uses the model shipped in the package (<= 2 MiB, float16,
    with its recipe and card)."""
    import alignkit
    from alignkit.methods.shipped import MAX_BYTES, get_shipped, shipped_for

    shipped = get_shipped("c2f_multimodal2d")
    assert shipped.available() and shipped.path().stat().st_size <= MAX_BYTES
    assert shipped_for("c2f", 2) == shipped
    assert shipped.card()["method"] == "c2f" and shipped.recipe()["method"] == "c2f"
    folder = data_path("multimodal", "itk-t1-pd-slices")
    result = alignkit.register(folder / "BrainT1SliceBorder20.png", folder / "BrainProtonDensitySliceBorder20.png",
                               method="c2f")
    assert result.metrics["checkpoint"] == str(shipped.path())
    assert torch.isfinite(result.transform.stages[-1].voxels).all()


def test_the_chain_stops_near_the_training_patch_side_by_default():
    """The coarsest level is at least 90 % of the patches the blocks learnt on (the shipped model: 48 px,
    so 43 px: a 188-px slice's quarter, 47 px, is a level), unless ``min_level`` says otherwise; a model
    that records no size keeps 16."""
    from alignkit.methods.c2f import chain_factors
    from alignkit.methods.registry import get_method

    learned, _ = get_method("c2f").create().model(2, torch.device("cpu"))
    side = min(int(s) for s in learned.config["size"])
    assert learned.coarsest_side() == int(0.9 * side) and learned.coarsest_side(32) == 32
    assert chain_factors((256, 256), learned.coarsest_side()) == [4, 2, 1]
    assert chain_factors((188, 256), learned.coarsest_side()) == [4, 2, 1]
    assert chain_factors((188, 256), side) == [2, 1]
    from types import SimpleNamespace

    assert type(learned).coarsest_side(SimpleNamespace(config={})) == 16


def test_blocks_draw_only_pairs_aligned_well_enough_for_their_scale():
    """A pair known to 1.5 px teaches the scale-4 block (0.375 px there) but not the scale-1 or scale-2 ones."""
    _, image = two_label_scene()
    valid = torch.ones_like(image, dtype=torch.bool)
    exact = AlignedPair("exact", "a", image, image, valid, pad_is_background=True)
    rough = AlignedPair("rough", "b", image, image, valid, pad_is_background=True, misalignment=1.5)
    ds = ScalePatchPairs([exact, rough], size=16, length=4, max_displacement=2.0)
    assert ds.pool(1) == [exact] and ds.pool(2) == [exact] and ds.pool(4) == [exact, rough]
    with pytest.raises(ConfigError, match="aligned well enough"):
        ScalePatchPairs([rough], size=16, length=4, max_displacement=2.0).pool(1)
    # misaligned_as_mono: the rough pair teaches the scale-1 block as itself against itself only
    inverted = AlignedPair("rough", "b", image, 1 - image, valid, pad_is_background=True, misalignment=1.5)
    common = {"size": 24, "length": 6, "max_displacement": 2.0, "min_minor_class": 0.0, "seed": 0}
    mono = ScalePatchPairs([inverted], misaligned_as_mono=True, scale_of_epoch=lambda e: (1, False), **common)
    paired = ScalePatchPairs([inverted], misaligned_as_mono=True, scale_of_epoch=lambda e: (4, False), **common)
    identity = Grid.from_spacing((24, 24)).voxel_points()
    inner = (slice(None), slice(3, -3), slice(3, -3))
    for i in range(6):
        for ds, is_mono in ((mono, True), (paired, False)):
            item = ds[i]
            warped = sample_voxels(item["moving"][None], identity + item["flow"][None], padding="border")[0]
            reproduces = float((warped - item["fixed"])[inner].abs().max()) < 1e-4
            assert reproduces == is_mono


def test_segment_labels_cut_an_image_into_intensity_regions():
    """Every pixel is labelled; on a ramp the regions are bands across it (3-8 of them), in the ramp's order."""
    ramp = torch.linspace(0, 1, 64).view(1, 1, 64).expand(1, 48, 64).contiguous()
    counts = set()
    for seed in range(8):
        labels = segment_labels(ramp, np.random.default_rng(seed))
        assert labels.shape == (1, 48, 64) and labels.dtype == torch.int64 and int(labels.min()) >= 1
        assert torch.equal(labels, segment_labels(ramp, np.random.default_rng(seed)))
        assert bool((labels == labels[:, :1, :]).all())  # constant down each column
        row = labels[0, 0]
        assert bool((row[1:] >= row[:-1]).all())  # one band after the other along the ramp
        counts.add(len(row.unique()))
    assert min(counts) >= 2 and max(counts) <= 8 and len(counts) > 1, counts


def test_segment_synth_makes_exact_multimodal_pairs_from_one_image(monkeypatch):
    """``segment_synth``: a pair too rough for the scale-1 block (and without labels) teaches it through
    synthetic contrasts of ONE of its images, so the patch pair is exact whatever the pair's own error. With
    the contrast generator replaced by an inversion, the moving side pulled through the true field gives back
    the fixed side or its inverse to interpolation error (it never does for the real, 6-px-off pair, which
    held-out sets keep), and the synthetic side follows the base image's segments."""
    from alignkit.data import aligned

    _, image = two_label_scene()
    image = gaussian_blur(image[None], 1.0)[0]
    valid = torch.ones_like(image, dtype=torch.bool)
    shifted = torch.roll(1 - image, shifts=(5, -4), dims=(1, 2))  # another modality, 6 px off
    rough = AlignedPair("rough", "b", image, shifted, valid, pad_is_background=True, misalignment=1.5)
    common = {"size": 32, "length": 8, "max_displacement": 3.0, "min_minor_class": 0.0, "seed": 0,
              "scale_of_epoch": lambda e: (1, False)}
    with pytest.raises(ConfigError, match="aligned well enough"):
        ScalePatchPairs([rough], **common).pool(1)
    seen_labels = []

    def inverted(labels: Tensor, intensity: Tensor, rng: np.random.Generator) -> Tensor:
        seen_labels.append((labels, intensity))
        return 1 - intensity

    monkeypatch.setattr(aligned, "synthetic_contrast", inverted)
    ds = ScalePatchPairs([rough], segment_synth=1.0, **common)
    assert ds.pool(1) == [rough]
    identity = Grid.from_spacing((32, 32)).voxel_points()
    inner = (slice(None), slice(4, -4), slice(4, -4))
    for i in range(8):
        item = ds[i]
        warped = sample_voxels(item["moving"][None], identity + item["flow"][None], padding="border")[0]
        error = min(float((warped - item["fixed"])[inner].abs().max()),
                    float((1 - warped - item["fixed"])[inner].abs().max()))
        assert error < 0.05, (i, error)
    for labels, intensity in seen_labels:  # drawn from the segments of the image they recolour
        assert labels.shape == intensity.shape and int(labels.min()) >= 1
    held = ScalePatchPairs([rough], segment_synth=1.0, held_out=True, **common)
    for i in range(4):
        item = held[i]
        warped = sample_voxels(item["moving"][None], identity + item["flow"][None], padding="border")[0]
        error = min(float((warped - item["fixed"])[inner].abs().max()),
                    float((1 - warped - item["fixed"])[inner].abs().max()))
        assert error > 0.2


def test_residual_smoothing_blurs_each_residual_before_composing():
    """``smoothing`` σ: the one-level chain's map is the block's answer blurred by a Gaussian of σ pixels; a
    wide Gaussian, run on a shrunk grid, matches the direct one."""
    fine = AffineField(scale=0.05, shift=(0.5, 0.0))
    model = stub_model(AffineField(), fine)
    gen = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand(1, 1, 40, 40, generator=gen), torch.rand(1, 1, 40, 40, generator=gen)
    plain = model.align(fixed, moving, mode="fast", tile=None, min_level=32, **RAW)
    smooth = model.align(fixed, moving, mode="fast", tile=None, min_level=32, smoothing=2.0, passes=1, finest_passes=1,
                         weighting="uniform")
    assert torch.allclose(smooth, gaussian_blur(plain, 2.0), atol=1e-5)
    assert not torch.allclose(smooth, plain, atol=1e-3)  # replicated borders bend a linear field
    noise = gaussian_blur(torch.randn(1, 2, 160, 160, generator=gen), 3.0)
    wide, direct = smooth_field(noise, 12.0), gaussian_blur(noise, 12.0)
    inner = (slice(None), slice(None), slice(40, -40), slice(40, -40))
    assert float((wide - direct)[inner].abs().max()) < 0.1 * float(direct[inner].abs().max())
    with pytest.raises(ConfigError, match="residual_sigma"):
        ScaleChain(networks=[fine], factors=(1,), residual_sigma=-1.0)
    with pytest.raises(ConfigError, match="smoothing"):
        C2FMethod(smoothing=-2.0)


def test_structure_weighting_lets_structured_neighbours_answer_for_flat_regions(monkeypatch):
    """``weighting="structure"``: the weights are high where both images show structure, at the floor where either
    is flat or the moving image is read outside its grid; a constant weight is the plain smoothing; and a block that
    answers 1 px where it sees texture and 0 on the flat half is, near the texture, answered for by the textured
    side (normalised convolution), where the plain Gaussian halves the answer."""
    gen = torch.Generator().manual_seed(0)
    image = torch.zeros(1, 1, 64, 96)
    image[..., :48] = torch.rand(1, 1, 64, 48, generator=gen)  # textured left, flat (background) right
    zero = torch.zeros(1, 2, 64, 96)
    weight = structure_confidence(image, image, zero)
    assert weight.shape == (1, 1, 64, 96)
    assert float(weight[..., 8:-8, 4:40].mean()) > 0.4
    assert float(weight[..., 60:].max()) <= STRUCTURE_FLOOR + 1e-6
    pushed = zero.clone()
    pushed[:, 1] = 60.0  # x + 60 leaves the 96-px grid for x > 35
    assert float(structure_confidence(image, image, pushed)[..., 36:].max()) <= STRUCTURE_FLOOR + 1e-6
    flat_moving = torch.full_like(image, 0.5)  # either image flat: no trust
    assert float(structure_confidence(image, flat_moving, zero).max()) <= STRUCTURE_FLOOR + 1e-6
    # strips: the same weights whatever the strip length (a shifted, partly outside read)
    shifted = zero.clone()
    shifted[:, 0] = torch.linspace(-3.0, 5.0, 64).view(64, 1)
    moving = torch.roll(image, 2, dims=3)
    whole = structure_confidence(image, moving, shifted)
    monkeypatch.setattr(pyramid, "STRUCTURE_STRIP", 7)
    assert torch.allclose(structure_confidence(image, moving, shifted), whole, atol=1e-6)
    field = torch.randn(1, 2, 64, 96, generator=gen)
    for sigma in (3.0, 6.0):  # on the level's grid, and on a shrunk one
        assert torch.allclose(weighted_smooth_field(field, torch.full_like(weight, 0.3), sigma),
                              smooth_field(field, sigma), atol=1e-5)
    structured = weight[0, 0, 32] > 0.05
    edge = int(structured.nonzero().max())  # the last column with structure (the texture's edge, blurred)
    answer = torch.zeros(1, 2, 64, 96)
    answer[:, 1, :, : edge + 1] = 1.0
    near = (slice(None), 1, slice(16, 48), slice(edge + 4, edge + 10))  # flat pixels 4-10 px from any structure
    weighted, plain = weighted_smooth_field(answer, weight, 8.0), smooth_field(answer, 8.0)
    assert float(weighted[near].min()) > 0.75 and float(plain[near].max()) < 0.4
    # the chain applies it: the one-level chain's map is the weighted smoothing of the block's answer
    fine = AffineField(scale=0.05, shift=(0.5, 0.0))
    model = stub_model(AffineField(), fine)
    fixed = torch.rand(1, 1, 40, 40, generator=gen)
    fixed[..., 20:] = 0.5
    moving = torch.rand(1, 1, 40, 40, generator=gen)
    raw = model.align(fixed, moving, mode="fast", tile=None, min_level=32, **RAW)
    chained = model.align(fixed, moving, mode="fast", tile=None, min_level=32, smoothing=4.0, passes=1,
                          finest_passes=1, weighting="structure")
    expected = weighted_smooth_field(raw, structure_confidence(fixed, moving, torch.zeros_like(raw)), 4.0)
    assert torch.allclose(chained, expected, atol=1e-5)
    with pytest.raises(ConfigError, match="weighting"):
        C2FMethod(weighting="median")
    with pytest.raises(ConfigError, match="residual weighting"):
        ScaleChain(networks=[fine], factors=(1,), residual_weighting="median")


def test_passes_at_every_level_but_the_finest():
    """``passes``: each level coarser than the finest runs its block that many times, the finest
    ``finest_passes``; ``coarsest_passes`` is a floor for the coarsest level."""
    assert level_passes(3, 2, 1, 1) == [2, 2, 1]
    assert level_passes(3, 1, 3, 2) == [3, 1, 2]
    assert level_passes(1, 2, 1, 1) == [1] and level_passes(1, 2, 3, 1) == [3]
    coarse, fine = AffineField(shift=(0.5, 0.0)), AffineField(shift=(0.25, 0.0))
    model = stub_model(coarse, fine)
    gen = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand(1, 1, 65, 65, generator=gen), torch.rand(1, 1, 65, 65, generator=gen)
    u = model.align(fixed, moving, mode="per-scale", tile=None, min_level=32, passes=3, pass_tolerance=0.0)
    assert len(coarse.seen) == 3 and len(fine.seen) == 1
    inner = (slice(None), 0, slice(8, -8), slice(8, -8))
    # three coarse shifts of 0.5 level pixels (x2 on the fine grid) and one fine shift of 0.25
    assert torch.allclose(u[inner], torch.full_like(u[inner], 3 * 0.5 * 2 + 0.25), atol=1e-4)
    with pytest.raises(ConfigError, match="finest_passes"):
        C2FMethod(finest_passes=0)


def test_coarse_levels_pass_again_while_a_pass_still_moves_them():
    """``max_passes`` / ``pass_tolerance``: after its ``passes``, a coarse level runs its block again while the last
    residual's mean length is at least the tolerance (level pixels), never past ``max_passes``; the finest level
    runs exactly its own passes; a tolerance of 0 runs exactly ``passes``."""
    gen = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand(1, 1, 65, 65, generator=gen), torch.rand(1, 1, 65, 65, generator=gen)
    inner = (slice(None), 0, slice(8, -8), slice(8, -8))
    for tolerance, coarse_runs in ((0.4, 4), (0.6, 2), (0.0, 2)):
        coarse, fine = AffineField(shift=(0.5, 0.0)), AffineField(shift=(0.25, 0.0))
        model = stub_model(coarse, fine)
        u = model.align(fixed, moving, mode="per-scale", tile=None, min_level=32, smoothing=0.0, passes=2,
                        finest_passes=1, max_passes=4, pass_tolerance=tolerance)
        assert len(coarse.seen) == coarse_runs and len(fine.seen) == 1, tolerance
        # each coarse pass shifts 0.5 level pixels (x2 on the fine grid), the fine one 0.25
        assert torch.allclose(u[inner], torch.full_like(u[inner], coarse_runs * 0.5 * 2 + 0.25), atol=1e-4)
    bar_steps = []

    class Bar:
        def __init__(self, total: int, **_: object) -> None:
            bar_steps.append(total)

        def update(self, n: int) -> None:
            bar_steps.append(n)

        def close(self) -> None:
            pass

    model = stub_model(AffineField(shift=(0.5, 0.0)), AffineField())
    model.align(fixed, moving, mode="per-scale", tile=None, min_level=32, smoothing=0.0, passes=1, finest_passes=1,
                max_passes=3, pass_tolerance=0.6, progress=Bar)
    assert sum(bar_steps[1:]) == bar_steps[0]  # the passes a level skips still fill the bar
    with pytest.raises(ConfigError, match="min_passes"):
        ScaleChain(networks=[AffineField()], factors=(1,), passes=1, min_passes=2)
    with pytest.raises(ConfigError, match="pass_tolerance"):
        ScaleChain(networks=[AffineField()], factors=(1,), pass_tolerance=-1.0)
    with pytest.raises(ConfigError, match="pass_tolerance"):
        C2FMethod(pass_tolerance=-0.5)
    with pytest.raises(ConfigError, match="max_passes"):
        C2FMethod(max_passes=0)


def test_symmetric_averages_with_the_inverse_of_the_swapped_run():
    """``symmetric``: a level run both ways has its map averaged with the inverse of the swapped answer -- blocks
    biased alike in either order (a constant shift whichever image is fixed) cancel to 0 on every such level
    (``all``), the finest level's stays with ``coarse``; the fixed-point inverse of a smooth field composes with it to
    ~identity; the modes' defaults and the option's spellings."""
    gen = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand(1, 1, 65, 65, generator=gen), torch.rand(1, 1, 65, 65, generator=gen)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    model = stub_model(AffineField(shift=(0.5, -0.25)), AffineField(shift=(0.25, 0.5)))
    options = {"mode": "per-scale", "tile": None, "min_level": 32, **RAW}
    one_way = model.align(fixed, moving, **options)
    both = model.align(fixed, moving, **(options | {"symmetric": "all"}))
    assert float(one_way[inner].abs().max()) > 0.5
    assert float(both[inner].abs().max()) < 1e-4
    # only the coarse level both ways: its shift cancels, the fine one's stays
    coarse_only = model.align(fixed, moving, **(options | {"symmetric": "coarse"}))
    assert torch.allclose(coarse_only[inner], torch.tensor([0.25, 0.5]).view(1, 2, 1, 1).expand_as(coarse_only[inner]),
                          atol=1e-3)
    field = gaussian_blur(torch.randn(1, 2, 48, 48, generator=gen), 6.0)
    field = field * (3.0 / float(field.norm(dim=1).max()))  # a smooth field of up to 3 voxels
    inverse = invert_displacement(field)
    round_trip = compose_displacements(field, inverse)  # (id + field) ∘ (id + inverse)
    assert float(round_trip[inner].norm(dim=1).max()) < 0.02
    assert (C2FMethod(mode="accurate").symmetric, C2FMethod(mode="fast").symmetric) == ("coarse", "none")
    assert C2FMethod(mode="accurate", symmetric=False).symmetric == "none"
    assert C2FMethod(symmetric=True).symmetric == "all"
    assert symmetric_levels(3, "coarse") == [True, True, False] and symmetric_levels(2, "all") == [True, True]
    assert symmetric_levels(3, "none") == [False, False, False]
    with pytest.raises(ConfigError, match="symmetric"):
        C2FMethod(symmetric="yes")
    with pytest.raises(ConfigError, match="symmetric_levels"):
        ScaleChain(networks=[AffineField()], factors=(2, 1), symmetric_levels=[True])


def test_measured_misalignment_option_decides_which_blocks_a_pair_teaches():
    """``misalignment`` ``{"pattern": px}`` replaces a source's default: the CT/MR pair (known to ~2 px) teaches only
    the scale-4 block by default, every block once measured at 0.2 px; negative values are refused."""
    data_path("multimodal", "ct-mr-2d")
    from alignkit.train.config import TrainConfig

    base = {"method": "c2f", "dataset": "multimodal/ct-mr-2d,multimodal/itk-t1-pd-slices", "val_subjects": ["itk-t1-pd"],
            "size": 32, "batch_size": 4, "synthetic_length": 8, "epochs": 1, "device": "cpu", "quiet": True}
    train, _ = C2F.training_data(TrainConfig.from_dict({**base, "method_options": {}}))
    assert [p.name for p in train.pool(4)] == ["mri<-ct_true"]
    with pytest.raises(ConfigError, match="aligned well enough"):
        train.pool(1)
    measured, _ = C2F.training_data(TrainConfig.from_dict({**base, "method_options": {"misalignment": {"ct-mr": 0.2}}}))
    assert [p.name for p in measured.pool(1)] == ["mri<-ct_true"]
    with pytest.raises(ConfigError, match="misalignment"):
        C2F.training_data(TrainConfig.from_dict({**base, "method_options": {"misalignment": {"ct-mr": -1}}}))


def test_translation_levels_move_the_whole_image_only():
    """``translation_from``: a level shrunk by at least that factor has each pass's residual replaced by its mean --
    weighted by structure, so a flat region's answers do not count -- while finer levels keep their local answers;
    the rule's levels and the option's checks."""
    gen = torch.Generator().manual_seed(0)
    field = torch.randn(1, 2, 20, 30, generator=gen)
    assert torch.allclose(weighted_translation(field), field.mean(dim=(2, 3), keepdim=True).expand_as(field))
    weight = torch.full((1, 1, 20, 30), 1e-6)
    weight[..., :10, :] = 1.0  # only the top half counts
    assert torch.allclose(weighted_translation(field, weight)[:, :, 0, 0], field[..., :10, :].mean(dim=(2, 3)),
                          atol=1e-4)
    # a coarse block answering a scaling about the level's centre plus a shift: as a translation only the shift is
    # left (the scaling's mean is 0 on a symmetric grid); the fine level's own answer is local
    coarse, fine = AffineField(scale=0.05, shift=(0.5, -0.25)), AffineField(scale=0.02)
    model = stub_model(coarse, fine)
    fixed, moving = torch.rand(1, 1, 65, 65, generator=gen), torch.rand(1, 1, 65, 65, generator=gen)
    options = {"mode": "per-scale", "tile": None, "min_level": 32, **RAW, "weighting": "uniform"}
    local = model.align(fixed, moving, **options)
    shifted = model.align(fixed, moving, **(options | {"translation_from": 2}))
    x = Grid.from_spacing((65, 65)).voxel_points()
    centre = torch.full((1, 2, 1, 1), 32.0)
    expected = 0.02 * (x - centre) + torch.tensor([1.0, -0.5]).view(1, 2, 1, 1)  # coarse shift x2, then fine
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    assert torch.allclose(shifted[inner], expected[inner], atol=1e-3)
    assert float((local - shifted)[inner].abs().max()) > 0.5  # the coarse scaling was kept without the option
    # structure weighting: the mean counts where both images show structure
    flat_left = torch.rand(1, 1, 65, 65, generator=gen)
    flat_left[..., :, :32] = 0.5
    weights = pyramid.structure_confidence(flat_left, flat_left, torch.zeros(1, 2, 65, 65))
    assert float(weights[..., :, :20].max()) < 0.05 < float(weights[..., :, 45:].mean())
    assert translation_levels([8, 4, 2, 1], 4) == [True, True, False, False]
    assert translation_levels([4, 2, 1], 0) == [False, False, False]
    assert translation_levels([2, 1], 2) == [True, False]
    assert C2FMethod().translation_from == 4 and C2FMethod(translation_from="0").translation_from == 0
    for bad in (1, -2, 2.5, "x", True):
        with pytest.raises(ConfigError, match="translation_from"):
            C2FMethod(translation_from=bad)
    with pytest.raises(ConfigError, match="translation_levels"):
        ScaleChain(networks=[AffineField()], factors=(2, 1), translation_levels=[True])


def test_linear_prealignment_is_multimodal():
    """``transform="affine"``: c2f pre-aligns with the ``multimodal`` preset's mutual information, not the default
    preset's NCC: the ITK PD slice shifted by (13, 17) px lands on the unshifted one (aligned with the T1 slice) with
    a mean intensity error under 0.3 of the shifted slice's; with the NCC affine it was 0.47 (22.2 against 46.9 of
    255), with MI 0.20 (9.6)."""
    import alignkit
    from alignkit.io import read_image
    from alignkit.methods.c2f import PREALIGN_PRESET
    from alignkit.solve.presets import learned_prealign_config

    assert [s.similarity for s in learned_prealign_config(2, "affine", PREALIGN_PRESET).stages] == ["mi"]
    folder = data_path("multimodal", "itk-t1-pd-slices")
    moving = folder / "BrainProtonDensitySliceShifted13x17y.png"
    result = alignkit.register(folder / "BrainT1SliceBorder20.png", moving, method="c2f", transform="affine", seed=0)
    assert result.stages == ["affine", "c2f"]
    truth = read_image(folder / "BrainProtonDensitySliceBorder20.png").data.float()
    inner = (slice(None), slice(30, -30), slice(30, -30))
    error = (result.warped.data.float() - truth)[inner].abs().mean()
    before = (read_image(moving).data.float() - truth)[inner].abs().mean()
    assert float(error) < 0.3 * float(before), (float(error), float(before))
