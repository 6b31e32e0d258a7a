"""``alignkit demo``: register a real image to a copy of itself warped by a known random deformation.

The 3D demo uses nilearn's MNI152 template, the 2D demo scikit-image's astronaut photograph; both
ship with those packages, so the demo needs no download. The *fixed* image is the real image
resampled through a known map ``φ_true`` (an affine composed with a diffeomorphic SVF); the
registration must find ``φ ≈ φ_true`` (fixed→moving points), and the demo prints the error.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from alignkit.errors import ConfigError
from alignkit.image import Image
from alignkit.spatial import Grid, gaussian_blur, sample_world
from alignkit.transforms import ComposedTransform


def load_demo_image(ndim: int) -> Image:
    if ndim == 3:
        try:
            from nilearn.datasets import load_mni152_template
        except ImportError:
            raise ConfigError("the 3D demo needs nilearn: pip install 'alignkit[demo]'") from None
        from alignkit.io.images import image_from_nibabel

        nii = load_mni152_template(resolution=2)
        return image_from_nibabel(nii, path="nilearn:MNI152 (2 mm)")
    try:
        from skimage import data as skdata
    except ImportError:
        raise ConfigError("the 2D demo needs scikit-image: pip install 'alignkit[demo]'") from None
    rgb = skdata.astronaut().astype(np.float32) / 255.0
    image = Image.from_array(rgb, path="skimage:astronaut")
    return image


def random_true_transform(grid: Grid, generator: torch.Generator, *, displacement_mm: float = 4.0) -> ComposedTransform:
    """A random affine (±6°, ±5 % scale, ±6 % of the extent shift) composed with a smooth SVF."""
    from alignkit.transforms import MatrixTransform, StationaryVelocityField

    ndim = grid.ndim
    centre = grid.center_world()
    extent = float(grid.extent().mean())
    noise = lambda *shape: torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1
    linear = torch.eye(ndim, dtype=torch.float64) + 0.05 * noise(ndim, ndim)
    angle = float(noise(1)) * np.deg2rad(6.0)
    rotation = torch.eye(ndim, dtype=torch.float64)
    c, s = np.cos(angle), np.sin(angle)
    rotation[0, 0], rotation[0, 1], rotation[1, 0], rotation[1, 1] = c, -s, s, c
    linear = rotation @ linear
    matrix = torch.eye(ndim + 1, dtype=torch.float64)
    matrix[:ndim, :ndim] = linear
    matrix[:ndim, ndim] = centre - linear @ centre + 0.06 * extent * noise(ndim) / 2
    field_grid = grid.downsampled(4)
    velocity = torch.randn(1, ndim, *field_grid.shape, generator=generator, dtype=torch.float64).float()
    velocity = gaussian_blur(velocity, 2.0)
    velocity = velocity / velocity.abs().amax().clamp(min=1e-6) * displacement_mm
    svf = StationaryVelocityField(field_grid)
    with torch.no_grad():
        next(svf.parameters()).copy_(velocity)
    svf.requires_grad_(False)
    return ComposedTransform([MatrixTransform(matrix.float()), svf])


def make_demo_pair(ndim: int, seed: int) -> tuple[Image, Image, ComposedTransform, Image]:
    """(fixed = real image ∘ φ_true, moving = real image, φ_true, foreground mask on the fixed grid)."""
    real = load_demo_image(ndim)
    generator = torch.Generator().manual_seed(seed)
    spacing = float(real.grid.spacing.mean())
    truth = random_true_transform(real.grid, generator, displacement_mm=2.0 * spacing)
    with torch.no_grad():
        world = truth.map_on(real.grid)
        fixed_data = sample_world(real.batch(), real.grid, world)[0]
    fixed = Image(fixed_data, real.grid, path=f"{real.path} warped by a known random deformation")
    grey = fixed_data.mean(0)
    mask = Image((grey > grey.quantile(0.5) * 0 + 0.1 * grey.max()).float().unsqueeze(0), real.grid)
    return fixed, real, truth, mask


def run_demo(output: str | Path, *, ndim: int = 3, device: str = "auto", seed: int = 0, quiet: bool = False) -> int:
    import alignkit

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stdout, flush=True))
    output = Path(output)
    fixed, moving, truth, mask = make_demo_pair(ndim, seed)
    say(f"alignkit demo: registering {moving.path} to a copy warped by a known random affine + smooth deformation")
    started = time.perf_counter()
    result = alignkit.register(fixed, moving, device=device, seed=seed, quiet=quiet)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        true_map = truth.map_on(fixed.grid)
        found_map = result.world_map().cpu()
        inside = mask.data[0] > 0
        start_error = (true_map[0] - fixed.grid.world_points()[0]).norm(dim=0)[inside]
        error = (found_map[0] - true_map[0]).norm(dim=0)[inside]
    unit = "mm" if ndim == 3 else "px"
    result.metrics["demo"] = {
        "true_displacement_mean": float(start_error.mean()),
        "recovered_error_mean": float(error.mean()),
        "recovered_error_p95": float(error.quantile(0.95)),
        "unit": unit,
    }
    result.save(output, moving_suffix=".nii.gz" if ndim == 3 else ".png")
    from alignkit.io import write_image

    write_image(fixed, output / ("fixed.nii.gz" if ndim == 3 else "fixed.png"))
    say(
        f"true displacement {float(start_error.mean()):.2f} {unit} on average; recovered map error "
        f"{float(error.mean()):.2f} {unit} mean, {float(error.quantile(0.95)):.2f} {unit} 95th percentile "
        f"(inside the foreground), in {seconds:.1f} s"
    )
    say(f"NCC {result.metrics['ncc_before']:.3f} -> {result.metrics['ncc_after']:.3f}; "
        f"non-positive Jacobians {result.metrics['nonpositive_jacobian_percent']:.3f}%")
    say(f"QC figure: {output / 'qc.png'}; transform files: {output / 'transform'}/")
    return 0
