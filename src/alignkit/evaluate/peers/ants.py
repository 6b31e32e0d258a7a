"""ANTsPy (``antspyx``): ``ants.registration`` with its stock ``type_of_transform`` settings.

* ``ants:syn``       -- ``type_of_transform="SyN"``: ANTsPy's defaults (affine stage with Mattes MI,
  then SyN with Mattes MI, ``reg_iterations=(40, 20, 0)``);
* ``ants:synquick``  -- ``"antsRegistrationSyNQuick[s]"`` (rigid + affine + SyN, the quick script);
* ``ants:syncc``     -- ``"SyNCC"``: rigid + affine (Mattes MI), then SyN with cross-correlation
  (radius 4, ``SyN[0.15,3,0]``, ``2100x1200x1200x20`` iterations; ANTsPy fixes these and
  ``reg_iterations`` does not change them), as in issue 17's comparison;
* ``ants:affine``    -- ``"Affine"`` only; the prediction carries the exact matrix.

Images are handed over in memory (``ants.from_numpy`` with the grid's LPS origin, spacing and
direction; ANTsPy arrays are in ITK index order). The deformable map is read from
``ants.apply_transforms(..., compose=prefix)``: one displacement field on the fixed grid that
composes every forward transform, in LPS world units, so that ``y = x + u(x)`` -- the same recipe as
``benchmarks/brain3d_oasis.py``. Options given to the constructor are passed to ``ants.registration``
(e.g. ``reg_iterations=(20, 10, 0)``).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np

from alignkit.data.case import Case
from alignkit.evaluate.method import Method, Prediction
from alignkit.evaluate.peers._common import (
    ItkLayout,
    grey_array,
    itk_layout,
    require,
    set_threads,
    world_points,
)
from alignkit.image import Image

#: method name -> ``type_of_transform``
SETTINGS = {
    "ants:syn": "SyN",
    "ants:synquick": "antsRegistrationSyNQuick[s]",
    "ants:syncc": "SyNCC",
    "ants:affine": "Affine",
}


def ants_image(image: Image, layout: ItkLayout) -> Any:
    """An in-memory ANTs image of the channel mean, placed in LPS like the alignkit grid."""
    import ants

    return ants.from_numpy(
        layout.to_index_order(grey_array(image)),
        origin=[float(v) for v in layout.origin],
        spacing=[float(v) for v in layout.spacing],
        direction=np.asarray(layout.direction, dtype=np.float64),
    )


class AntsMethod(Method):
    """``ants.registration`` with one of :data:`SETTINGS` (see the module docstring)."""

    kinds: tuple[str, ...] = ("deformable", "affine", "homography", "flow")

    def __init__(self, name: str = "ants:syn", **options: Any) -> None:
        if name not in SETTINGS:
            raise ValueError(f"unknown ANTs setting {name!r}; choose from {', '.join(SETTINGS)}")
        super().__init__(name, **options)
        self.type_of_transform = SETTINGS[name]
        self.description = f'ants.registration(type_of_transform="{self.type_of_transform}")'
        if name == "ants:affine":
            self.kinds = ("deformable", "affine", "homography")

    def check_available(self) -> None:
        require("ants", "antspyx")

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        # ANTs' C++ reads both variables from the environment: the seed on every call, the
        # thread count when its ITK thread pool starts (first call in the process)
        os.environ["ANTS_RANDOM_SEED"] = str(seed if seed > 0 else 1)
        set_threads(threads)
        import ants

        flayout = itk_layout(case.fixed.grid)
        fixed = ants_image(case.fixed, flayout)
        moving = ants_image(case.moving, itk_layout(case.moving.grid))
        with tempfile.TemporaryDirectory(prefix="alignkit-ants-") as tmp:
            started = time.perf_counter()
            reg = ants.registration(
                fixed,
                moving,
                type_of_transform=self.type_of_transform,
                outprefix=os.path.join(tmp, "reg_"),
                **self.options,
            )
            seconds = time.perf_counter() - started
            transforms = list(reg["fwdtransforms"])
            extra: dict[str, Any] = {"type_of_transform": self.type_of_transform, "transforms": len(transforms)}
            if self.name == "ants:affine":
                from alignkit.io.itk import read_itk_linear

                # the .mat is an ITK AffineTransform: fixed LPS point -> moving LPS point
                matrix = read_itk_linear(transforms[0]).numpy()
                return Prediction(matrix=matrix, seconds=seconds, extra=extra)
            prefix = os.path.join(tmp, "comp_")
            composed = ants.apply_transforms(fixed, moving, transformlist=transforms, compose=prefix)
            field = ants.image_read(composed).numpy()  # (*size, ndim) in index order, LPS world units
        displacement = np.moveaxis(flayout.from_index_order(np.asarray(field, dtype=np.float64)), -1, 0)
        return Prediction(world_map=world_points(case.fixed.grid) + displacement, seconds=seconds, extra=extra)
