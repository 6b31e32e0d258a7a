"""``c2f``: a coarse-to-fine chain of scale-specific networks for dense multimodal 2D alignment.

Zampieri, Charpiat, Girard, Tarabalka, "Coarse to fine non-rigid registration: a chain of
scale-specific neural networks for multimodal image alignment with application to remote sensing"
(2018). The whole system, wired from parts that exist elsewhere:

* **block** (appendix A.1): :class:`~alignkit.nets.pyramid.PyramidUNet` -- one convolutional pyramid
  per modality (5x5x16, 5x5x32, pool, 3x3x32 x2, pool, 3x3x64 x2), the two concatenated at each of
  the three scales, a decoder of deconvolutions with skip concatenations, a 2-channel displacement
  in pixels. One block per shrink factor in :data:`BLOCK_FACTORS` (``block1``, ``block2``,
  ``block4``); coarser levels of the chain use the coarsest block.
* **task at scale s** (§3.5): each block learns "1-pixel precision for displacements of at most
  ``max_displacement`` (2) pixels at its own scale" on aligned multimodal pairs deformed by eq. 3
  (:class:`alignkit.data.aligned.ScalePatchPairs`, through :meth:`C2F.training_data`); loss: the
  squared distance to the true displacement (``edge_weight`` times more on the map's edges) +
  ``laplacian_weight`` x eq. 4 (:class:`~alignkit.losses.Laplacian`). One training stage per block
  (``block1``, ``block2``, ``block4``), trained independently as in §3.6. The paper's training
  tricks are options: ``edge_weight`` (loss multiplier on the map's edges), ``min_minor_class``
  (patches whose minor class is under 5 % are redrawn), ``warmup`` (first epochs of each block on 4
  images); ``mono_fraction`` adds one-modality patches (ours: the blocks learn plain shifts first);
  ``synth_fraction`` gives patches of labelled pairs random synthetic contrasts drawn from their labels
  (ours, after SynthMorph: :func:`alignkit.data.aligned.synthetic_contrast`), so that the blocks match
  structure in modalities they never saw; ``max_misalignment`` keeps pairs known to be aligned only to
  ~1.5 px (VIS-NIR) away from the blocks whose task that error would drown (the scale-1 and scale-2 blocks), or,
  with ``misaligned_as_mono``, gives them those pairs as one-modality pairs only; ``segment_synth`` gives
  pairs without labels (natural scenes) synthetic contrasts drawn from segments of their own images
  (:func:`alignkit.data.aligned.segment_labels`), and gives every block the pairs too rough for its scale
  as exactly aligned synthetic pairs made from one of their images; ``misalignment`` (``{"pattern": px}``) sets a
  measured residual misalignment for the pairs a pattern matches, instead of their source's default.
* **chain** (§3.6): the pair is shrunk by ``2^K, ..., 2, 1`` (the coarsest level at least
  ``min_level`` pixels a side; by default 90 % of the model's training patch side: a block asked to align a
  level smaller than the patches it learnt on answers with errors that the chain multiplies by the
  level's factor -- measured on the 5 held-out pairs of ``benchmarks/c2f.py`` with the OASIS-only
  candidate block of session 10, ``fast``: EPE 10.77 / PCK@5 0.251 with 16-px coarsest levels, 6.35 /
  0.410 with 48 px, the patch side; found on those pairs, so they are not clean held-out for this
  choice); at each level the level's moving image is resampled *once* through the
  current map, the block predicts the residual ``r`` and the map is composed, ``u <- r + u∘(id + r)``
  (:func:`~alignkit.nets.pyramid.compose_displacements`' rule), never added. Ours: each level's residual is
  smoothed by a Gaussian of ``smoothing`` pixels of the level (weighted by how much structure both images show
  there, ``weighting``) before it is composed -- or, at the levels shrunk by ``translation_from`` (4) or more, reduced
  to its weighted mean, a shift of the whole image -- and each level but the
  finest runs its block ``passes`` times -- optionally again, up to ``max_passes``, while a pass still moves it by
  ``pass_tolerance`` level pixels on average (:data:`DEFAULT_SMOOTHING`, :data:`DEFAULT_PASSES`,
  :data:`DEFAULT_PASS_TOLERANCE`).
* **modes** (§3.6-3.7): ``per-scale`` (the scale-specific block at each scale), ``fast`` (the
  scale-1 block at every scale; the default), ``accurate`` (the blocks of ``accurate_blocks``: the scale-1
  block at every scale by default, or ``per-scale``; each block's answer averaged over the 8
  flips/rotations of the pair, each mapped back by :func:`~alignkit.nets.pyramid.symmetry_pull_field`).
* **large images**: each level runs in overlapping tiles (``tile`` pixels with a ``halo`` of
  context, only the tile's core kept; tiles start on multiples of 4 so the blocks' pooling grid is
  the untiled one), so memory is bounded by the tile and time is linear in the number of pixels.

The prediction is a displacement on the fixed image's own grid (full resolution, no network grid),
a :class:`~alignkit.methods.heads.LearnedDisplacement`; the moving image is first resampled onto that
grid through the world frames (and a linear pre-alignment, ``transform="affine"``, when asked: the ``multimodal``
preset's mutual information, :data:`PREALIGN_PRESET`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.image import Image, grey_channels
from alignkit.losses import Laplacian
from alignkit.methods.base import MethodInfo, MethodOutput, ProgressFactory
from alignkit.methods.heads import LearnedDisplacement
from alignkit.methods.learned import LearnedMethod, LearnedModel, learned_method
from alignkit.nets.pyramid import TILE_ALIGN, ResidualWeighting, ScaleChain
from alignkit.registration import Inputs
from alignkit.solve.engine import normalize_intensity
from alignkit.spatial import Grid, sample_world
from alignkit.train.protocol import TrainingStage
from alignkit.transforms import ComposedTransform, Transform

C2FMode = Literal["per-scale", "fast", "accurate"]
#: the mode users get: ``fast`` (the scale-1 block at every level). With the shipped model and the default smoothing,
#: weighting, passes and translation levels, on the tuning pairs of ``benchmarks/c2f.py --tuning`` (OASIS subject10,
#: VIS-NIR field 0008/0011/0015/0019, the T1/PD head's slices): mean EPE 0.92 px / PCK@1 0.623, against ``per-scale``'s
#: coarse blocks (less trained; 2.11 / 0.600) and ``accurate`` 0.63 / 0.852 at ~10 times the time: ``fast`` is the
#: mode that keeps a 5000 x 5000 pair under two minutes on two CPU cores
DEFAULT_MODE: C2FMode = "fast"
#: which blocks ``accurate`` averages over the 8 symmetries (§3.7's two options are independent: "fast" picks
#: the blocks, "accurate" averages each block's answers): ``shared`` (the scale-1 block at every level) or
#: ``per-scale``. With the shipped model, on the tuning pairs: ``shared`` EPE 3.29 px / PCK@5 0.747,
#: ``per-scale`` 4.42 / 0.632 (and ``fast`` without the average 3.85 / 0.693)
AccurateBlocks = Literal["shared", "per-scale"]
DEFAULT_ACCURATE_BLOCKS: AccurateBlocks = "shared"
#: σ, in pixels of each level, of the Gaussian that smooths every block's residual before it is composed
#: (``smoothing``; :class:`~alignkit.nets.pyramid.ScaleChain`'s ``residual_sigma``); 0 = the blocks' answers as
#: they are. Chosen with :data:`DEFAULT_PASSES` on the tuning pairs of ``benchmarks/c2f.py --tuning`` (shipped
#: model; mean EPE px / PCK@5 of ``fast`` | ``accurate``): none, 1 pass 3.85 / 0.693 | 3.29 / 0.747; σ 16, 2 passes
#: 2.10 / 0.909 | 1.87 / 0.933; **σ 24, 2 passes 1.88 / 0.947 | 1.71 / 0.965**; σ 32, 2 passes 1.84 / 0.957 |
#: 1.69 / 0.963 (24 kept: within 0.05 px of 32, less smoothing of detail). The block's answers vary from pixel to
#: pixel (a speckled Jacobian) and it is unreliable where it never learnt the modality (VIS-NIR for the scale-1
#: block), where a wide smoothing helps most; it costs detail finer than σ: an OASIS slice's EPE went 1.19
#: (σ 16) -> 1.77 px (σ 24) in ``fast``. ``smoothing=0`` gives the raw answers. (Figures measured before
#: :func:`~alignkit.nets.pyramid.smooth_field` shrank through ``downsample``, which moved held-out means by 0.02 px.)
DEFAULT_SMOOTHING = 24.0
#: how that smoothing weighs the block's answers (``weighting``; :class:`~alignkit.nets.pyramid.ScaleChain`'s
#: ``residual_weighting``): ``structure``, a normalised convolution that trusts an answer as much as both images show
#: structure there and the moving image is read inside its grid (:func:`~alignkit.nets.pyramid.structure_confidence`),
#: or ``uniform``, a plain Gaussian. Chosen on the tuning pairs of ``benchmarks/c2f.py --tuning`` (session 15's first
#: set, 6 pairs with field scenes 0015/0019; shipped model; mean EPE px / PCK@1 / PCK@5): ``fast`` uniform 1.112 /
#: 0.594 / 0.993, structure 0.982 / 0.616 / 1.000; ``accurate`` uniform 0.868 / 0.667 / 0.999, structure 0.779 /
#: 0.723 / 1.000 (better on 5 of the 6 pairs in each mode); with the sky scenes 0008/0011 added (the 8 pairs of
#: ``--tuning`` now), ``fast`` uniform 1.621 / 0.569 / 0.909, structure 1.383 / 0.603 / 0.943. Also tried there (with each image's gradient against its median, which
#: is 0 on a brain slice: 0.987 in ``fast``) and not kept: the smaller of the two images' weights instead of their
#: product (``fast`` 0.978), a blur of 1 or 4 px (0.981, 0.984), a floor of 0.1 (1.022), and, in ``accurate``, also
#: down-weighting where the 8 symmetric answers disagree (0.772 against 0.780: not worth a knob).
DEFAULT_WEIGHTING: ResidualWeighting = "structure"
#: passes of the block at each level coarser than the finest (``passes``): with smoothing, a second look at the
#: coarse levels catches up with displacements beyond a block's task there (a head slice of the tuning pairs:
#: ``fast``, σ 16 px: EPE 6.53 px with one pass, 2.11 with two); without smoothing it made things worse
#: (``coarsest_passes``, session 13). Session 15 kept 2: a third pass was better on its tuning pairs but worse on the
#: held-out pairs of ``benchmarks/c2f.py`` (mean EPE / PCK@5, ``fast`` 1.69 / 0.934 -> 1.89 / 0.902; VIS-NIR mountain
#: 1.97 -> 2.97 px) -- a block's small local bias on a modality it barely learnt (clouds, sky) added up pass after
#: pass at the coarse levels. Since session 16 those levels (:data:`DEFAULT_TRANSLATION_FROM`) move the whole image
#: only, so their passes converge on one shift instead of piling up local errors, and the third pass is the default:
#: on the 8 tuning pairs (``fast``, EPE px / PCK@1 / PCK@5) 2 passes 1.194 / 0.603 / 0.972, **3 passes 0.921 / 0.623 /
#: 0.998**, 4 passes 0.919 / 0.643 / 0.997; the head slice z110 (a mean true displacement of 11 px, 2.8 px at the
#: coarsest level, beyond the block's 2-px task) needs it: 3.42 px with 2 passes, 1.43 with 3.
DEFAULT_PASSES = 3
#: passes at the finest level (``finest_passes``) per mode: it holds most of the pixels, so each pass there costs
#: about the time of the whole chain's first; ``accurate``, the mode that pays for accuracy, takes a second (session
#: 14's tuning pairs, σ 24, uniform smoothing, 2 coarse passes, EPE / PCK@5: ``accurate`` 1.71 / 0.965 -> 1.57 /
#: 0.971, ``fast`` 1.88 / 0.947 -> 1.73 / 0.953 at twice its time, which would take a 5000 x 5000 pair past two
#: minutes on two cores)
DEFAULT_FINEST_PASSES: dict[str, int] = {"fast": 1, "per-scale": 1, "accurate": 2}
#: with ``pass_tolerance`` > 0 (level pixels), a level coarser than the finest runs its block again after its ``passes``,
#: up to ``max_passes`` in all, while the last pass's residual has a mean length of the tolerance or more: a pair whose
#: coarse levels hold displacements beyond a block's task gets the extra looks, a pair the block has caught up with
#: stops (residuals shrink ~2-4 times per pass on every tuning pair: level means of 0.5-1.1 px first, 0.03-0.15 by
#: the fourth). **Off by default** (tolerance 0: exactly ``passes``). On session 15's 8 tuning pairs (field 0008/0011
#: with sky added; mean EPE px / PCK@1 / PCK@5, ``fast``) it looked best: 2 passes 1.383 / 0.603 / 0.943, 3 passes
#: 1.140 / 0.604 / 0.978, up to 4 with a tolerance of 0.15 / 0.25 / 0.35 / 0.5 px 1.104 / 0.605 / 0.979, 1.072 /
#: 0.618 / 0.984, 1.091 / 0.615 / 0.984, 1.121 / 0.601 / 0.984 (up to 6 at 0.25: 1.068 / 0.646 / 0.984; ``accurate``
#: 1.095 / 0.711 / 0.958 -> 0.804 / 0.762 / 0.987 at 0.25), but on the held-out pairs of ``benchmarks/c2f.py``
#: (up to 4 at 0.25) ``fast`` went 1.68 / 0.520 / 0.933 -> 1.74 / 0.539 / 0.918 and ``accurate`` 1.40 / 0.617 /
#: 0.957 -> 1.41 / 0.626 / 0.953: the MR slices gained (subject11 1.37 -> 1.03 px in ``fast``), VIS-NIR mountain
#: lost (1.98 -> 2.61), as with a fixed third pass. An option for one-modality or MR pairs with large displacements.
DEFAULT_MAX_PASSES = 4
DEFAULT_PASS_TOLERANCE = 0.0
#: ``symmetric``: which levels also run with the two images swapped (``ScaleChain``'s ``symmetric_levels``: from the
#: inverse of the incoming map, the level's answer averaged with the inverse of that one, so a block's bias that
#: depends on which image it reads as fixed cancels): ``none``, ``coarse`` (every level but the finest: ~1.4 times
#: the time of ``none``) or ``all`` (twice the time); ``true`` / ``false`` mean ``all`` / ``none``.
Symmetric = Literal["none", "coarse", "all"]
#: The default per mode, from session 15's 8 tuning pairs (EPE px / PCK@1 / PCK@5). ``fast``: none 1.383 / 0.603 /
#: 0.943, coarse 1.275 / 0.668 / 0.952, all 1.263 / 0.667 / 0.952; the whole chain run both ways and averaged (the
#: option's first version) 1.274 / 0.666 / 0.952 -- the gain is the coarse levels'. ``accurate``: none 1.095 / 0.711 /
#: 0.958, **coarse 1.016 / 0.720 / 0.971**, all 1.016 / 0.715 / 0.972, two whole chains 1.002 / 0.713 / 0.977.
#: ``fast`` stays ``none``: with ``coarse`` a 5000 x 5000 pair took 119.7 s on two cores (``benchmarks/c2f.py
#: --no-accuracy --sizes 5000``), at the issue's two-minute bound with no margin, against ~76 s; ask for it with
#: ``--option symmetric=coarse``.
DEFAULT_SYMMETRIC: dict[str, Symmetric] = {"fast": "none", "per-scale": "none", "accurate": "coarse"}


#: ``translation_from``: the levels shrunk by at least this factor move the whole image only -- each pass's residual is
#: reduced to its mean weighted by structure (:func:`~alignkit.nets.pyramid.weighted_translation`) instead of being
#: smoothed; 0 = every level local. Every mode here uses the scale-1 block at levels 4 and more times coarser than its
#: training scale (``fast``, ``accurate``; ``per-scale`` has the coarse blocks, less trained): its local answers there
#: are the least reliable part of the chain -- on VIS-NIR skies and clouds they wander by several pixels -- while
#: their weighted mean is a sound shift. Chosen on the 8 tuning pairs of ``benchmarks/c2f.py --tuning`` (shipped model;
#: EPE px / PCK@1 / PCK@5; ``fast``, 3 passes unless said): session 15's defaults (every level local, σ 24, 2 passes)
#: 1.383 / 0.603 / 0.943, with 3 passes 1.140 / 0.604 / 0.978; translation from x8 1.036 / 0.616 / 0.996, **from x4
#: 0.921 / 0.623 / 0.998**, from x2 (every level but the finest; a /tmp probe with σ 1000 in place of the mean) 1.062 /
#: 0.626 / 0.986 -- the brain slices lose detail; an affine fit instead of a shift at x4 and coarser 1.123 / 0.557 /
#: 0.999; wider σ at the coarse levels instead (σ 24·√f) 1.273 / 0.635 / 0.953 with 2 passes. ``accurate`` (symmetric
#: ``coarse``): 1.016 / 0.720 / 0.971 -> 0.634 / 0.852 / 0.996; ``per-scale`` 2.241 / 0.601 / 0.845 -> 2.107 / 0.600 /
#: 0.851. The rule is a shrink factor, not a level size: the levels it makes global hold displacements of at most
#: a quarter of the full-resolution ones, and the x2 and x1 levels keep local detail at any image size.
DEFAULT_TRANSLATION_FROM = 4


#: the preset whose linear stages pre-align a pair when ``transform`` asks for it: c2f's pairs are multimodal. On the
#: ITK T1 slice against the PD slice shifted by (13, 17) px (``multimodal/itk-t1-pd-slices``, ``Border20`` T1,
#: ``Shifted13x17y`` PD; ``transform="affine"``, then c2f ``fast``), the mean absolute intensity error against the
#: unshifted PD slice (inner region, 0-255) was 22.2 with the default preset's NCC affine and 9.6 with the
#: ``multimodal`` preset's mutual information (46.9 before; the PD slice rotated by 10 degrees and shifted: 23.0 and
#: 10.8 of 45.9). Without a pre-alignment c2f leaves it at 44.1: a 21-px shift is beyond its coarsest level's reach.
PREALIGN_PRESET = "multimodal"


def translation_levels(factors: Sequence[int], translation_from: int) -> list[bool]:
    """Per level, coarse to fine, whether it estimates a translation only (shrink factor >= ``translation_from`` > 0;
    never the finest level)."""
    return [translation_from > 0 and f >= translation_from and f > 1 for f in factors]


def symmetric_choice(value: Any, mode: str) -> Symmetric:
    """The ``symmetric`` setting as one of :data:`Symmetric` (``None``: the mode's default; ``true`` = ``all``)."""
    if value is None:
        return DEFAULT_SYMMETRIC.get(mode, "none")
    if isinstance(value, bool):
        return "all" if value else "none"
    if value not in get_args(Symmetric):
        raise ConfigError(f"c2f symmetric must be one of {', '.join(get_args(Symmetric))} (or true / false), "
                          f"got {value!r}")
    return value


def symmetric_levels(levels: int, symmetric: Symmetric) -> list[bool]:
    """Per level, coarse to fine, whether it also runs with the images swapped."""
    return [symmetric == "all" or (symmetric == "coarse" and k < levels - 1) for k in range(levels)]
#: the coarsest level's side may be this fraction of the training patch side (:meth:`C2F.coarsest_side`)
COARSEST_FRACTION = 0.9
#: shrink factors of the scale-specific blocks (networks ``block1``, ``block2``, ``block4``)
BLOCK_FACTORS = (1, 2, 4)
def block_name(factor: int) -> str:
    return f"block{int(factor)}"


def block_spec(ndim: int, width: float = 1.0) -> dict[str, Any]:
    """The A.1 network (``width`` 1) or a narrower one (``width`` scales every feature count).

    With batch normalisation after every convolution: A.1 names none, and without one the blocks
    stayed at the null answer (the local minimum of §A.4.1) on our CPU budgets: 500 steps of a
    half-width A.1 block on OASIS/VIS-NIR patches left the held-out field error at the identity's
    (1.193 vs 1.185 px after 500 steps); 250 steps of a quarter-width block on the T1 slice did not move it (1.212 vs
    1.215) without normalisation and brought it to 0.970 with it. In eval mode the
    statistics are fixed, so tiled inference stays equal to untiled."""
    def w(n: int) -> int:
        return max(2, round(n * width))

    return {"name": "pyramid_unet", "ndim": ndim, "in_channels": 1, "stream_features": [w(32), w(32), w(64)],
            "first_kernel": 5, "merge_features": [w(32), w(64), w(64)], "decoder_features": [w(64), w(64)],
            "head_features": w(32), "norm": "batch"}


def chain_factors(shape: Sequence[int], min_level: int) -> list[int]:
    """``[2^K, ..., 2, 1]``: the largest ``K`` whose level keeps at least ``min_level`` pixels a side."""
    k = max(0, math.floor(math.log2(max(min(shape), 1) / max(min_level, 1))))
    return [2**i for i in range(k, -1, -1)]


def level_passes(levels: int, passes: int, coarsest_passes: int, finest_passes: int) -> list[int]:
    """Passes per level, coarse to fine: ``passes`` at every level but the finest (``finest_passes``), at least
    ``coarsest_passes`` at the coarsest; a chain of one level is both coarsest and finest."""
    if levels == 1:
        return [max(int(coarsest_passes), int(finest_passes))]
    out = [int(passes)] * (levels - 1) + [int(finest_passes)]
    out[0] = max(out[0], int(coarsest_passes))
    return out


class C2FMethod(LearnedMethod):
    """Registers a pair with a trained ``c2f`` chain (default: the model shipped with alignkit).

    ``mode``: ``fast`` (default, :data:`DEFAULT_MODE`), ``per-scale`` or ``accurate`` (module docstring); ``tile``: level
    pixels per tile side (default 512; 0 = untiled), ``halo`` the context read around each tile's
    core (32); ``min_level``: the coarsest level's smallest side in pixels (default: the model's
    training patch side, else 16); ``accurate_blocks``: the blocks ``accurate`` averages
    (:data:`DEFAULT_ACCURATE_BLOCKS`); ``passes``: how many times the block of each level coarser than the
    finest runs (each pass reads the level's moving image through the map so far and composes one more
    residual; :data:`DEFAULT_PASSES`); ``max_passes`` / ``pass_tolerance``: further passes there, up to ``max_passes``
    in all, while the last one's mean residual is at least ``pass_tolerance`` level pixels (:data:`DEFAULT_MAX_PASSES`,
    :data:`DEFAULT_PASS_TOLERANCE`: 0, which runs exactly ``passes``); ``symmetric``: the levels that also run
    the other way round, ``none``, ``coarse`` or ``all`` (default :data:`DEFAULT_SYMMETRIC` of the mode);
    ``translation_from``: levels shrunk by at least this factor estimate a translation only (:data:`DEFAULT_TRANSLATION_FROM`;
    0: none); ``coarsest_passes``: at least this
    many at the coarsest level (default 1);
    ``finest_passes``: at the finest level (default :data:`DEFAULT_FINEST_PASSES` of the mode); ``smoothing``: σ, in pixels of each level, of the
    Gaussian applied to every block's whole residual before it is composed (:data:`DEFAULT_SMOOTHING`); ``transform``: a
    linear pre-alignment (``affine``, ``rigid,affine``; default none -- c2f is for roughly aligned
    pairs); ``similarity``: a refinement's similarity (``refine=K``).
    """

    def __init__(
        self,
        *,
        checkpoint: LearnedModel | str | os.PathLike | None = None,
        transform: str | list[str] | None = None,
        similarity: str | None = None,
        mode: C2FMode = DEFAULT_MODE,
        tile: int | None = 512,
        halo: int = 32,
        min_level: int | None = None,
        coarsest_passes: int = 1,
        accurate_blocks: AccurateBlocks = DEFAULT_ACCURATE_BLOCKS,
        smoothing: float = DEFAULT_SMOOTHING,
        weighting: ResidualWeighting = DEFAULT_WEIGHTING,
        passes: int = DEFAULT_PASSES,
        finest_passes: int | None = None,
        max_passes: int = DEFAULT_MAX_PASSES,
        pass_tolerance: float = DEFAULT_PASS_TOLERANCE,
        symmetric: Symmetric | bool | None = None,
        translation_from: int = DEFAULT_TRANSLATION_FROM,
    ) -> None:
        super().__init__(checkpoint=checkpoint, transform=transform, similarity=similarity)
        self.symmetric = symmetric_choice(symmetric, str(mode))
        try:
            factor = int(translation_from)
            whole = not isinstance(translation_from, bool) and float(translation_from) == factor
        except (TypeError, ValueError):
            whole = False
        if not whole or not (factor == 0 or factor >= 2):
            raise ConfigError(f"c2f translation_from must be 0 (off) or a shrink factor >= 2, got {translation_from!r}")
        self.translation_from = factor
        if not float(pass_tolerance) >= 0:
            raise ConfigError(f"c2f pass_tolerance must be >= 0 pixels, got {pass_tolerance}")
        self.max_passes, self.pass_tolerance = int(max_passes), float(pass_tolerance)
        if not float(smoothing) >= 0:
            raise ConfigError(f"c2f smoothing must be >= 0 pixels, got {smoothing}")
        self.smoothing = float(smoothing)
        if weighting not in get_args(ResidualWeighting):
            raise ConfigError(f"c2f weighting must be one of {', '.join(get_args(ResidualWeighting))}, got {weighting!r}")
        self.weighting = weighting
        if accurate_blocks not in get_args(AccurateBlocks):
            raise ConfigError(f"c2f accurate_blocks must be one of {', '.join(get_args(AccurateBlocks))}, "
                              f"got {accurate_blocks!r}")
        self.accurate_blocks = accurate_blocks
        if finest_passes is None:
            finest_passes = DEFAULT_FINEST_PASSES.get(str(mode), 1)
        for name, value in (("coarsest_passes", coarsest_passes), ("passes", passes), ("finest_passes", finest_passes),
                            ("max_passes", max_passes)):
            if int(value) < 1:
                raise ConfigError(f"c2f {name} must be >= 1, got {value}")
        self.coarsest_passes, self.passes, self.finest_passes = int(coarsest_passes), int(passes), int(finest_passes)
        if mode not in get_args(C2FMode):
            raise ConfigError(f"c2f mode must be one of {', '.join(get_args(C2FMode))}, got {mode!r}")
        tile = None if tile in (None, 0) else int(tile)
        if tile is not None and tile < 64:
            raise ConfigError(f"c2f tile must be >= 64 pixels (or 0: untiled), got {tile}")
        if int(halo) < 0 or int(halo) % TILE_ALIGN:
            raise ConfigError(f"c2f halo must be a non-negative multiple of {TILE_ALIGN}, got {halo}")
        if min_level is not None and int(min_level) < 8:
            raise ConfigError(f"c2f min_level must be >= 8 pixels, got {min_level}")
        self.mode, self.tile, self.halo = mode, tile, int(halo)
        self.min_level = None if min_level is None else int(min_level)

    def run(self, inputs: Inputs, *, device: torch.device, seed: int | None, progress: ProgressFactory) -> MethodOutput:
        learned, source = self.model(inputs.ndim, device)
        assert isinstance(learned, C2F)
        models, stages, names, stage_seconds = self.prealign(
            inputs, None, device=device, seed=seed, progress=progress, preset=PREALIGN_PRESET)
        tic = time.perf_counter()
        fixed, moving = learned.prepare(inputs.fixed, inputs.moving,
                                        initial=ComposedTransform(stages) if stages else None, device=device)
        min_level = learned.coarsest_side(self.min_level)
        displacement = learned.align(fixed, moving, mode=self.mode, tile=self.tile, halo=self.halo,
                                     min_level=min_level, coarsest_passes=self.coarsest_passes,
                                     passes=self.passes, finest_passes=self.finest_passes,
                                     accurate_blocks=self.accurate_blocks, smoothing=self.smoothing,
                                     weighting=self.weighting, max_passes=self.max_passes,
                                     pass_tolerance=self.pass_tolerance, symmetric=self.symmetric,
                                     translation_from=self.translation_from, progress=progress)
        predicted = LearnedDisplacement(inputs.fixed.grid, displacement.cpu())
        predicted.kind = "c2f"
        stage_seconds["c2f"] = round(time.perf_counter() - tic, 3)
        stages.append(predicted)
        names.append("c2f")
        settings = {"mode": self.mode, "tile": self.tile, "halo": self.halo, "min_level": min_level,
                    "coarsest_passes": self.coarsest_passes, "passes": self.passes,
                    "finest_passes": self.finest_passes, "max_passes": self.max_passes,
                    "pass_tolerance": self.pass_tolerance, "symmetric": self.symmetric,
                    "translation_from": self.translation_from, "accurate_blocks": self.accurate_blocks,
                    "smoothing": self.smoothing, "weighting": self.weighting, "levels": chain_factors(inputs.fixed.grid.shape, min_level)}
        description = {"method": "c2f", "prealign": models, "model": learned.config, "networks": learned.network_specs(),
                       "checkpoint": source, **settings}
        extra: dict[str, Any] = {"method": "c2f", "c2f": settings}
        if source is not None:
            extra["checkpoint"] = source
        return MethodOutput(transform=ComposedTransform(stages), name="c2f", stages=names, description=description,
                            stage_seconds=stage_seconds, extra=extra)


@learned_method(MethodInfo(
    name="c2f",
    kind="learned",
    summary="coarse-to-fine chain of scale-specific two-stream networks (each block: 1-pixel precision on "
    "displacements of at most 2 pixels at its scale), maps composed; multimodal, large 2D images in tiles",
    ndims=(2,),
    modalities=("mono", "multi"),
    case_kinds=("deformable", "affine", "flow"),
    needs_checkpoint=False,
    reference="Zampieri, Charpiat, Girard, Tarabalka, Coarse to fine non-rigid registration: a chain of "
    "scale-specific neural networks for multimodal image alignment with application to remote sensing, 2018",
), runner=C2FMethod)
class C2F(LearnedModel):
    """See the module docstring. ``size`` is the training patch side (pixels at a block's scale)."""

    trained: Tensor

    @classmethod
    def default_networks(cls, ndim: int) -> dict[str, dict[str, Any]]:
        if ndim != 2:
            raise ConfigError(f"c2f registers 2D images, not {ndim}D")
        return {block_name(f): block_spec(ndim) for f in BLOCK_FACTORS}

    def __init__(
        self,
        *,
        networks: Mapping[str, nn.Module],
        ndim: int,
        size: Sequence[int],
        max_displacement: float = 2.0,
        laplacian_weight: float = 1.0,
        edge_weight: float = 1.0,
        min_minor_class: float = 0.05,
        warmup: int = 0,
        mono_fraction: float = 0.0,
        synth_fraction: float = 0.0,
        max_misalignment: float = 0.25,
        misaligned_as_mono: bool = False,
        segment_synth: float = 0.0,
        misalignment: Mapping[str, float] | None = None,
        map_kind: str = "edges",
        slice_stride: int = 8,
    ) -> None:
        super().__init__(networks=networks, ndim=ndim, size=size)
        if float(max_displacement) <= 0:
            raise ConfigError(f"c2f max_displacement must be > 0 pixels, got {max_displacement}")
        for name, value in (("laplacian_weight", laplacian_weight), ("min_minor_class", min_minor_class),
                            ("warmup", warmup)):
            if float(value) < 0:
                raise ConfigError(f"c2f {name} must be >= 0, got {value}")
        if float(edge_weight) <= 0:
            raise ConfigError(f"c2f edge_weight must be > 0, got {edge_weight}")
        if map_kind not in ("edges", "cortex"):
            raise ConfigError(f"c2f map_kind must be 'edges' or 'cortex', got {map_kind!r}")
        self.options = {
            "max_displacement": float(max_displacement), "laplacian_weight": float(laplacian_weight),
            "edge_weight": float(edge_weight), "min_minor_class": float(min_minor_class), "warmup": int(warmup),
            "mono_fraction": float(mono_fraction), "synth_fraction": float(synth_fraction),
            "max_misalignment": float(max_misalignment), "misaligned_as_mono": bool(misaligned_as_mono),
            "segment_synth": float(segment_synth), "misalignment": {str(k): float(v) for k, v in (misalignment or {}).items()},
            "map_kind": map_kind, "slice_stride": int(slice_stride),
        }
        self.laplacian = Laplacian()
        # which blocks have been trained (a buffer: saved with the weights, restored on resume); an
        # untrained block answers ~0, so the chain uses the nearest trained one in its place
        self.register_buffer("trained", torch.zeros(len(BLOCK_FACTORS)))

    # -- training -----------------------------------------------------------------------------------
    @classmethod
    def stage_list(cls) -> list[TrainingStage]:
        # the finest block first: a run cut short still has the block that `fast` uses everywhere
        return [TrainingStage(block_name(f), networks=(block_name(f),)) for f in BLOCK_FACTORS]

    def training_stages(self) -> list[TrainingStage]:
        return self.stage_list()

    def set_stage(self, name: str) -> None:
        super().set_stage(name)
        self.trained[[block_name(f) for f in BLOCK_FACTORS].index(name)] = 1.0

    @property
    def stage_factor(self) -> int:
        return int(self.stage.removeprefix("block"))

    @classmethod
    def training_data(cls, config: Any) -> tuple[Any, Any]:
        """Scale-specific patch pairs (:class:`~alignkit.data.aligned.ScalePatchPairs`) from the aligned
        pairs of ``config.dataset`` (comma-separated sources of :func:`~alignkit.data.aligned.aligned_pairs`),
        split by subject/scene (``subjects``/``val_subjects`` patterns, else ``val_fraction``); each
        epoch poses the task of the block its stage trains. ``size`` is the patch side (one value),
        ``synthetic_length`` the patches per epoch (default 100 batches)."""
        from types import SimpleNamespace

        from alignkit.data.aligned import ScalePatchPairs, aligned_pairs, pair_matches, split_pairs
        from alignkit.train.loop import plan_stages

        if not config.dataset:
            raise ConfigError("c2f trains on aligned pairs: give --dataset (e.g. brain3d-oasis-trt20,vis-nir)")
        options = dict(config.method_options)
        sizes = {int(s) for s in config.size}
        if len(sizes) != 1:
            raise ConfigError(f"c2f trains on square patches: give one size, got {config.size}")
        size = sizes.pop()
        pairs = []
        for source in str(config.dataset).split(","):
            pairs += aligned_pairs(source.strip(), map_kind=options.get("map_kind", "edges"),
                                   slice_stride=int(options.get("slice_stride", 8)))
        # {"pattern": px}: a measured residual misalignment for the pairs a pattern matches (name or group, shell
        # style), instead of their source's default (which decides which blocks they teach)
        for pattern, px in dict(options.get("misalignment", {})).items():
            if not float(px) >= 0:
                raise ConfigError(f"c2f misalignment for {pattern!r} must be >= 0 pixels, got {px}")
            for pair in pairs:
                if pair_matches(pair, [pattern]):
                    pair.misalignment = float(px)
        train_pairs, val_pairs = split_pairs(pairs, train=config.subjects, val=config.val_subjects,
                                             val_fraction=config.val_fraction, seed=config.seed)
        stand_in = SimpleNamespace(method_name="c2f", training_stages=cls.stage_list,
                                   networks=lambda: {block_name(f): None for f in BLOCK_FACTORS})
        plan = plan_stages(stand_in, config)  # the loop's own plan: which epochs train which block
        warmup = int(options.get("warmup", 0))

        def scale_of_epoch(epoch: int) -> tuple[int, bool]:
            for stage in plan:
                if epoch <= stage.last_epoch:
                    return int(stage.spec.name.removeprefix("block")), epoch - stage.first_epoch < warmup
            return int(plan[-1].spec.name.removeprefix("block")), False

        common = {"size": size, "scale_of_epoch": scale_of_epoch,
                  "max_displacement": float(options.get("max_displacement", 2.0)),
                  "min_minor_class": float(options.get("min_minor_class", 0.05)),
                  "edge_weight": float(options.get("edge_weight", 1.0)),
                  "mono_fraction": float(options.get("mono_fraction", 0.0)),
                  "synth_fraction": float(options.get("synth_fraction", 0.0)),
                  "max_misalignment": float(options.get("max_misalignment", 0.25)),
                  "misaligned_as_mono": bool(options.get("misaligned_as_mono", False)),
                  "segment_synth": float(options.get("segment_synth", 0.0)), "seed": config.seed}
        clock = [1]
        length = int(config.synthetic_length or 100 * config.batch_size)
        train_set = ScalePatchPairs(train_pairs, length=length, clock=clock, **common)
        val_set = (ScalePatchPairs(val_pairs, length=max(config.batch_size, 32), held_out=True, clock=clock, **common)
                   if val_pairs else None)
        return train_set, val_set

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        fixed, moving = batch["fixed"].float(), batch["moving"].float()
        net = getattr(self, self.stage)
        return {"displacement": net(fixed, moving).float()}

    def loss(self, batch: Mapping[str, Tensor], output: Mapping[str, Tensor], *, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        predicted, truth = output["displacement"], batch["flow"].float()
        error = ((predicted - truth) ** 2).sum(1, keepdim=True)
        weight = batch["weight"].float() if "weight" in batch else torch.ones_like(error)
        parts = {"l2": ((error * weight).flatten(1).sum(1) / weight.flatten(1).sum(1)).mean(),
                 "laplacian": self.laplacian(predicted)}
        total = parts["l2"] + self.options["laplacian_weight"] * parts["laplacian"]
        return total, {k: v.detach() for k, v in parts.items()}

    @torch.no_grad()
    def validation_metrics(self, batch: Mapping[str, Tensor], output: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``epe`` and ``pck1`` (share of pixels within 1 pixel of the truth: the block's task) per pair."""
        out = super().validation_metrics(batch, output)
        error = (output["displacement"] - batch["flow"]).norm(dim=1).flatten(1)
        out["pck1"] = (error <= 1.0).float().mean(1)
        out["epe_identity"] = batch["flow"].norm(dim=1).flatten(1).mean(1)
        return out

    # -- inference ----------------------------------------------------------------------------------
    def coarsest_side(self, min_level: int | None = None) -> int:
        """The chain's coarsest level side: ``min_level`` when given, else 90 % of the training patch
        side (``config["size"]``; a block answers reliably only on levels about as large as the patches
        it learnt on -- and a 188-px slice, whose quarter is 47 px, still needs that quarter: with the
        whole patch side as the bound its chain started at half size with 6-px displacements there;
        chosen on the tuning pairs of ``benchmarks/c2f.py --tuning``), else 16."""
        if min_level is not None:
            return int(min_level)
        size = self.config.get("size") if isinstance(self.config, Mapping) else None
        sides = [int(s) for s in size] if isinstance(size, (list, tuple)) else [int(size)] if size else []
        return int(COARSEST_FRACTION * min(sides)) if sides else 16

    def block_for(self, factor: int, mode: C2FMode) -> nn.Module:
        """The block that serves a level shrunk by ``factor``: ``fast``: the scale-1 block; otherwise
        the block of that factor (the coarsest for coarser levels). An untrained block is replaced by
        the trained block nearest in scale."""
        trained = [f for f, t in zip(BLOCK_FACTORS, self.trained.tolist()) if t > 0] or list(BLOCK_FACTORS)
        want = BLOCK_FACTORS[0] if mode == "fast" else min(int(factor), BLOCK_FACTORS[-1])
        chosen = min(trained, key=lambda f: (abs(math.log2(f) - math.log2(want)), f))
        return getattr(self, block_name(chosen))

    def prepare(self, fixed: Image, moving: Image, *, initial: Transform | None = None,
                device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """Both images as ``(1, 1, *fixed.shape)`` grey, normalised tensors on the fixed grid (the moving
        one resampled there through the world frames and ``initial``)."""
        if fixed.ndim != 2 or moving.ndim != 2:
            raise ShapeError(f"c2f registers 2D images; got {fixed.ndim}D and {moving.ndim}D")
        low, high = self.intensity_percentiles
        fixed_t = normalize_intensity(grey_channels(fixed.batch(device=device).float()), low, high)
        moving_t = grey_channels(moving.batch(device=device).float())
        if initial is not None or not moving.grid.same_as(fixed.grid):  # else the grids coincide: no resampling
            world = fixed.grid.world_points(device=device)
            if initial is not None:
                world = initial.to(device).transform_points(world)
            moving_t = sample_world(moving_t, moving.grid, world)
        return fixed_t, normalize_intensity(moving_t, low, high)

    @torch.no_grad()
    def align(
        self,
        fixed: Tensor,
        moving: Tensor,
        *,
        mode: C2FMode = DEFAULT_MODE,
        tile: int | None = 512,
        halo: int = 32,
        min_level: int | None = None,
        coarsest_passes: int = 1,
        accurate_blocks: AccurateBlocks = DEFAULT_ACCURATE_BLOCKS,
        smoothing: float = DEFAULT_SMOOTHING,
        weighting: ResidualWeighting = DEFAULT_WEIGHTING,
        passes: int = DEFAULT_PASSES,
        finest_passes: int | None = None,
        max_passes: int = DEFAULT_MAX_PASSES,
        pass_tolerance: float = DEFAULT_PASS_TOLERANCE,
        symmetric: Symmetric | bool | None = None,
        translation_from: int = DEFAULT_TRANSLATION_FROM,
        progress: ProgressFactory = None,
    ) -> Tensor:
        """The chain on ``fixed``, ``moving`` ``(1, 1, H, W)`` (one grid, normalised): the displacement
        ``(1, 2, H, W)`` in pixels, array-axis order, ``moving ∘ (id + u) ≈ fixed`` (module docstring)."""
        if mode not in get_args(C2FMode):
            raise ConfigError(f"c2f mode must be one of {', '.join(get_args(C2FMode))}, got {mode!r}")
        if fixed.dim() != 4 or fixed.shape[:2] != (1, 1) or moving.shape != fixed.shape:
            raise ShapeError(f"c2f align: fixed and moving must be (1, 1, H, W) on one grid, got "
                             f"{tuple(fixed.shape)} and {tuple(moving.shape)}")
        factors = chain_factors(tuple(fixed.shape[2:]), self.coarsest_side(min_level))
        serving: C2FMode = ("fast" if accurate_blocks == "shared" else "per-scale") if mode == "accurate" else mode
        least = level_passes(len(factors), passes, coarsest_passes,
                             DEFAULT_FINEST_PASSES[mode] if finest_passes is None else finest_passes)
        # the finest level runs exactly its passes; the coarser ones may go on up to max_passes (with a tolerance)
        most = [max(n, int(max_passes)) for n in least[:-1]] + least[-1:] if pass_tolerance > 0 else least
        chain = ScaleChain(networks=[self.block_for(f, serving) for f in factors], factors=factors, combine="compose",
                           mode="accurate" if mode == "accurate" else "standard", symmetries="full",
                           passes=most, min_passes=least, pass_tolerance=pass_tolerance,
                           symmetric_levels=symmetric_levels(len(factors), symmetric_choice(symmetric, mode)),
                           translation_levels=translation_levels(factors, int(translation_from)),
                           residual_sigma=smoothing, residual_weighting=weighting)
        was_training = self.training
        self.eval()
        try:
            return chain(fixed, moving, tile=tile, halo=halo, progress=progress)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def predict(self, fixed: Image, moving: Image, *, initial: Transform | None = None,
                device: str | torch.device | None = None) -> Transform:
        """The chain (:data:`DEFAULT_MODE`, default tiles) on a pair at the fixed image's full resolution: a
        :class:`~alignkit.methods.heads.LearnedDisplacement` on ``fixed.grid``, composed after ``initial``."""
        if device is None:
            device = next(iter(self.parameters())).device
        fixed_t, moving_t = self.prepare(fixed, moving, initial=initial, device=device)
        return self.predict_transform(fixed.grid, fixed_t, moving_t)

    def predict_transform(self, grid: Grid, fixed: Tensor, moving: Tensor) -> Transform:
        out = LearnedDisplacement(grid, self.align(fixed, moving).cpu())
        out.kind = "c2f"
        return out
