"""Named configurations, like ANTs' ``antsRegistrationSyNQuick.sh``: stages, objective, levels, iterations.

Presets are starting points; every field can be overridden (``--transform``, ``--similarity``,
``--config``). Each preset's docstring says, under "Tuned on", which cases of ``../shared/data`` its
settings were chosen on (from the commit history: the presets lived in ``alignkit/methods/presets.py``
until they moved here), and where that record is incomplete it says so. Scores on those cases are
in-sample; ``benchmarks/README.md`` marks them and lists the held-out cases.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

from alignkit.errors import ConfigError
from alignkit.solve.config import (
    FIELD_MODELS,
    LINEAR_MODELS,
    RegistrationConfig,
    StageConfig,
    load_config_file,
)


def _brain() -> RegistrationConfig:
    """Mono-modal 3D MRI, native space: centre-of-mass start, affine (NCC on a voxel sample), then PICSL
    Greedy's update of a displacement field (LNCC, 5-voxel window; :mod:`alignkit.solve.greedy`).

    The deformable stage is Greedy's documented example run in the one engine: NCC 2x2x2 (a 5-voxel
    window), ``-s 2.0vox 0.5vox`` (``gradient_smoothing=2``, ``field_smoothing=0.5``), a 1-voxel step
    (``-e 1``) and the schedule ``100x50x15`` at 1/4, 1/2 and full resolution (Greedy's example has 10
    at full resolution; the compiled iteration of :mod:`alignkit.spatial.compiled` pays for 5 more). Levels are never finer
    than 2^22 voxels (``max_level_voxels``): a 2 mm brain (~0.8M voxels once cropped) is registered at
    full resolution, a 1 mm brain's finest level is ~1.2 mm. The exactly diffeomorphic setting is
    ``--transform affine,svf`` (Greedy's ``-sv``: the same updates added to a stationary velocity whose
    squarings are chosen so that no voxel folds).

    Tuned on: OASIS-TRT-20 (``brain3d-oasis-trt20``) ``subject02<-subject01`` resampled to 2 mm (issue 17):
    the greedy displacement update with Greedy's schedule gave mean Dice (99 labels) 0.587 against 0.531
    for the previous SVF/Adam preset, 0.578 for the svf setting, 0.577 for PICSL Greedy and 0.498 for
    ANTs SyN, no folded voxel; shorter schedules lost Dice (100x30x5: 0.569, 50x20x3: 0.548, no
    full-resolution level: 0.516); sampling the affine NCC on 20k voxels left Dice unchanged (0.586). The
    level cap on the same pair at 1 mm: 2^20 / 2^21 / 2^22 voxels gave Dice 0.642 / 0.657 / 0.668 (89 s
    and 120 s for the last two, in-process, load 3-4.5); chosen after a held-out run with 2^20 had
    scored 0.036 below Greedy at 1 mm (``benchmarks/README.md``). The full-resolution iterations (issue
    17, with the compiled iteration; in-process, load 3-5): 10 / 15 / 20 gave Dice 0.5842 / 0.5897 /
    0.5902 on ``subject02<-subject01`` and 0.5752 / 0.5779 / 0.5812 on ``subject04<-subject03`` at 2 mm,
    0.6693 / 0.6731 / 0.6728 on ``subject02<-subject01`` at 1 mm (there a finest level at 1 mm instead
    of ~1.2 mm gave 0.6619: the 5-voxel window and the smoothing are in voxels); 15 costs ~5 iterations
    at the finest level, 20 ten. The compiled 3D sampler of the affine stage (issue 17, fourth pass) changed
    its rounding and, through the greedy stage, these pairs' Dice to 0.5871 and 0.5768 (no setting changed).
    ``capped_smoothing_physical`` (issue 17, session 8): the capped finest level of a 1 mm brain (~1.15 mm)
    smoothed with Greedy's voxel sigmas is ~15 % wider in mm than Greedy's; keeping the width in mm
    raised Dice at 1 mm from 0.6666 to 0.6719 on ``subject02<-subject01`` and from 0.6466 to 0.6509 on
    ``subject04<-subject03`` (no folds; in-process, one thread, another job on the other core). Scaling
    every level's sigmas by 0.835 instead gave 0.6729 / 0.6541 but has no reason behind it; field
    smoothing 0.42 or 0.5 with gradient smoothing 1.67 gave 0.6729 / 0.6632 on the first pair: the choice
    is within noise of its neighbours. A 2 mm brain has no capped level: unchanged.
    The affine stage's other settings date from the first commit (f31f841, no recorded tuning); the
    previous deformable stage was tuned on ``subject02<-subject01``, ``subject04<-subject03`` and
    ``subject06<-subject05`` (commits 986017c, 30b175e, 053a88e, 9298314). Not tuned on: the other OASIS
    subjects (07-12, held out: ``benchmarks/speed3d.py`` reports on them), the aseg pair
    (``brain3d-aseg-pair``) and the 2D slices (``brain2d``).
    """
    return RegistrationConfig(
        name="brain",
        init="com",
        stages=[
            StageConfig(
                transform="affine",
                similarity="ncc",
                levels=(8, 4, 2),
                iterations=(200, 100, 50),
                learning_rate=1e-2,
                tolerance=1e-5,
                patience=20,
                # NCC on a fixed random sample of voxels per level (ITK's metric sampling): the affine
                # stage no longer costs in proportion to the volume (Dice unchanged on the tuning pair)
                sample_points=20_000,
            ),
            StageConfig(
                transform="displacement",
                optimizer="greedy",
                similarity="lncc",
                similarity_options={"window": 5},
                levels=(4, 2, 1),
                iterations=(100, 50, 15),
                learning_rate=1.0,
                gradient_smoothing=2.0,
                field_smoothing=0.5,
                tolerance=1e-5,
                patience=20,
                # a 1 mm brain (~6M voxels once cropped) is fitted at ~1.2 mm: on the tuning pair at 1 mm,
                # Dice 0.642 / 0.657 / 0.668 with caps of 2^20 / 2^21 / 2^22 voxels
                max_level_voxels=1 << 22,
                # ... with Greedy's sigmas kept at their width in mm there (see the docstring)
                capped_smoothing_physical=True,
            ),
        ],
    )


def _multimodal() -> RegistrationConfig:
    """Different contrasts (T1↔PD, CT↔MR): Mattes mutual information for every stage.

    Tuned on: "the four ITK T1/PD cases" of ``multimodal/itk-t1-pd-slices`` -- the similarity (rather
    than rigid) start and the SVF stage's regularisation, smoothing and levels (commit 3bdf0e4). The
    commit does not name the four; the data set has five cases (``t1<-pd`` and the moved slices
    ``t1<-pd_Shifted13x17y``, ``t1<-pd_Rotated10``, ``t1<-pd_R10X13Y17``, ``t1<-pd_R10X13Y17S12``), so
    treat all five as in-sample. The "12 % scale" on which a rigid start got stuck is not named either.
    The metric sampling (100k voxels), the full-resolution affine level and the SVF voxel cap were set
    for speed on the 3D head ``multimodal/t1-pd-3d`` (commits dea7674, 8019f65, 1077793; whether
    accuracy on it was compared while choosing them is not recorded), so its two cases ``t1<-pd`` and
    ``pd<-t1`` count as in-sample too. No recorded tuning on ``multimodal/ct-mr-2d`` or
    ``multimodal/prostate-mr-us`` (held out).

    Issue 17 (speed at equal or better accuracy) re-chose the stopping rules and the SVF stage on
    ``multimodal/t1-pd-3d`` ``t1<-pd`` and the five ``itk-t1-pd-slices`` cases (in-process runs, two
    threads, load 2.5-4; accuracy = mean distance of the map to the true rigid/affine map over the
    brightest 40 % of the fixed voxels, and the corner error the benchmark reports). On ``t1<-pd``:
    previous preset 117.5 s, map error 0.61 mm, corner error 0.76 mm; with the new stopping rules
    and SVF stage 46.6 s (SVF stage 81.6 s -> 6.0 s), 0.59 mm, 0.86 mm, no folded voxel; without the
    similarity stage's 1/2 level (this preset) 0.59 mm, 0.87 mm. On the slices: mean map error
    0.30 px against 0.36, mean corner error 0.55 against 0.60. What was tried and not kept: 25k or 50k metric
    samples (``t1<-pd`` map error of the linear stages 0.56 / 0.48 mm against 0.41 with 100k); the
    greedy update with the MI force (:meth:`~alignkit.losses.MattesMI.value_and_gradient`) in place of
    the SVF stage (steps of 1 or 0.25 voxel, smoothings 2/1 or 3/2: 4-5 s for the stage but map errors
    0.64-0.66 mm on ``t1<-pd`` and 0.36-0.66 px on the slices, since its normalised step keeps moving
    a field that should stay near zero when the truth is rigid). ``multimodal/ct-mr-2d`` stays held
    out (its two probes during profiling, the previous preset and a greedy stage, were not used to
    choose), as do ``pd<-t1`` and ``multimodal/prostate-mr-us``.
    """
    return RegistrationConfig(
        name="multimodal",
        init="center",
        stages=[
            StageConfig(
                # similarity (rigid + isotropic scale) rather than rigid: voxel sizes of two
                # modalities are often miscalibrated, and rigid alone got stuck on a 12 % scale.
                transform="similarity",
                similarity="mi",
                # no 1/2 level (issue 17): the affine stage visits it next anyway; on t1<-pd map error
                # 0.59 mm either way, on the five slices mean corner error 0.55 px against 0.60
                levels=(8, 4),
                iterations=(150, 100),
                learning_rate=1e-2,
                # a level stops after 10 iterations without a 1e-4 relative gain (issue 17: the
                # 1e-5 / 20 rule never fired on the sampled metric; t1<-pd map error 0.41 mm with this
                # rule against 0.44 with the old one, in ~0.75x the iterations)
                tolerance=1e-4,
                patience=10,
                # MI on a random 100k-voxel sample, as ITK/ANTs do for linear stages: a step
                # then costs the same on a 3D head as on a 2D slice (25k / 50k lost accuracy on t1<-pd)
                sample_points=100_000,
            ),
            StageConfig(
                transform="affine",
                similarity="mi",
                levels=(4, 2, 1),
                iterations=(100, 50, 30),
                learning_rate=5e-3,
                tolerance=1e-4,
                patience=10,
                sample_points=100_000,
            ),
            StageConfig(
                transform="svf",
                similarity="mi",
                regularizer="diffusion",
                regularizer_weight=3.0,
                levels=(4, 2, 1),
                iterations=(100, 60, 30),
                learning_rate=0.3,
                field_smoothing=2.0,
                tolerance=1e-4,
                patience=10,
                # as many squarings as the velocity needs at each evaluation (few at the coarse
                # levels) instead of 7: the backward pass through them was the stage's cost
                transform_options={"steps": "auto"},
                # the smooth inter-modality field is fitted on at most 65k voxels (about 5 mm on a
                # head, 4 px on a 1k x 1k slice) and interpolated to the full grid: 2^18 voxels cost
                # 81.6 s on t1<-pd for a map error of 0.61 mm, 2^16 6.0 s for 0.59 mm (issue 17)
                max_level_voxels=1 << 16,
            ),
        ],
    )


def _photo() -> RegistrationConfig:
    """2D photographs: a homography started from SIFT matches (when OpenCV is installed; else from the
    centres) and refined coarse to fine with NCC on grey levels.

    The feature start (:func:`alignkit.solve.features.feature_fit`) fits a homography, an affine map and
    a similarity to one-to-one ratio-test matches, polishes each on its inliers and keeps the one Torr's
    GRIC prefers; the engine's never-worse rule (``Engine._judge_stage``) then drops any refinement
    that ends worse by its own objective or that the keypoint inliers rule out (a chi-square test on
    their residuals, ``INLIER_CHI2_LIMIT``). On photographs with many precise matches the refinement is
    therefore mostly a check: it is kept where the matches are few or noisy.

    Tuned on: ``homography/homogr`` -- the homography stage's levels (no full-resolution level) were
    chosen on "the four 1-1.5 Mpx homogr pairs" (commit 0693568); the four are not named, so treat the
    whole set as in-sample. The feature start's rules (one match per moving keypoint, LO refits, GRIC,
    3x the minimal sample of inliers) and the chi-square rule were set after looking at every vis-nir
    pair's start and stage checks against the truth (session 5: the hub of 25 matches on
    ``mountain/0012`` and ``field/0002``, the 6-inlier similarity of ``field/0006``, the refinements of
    ``forest/0006``, ``field/0011``, ``mountain/0005``-``0009``) and on homogr; the rules they replaced
    were set on ``field/*``, ``indoor/0006``, ``indoor/0019``, ``mountain/0002``, ``mountain/0006``,
    ``mountain/0016``, ``forest/0010``, ``forest/0013``. So the whole of vis-nir has been looked at; the
    benchmark's "held-out" block (the 53 pairs outside that older list) is held out from the older
    rules only, and each new rule is a general principle (GRIC, LO-RANSAC, a chi-square test), not a
    tuned number.

    Measured (``python benchmarks/presets2d.py --part photo --threads 1``, one run, every method on
    one thread, load 2.4-3.1 from other jobs; an affine case runs the affine chain, as the OpenCV peers
    fit an affine to it): on all 80 vis-nir pairs success at 1 / 3 / 5 px 0.69 / 0.94 / 0.98 against
    0.65 / 0.85 / 0.91 for SIFT + RANSAC, median corner error 0.65 px against 0.75, no pair more than
    1 px worse than SIFT + RANSAC (worst +0.40 px, ``forest/0022``), 2.7 s per pair against 1.0 s.
    homogr (TRE of the manual points): mean 7.6 px, median 1.72, against 30.6 and 1.56 for SIFT +
    RANSAC, success 0.38 / 0.62 / 0.75 against 0.50 / 0.62 / 0.75, no pair worse by more than 1 px
    (worst +0.43, ``BruggeSquare``), 9.3 s against 1.5 s per pair.
    """
    return RegistrationConfig(
        name="photo",
        init="features",
        stages=[
            StageConfig(
                transform="affine",
                similarity="ncc",
                levels=(16, 8, 4),
                iterations=(200, 150, 100),
                learning_rate=1e-2,
                grey=True,
                patience=25,
            ),
            StageConfig(
                transform="homography",
                similarity="ncc",
                # no full-resolution level: on the four 1-1.5 Mpx homogr pairs it cost ~1.5x the time
                # for a landmark error that was not better (mean 2.72 px with it, 2.88 px without)
                levels=(8, 4, 2),
                iterations=(150, 100, 60),
                learning_rate=5e-3,
                grey=True,
                patience=25,
            ),
        ],
    )


def _flow() -> RegistrationConfig:
    """Optical flow: OpenCV's DIS patch search down to full resolution, then a short variational
    refinement at full resolution -- a robust Charbonnier data term on colour plus gradient constancy
    (``flow-data``), total-variation smoothness, the 5×5 median filter of the flow of Sun, Roth and
    Black, "Secrets of Optical Flow Estimation and Their Principles", CVPR 2010 (the deep-learning
    registration survey §1.2).

    The start (``init="dis"``, :func:`alignkit.solve.features.dis_displacement`; a zero start without
    OpenCV) reaches motions of tens of pixels that coarse to fine alone misses on thin structures
    (issue 18); the never-worse rule keeps DIS' field if the refinement ends worse by its own
    objective. A coarse-to-fine refinement over 16/8/4/2/1 (120/120/120/80/40 iterations, step 0.4,
    the previous version of this preset) started from DIS' coarser MEDIUM setting and cost 4-5 s per
    Middlebury pair; from the full-resolution DIS start a few small steps at full resolution do as
    well (probes, one run each under load: mean EPE 0.144 for 30 steps of 0.05, 0.150 for two levels
    at step 0.1, 0.142 for the start alone; Sintel samples 0.921 / 0.922 / 0.920).

    Measured (``python benchmarks/presets2d.py --part flow --threads 1``, one run, every method on one
    thread, load average 3-4 from another job): Middlebury mean EPE 0.143 in 1.19 s per pair against
    TV-L1 0.170 in 7.73 s (time ratio 0.15), DIS 0.236, Farneback 0.523; Sintel samples 0.919
    against DIS 1.071 and TV-L1 3.15; held-out mmflow crops 0.759 against TV-L1 0.738 and DIS 0.859.

    Tuned on: all four ``flow/middlebury`` sequences with public ground truth (``Dimetrodon``,
    ``Grove2``, ``Hydrangea``, ``RubberWhale``) and the ``flow/sintel`` samples (``clean``/``final`` ×
    ``easy``/``medium``, ``frame_0002``) -- the DIS settings, the single level, the step and the
    iteration count (10; smoothing 0 or a TV weight of 0.02 were worse on both). The data-term
    constants and the TV weight date from the coarse-to-fine version (commits f781321, 3bdf0e4, tuned
    on Middlebury). Held out: ``flow/mmflow-crops`` and ``stereo``. ``benchmarks/presets2d.py`` has
    the figures against DIS, Farneback and TV-L1.
    """
    return RegistrationConfig(
        name="flow",
        init="dis",
        stages=[
            StageConfig(
                transform="displacement",
                similarity="flow-data",
                similarity_options={"eps": 1e-3, "alpha": 0.45, "gradient_weight": 1.0},
                regularizer="tv",
                regularizer_weight=0.05,
                levels=(1,),
                iterations=(10,),
                # the image blur of the old finest level: without it (sigma 0) EPE rose on both sets
                smoothing=(0.5,),
                # small steps: the start is already within a fraction of a pixel, and Adam's first
                # steps at 0.4 px made the objective rise on 5 of 8 tuning pairs (rejected)
                learning_rate=0.05,
                field_median=5,
                tolerance=1e-6,
                patience=30,
            )
        ],
    )


def _stereo() -> RegistrationConfig:
    """A rectified pair (fixed = left, moving = right): disparity as one-dimensional registration.

    Starts from semi-global matching (``init="sgm"``, :func:`alignkit.stereo.match`: census cost over
    the disparity range, 8-path aggregation, sub-pixel winner-take-all, left-right check with the
    rejected pixels filled from the background; ``init_options`` ``min_disparity``/``max_disparity``,
    default 0 and a fifth of the width) and refines the disparity variationally in the engine: the
    robust flow data term (Charbonnier on grey values and their gradients) and TV smoothness at full
    resolution, one Adam step; the never-worse rule keeps SGM's disparity if the refinement ends
    worse by its own objective.

    Tuned on: ``stereo/motorcycle`` and ``stereo/aloe`` (the only real pairs: every setting below was
    chosen by their bad-2 / EPE, so both are in-sample; SGM's P1, P2 and the adaptive-P2 scale: three
    settings tried on motorcycle, the defaults of :func:`alignkit.stereo.match` kept; 8 paths rather
    than OpenCV's 5, fourth pass: with 5 the preset's bad-2 on motorcycle rose to 0.0732 and its EPE on
    aloe by 1 %) and a synthetic piecewise-planar pair (``tests/test_stereo.py``).

    Measured (``NUMBA_NUM_THREADS=1 python benchmarks/stereo.py --methods
    alignkit:stereo,alignkit:sgm,opencv:sgbm --threads 1 --repeat 5``, commit 3589377, one thread,
    shared 2-core machine at load ~2): bad-2 0.0727 / 0.0674 on motorcycle / half-size aloe against
    OpenCV SGBM's 0.182 / 0.298, EPE 1.326 / 1.583, in 4.78x / 3.95x SGBM's time (4.5-5.9x / 3.8-5.5x
    across five runs at load 1.6-3.3; ``benchmarks/README.md``). Session 8 (``--threads 2``, commit
    3f505f8, idle machine): 3.3-3.6x SGBM's time fastest of five, 3.7-4.2x in single runs, the same
    disparities; with another process on the other core the engine's two-thread refinement makes it
    unstable (8-35x in that run).
    """
    return RegistrationConfig(
        name="stereo",
        init="sgm",
        crop_foreground=False,
        stages=[
            StageConfig(
                transform="disparity",
                similarity="flow-data",
                similarity_options={"eps": 1e-3, "alpha": 0.45, "gradient_weight": 1.0},
                regularizer="tv",
                # at full resolution only, small steps: on motorcycle a half-resolution level (lr 0.1,
                # TV 0.05) raised bad-2 from 0.074 to 0.088, and one at lr 0.01 (10 steps) still raised
                # bad-2 and the non-occluded EPE on both pairs. SGM's error is in occlusions and outliers
                # a local refinement cannot move, so the stage is short: with lr 0.05 / TV 0.2 / 30
                # iterations (the first setting) Adam's first steps raised the objective and the
                # never-worse rule dropped the stage after paying for it (planar test pair); lr 0.01 /
                # TV 0.05 descends from the start. Third pass (issue 16, speed): grey (one channel
                # instead of three), no pre-blur, 3 steps at lr 0.03 instead of 10 at 0.01 -- the same
                # bad-2 (motorcycle 0.0729, aloe 0.0678) with EPE 1.3233 / 1.5826 against 1.3225 /
                # 1.5808, at about a quarter of the refinement's time. Fourth pass: one step instead of
                # three -- bad-2 0.0727 / 0.0674 (lower), EPE 1.3260 / 1.5830 (+0.2 % / +0.03 %), two
                # forward-backward passes fewer
                regularizer_weight=0.05,
                grey=True,
                levels=(1,),
                iterations=(1,),
                smoothing=None,
                learning_rate=0.03,
                tolerance=1e-6,
                patience=20,
            )
        ],
    )


def _default2d() -> RegistrationConfig:
    """2D mono-modal (slices): affine then SVF with LNCC.

    Tuned on: cannot be determined. The preset is the ``brain`` preset (see its record) with more levels
    and a 9-pixel LNCC window, both from the first commit (f31f841) with no recorded tuning; the only 2D
    brain cases with ground truth, ``brain2d`` ``r16<-r85`` and ``r85<-r16``, are not named anywhere
    as used for choosing them.
    """
    # the brain preset as it was until issue 17 (affine, then an SVF fitted by Adam), which this one
    # was derived from; the brain preset's greedy update has not been tried on 2D slices
    return RegistrationConfig(
        name="default2d",
        init="com",
        stages=[
            StageConfig(transform="affine", similarity="ncc", levels=(8, 4, 2, 1), iterations=(200, 150, 100, 50),
                        learning_rate=1e-2, tolerance=1e-5, patience=20),
            StageConfig(transform="svf", similarity="lncc", similarity_options={"window": 9},
                        transform_options={"steps": 7}, regularizer="diffusion", regularizer_weight=0.1,
                        levels=(4, 2, 1), iterations=(150, 100, 60), learning_rate=0.5, field_smoothing=0.5,
                        tolerance=1e-5, patience=20),
        ],
    )


PRESETS = {
    "brain": _brain,
    "multimodal": _multimodal,
    "photo": _photo,
    "flow": _flow,
    "stereo": _stereo,
    "default2d": _default2d,
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> RegistrationConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    return PRESETS[name]()


def default_preset(ndim: int) -> str:
    return "brain" if ndim == 3 else "default2d"


def override(
    config: RegistrationConfig, *, transforms: Sequence[str] | None = None, similarity: str | None = None
) -> RegistrationConfig:
    """Replace a preset's chain of models and/or its similarity.

    Each requested model takes the settings of the preset's stage of the same kind (linear or
    field), so ``--transform rigid,affine,svf`` on ``brain`` gives two linear stages tuned like the
    preset's affine stage and an SVF stage tuned like its SVF stage.
    """
    config = copy.deepcopy(config)
    if transforms:
        linear_template = next((s for s in config.stages if s.is_linear), None)
        field_template = next((s for s in config.stages if not s.is_linear), None)
        stages = []
        for name in transforms:
            name = name.strip().lower()
            if name in LINEAR_MODELS:
                template = linear_template or get_preset("brain").stages[0]
            elif name in FIELD_MODELS:
                template = field_template or get_preset("brain").stages[1]
            else:
                raise ConfigError(f"unknown transform {name!r}; choose from {', '.join(LINEAR_MODELS + FIELD_MODELS)}")
            stage = copy.deepcopy(template)
            stage.transform = name
            stage.transform_options = {}
            stages.append(stage)
        config.stages = stages
    if similarity:
        for stage in config.stages:
            stage.similarity = similarity
            stage.similarity_options = {}
    RegistrationConfig.__post_init__(config)
    return config


def learned_prealign_config(ndim: int, transform: str | list[str], preset: str | None = None) -> RegistrationConfig:
    """The linear pre-alignment of the learned methods, in training and at inference: the linear stages
    for ``transform`` of ``preset`` (default: the dimension's default preset), with the metric evaluated
    on every voxel. A multimodal method names the ``multimodal`` preset (mutual information).

    The brain preset's affine stage samples its NCC on 20k voxels since issue 17 (same Dice, a
    fraction of the time), which lands within a fraction of a voxel of the full metric's answer; the
    shipped models were trained on full-metric pre-alignments, and that shift alone moved the shipped
    voxelmorph's held-out Dice from its card's 0.4462 to 0.4419. A model must see the inputs it was
    trained on, so the learned methods keep the full metric whatever the preset's speed settings."""
    config = resolve_config(ndim, preset=preset, transform=transform)
    for stage in config.stages:
        stage.sample_points = 0
    return config


def resolve_config(
    ndim: int,
    *,
    preset: str | None = None,
    transform: str | list[str] | None = None,
    similarity: str | None = None,
    config: RegistrationConfig | dict[str, Any] | str | os.PathLike | None = None,
) -> RegistrationConfig:
    """Preset (or the default for the dimension) → config file → ``transform``/``similarity`` overrides."""
    if isinstance(config, RegistrationConfig):
        base = config
    elif config is not None:
        data = load_config_file(os.fspath(config)) if isinstance(config, (str, os.PathLike)) else dict(config)
        if "stages" in data:
            base = RegistrationConfig.from_dict(data)
        else:  # a partial file: preset plus top-level options
            base = get_preset(data.pop("preset", preset or default_preset(ndim)))
            for key, value in data.items():
                if not hasattr(base, key):
                    raise ConfigError(f"unknown configuration key {key!r}")
                setattr(base, key, value)
    else:
        base = get_preset(preset or default_preset(ndim))
    transforms = transform.split(",") if isinstance(transform, str) else transform
    result = override(base, transforms=transforms, similarity=similarity)
    if ndim == 3 and any(s.transform == "homography" for s in result.stages):
        raise ConfigError("homography is a 2D model; use affine for 3D images")
    return result
