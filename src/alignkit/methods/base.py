"""The method contract: what every registration system users pick by name provides.

A *method* is a class registered under a name (:func:`alignkit.methods.registry.register_method`)
with a :class:`MethodInfo` record and one call::

    Method(**options).run(inputs, device=..., seed=..., progress=...) -> MethodOutput

``inputs`` are the checked images, label maps and landmarks (:class:`alignkit.registration.Inputs`);
the output's ``transform`` is any :class:`~alignkit.transforms.Transform` that maps fixed-world
points to moving-world points (a matrix, a homography, a field, a composed chain), so the moving
image is resampled once: ``warped = moving ∘ transform``. :func:`alignkit.register` wraps every
method the same way -- input checks, optional refinement (``refine=K``), metrics, the
:class:`~alignkit.registration.Registration` that saves and exports -- so a method adds only what
its paper adds.

Three kinds of methods fit this contract:

* ``optimisation``: the transform is optimised per pair by the classical engine (``classical``);
* ``learned``: networks trained on a data set predict the transform
  (:class:`alignkit.methods.learned.LearnedModel`; ``voxelmorph``); the options name the trained
  model (``checkpoint``) or a shipped one is used;
* ``learned-per-pair``: networks and transform are optimised together on the pair itself, with no
  training set (``trainable = False``).

Options are keyword-only constructor arguments; an unknown option is a one-line
:class:`~alignkit.errors.ConfigError` that lists the known ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

import torch

from alignkit.errors import ConfigError
from alignkit.registration import Inputs
from alignkit.transforms import Transform

MethodKind = Literal["optimisation", "learned", "learned-per-pair"]
#: the case kinds of :mod:`alignkit.data.case` a method can be evaluated on
CaseKind = Literal["deformable", "affine", "homography", "flow", "stereo"]
Modality = Literal["mono", "multi"]

ProgressFactory = Callable[..., Any] | None


@dataclass(frozen=True)
class MethodInfo:
    """What ``alignkit methods`` and :func:`alignkit.methods.available` say about a method.

    ``case_kinds`` are the ground-truth kinds it is meant for (``alignkit evaluate`` reports other
    cases as not applicable); ``modalities`` whether it registers images of one modality, of
    different ones, or both; ``needs_checkpoint`` whether it cannot run without a trained model
    (true for learned methods that ship no model for some dimension); ``reference`` the paper
    (authors, title, venue).
    """

    name: str
    kind: MethodKind
    summary: str
    ndims: tuple[int, ...] = (2, 3)
    modalities: tuple[Modality, ...] = ("mono",)
    case_kinds: tuple[CaseKind, ...] = ("deformable",)
    needs_checkpoint: bool = False
    reference: str = ""

    def __post_init__(self) -> None:
        if self.kind not in get_args(MethodKind):
            raise ConfigError(f"method {self.name!r}: kind must be one of {', '.join(get_args(MethodKind))}")
        bad = [k for k in self.case_kinds if k not in get_args(CaseKind)]
        if bad:
            raise ConfigError(f"method {self.name!r}: unknown case kinds {bad}; choose from {get_args(CaseKind)}")
        bad = [m for m in self.modalities if m not in get_args(Modality)]
        if bad:
            raise ConfigError(f"method {self.name!r}: unknown modalities {bad}; choose from {get_args(Modality)}")

    @property
    def trainable(self) -> bool:
        """Whether ``alignkit train --method NAME`` trains it (learned on a data set)."""
        return self.kind == "learned"


@dataclass
class MethodOutput:
    """What :meth:`Method.run` returns.

    ``name`` is what ran (a preset name, ``voxelmorph`` ...); ``stages`` names each stage of
    ``transform`` as the method describes it (metrics' ``stages``); ``description`` is a JSON-safe
    record of the settings (saved in the transform manifest); ``stage_seconds`` the time of each
    part; ``extra`` method-specific values added to the metrics.
    """

    transform: Transform
    name: str
    stages: list[str]
    description: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: the inputs as :func:`~alignkit.registration.compute_metrics` normalises them (fixed, moving), when
    #: the method already computed them (the classical engine): the metrics reuse them
    normalised: tuple[Any, Any] | None = None


class Method:
    """Base class of every registered method (module docstring). Subclasses set :attr:`info`,
    take their options as keyword-only constructor arguments and implement :meth:`run`."""

    info: ClassVar[MethodInfo]

    def run(
        self, inputs: Inputs, *, device: torch.device, seed: int | None, progress: ProgressFactory
    ) -> MethodOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def option_names(cls) -> list[str]:
        """The keyword options the constructor takes."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]

    @classmethod
    def create(cls, **options: Any) -> Method:
        """``cls(**options)``, with unknown options reported in one line naming the known ones."""
        known = cls.option_names()
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(
                f"method {cls.info.name!r} takes no option {', '.join(map(repr, unknown))}; "
                f"its options: {', '.join(known) or '(none)'}"
            )
        return cls(**options)
