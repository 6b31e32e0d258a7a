"""FlyingChairs-style optical-flow pairs generated on the fly from real photographs.

After Dosovitskiy et al., FlowNet: Learning Optical Flow with Convolutional Networks, ICCV 2015
(the "Flying Chairs" data; the survey of deep-learning registration, §1.1 and §2): a background
photograph and several textured foreground layers, each moved by its own random affine motion
between the two frames, composited back to front. Chairs are replaced by random star-shaped
super-ellipses textured with other photographs. Because every layer's motion is an affine map
known in closed form and every layer's shape is known analytically, the flow and the occlusion
mask are **exact**, not estimated.

Conventions (alignkit's flow, :mod:`alignkit.spatial`)
--------------------------------------------------------
* images are ``(1, H, W)`` float32; frame 1 is the *fixed* image, frame 2 the *moving* one;
* every matrix here is homogeneous ``3 x 3`` acting on **voxel points in array-axis order**
  ``(row, column, 1)``, named ``target_from_source``; a layer's ``motion`` maps a point of the layer
  in frame 1 to the same point of the layer in frame 2;
* ``flow (2, H, W)`` is in pixels, array-axis order ``(dy, dx)``, fixed → moving:
  ``frame1(p) = frame2(p + flow(p))`` wherever ``p`` is not occluded; at ``p`` the flow is the motion of
  the top layer of frame 1, ``flow(p) = motion_k p - p``;
* ``occluded (H, W)`` bool: the point of frame 1 at ``p`` is not visible in frame 2 -- a layer above
  its own covers ``motion_k p`` in frame 2, or ``motion_k p`` leaves the image.

Items of :class:`SyntheticFlowPairs` are pure functions of ``(seed, epoch, index)`` (their own random
generator, :func:`alignkit.train.pairs.item_generator`), so the training loop's determinism, resume
and multi-process guarantees hold.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from alignkit.errors import ConfigError, InputError
from alignkit.spatial import apply_matrix, sample_voxels, voxel_identity

#: scikit-image's sample photographs used as textures. ``stereo_motorcycle`` is left out: it is the
#: ``stereo/motorcycle`` benchmark pair; ``horse``, ``checkerboard`` and the like are not photographs.
PHOTOGRAPHS: tuple[str, ...] = (
    "astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "brick", "grass", "gravel",
    "immunohistochemistry", "hubble_deep_field", "retina", "clock", "cell", "page", "text",
)


@functools.lru_cache(maxsize=4)
def photo_textures(names: tuple[str, ...] = PHOTOGRAPHS, max_side: int = 512) -> tuple[Tensor, ...]:
    """The photographs ``names`` of :mod:`skimage.data` as grey ``(1, h, w)`` float32 in [0, 1], longer
    side at most ``max_side`` (larger ones are downscaled with anti-aliasing). Cached per process."""
    import skimage.data
    from skimage.color import rgb2gray, rgba2rgb
    from skimage.transform import rescale

    out = []
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ConfigError(f"scikit-image has no sample image {name!r}")
        try:
            image = np.asarray(loader())
        except Exception as exc:  # noqa: BLE001 - a sample that needs a download (pooch) is not installed
            raise InputError(f"scikit-image sample {name!r} cannot be loaded here: {exc}") from None
        if image.ndim == 3 and image.shape[-1] == 4:
            image = rgba2rgb(image)
        if image.ndim == 3:
            image = rgb2gray(image)
        image = image.astype(np.float64)
        if image.max() > 1.0:
            image = image / 255.0
        factor = max_side / max(image.shape)
        if factor < 1.0:
            image = rescale(image, factor, anti_aliasing=True, preserve_range=True)
        out.append(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None])
    return tuple(out)


# -- scenes ----------------------------------------------------------------------------------------
@dataclass
class FlowLayer:
    """One layer of a scene (see the module docstring for the frames).

    ``texture (1, h, w)`` is read at ``texture_from_local @ local``; ``local_from_image`` places the
    layer in frame 1 (image voxel → layer coordinates, in which the shape has radius about 1);
    ``motion`` maps frame-1 image points of the layer to frame 2. ``exponent`` (``p`` of the
    super-ellipse ``(|u|^p + |v|^p)^(1/p) <= r(θ)``; ``inf`` = a square) and ``harmonics``
    (``(K, 2)`` cosine/sine amplitudes of ``r(θ) = 1 + Σ_k a_k cos kθ + b_k sin kθ``) give the shape;
    ``exponent=None`` is a background that covers everything. ``gain`` multiplies the layer's
    texture in frame 2 only (a change of illumination of that object).
    """

    texture: Tensor
    texture_from_local: Tensor
    local_from_image: Tensor
    motion: Tensor
    exponent: float | None = 2.0
    harmonics: Tensor | None = None
    gain: float = 1.0

    def local(self, points: Tensor, frame: int) -> Tensor:
        """Layer coordinates ``(1, 2, *S)`` of image voxel ``points (1, 2, *S)`` of frame 1 or 2."""
        matrix = self.local_from_image if frame == 1 else self.local_from_image @ torch.linalg.inv(self.motion)
        return apply_matrix(matrix.to(points.dtype), points)

    def radius(self, local: Tensor) -> Tensor:
        """``ρ = ||local||_p / r(θ)`` per point ``(1, 1, *S)``: inside the shape where ``ρ <= 1``."""
        if self.exponent is None:
            return torch.zeros_like(local[:, :1])
        u, v = local[:, :1], local[:, 1:2]
        if math.isinf(self.exponent):
            norm = torch.maximum(u.abs(), v.abs())
        else:
            p = float(self.exponent)
            norm = (u.abs() ** p + v.abs() ** p).clamp_min(1e-12) ** (1.0 / p)
        bound = torch.ones_like(norm)
        if self.harmonics is not None and len(self.harmonics):
            theta = torch.atan2(v, u)
            for k, (a, b) in enumerate(self.harmonics.tolist(), start=1):
                bound = bound + a * torch.cos(k * theta) + b * torch.sin(k * theta)
        return norm / bound.clamp_min(0.2)

    def pixels_per_unit(self) -> float:
        """How many image pixels one unit of layer coordinates spans (for a one-pixel soft edge)."""
        linear = self.local_from_image[:2, :2].double()
        return float(1.0 / torch.linalg.det(linear).abs().sqrt().clamp_min(1e-9))


def _inside(layer: FlowLayer, points: Tensor, frame: int) -> Tensor:
    return layer.radius(layer.local(points, frame)) <= 1.0


def render_scene(layers: Sequence[FlowLayer], size: Sequence[int], *, edge: float = 1.0) -> dict[str, Tensor]:
    """Both frames, the exact flow and occlusion of a scene (layers back to front; the first one should
    be a background, ``exponent=None``).

    Returns ``frame1``, ``frame2`` ``(1, H, W)``, ``flow (2, H, W)`` (array-axis order, pixels, fixed →
    moving), ``occluded (H, W)`` bool and ``layer (H, W)`` int64 (the top layer of frame 1 at each
    pixel). Shapes get an anti-aliased edge ``edge`` pixels wide; the top layer is where ``ρ <= 1``.
    """
    height, width = (int(s) for s in size)
    identity = voxel_identity((height, width), like=torch.zeros(1, dtype=torch.float32))
    identity = identity.expand(1, 2, height, width)
    frames = []
    for frame in (1, 2):
        image = torch.zeros(1, 1, height, width)
        for layer in layers:
            local = layer.local(identity, frame)
            values = sample_voxels(layer.texture[None], apply_matrix(layer.texture_from_local.float(), local),
                                   padding="reflection")
            if frame == 2:
                values = values * layer.gain
            if layer.exponent is None:
                image = values
                continue
            ramp = layer.pixels_per_unit() / max(edge, 1e-6)
            alpha = ((1.0 - layer.radius(local)) * ramp + 0.5).clamp(0.0, 1.0)
            image = image + alpha * (values - image)
        frames.append(image[0])
    # the top layer of frame 1 and its motion give the flow
    top = torch.zeros(height, width, dtype=torch.long)
    for k, layer in enumerate(layers):
        if k and layer.exponent is not None:
            top[_inside(layer, identity, 1)[0, 0]] = k
    target = identity.clone()
    for k, layer in enumerate(layers):
        here = top == k
        if here.any():
            target[0, :, here] = apply_matrix(layer.motion.float(), identity)[0, :, here]
    flow = (target - identity)[0]
    # occluded: a layer above the pixel's own covers its point in frame 2, or that point leaves the image
    occluded = (target[0, 0] < 0) | (target[0, 0] > height - 1) | (target[0, 1] < 0) | (target[0, 1] > width - 1)
    for k, layer in enumerate(layers):
        if k == 0 or layer.exponent is None:
            continue
        covered = _inside(layer, target, 2)[0, 0]
        occluded |= covered & (top < k)
    return {"frame1": frames[0], "frame2": frames[1], "flow": flow, "occluded": occluded, "layer": top}


def reverse_scene(layers: Sequence[FlowLayer]) -> list[FlowLayer]:
    """The same scene played backwards (frame 2 first): each layer placed where it is in frame 2 and
    moved by the inverse motion, so :func:`render_scene` of it gives the backward flow and occlusion
    (frame 2 → frame 1; per-layer gains are dropped)."""
    out = []
    for layer in layers:
        inverse = torch.linalg.inv(layer.motion)
        out.append(FlowLayer(texture=layer.texture, texture_from_local=layer.texture_from_local,
                             local_from_image=layer.local_from_image @ inverse, motion=inverse,
                             exponent=layer.exponent, harmonics=layer.harmonics))
    return out


# -- random scenes ------------------------------------------------------------------------------------
def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64))


def _affine(rotation_deg: float, scale: float, translation: Sequence[float], center: Sequence[float]) -> Tensor:
    """``T(center + translation) R S T(-center)`` in (row, column) voxel coordinates, float64."""
    angle = math.radians(rotation_deg)
    c, s = math.cos(angle), math.sin(angle)
    linear = torch.tensor([[c, -s], [s, c]], dtype=torch.float64) * scale
    centre = torch.tensor([float(v) for v in center], dtype=torch.float64)
    out = torch.eye(3, dtype=torch.float64)
    out[:2, :2] = linear
    out[:2, 2] = centre + torch.tensor([float(v) for v in translation], dtype=torch.float64) - linear @ centre
    return out


def random_motion(generator: torch.Generator, center: Sequence[float], *, max_translation: float,
                  max_rotation: float, max_scale: float) -> Tensor:
    """A random affine motion about ``center``: translation of magnitude up to ``max_translation`` pixels
    (``u^1.5``-distributed, so small motions are more frequent, as in Flying Chairs), rotation up to
    ``max_rotation`` degrees, zoom in ``[1/max_scale, max_scale]``."""
    magnitude = max_translation * _uniform(generator, 0.0, 1.0) ** 1.5
    direction = _uniform(generator, -math.pi, math.pi)
    translation = (magnitude * math.sin(direction), magnitude * math.cos(direction))
    rotation = _uniform(generator, -max_rotation, max_rotation)
    scale = math.exp(_uniform(generator, -math.log(max_scale), math.log(max_scale)))
    return _affine(rotation, scale, translation, center)


def _texture_placement(generator: torch.Generator, texture: Tensor, pixels_per_unit: float, extent: float) -> Tensor:
    """``texture_from_local``: a random rotation and a zoom of 0.5-1.25 texture pixels per image pixel
    (``pixels_per_unit`` image pixels per local unit) of a random region of ``texture``, such that the
    local square ``[-extent/2, extent/2]^2`` stays inside the texture (a texture too small for that is
    magnified further)."""
    h, w = texture.shape[-2:]
    zoom = math.exp(_uniform(generator, math.log(0.5), math.log(1.25)))
    side = min(pixels_per_unit * zoom, (min(h, w) - 2) / (extent * math.sqrt(2.0)))  # texture px per local unit
    rotation = _uniform(generator, -180.0, 180.0)
    half = 0.5 * extent * side * math.sqrt(2.0)
    centre = (_uniform(generator, half, max(h - 1 - half, half)), _uniform(generator, half, max(w - 1 - half, half)))
    return _affine(rotation, side, centre, (0.0, 0.0))


def random_scene(
    generator: torch.Generator,
    textures: Sequence[Tensor],
    size: Sequence[int],
    *,
    layers: tuple[int, int] = (3, 8),
    max_motion: float = 12.0,
    max_rotation: float = 10.0,
    max_scale: float = 1.1,
    background_motion: float = 0.5,
    photometric: bool = True,
) -> list[FlowLayer]:
    """A random Flying-Chairs-like scene: a background layer moving by a smaller affine motion
    (``background_motion`` times the objects' ranges) and ``layers`` (inclusive range) foreground
    objects: star-shaped super-ellipses of random size, exponent and harmonics, each with a texture
    from another photograph and its own affine motion. ``photometric`` also draws a per-layer
    illumination change between the frames (``gain`` 0.9-1.1)."""
    height, width = (int(s) for s in size)
    short = float(min(height, width))
    pick = torch.randperm(len(textures), generator=generator).tolist()

    def texture(k: int) -> Tensor:
        return textures[pick[k % len(pick)]]

    centre = ((height - 1) / 2.0, (width - 1) / 2.0)
    image_box = math.hypot(height, width)
    # background: the image itself in layer coordinates (local = image voxels), a texture region
    background_texture = texture(0)
    out = [FlowLayer(
        texture=background_texture,
        texture_from_local=_texture_placement(generator, background_texture, 1.0, image_box + 4 * max_motion)
        @ _affine(0.0, 1.0, (-centre[0], -centre[1]), (0.0, 0.0)),
        local_from_image=torch.eye(3, dtype=torch.float64),
        motion=random_motion(generator, centre, max_translation=background_motion * max_motion,
                             max_rotation=background_motion * max_rotation,
                             max_scale=max_scale ** background_motion),
        exponent=None,
        gain=_uniform(generator, 0.95, 1.05) if photometric else 1.0,
    )]
    count = int(torch.randint(layers[0], layers[1] + 1, (), generator=generator))
    for k in range(1, count + 1):
        radius = short * math.exp(_uniform(generator, math.log(0.08), math.log(0.3)))
        aspect = math.exp(_uniform(generator, -0.5, 0.5))
        where = (_uniform(generator, -0.1 * height, 1.1 * height), _uniform(generator, -0.1 * width, 1.1 * width))
        angle = _uniform(generator, -180.0, 180.0)
        # image voxel -> local: undo the placement (translate, rotate, scale by radius and aspect)
        image_from_local = _affine(angle, 1.0, where, (0.0, 0.0)) @ torch.diag(
            torch.tensor([radius * aspect, radius / aspect, 1.0], dtype=torch.float64))
        exponent = float("inf") if _uniform(generator, 0, 1) < 0.15 else math.exp(_uniform(generator, math.log(0.8),
                                                                                               math.log(4.0)))
        harmonics = torch.empty(4, 2, dtype=torch.float64).uniform_(-1.0, 1.0, generator=generator)
        harmonics = harmonics * torch.tensor([0.15, 0.12, 0.08, 0.05], dtype=torch.float64)[:, None]
        layer_texture = texture(k)
        out.append(FlowLayer(
            texture=layer_texture,
            texture_from_local=_texture_placement(generator, layer_texture, radius, 3.0),
            local_from_image=torch.linalg.inv(image_from_local),
            motion=random_motion(generator, where, max_translation=max_motion, max_rotation=max_rotation,
                                 max_scale=max_scale),
            exponent=exponent,
            harmonics=harmonics,
            gain=_uniform(generator, 0.9, 1.1) if photometric else 1.0,
        ))
    return out


def photometric_change(generator: torch.Generator, frame1: Tensor, frame2: Tensor) -> tuple[Tensor, Tensor]:
    """Global photometric changes of both frames: a common random contrast and brightness, then a
    relative gain (0.9-1.1), bias (±0.05) and gamma (0.9-1.1) of frame 2 and Gaussian noise of
    standard deviation up to 0.02 in each frame (images in [0, 1])."""
    contrast = _uniform(generator, 0.6, 1.4)
    brightness = _uniform(generator, -0.15, 0.15)
    out = []
    for k, frame in enumerate((frame1, frame2)):
        frame = ((frame - 0.5) * contrast + 0.5 + brightness).clamp(0.0, 1.0)
        if k == 1:
            frame = (frame.clamp_min(0.0) ** _uniform(generator, 0.9, 1.1)) * _uniform(generator, 0.9, 1.1)
            frame = frame + _uniform(generator, -0.05, 0.05)
        noise = _uniform(generator, 0.0, 0.02)
        frame = frame + noise * torch.randn(frame.shape, generator=generator)
        out.append(frame.clamp(0.0, 1.0))
    return out[0], out[1]


def synthetic_flow_pair(
    generator: torch.Generator,
    size: Sequence[int],
    *,
    textures: Sequence[Tensor] | None = None,
    photometric: bool = True,
    **scene: Any,
) -> dict[str, Tensor]:
    """One random pair: :func:`random_scene` rendered by :func:`render_scene`, then (``photometric``)
    :func:`photometric_change`. Keys as :func:`render_scene`'s."""
    textures = photo_textures() if textures is None else textures
    layers = random_scene(generator, textures, size, photometric=photometric, **scene)
    out = render_scene(layers, size)
    if photometric:
        out["frame1"], out["frame2"] = photometric_change(generator, out["frame1"], out["frame2"])
    return out


class SeededItems(Dataset):
    """A map-style data set of ``length`` random items, item ``i`` of epoch ``e`` drawn from its own
    generator ``item_generator(seed, e, i)`` (``per_epoch=False``: epoch 0 always, the same items every
    epoch) -- what the training loop's determinism needs (:mod:`alignkit.train.pairs`)."""

    def __init__(self, *, length: int, seed: int, per_epoch: bool) -> None:
        if length < 1:
            raise ConfigError(f"length must be >= 1, got {length}")
        self.length, self.seed, self.per_epoch = int(length), int(seed), bool(per_epoch)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def generator(self, index: int) -> torch.Generator:
        """Item ``index``'s generator (IndexError outside the data set)."""
        from alignkit.train.pairs import item_generator

        if not 0 <= index < self.length:
            raise IndexError(index)
        return item_generator(self.seed, self.epoch if self.per_epoch else 0, index)


class SyntheticFlowPairs(SeededItems):
    """Training pairs from :func:`synthetic_flow_pair`: item ``i`` of epoch ``e`` is drawn from
    ``item_generator(seed, e, i)`` (``per_epoch=True``; a fixed set of ``length`` pairs with
    ``per_epoch=False``, e.g. for validation with another ``seed``).

    Items (the keys of :mod:`alignkit.train.pairs`): ``fixed``/``moving`` ``(1, H, W)`` -- frame 1 and
    2, each normalised by its intensity ``percentiles`` as inference normalises images
    (:func:`alignkit.train.subjects.to_network_grid`) --, ``flow (2, H, W)`` (array-axis order,
    pixels), ``flow_mask (1, H, W)`` (all ones: the flow is known everywhere), ``occluded (1, H, W)``
    float and ``index``. ``scene`` options go to :func:`random_scene`.
    """

    ndim = 2

    def __init__(
        self,
        size: Sequence[int],
        *,
        length: int = 2000,
        seed: int = 0,
        per_epoch: bool = True,
        photometric: bool = True,
        percentiles: Sequence[float] | None = (0.5, 99.5),
        textures: Sequence[str] = PHOTOGRAPHS,
        **scene: Any,
    ) -> None:
        size = tuple(int(s) for s in size)
        if len(size) == 1:
            size = size * 2
        if len(size) != 2 or min(size) < 16:
            raise ConfigError(f"synthetic flow pairs are 2D with sides >= 16 pixels, got size {size}")
        super().__init__(length=length, seed=seed, per_epoch=per_epoch)
        self.size = size
        self.photometric = bool(photometric)
        self.percentiles = None if percentiles is None else tuple(float(v) for v in percentiles)
        self.texture_names = tuple(textures)
        self.scene = dict(scene)
        random_scene(torch.Generator().manual_seed(0), [torch.zeros(1, 8, 8)], size, **self.scene)  # check options

    def __getitem__(self, index: int) -> dict[str, Any]:
        from alignkit.solve.engine import normalize_intensity

        generator = self.generator(index)
        pair = synthetic_flow_pair(generator, self.size, textures=photo_textures(self.texture_names),
                                   photometric=self.photometric, **self.scene)
        fixed, moving = pair["frame1"], pair["frame2"]
        if self.percentiles is not None:
            fixed = normalize_intensity(fixed[None], *self.percentiles)[0]
            moving = normalize_intensity(moving[None], *self.percentiles)[0]
        return {
            "fixed": fixed,
            "moving": moving,
            "flow": pair["flow"],
            "flow_mask": torch.ones(1, *self.size),
            "occluded": pair["occluded"][None].float(),
            "index": index,
        }
