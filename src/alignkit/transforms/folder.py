"""The transform folder alignkit writes, and reads back.

Layout of ``transform/``::

    manifest.json   what is here, the fixed grid, the stages, and the point-mapping order
    affine.txt      the leading linear stages as one ITK text transform (absent for a homography)
    warp.nii.gz     the remaining (deformable) stages as one ITK/ANTs displacement field on the
                    fixed grid: world (LPS) displacements

A fixed-world point ``x`` maps to the moving world as ``y = M @ (x + u(x))``: the warp acts first,
then the matrix. That is ANTs' ``transformlist=[warp.nii.gz, affine.txt]`` and SimpleITK's
``CompositeTransform([affine, displacement])`` (ITK applies the last-added transform first).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from alignkit.errors import InputError
from alignkit.io.itk import read_displacement_field, write_displacement_field, write_itk_linear
from alignkit.spatial import Grid
from alignkit.transforms.base import ComposedTransform, Transform, flatten_stages, stage_kinds
from alignkit.transforms.dense import DisplacementField
from alignkit.transforms.linear import MatrixTransform

MANIFEST = "manifest.json"
FORMAT = "alignkit-transform"


def split_linear(transform: Transform) -> tuple[torch.Tensor, Transform | None]:
    """(moving_from_fixed matrix of the leading linear stages, the rest or None)."""
    stages = flatten_stages(transform)
    ndim = transform.ndim
    matrix = torch.eye(ndim + 1, dtype=torch.float64)
    index = 0
    while index < len(stages) and stages[index].is_linear:
        matrix = matrix @ stages[index].matrix().detach().cpu().double()
        index += 1
    rest = stages[index:]
    if not rest:
        return matrix, None
    return matrix, ComposedTransform(list(rest))


def save_transform(
    transform: Transform, fixed_grid: Grid, directory: str | Path, *, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``transform`` (fixed→moving) into ``directory`` (created; written atomically)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        matrix, rest = split_linear(transform)
        ndim = fixed_grid.ndim
        is_affine = bool(torch.allclose(matrix[ndim, :], torch.eye(ndim + 1, dtype=torch.float64)[ndim]))
        files: dict[str, str | None] = {"linear": None, "warp": None}
        if is_affine:
            write_itk_linear(tmp / "affine.txt", matrix)
            files["linear"] = "affine.txt"
        if rest is not None:
            with torch.no_grad():
                displacement = rest.displacement_on(fixed_grid, dtype=torch.float32)
            write_displacement_field(tmp / "warp.nii.gz", displacement[0].cpu(), fixed_grid)
            files["warp"] = "warp.nii.gz"
        manifest = {
            "format": FORMAT,
            "version": 1,
            "ndim": ndim,
            "direction": "maps fixed-world points to moving-world points (LPS)",
            "order": "y = matrix @ (x + warp(x)); ANTs transformlist = [warp, affine]",
            "fixed_grid": {"shape": list(fixed_grid.shape), "world_from_voxel": fixed_grid.world_from_voxel.tolist()},
            "matrix": matrix.tolist(),
            "files": files,
            # what each stage is (``affine``, ``svf``, ``homography`` ...), in application order
            "stages": stage_kinds(transform),
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_manifest(directory: str | Path) -> tuple[Grid, dict[str, Any]]:
    """The fixed grid and manifest of a folder written by :func:`save_transform`, without reading
    its warp."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise InputError("not an alignkit transform folder (no manifest.json)", directory)
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"corrupt manifest ({exc.msg})", manifest_path) from None
    if manifest.get("format") != FORMAT:
        raise InputError("manifest is not an alignkit transform manifest", manifest_path)
    grid_info = manifest["fixed_grid"]
    return Grid(tuple(grid_info["shape"]), torch.tensor(grid_info["world_from_voxel"], dtype=torch.float64)), manifest


def load_transform(directory: str | Path) -> tuple[ComposedTransform, Grid, dict[str, Any]]:
    """Read a folder written by :func:`save_transform`: (transform, fixed grid, manifest)."""
    directory = Path(directory)
    fixed_grid, manifest = load_manifest(directory)
    stages: list[Transform] = [MatrixTransform(torch.tensor(manifest["matrix"], dtype=torch.float64).float())]
    warp_name = manifest["files"].get("warp")
    if warp_name:
        displacement, warp_grid = read_displacement_field(directory / warp_name)
        field = DisplacementField(warp_grid)
        with torch.no_grad():
            field_param = next(field.parameters())
            field_param.copy_(torch.as_tensor(displacement, dtype=field_param.dtype).unsqueeze(0))
        field.requires_grad_(False)
        stages.append(field)
    return ComposedTransform(stages), fixed_grid, manifest
