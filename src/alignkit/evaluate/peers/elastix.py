"""ITK-elastix (``itk-elastix``): elastix's default affine and B-spline parameter maps.

* ``elastix:affine``  -- ``GetDefaultParameterMap("affine")`` (4 resolutions, Mattes MI, adaptive
  stochastic gradient descent, 256 iterations, 2048 random samples) with
  ``AutomaticTransformInitialization`` (centre of gravity) so that pairs need not be pre-aligned;
  the prediction is the exact matrix read from the transform parameters.
* ``elastix:bspline`` -- that affine map followed by ``GetDefaultParameterMap("bspline")`` (3
  resolutions, Mattes MI + bending energy, final grid spacing 10 world units, 256 iterations);
  the map is transformix's deformation field of the whole (affine then B-spline) transform on the
  fixed grid, ``y = x + u(x)`` in LPS world units.

``RandomSeed`` (elastix >= 5.1) is set from the run's seed; ``WriteResultImage`` is off (we do not
need elastix's resampled image). Constructor options override parameter-map entries of every stage,
e.g. ``MaximumNumberOfIterations=100`` (values become elastix's strings).
"""

from __future__ import annotations

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

SETTINGS = ("elastix:bspline", "elastix:affine")


def itk_image(image: Image, layout: ItkLayout) -> Any:
    """A float32 ``itk.Image`` of the channel mean, placed in LPS like the alignkit grid."""
    import itk

    img = itk.image_from_array(layout.to_sitk_order(grey_array(image)))  # ITK numpy arrays are [k, j, i]
    img.SetOrigin([float(v) for v in layout.origin])
    img.SetSpacing([float(v) for v in layout.spacing])
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(layout.direction, dtype=np.float64)))
    return img


def linear_matrix(parameter_map: Any, ndim: int) -> np.ndarray:
    """fixed -> moving matrix of an elastix ``AffineTransform`` parameter map:
    ``y = A (x - c) + t + c`` with ``TransformParameters = [A (row-major), t]`` and
    ``CenterOfRotationPoint = c``."""
    params = np.array([float(v) for v in parameter_map["TransformParameters"]])
    centre = np.array([float(v) for v in parameter_map["CenterOfRotationPoint"]])
    a = params[: ndim * ndim].reshape(ndim, ndim)
    t = params[ndim * ndim : ndim * ndim + ndim]
    m = np.eye(ndim + 1)
    m[:ndim, :ndim] = a
    m[:ndim, ndim] = t + centre - a @ centre
    return m


class ElastixMethod(Method):
    """elastix affine or affine + B-spline through ITK's Python wrapping (see the module docstring)."""

    kinds: tuple[str, ...] = ("deformable", "affine", "homography", "flow")

    def __init__(self, name: str = "elastix:bspline", **options: Any) -> None:
        if name not in SETTINGS:
            raise ValueError(f"unknown elastix setting {name!r}; choose from {', '.join(SETTINGS)}")
        super().__init__(name, **options)
        if name == "elastix:affine":
            self.kinds = ("deformable", "affine", "homography")
            self.description = "elastix default affine map (Mattes MI, ASGD) with centre-of-gravity initialisation"
        else:
            self.description = "elastix default affine then B-spline maps (Mattes MI + bending energy, ASGD)"

    def check_available(self) -> None:
        require("itk", "itk-elastix")
        # itk-elastix adds its extension module to the itk package; looking it up (rather than touching
        # itk.ElastixRegistrationMethod, which makes ITK's lazy loader import every module, ~8 s)
        # keeps the check cheap
        require("itk._ElastixPython", "itk-elastix")

    def _parameter_object(self, ndim: int, seed: int) -> Any:
        import itk

        po = itk.ParameterObject.New()
        overrides = {
            key: [str(x) for x in value] if isinstance(value, (list, tuple)) else [str(value)]
            for key, value in self.options.items()
        }
        stages = ["affine"] if self.name == "elastix:affine" else ["affine", "bspline"]
        for stage in stages:
            pm = po.GetDefaultParameterMap(stage)
            if stage == "affine":
                pm["AutomaticTransformInitialization"] = ["true"]
                pm["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
            pm["RandomSeed"] = [str(int(seed))]
            pm["WriteResultImage"] = ["false"]
            for key, value in overrides.items():
                pm[key] = value
            po.AddParameterMap(pm)
        return po

    def register(self, case: Case, *, seed: int = 0, device: str = "cpu", threads: int | None = None) -> Prediction:
        set_threads(threads)
        import itk

        ndim = case.ndim
        if threads is not None:
            itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(max(1, int(threads)))
        flayout = itk_layout(case.fixed.grid)
        fixed = itk_image(case.fixed, flayout)
        moving = itk_image(case.moving, itk_layout(case.moving.grid))
        parameters = self._parameter_object(ndim, seed)

        # elastix and transformix write their files (transformix's deformationField.nii even when no
        # output directory is given: into the working directory) into a folder of our own
        with tempfile.TemporaryDirectory(prefix="alignkit-elastix-") as tmp:
            started = time.perf_counter()
            method = itk.ElastixRegistrationMethod.New(fixed, moving)
            method.SetParameterObject(parameters)
            method.SetLogToConsole(False)
            method.SetOutputDirectory(tmp)
            # threads go through ITK's global default only: ElastixRegistrationMethod.SetNumberOfThreads
            # segfaulted a 3D affine + B-spline run (itk-elastix 0.25.4, measured)
            method.UpdateLargestPossibleRegion()
            result = method.GetTransformParameterObject()
            seconds = time.perf_counter() - started
            extra: dict[str, Any] = {"stages": result.GetNumberOfParameterMaps()}
            if self.name == "elastix:affine":
                matrix = linear_matrix(result.GetParameterMap(0), ndim)
                return Prediction(matrix=matrix, seconds=seconds, extra=extra)

            # transformix samples the whole transform (affine then B-spline) on the fixed-image domain
            # recorded in the transform parameters: u such that fixed x maps to moving x + u(x)
            transformix = itk.TransformixFilter.New(moving)
            transformix.SetTransformParameterObject(result)
            transformix.SetComputeDeformationField(True)
            transformix.SetLogToConsole(False)
            transformix.SetOutputDirectory(tmp)
            transformix.UpdateLargestPossibleRegion()
            field = np.array(itk.array_from_image(transformix.GetOutputDeformationField()), dtype=np.float64)
        u = flayout.from_sitk_order(field)  # (*shape, ndim), LPS world units
        return Prediction(world_map=world_points(case.fixed.grid) + np.moveaxis(u, -1, 0), seconds=seconds, extra=extra)
