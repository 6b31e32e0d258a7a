"""alignkit: image registration in PyTorch, classical and learned, 2D and 3D.

    import alignkit
    result = alignkit.register("fixed.nii.gz", "moving.nii.gz", preset="brain")
    result.warped, result.transform, result.metrics, result.save("out/")
    alignkit.register("fixed.nii.gz", "moving.nii.gz", method="voxelmorph")   # a learned method
    alignkit.methods.available()                                              # every method by name
"""

from alignkit import methods
from alignkit.errors import AlignkitError, ConfigError, InputError, NotInvertibleError, ShapeError
from alignkit.image import Image
from alignkit.methods import register
from alignkit.registration import Registration
from alignkit.spatial import Grid

__all__ = [
    "AlignkitError",
    "ConfigError",
    "Grid",
    "Image",
    "InputError",
    "NotInvertibleError",
    "Registration",
    "ShapeError",
    "methods",
    "register",
]
