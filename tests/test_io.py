"""Tests of alignkit.io: round trips, error messages, real data, and cross-checks with SimpleITK / ANTs."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from alignkit.errors import InputError
from alignkit.image import Image
from alignkit.io import (
    atomic_path,
    read_displacement_field,
    read_flo,
    read_image,
    read_itk_linear,
    read_kitti_flow,
    read_points,
    write_displacement_field,
    write_flo,
    write_image,
    write_itk_linear,
    write_points,
)
from alignkit.spatial import Grid, apply_matrix, sample_world

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def need_data(rel: str) -> Path:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"real data {path} is not available")
    return path


# ------------------------------------------------------------------------------------------------
# geometry used by the cross-checks: non-unit spacing, oblique direction, asymmetric shapes
# ------------------------------------------------------------------------------------------------
def rotation(ndim: int, angles: tuple[float, ...]) -> np.ndarray:
    if ndim == 2:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    out = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = out @ r
    return out


def scene(ndim: int) -> tuple[Grid, Grid, torch.Tensor, np.ndarray]:
    """fixed grid, moving grid, smooth moving volume, moving_from_fixed matrix."""
    from scipy.ndimage import gaussian_filter

    if ndim == 3:
        fixed = Grid.from_spacing((20, 17, 14), (1.5, 1.2, 2.0), (5.0, -3.0, 7.0), torch.tensor(rotation(3, (0.2, 0.0, 0.3))))
        moving = Grid.from_spacing((24, 22, 18), (1.3, 1.4, 1.6), (-8.0, -12.0, -5.0), torch.tensor(rotation(3, (0.0, 0.1, -0.15))))
    else:
        fixed = Grid.from_spacing((27, 21), (1.5, 1.2), (5.0, -3.0), torch.tensor(rotation(2, (0.3,))))
        moving = Grid.from_spacing((33, 30), (1.3, 1.4), (-8.0, -12.0), torch.tensor(rotation(2, (-0.15,))))
    rng = np.random.default_rng(0)
    vol = torch.tensor(gaussian_filter(rng.random(moving.shape), 2.0) * 10.0, dtype=torch.float32)
    m = np.eye(ndim + 1)
    m[:ndim, :ndim] = rotation(ndim, (0.1,) * (ndim - 2 if ndim == 3 else 1)) @ np.diag([1.05, 0.97, 1.02][:ndim])
    m[:ndim, ndim] = [2.0, -1.5, 3.0][:ndim]
    return fixed, moving, vol, m


def smooth_field(grid: Grid) -> torch.Tensor:
    w = grid.world_points(dtype=torch.float64)[0]
    comps = [2.0 * torch.sin(w[1] / 6.0), 1.5 * torch.cos(w[0] / 7.0), 1.0 * torch.sin((w[0] + w[1]) / 5.0)]
    return torch.stack(comps[: grid.ndim])


def interior(world: torch.Tensor, grid: Grid) -> np.ndarray:
    """Points whose voxel coordinates lie inside [0, n-1] (where every tool interpolates alike)."""
    v = apply_matrix(grid.voxel_from_world, world.double())[0]
    ok = torch.ones(v.shape[1:], dtype=torch.bool)
    for d, n in enumerate(grid.shape):
        ok &= (v[d] >= 0) & (v[d] <= n - 1)
    return ok.numpy()


def ours(vol: torch.Tensor, moving: Grid, world: torch.Tensor) -> np.ndarray:
    return sample_world(vol[None, None].double(), moving, world.double())[0, 0].numpy()


def to_sitk(array: np.ndarray, grid: Grid):
    sitk = pytest.importorskip("SimpleITK")
    n = grid.ndim
    img = sitk.GetImageFromArray(np.transpose(array, tuple(range(n - 1, -1, -1))).astype(np.float64))
    lin = grid.world_from_voxel.numpy()[:n, :n]
    sp = np.linalg.norm(lin, axis=0)
    img.SetSpacing(sp.tolist())
    img.SetDirection((lin / sp).ravel().tolist())
    img.SetOrigin(grid.world_from_voxel.numpy()[:n, n].tolist())
    return img


def sitk_resample(vol: torch.Tensor, moving: Grid, fixed: Grid, transform) -> np.ndarray:
    import SimpleITK as sitk

    out = sitk.Resample(to_sitk(vol.numpy(), moving), to_sitk(np.zeros(fixed.shape), fixed), transform, sitk.sitkLinear, 0.0)
    return np.transpose(sitk.GetArrayFromImage(out), tuple(range(fixed.ndim - 1, -1, -1)))


def to_ants(array: np.ndarray, grid: Grid):
    ants = pytest.importorskip("ants")
    n = grid.ndim
    lin = grid.world_from_voxel.numpy()[:n, :n]
    sp = np.linalg.norm(lin, axis=0)
    return ants.from_numpy(
        np.ascontiguousarray(array, dtype=np.float32),
        origin=grid.world_from_voxel.numpy()[:n, n].tolist(),
        spacing=sp.tolist(),
        direction=lin / sp,
    )


def ants_resample(vol: torch.Tensor, moving: Grid, fixed: Grid, transforms: list[str]) -> np.ndarray:
    ants = pytest.importorskip("ants")
    out = ants.apply_transforms(to_ants(np.zeros(fixed.shape), fixed), to_ants(vol.numpy(), moving), transformlist=transforms)
    return out.numpy()


TOL = 1e-4  # float32 inside ITK/ANTs resampling


# ------------------------------------------------------------------------------------------------
# cross-checks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_file_matches_simpleitk_and_ants(tmp_path: Path, ndim: int) -> None:
    sitk = pytest.importorskip("SimpleITK")
    fixed, moving, vol, m = scene(ndim)
    path = tmp_path / "affine.txt"
    write_itk_linear(path, torch.tensor(m), center=fixed.center_world())
    assert np.allclose(read_itk_linear(path).numpy(), m, atol=1e-12)
    world = apply_matrix(torch.tensor(m), fixed.world_points(dtype=torch.float64))
    mask = interior(world, moving)
    assert mask.sum() > 0.15 * mask.size
    expected = ours(vol, moving, world)
    got_sitk = sitk_resample(vol, moving, fixed, sitk.ReadTransform(str(path)))
    np.testing.assert_allclose(got_sitk[mask], expected[mask], atol=TOL)
    got_ants = ants_resample(vol, moving, fixed, [str(path)])
    np.testing.assert_allclose(got_ants[mask], expected[mask], atol=TOL)
    # A wrong convention (the inverse matrix) must be detected by this comparison.
    wrong = ours(vol, moving, apply_matrix(torch.tensor(np.linalg.inv(m)), fixed.world_points(dtype=torch.float64)))
    assert np.abs(wrong - got_sitk)[mask].max() > 0.05


@pytest.mark.parametrize("ndim", [2, 3])
def test_displacement_field_matches_simpleitk_and_ants(tmp_path: Path, ndim: int) -> None:
    sitk = pytest.importorskip("SimpleITK")
    fixed, moving, vol, _ = scene(ndim)
    u = smooth_field(fixed)
    path = tmp_path / "warp.nii.gz"
    write_displacement_field(path, u, fixed)
    header = nib.load(str(path)).header
    assert int(header["intent_code"]) == 1007
    assert nib.load(str(path)).shape == (*fixed.shape, *([1] if ndim == 2 else []), 1, ndim)
    u_back, grid_back = read_displacement_field(path)
    assert grid_back.same_as(fixed, atol=1e-5)
    np.testing.assert_allclose(u_back.numpy(), u.numpy(), atol=1e-5)

    world = fixed.world_points(dtype=torch.float64) + u[None]
    mask = interior(world, moving)
    assert mask.sum() > 0.15 * mask.size
    expected = ours(vol, moving, world)
    field = sitk.ReadImage(str(path))
    assert field.GetDimension() == ndim and field.GetNumberOfComponentsPerPixel() == ndim
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    got_sitk = sitk_resample(vol, moving, fixed, transform)
    np.testing.assert_allclose(got_sitk[mask], expected[mask], atol=TOL)
    got_ants = ants_resample(vol, moving, fixed, [str(path)])
    np.testing.assert_allclose(got_ants[mask], expected[mask], atol=TOL)
    # Components flipped to RAS (the classic mistake) would not match.
    flipped = u.clone()
    flipped[:2] *= -1
    wrong = ours(vol, moving, fixed.world_points(dtype=torch.float64) + flipped[None])
    assert np.abs(wrong - got_sitk)[mask].max() > 0.05


@pytest.mark.parametrize("ndim", [2, 3])
def test_ants_composite_order_warp_then_affine(tmp_path: Path, ndim: int) -> None:
    """``transformlist=[warp, affine]`` maps a fixed point x to ``A(x + u(x))`` (see alignkit.io.itk)."""
    fixed, moving, vol, m = scene(ndim)
    u = smooth_field(fixed)
    warp, affine = tmp_path / "warp.nii.gz", tmp_path / "affine.txt"
    write_displacement_field(warp, u, fixed)
    write_itk_linear(affine, m)
    a = torch.tensor(m)
    x = fixed.world_points(dtype=torch.float64)
    documented = apply_matrix(a, x + u[None])  # warp acts on the fixed point first
    ax = apply_matrix(a, x)
    other = ax + sample_world(u[None], fixed, ax)  # affine first, then warp
    mask = interior(documented, moving) & interior(other, moving)
    assert mask.sum() > 0.15 * mask.size
    got = ants_resample(vol, moving, fixed, [str(warp), str(affine)])
    np.testing.assert_allclose(got[mask], ours(vol, moving, documented)[mask], atol=TOL)
    assert np.abs(got - ours(vol, moving, other))[mask].max() > 0.05


# ------------------------------------------------------------------------------------------------
# ITK text transforms
# ------------------------------------------------------------------------------------------------
def test_itk_linear_round_trip_and_other_types(tmp_path: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    _, _, _, m = scene(3)
    path = tmp_path / "a.txt"
    write_itk_linear(path, m)
    text = path.read_text()
    assert text.startswith("#Insight Transform File V1.0") and "AffineTransform_double_3_3" in text
    np.testing.assert_allclose(read_itk_linear(path).numpy(), m, atol=1e-12)
    # Euler3D with a centre, written by SimpleITK: compare point mapping.
    euler = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.2, 0.3, (4.0, -5.0, 6.0))
    sitk.WriteTransform(euler, str(tmp_path / "e.tfm"))
    mat = read_itk_linear(tmp_path / "e.tfm").numpy()
    p = np.array([7.0, -3.0, 11.0])
    np.testing.assert_allclose(mat[:3, :3] @ p + mat[:3, 3], euler.TransformPoint(p.tolist()), atol=1e-9)
    # .mat via SimpleITK
    write_itk_linear(tmp_path / "a.mat", m)
    np.testing.assert_allclose(read_itk_linear(tmp_path / "a.mat").numpy(), m, atol=1e-12)


def test_itk_linear_text_parser_without_simpleitk(tmp_path: Path) -> None:
    from alignkit.io.itk import _parse_text_linear

    m = np.array([[1.1, 0.2, 3.0], [-0.1, 0.9, -2.0], [0.0, 0.0, 1.0]])
    path = tmp_path / "a.txt"
    write_itk_linear(path, m, center=np.array([10.0, -4.0]))
    assert "AffineTransform_double_2_2" in path.read_text()
    np.testing.assert_allclose(_parse_text_linear(path.read_text(), path), m, atol=1e-12)
    with pytest.raises(InputError, match="BSpline"):
        _parse_text_linear("Transform: BSplineTransform_double_2_2\nParameters: 1 2\n", path)


def test_itk_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="projective"):
        write_itk_linear(tmp_path / "h.txt", np.array([[1, 0, 0], [0, 1, 0], [0.1, 0, 1.0]]))
    with pytest.raises(InputError, match="suffix"):
        write_itk_linear(tmp_path / "h.json", np.eye(3))
    bad = tmp_path / "bad.txt"
    bad.write_text("not a transform\n")
    with pytest.raises(InputError, match=str(bad).replace("\\", "\\\\")):
        read_itk_linear(bad)
    with pytest.raises(InputError, match="not found"):
        read_itk_linear(tmp_path / "missing.txt")
    grid = Grid.from_spacing((4, 5, 6), 1.0)
    with pytest.raises(InputError, match="displacement must be"):
        write_displacement_field(tmp_path / "w.nii.gz", torch.zeros(3, 4, 5, 7), grid)
    img = tmp_path / "scalar.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), str(img))
    with pytest.raises(InputError, match="not a displacement field"):
        read_displacement_field(img)


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
def test_nifti_round_trip_and_lps(tmp_path: Path) -> None:
    affine_ras = np.eye(4)  # oblique rotation, anisotropic spacing (qform-representable, as ITK needs)
    affine_ras[:3, :3] = rotation(3, (0.1, -0.2, 0.3)) @ np.diag([-1.2, 0.9, 2.5])
    affine_ras[:3, 3] = [30.0, -20.0, 5.0]
    array = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    path = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(array, affine_ras), str(path))
    image = read_image(path)
    assert image.shape == (5, 6, 7) and image.channels == 1 and image.data.dtype == torch.float32
    assert image.meta["format"] == "nifti" and image.meta["dtype"] == "int16"
    voxel = np.array([1.0, 4.0, 2.0, 1.0])
    ras = affine_ras @ voxel
    lps = image.world_from_voxel.numpy() @ voxel
    np.testing.assert_allclose(lps[:3], [-ras[0], -ras[1], ras[2]], atol=1e-6)
    assert float(image.data[0, 1, 4, 2]) == float(array[1, 4, 2])

    out = tmp_path / "b.nii"
    write_image(image, out)
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, affine_ras, atol=1e-5)
    assert back.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(back.dataobj), array)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    # SimpleITK reads the same world position for the same voxel.
    sitk = pytest.importorskip("SimpleITK")
    s = sitk.ReadImage(str(out))
    np.testing.assert_allclose(s.TransformIndexToPhysicalPoint((1, 4, 2)), lps[:3], atol=1e-4)


def test_nifti_2d_and_channels(tmp_path: Path) -> None:
    affine = np.diag([-0.5, 0.7, 1.0, 1.0])
    affine[:2, 3] = [3.0, -4.0]
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((9, 11)).astype(np.float32), affine), str(path))
    image = read_image(path)
    assert image.ndim == 2 and image.shape == (9, 11)
    np.testing.assert_allclose(image.world_from_voxel.numpy(), [[0.5, 0, -3.0], [0, -0.7, 4.0], [0, 0, 1]])
    write_image(image, tmp_path / "slice2.nii.gz")
    again = read_image(tmp_path / "slice2.nii.gz")
    assert again.grid.same_as(image.grid, atol=1e-6)
    torch.testing.assert_close(again.data, image.data)
    rgb = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.float32), np.eye(4)), str(rgb))
    assert read_image(rgb).channels == 3 and read_image(rgb).ndim == 3


def test_labels(tmp_path: Path) -> None:
    labels = np.array([[0, 3, 3], [1001, 2, 0]], dtype=np.float32)
    path = tmp_path / "lab.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(path))
    image = read_image(path, labels=True)
    assert image.data.dtype == torch.int64
    assert sorted(image.data.unique().tolist()) == [0, 2, 3, 1001]
    nib.save(nib.Nifti1Image(labels + 0.5, np.eye(4)), str(path))
    with pytest.raises(InputError, match="non-integer"):
        read_image(path, labels=True)


def test_itk_formats_round_trip(tmp_path: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    grid = Grid.from_spacing((6, 5, 4), (0.8, 1.1, 2.0), (1.0, 2.0, -3.0), torch.tensor(rotation(3, (0.1, 0.2, 0.3))))
    data = torch.arange(120, dtype=torch.float32).reshape(1, 6, 5, 4)
    image = Image(data, grid)
    for suffix in (".mha", ".nrrd"):
        path = tmp_path / f"a{suffix}"
        write_image(image, path)
        back = read_image(path)
        assert back.grid.same_as(grid, atol=1e-6)
        torch.testing.assert_close(back.data, data)
        s = sitk.ReadImage(str(path))
        assert s.GetSize() == (6, 5, 4)
        assert s.GetPixel(2, 3, 1) == float(data[0, 2, 3, 1])
    with pytest.raises(InputError, match="atomically"):
        write_image(image, tmp_path / "a.mhd")


def test_raster_png_tiff_round_trip(tmp_path: Path) -> None:
    from PIL import Image as PILImage

    rng = np.random.default_rng(2)
    grey16 = rng.integers(0, 65535, size=(7, 12), dtype=np.uint16)
    PILImage.fromarray(grey16).save(tmp_path / "g16.png")
    image = read_image(tmp_path / "g16.png")
    assert image.shape == (7, 12) and image.meta["dtype"] == "uint16"
    np.testing.assert_array_equal(image.data[0].numpy(), grey16.astype(np.float32))
    # world x = column, y = row
    np.testing.assert_allclose(image.world_from_voxel.numpy() @ [2, 5, 1], [5, 2, 1])
    write_image(image.with_data(image.data + 0.4), tmp_path / "out.png")
    np.testing.assert_array_equal(np.asarray(PILImage.open(tmp_path / "out.png")), grey16)
    # clipping to the original range
    write_image(image.with_data(image.data * 0 - 5.0), tmp_path / "neg.png")
    assert np.asarray(PILImage.open(tmp_path / "neg.png")).max() == 0

    rgb = rng.integers(0, 255, size=(6, 9, 3), dtype=np.uint8)
    PILImage.fromarray(rgb).save(tmp_path / "rgb.tif")
    image = read_image(tmp_path / "rgb.tif")
    assert image.channels == 3 and image.shape == (6, 9)
    write_image(image, tmp_path / "rgb2.png")
    np.testing.assert_array_equal(np.asarray(PILImage.open(tmp_path / "rgb2.png")), rgb)

    pages = [PILImage.fromarray(rgb[..., 0]), PILImage.fromarray(rgb[..., 1])]
    pages[0].save(tmp_path / "multi.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(InputError, match="multi-page"):
        read_image(tmp_path / "multi.tif")


def test_raster_matches_simpleitk_geometry(tmp_path: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    from PIL import Image as PILImage

    arr = np.random.default_rng(3).integers(0, 255, size=(5, 8), dtype=np.uint8)
    PILImage.fromarray(arr).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    s = sitk.ReadImage(str(tmp_path / "a.png"))
    row, col = 3, 6
    world = image.world_from_voxel.numpy() @ [row, col, 1]
    idx = s.TransformPhysicalPointToIndex(world[:2].tolist())
    assert s.GetPixel(idx) == float(image.data[0, row, col])


def test_numpy_round_trip(tmp_path: Path) -> None:
    vol = np.random.default_rng(4).random((5, 6, 7))
    np.savez(tmp_path / "v.npz", vol_data=vol, other=np.zeros(3))
    image = read_image(tmp_path / "v.npz")
    assert image.shape == (5, 6, 7) and image.meta["npz_key"] == "vol_data"
    np.testing.assert_allclose(image.world_from_voxel.numpy(), np.eye(4))
    moved = Image(image.data, Grid.from_spacing((5, 6, 7), (2.0, 1.0, 0.5), (1.0, 2.0, 3.0)), meta=dict(image.meta))
    write_image(moved, tmp_path / "w.npz")
    back = read_image(tmp_path / "w.npz")
    assert back.grid.same_as(moved.grid) and torch.equal(back.data, image.data)
    np.save(tmp_path / "s.npy", vol[0])
    flat = read_image(tmp_path / "s.npy")
    assert flat.ndim == 2 and flat.grid.same_as(Grid.raster_2d((6, 7)))
    np.savez(tmp_path / "ambiguous.npz", a=vol, b=vol)
    with pytest.raises(InputError, match="key="):
        read_image(tmp_path / "ambiguous.npz")
    assert read_image(tmp_path / "ambiguous.npz", key="b").shape == (5, 6, 7)


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("missing.nii.gz", None, "file not found"),
        ("corrupt.nii.gz", b"\x1f\x8b garbage that is not gzip", "cannot read NIfTI"),
        ("short.nii", b"\x00" * 20, "cannot read NIfTI"),
        ("bad.png", b"not a png at all", "cannot read image"),
        ("image.xyz", b"abc", "unsupported image suffix"),
        ("bad.npy", b"nonsense", "cannot read numpy"),
        ("bad.mha", b"ObjectType = Image\nNDims = 3\n", "cannot read image"),
    ],
)
def test_read_errors_name_the_file(tmp_path: Path, name: str, content: bytes | None, pattern: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and pattern in message and "\n" not in message


def test_dimension_errors(tmp_path: Path) -> None:
    np.save(tmp_path / "one.npy", np.zeros(5))
    with pytest.raises(InputError, match="2D or 3D"):
        read_image(tmp_path / "one.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 4)))
    with pytest.raises(InputError, match="zero size"):
        read_image(tmp_path / "empty.npy")
    nib.save(nib.Nifti1Image(np.zeros((2, 3, 4, 2, 2), np.float32), np.eye(4)), str(tmp_path / "5d.nii"))
    with pytest.raises(InputError, match="2D or 3D"):
        read_image(tmp_path / "5d.nii")
    with pytest.raises(InputError, match="does not exist"):
        write_image(Image.from_array(np.zeros((3, 4))), tmp_path / "nodir" / "a.png")


def test_atomic_path_leaves_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "x.nii.gz"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"]


# ------------------------------------------------------------------------------------------------
# flow and points
# ------------------------------------------------------------------------------------------------
def test_flo_round_trip_and_errors(tmp_path: Path) -> None:
    flow = np.random.default_rng(5).normal(size=(4, 6, 2)).astype(np.float32)
    flow[1, 2] = np.nan
    write_flo(tmp_path / "a.flo", flow)
    back = read_flo(tmp_path / "a.flo")
    assert back.shape == (4, 6, 2) and np.isnan(back[1, 2]).all()
    np.testing.assert_array_equal(np.nan_to_num(back, nan=-9), np.nan_to_num(flow, nan=-9))
    raw = (tmp_path / "a.flo").read_bytes()
    (tmp_path / "trunc.flo").write_bytes(raw[:-4])
    with pytest.raises(InputError, match="corrupt"):
        read_flo(tmp_path / "trunc.flo")
    (tmp_path / "magic.flo").write_bytes(b"XXXX" + raw[4:])
    with pytest.raises(InputError, match="magic"):
        read_flo(tmp_path / "magic.flo")
    with pytest.raises(InputError, match=r"\(H, W, 2\)"):
        write_flo(tmp_path / "b.flo", np.zeros((3, 3)))


def test_flo_layout_converts_to_alignkit_flow_on_an_asymmetric_raster(tmp_path: Path) -> None:
    """A .flo file is (H, W, 2) x then y; alignkit's flow is (2, H, W) rows then columns: the one
    conversion (alignkit.spatial.xy_from_flow / flow_from_xy) swaps the components and moves them."""
    from alignkit.errors import ShapeError
    from alignkit.spatial import flow_from_xy, xy_from_flow

    flow = np.zeros((2, 24, 37), np.float32)
    flow[0], flow[1] = 2.0, -3.0  # (dy, dx)
    flow[0, 5, 7] = 9.0  # one pixel, to pin where (row, column) lands
    xy = xy_from_flow(flow)
    assert xy.shape == (24, 37, 2) and xy.flags.c_contiguous
    assert xy[0, 0].tolist() == [-3.0, 2.0] and xy[5, 7].tolist() == [-3.0, 9.0]
    write_flo(tmp_path / "t.flo", xy)
    back = flow_from_xy(read_flo(tmp_path / "t.flo"))
    np.testing.assert_array_equal(back, flow)
    assert back.dtype == np.float32 and back.flags.c_contiguous
    as_tensor = xy_from_flow(torch.from_numpy(flow))  # torch in, torch out
    assert isinstance(as_tensor, torch.Tensor) and torch.equal(flow_from_xy(as_tensor), torch.from_numpy(flow))
    volume = np.random.default_rng(0).normal(size=(3, 4, 5, 6))  # 3D: (dz, dy, dx) <-> (x, y, z)
    np.testing.assert_array_equal(xy_from_flow(volume)[1, 2, 3], volume[::-1, 1, 2, 3])
    with pytest.raises(ShapeError, match="ndim"):
        xy_from_flow(np.zeros((24, 37, 2)))
    with pytest.raises(ShapeError, match="ndim"):
        flow_from_xy(np.zeros((2, 24, 37)))


def test_real_flow_files() -> None:
    flo = read_flo(need_data("flow/middlebury/RubberWhale/flow10.flo"))
    from PIL import Image as PILImage

    frame = PILImage.open(need_data("flow/middlebury/RubberWhale/frame10.png"))
    assert flo.shape == (frame.height, frame.width, 2)
    valid = np.isfinite(flo).all(-1)
    assert 0.5 < valid.mean() < 1.0  # Middlebury marks some pixels unknown
    assert np.abs(flo[valid]).max() < 50
    flow, valid = read_kitti_flow(need_data("flow/kitti-format/flow_gt.png"))
    assert flow.shape == (375, 1242, 2) and valid.shape == (375, 1242)
    assert 0.05 < valid.mean() < 0.95
    assert np.abs(flow[valid]).max() < 512 and np.abs(flow[valid]).mean() > 1.0
    with pytest.raises(InputError, match="16-bit"):
        read_kitti_flow(need_data("flow/middlebury/RubberWhale/frame10.png"))


def test_points_round_trip_and_formats(tmp_path: Path) -> None:
    pts = torch.tensor([[1.5, -2.0, 3.25], [0.0, 1e-3, -7.0]], dtype=torch.float64)
    write_points(tmp_path / "p.csv", pts)
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == "x,y,z"
    torch.testing.assert_close(read_points(tmp_path / "p.csv", 3), pts)
    write_points(tmp_path / "t.csv", pts, with_t=True)
    torch.testing.assert_close(read_points(tmp_path / "t.csv", 3), pts)
    (tmp_path / "named.csv").write_text("label,z,y,x\n7,3,2,1\n")
    torch.testing.assert_close(read_points(tmp_path / "named.csv", 3), torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))
    (tmp_path / "plain.txt").write_text("1 2\n3 4\n")
    assert read_points(tmp_path / "plain.txt", 2).tolist() == [[1.0, 2.0], [3.0, 4.0]]
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n3,abc\n")
    with pytest.raises(InputError, match="row 3 is not a finite"):
        read_points(tmp_path / "bad.csv", 2)
    (tmp_path / "short.csv").write_text("1,2\n3\n")
    with pytest.raises(InputError, match="row 2 has 1 columns"):
        read_points(tmp_path / "short.csv", 2)
    (tmp_path / "empty.csv").write_text("x,y\n")
    with pytest.raises(InputError, match="no points"):
        read_points(tmp_path / "empty.csv", 2)


# ------------------------------------------------------------------------------------------------
# real images
# ------------------------------------------------------------------------------------------------
def test_real_images() -> None:
    lm = read_image(need_data("brain2d/r16sliceLM.nii.gz"), labels=True)
    assert lm.ndim == 2 and lm.shape == (256, 256) and set(lm.data.unique().tolist()) <= {0, 1, 2}
    seg = read_image(need_data("brain3d-aseg-pair/subject_1_seg.npz"), labels=True)
    assert seg.shape == (160, 192, 224) and seg.data.dtype == torch.int64
    mhd = read_image(need_data("multimodal/itk-t1-pd-slices/BrainProtonDensitySliceBorder20.mhd"))
    png = read_image(need_data("multimodal/itk-t1-pd-slices/BrainProtonDensitySliceBorder20.png"))
    # ITK index order (x, y) vs raster (row, col): same pixels at the same world points.
    assert mhd.shape == png.shape[::-1]
    torch.testing.assert_close(mhd.data[0].t(), png.data[0])
    t1 = read_image(need_data("multimodal/t1-pd-3d/chris_t1.nii.gz"))
    sitk = pytest.importorskip("SimpleITK")
    s = sitk.ReadImage(str(need_data("multimodal/t1-pd-3d/chris_t1.nii.gz")))
    idx = (10, 20, 30)
    np.testing.assert_allclose(
        s.TransformIndexToPhysicalPoint(idx), (t1.world_from_voxel.numpy() @ [*idx, 1])[:3], atol=1e-3
    )
