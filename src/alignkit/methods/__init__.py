"""Every registration system users pick by name, behind one call.

::

    import alignkit
    alignkit.methods.available()          # what each is: kind, dimensions, modalities, checkpoint
    alignkit.register(fixed, moving, method="classical", preset="brain")
    alignkit.register(fixed, moving, method="voxelmorph")          # the model shipped with alignkit

One module per system (``classical`` with its presets, ``voxelmorph`` ...), each registered by name
(:mod:`alignkit.methods.registry`) on the contract of :mod:`alignkit.methods.base`; learned methods
are a model plus a loss (:mod:`alignkit.methods.learned`) trained by the loop of :mod:`alignkit.train`
(:func:`train_method`); shipped models and their cards are in :mod:`alignkit.methods.shipped`.
"""

from alignkit.methods import (  # noqa: F401  (registers the built-in methods)
    avsm,
    c2f,
    classical,
    descriptor_ransac,
    dio,
    flownet,
    stereo_net,
    stereo_volume,
    voxelmorph,
    weak_homography,
)
from alignkit.methods.api import register
from alignkit.methods.base import Method, MethodInfo, MethodOutput
from alignkit.methods.learned import LearnedMethod, LearnedModel, build_model, learned_method, load_model
from alignkit.methods.registry import available, get_method, method_names, register_method
from alignkit.methods.shipped import ShippedModel, shipped_models
from alignkit.methods.training import train_method

__all__ = [
    "LearnedMethod",
    "LearnedModel",
    "Method",
    "MethodInfo",
    "MethodOutput",
    "ShippedModel",
    "available",
    "build_model",
    "get_method",
    "learned_method",
    "load_model",
    "method_names",
    "register",
    "register_method",
    "shipped_models",
    "train_method",
]
