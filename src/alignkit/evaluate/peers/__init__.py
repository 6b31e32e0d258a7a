"""Peer registration tools behind alignkit's :class:`~alignkit.evaluate.method.Method` interface.

:data:`PEERS` maps a method name (what ``alignkit evaluate --method`` takes) to a factory that
builds the adapter; constructor keyword arguments override the adapter's settings. Importing this
package imports none of the tools: each adapter imports its package inside ``check_available`` /
``register``, and a tool that is not installed is reported by ``check_available`` raising
:class:`~alignkit.evaluate.method.MethodUnavailable` ("package X not installed").

Every adapter returns the fixed -> moving map in alignkit's LPS world frame (or the matrix, for
linear methods), so :func:`~alignkit.evaluate.scoring.score_case` scores all tools the same way;
the frame conversions live in :mod:`alignkit.evaluate.peers._common`, and each module's docstring
gives the exact settings used.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from alignkit.evaluate.method import Method
from alignkit.evaluate.peers.ants import AntsMethod
from alignkit.evaluate.peers.convexadam import ConvexAdamMethod
from alignkit.evaluate.peers.dipy import DipyMethod
from alignkit.evaluate.peers.elastix import ElastixMethod
from alignkit.evaluate.peers.fireants import FireANTsGreedy
from alignkit.evaluate.peers.greedy import GreedyMethod
from alignkit.evaluate.peers.kornia import KorniaRegistrator, KorniaSiftRansac
from alignkit.evaluate.peers.opencv import OpenCVECC, OpenCVFlow, OpenCVSiftRansac
from alignkit.evaluate.peers.simpleitk import SimpleITKDemons

#: method name -> factory(**options) -> Method
PEERS: dict[str, Callable[..., Method]] = {
    "ants:syn": partial(AntsMethod, "ants:syn"),
    "ants:synquick": partial(AntsMethod, "ants:synquick"),
    "ants:affine": partial(AntsMethod, "ants:affine"),
    "ants:syncc": partial(AntsMethod, "ants:syncc"),
    "greedy:affine": partial(GreedyMethod, "greedy:affine"),
    "greedy:deformable": partial(GreedyMethod, "greedy:deformable"),
    "convexadam": partial(ConvexAdamMethod, "convexadam"),
    "dipy:syn": partial(DipyMethod, "dipy:syn"),
    "dipy:affine": partial(DipyMethod, "dipy:affine"),
    "sitk:demons": partial(SimpleITKDemons, "sitk:demons"),
    "elastix:bspline": partial(ElastixMethod, "elastix:bspline"),
    "elastix:affine": partial(ElastixMethod, "elastix:affine"),
    "fireants:greedy": partial(FireANTsGreedy, "fireants:greedy"),
    "opencv:farneback": partial(OpenCVFlow, "opencv:farneback"),
    "opencv:dis": partial(OpenCVFlow, "opencv:dis"),
    "opencv:sift-ransac": partial(OpenCVSiftRansac, "opencv:sift-ransac"),
    "opencv:sift-magsac": partial(OpenCVSiftRansac, "opencv:sift-magsac"),
    "opencv:tvl1": partial(OpenCVFlow, "opencv:tvl1"),
    "opencv:ecc": partial(OpenCVECC, "opencv:ecc"),
    "kornia:registrator": partial(KorniaRegistrator, "kornia:registrator"),
    "kornia:sift-ransac": partial(KorniaSiftRansac, "kornia:sift-ransac"),
}

__all__ = [
    "PEERS",
    "AntsMethod",
    "ConvexAdamMethod",
    "DipyMethod",
    "ElastixMethod",
    "FireANTsGreedy",
    "GreedyMethod",
    "KorniaRegistrator",
    "KorniaSiftRansac",
    "OpenCVECC",
    "OpenCVFlow",
    "OpenCVSiftRansac",
    "SimpleITKDemons",
]
