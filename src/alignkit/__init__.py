"""alignkit: image registration in PyTorch, classical and learned, 2D and 3D.

    import alignkit
    result = alignkit.register("fixed.nii.gz", "moving.nii.gz", preset="brain")
    result.warped, result.transform, result.metrics, result.save("out/")
"""

from alignkit.errors import AlignkitError, ConfigError, InputError, NotInvertibleError, ShapeError
from alignkit.image import Image
from alignkit.methods.classical import Registration, register
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
    "register",
]
