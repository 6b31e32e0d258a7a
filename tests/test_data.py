"""Tests of alignkit.data: every real-data loader (shapes and ground-truth conventions, checked
numerically on the data), the name/path resolution, seeded pair lists, and the synthetic generators
(resampling the moving image through the ground truth must give the fixed image)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import DATA, data_path
from scipy import ndimage

from alignkit.data import Case
from alignkit.data.datasets import (
    CaseDataset,
    available_datasets,
    default_root,
    itk_slice_matrix,
    load_dataset,
)
from alignkit.data.synthetic import (
    SyntheticDataset,
    homography_from_points,
    modality_change,
    photometric,
    random_affine,
    random_homography,
    random_smooth_deformation,
)
from alignkit.errors import InputError
from alignkit.image import Image
from alignkit.spatial import Grid, apply_matrix, sample_world

FOLDERS = [
    "brain3d-oasis-trt20", "brain3d-aseg-pair", "brain2d", "multimodal/itk-t1-pd-slices", "multimodal/t1-pd-3d",
    "multimodal/ct-mr-2d", "multimodal/prostate-mr-us", "flow/middlebury", "flow/sintel", "flow/mmflow-crops",
    "stereo", "homography/homogr", "vis-nir",
]


def dataset(name: str) -> CaseDataset:
    data_path(*name.split("/"))  # skips with a reason when ../shared/data is absent
    return load_dataset(name, root=DATA)


# ------------------------------------------------------------------------------------------------
# numerical helpers, independent of alignkit.spatial where the convention is what is tested
# ------------------------------------------------------------------------------------------------
def grey(image: Image) -> np.ndarray:
    """(rows, cols) float64 of a raster image."""
    return image.data.double().mean(0).numpy()


def warp_raster_by_matrix(moving: np.ndarray, matrix: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """moving ∘ matrix on a (rows, cols) grid of ``shape``: pixel (r, c) is world (x=c, y=r); NaN outside."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    pts = matrix @ np.stack([cols.ravel(), rows.ravel(), np.ones(cols.size)])
    x, y = pts[0] / pts[2], pts[1] / pts[2]
    out = ndimage.map_coordinates(moving, [y, x], order=1, mode="constant", cval=np.nan)
    return out.reshape(shape)


def warp_raster_by_flow(moving: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """moving(p + flow(p)) with flow (2, H, W) = (rows, columns) in pixels (alignkit's flow); NaN outside."""
    rows, cols = np.mgrid[0 : flow.shape[1], 0 : flow.shape[2]].astype(np.float64)
    return ndimage.map_coordinates(moving, [rows + flow[0], cols + flow[1]], order=1, mode="constant", cval=np.nan)


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    m = np.isfinite(a) & np.isfinite(b) if mask is None else mask & np.isfinite(a) & np.isfinite(b)
    x, y = a[m] - a[m].mean(), b[m] - b[m].mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def gradient_magnitude(image: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    return ndimage.gaussian_gradient_magnitude(image, sigma)


def mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    m = np.isfinite(a) & np.isfinite(b)
    joint, _, _ = np.histogram2d(a[m], b[m], bins=bins)
    p = joint / joint.sum()
    pa, pb = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / (pa @ pb)[nz])).sum())


def photometric_errors(case: Case) -> tuple[float, float]:
    """Mean |fixed - moving ∘ flow| over valid, non-occluded pixels, and the same without warping."""
    fixed, moving = grey(case.fixed), grey(case.moving)
    warped = warp_raster_by_flow(moving, case.flow)
    mask = np.ones(fixed.shape, bool) if case.valid is None else case.valid.copy()
    if case.occluded is not None:
        mask &= ~case.occluded
    mask &= np.isfinite(warped)
    return float(np.abs(warped - fixed)[mask].mean()), float(np.abs(moving - fixed)[mask].mean())


# ------------------------------------------------------------------------------------------------
# names, paths, errors, seeded pair lists
# ------------------------------------------------------------------------------------------------
def test_every_data_folder_has_a_registered_loader():
    assert set(FOLDERS) <= set(available_datasets())


def test_unknown_name_and_missing_folder_are_one_line_input_errors(tmp_path):
    with pytest.raises(InputError) as info:
        load_dataset("no-such-set", root=tmp_path)
    assert "no-such-set" in str(info.value) and str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InputError) as info:
        load_dataset("flow/middlebury", root=tmp_path)  # registered, but not under this root
    assert str(tmp_path / "flow" / "middlebury") in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InputError, match="no-folder"):
        load_dataset(tmp_path / "no-folder")
    with pytest.raises(InputError, match="unknown layout"):
        load_dataset(tmp_path, layout="not-a-layout")
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="cannot tell the layout"):
        load_dataset(tmp_path / "plain")
    (tmp_path / "flow" / "middlebury").mkdir(parents=True)
    with pytest.raises(InputError, match="no cases found"):
        load_dataset("flow/middlebury", root=tmp_path)
    with pytest.raises(InputError, match="read_kitti_flow"):
        load_dataset("flow/kitti-format", root=tmp_path)


def test_default_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNKIT_DATA", str(tmp_path))
    assert default_root() == tmp_path
    monkeypatch.delenv("ALIGNKIT_DATA")
    assert default_root().parts[-2:] == ("shared", "data")


def test_user_folder_with_layout_or_detected_name(tmp_path):
    source = data_path("flow", "middlebury")
    # a user's folder: links to the real sequences (nothing copied), named freely or like the layout
    for folder_name in ("my-flows", "middlebury"):
        folder = tmp_path / folder_name
        folder.mkdir()
        for seq in ("Dimetrodon", "Grove2"):
            os.symlink(source / seq, folder / seq)
    explicit = load_dataset(tmp_path / "my-flows", layout="flow/middlebury")
    detected = load_dataset(tmp_path / "middlebury")
    assert explicit.layout == detected.layout == "flow/middlebury"
    assert explicit.names == detected.names == ["Dimetrodon", "Grove2"]
    assert explicit[1].flow.shape == (2, 480, 640)


def test_sub_folders_work_as_names():
    assert dataset("flow/sintel/clean").names == ["easy/frame_0002", "medium/frame_0002"]
    assert len(dataset("vis-nir/field")) == 20
    assert dataset("stereo/motorcycle").names == ["motorcycle"]
    whole = dataset("flow/sintel")
    assert set(whole.names) == {f"{p}/{d}/frame_0002" for p in ("clean", "final") for d in ("easy", "medium")}


def test_cases_are_seeded_and_reproducible():
    vis = dataset("vis-nir")
    first = vis.cases(10, seed=3)
    assert first.names == vis.cases(10, seed=3).names
    assert first.names != vis.cases(10, seed=4).names
    assert vis.cases(5, seed=3).names == first.names[:5] == first[:5].names
    assert vis[2:4].names == vis.names[2:4]
    assert sorted(vis.cases(seed=1).names) == sorted(vis.names) and len(vis.cases(0)) == 0
    with pytest.raises(InputError):
        vis.cases(-1)
    case = first[0]
    assert case.name == first.names[0] and case.meta["dataset"] == "vis-nir"
    assert vis[case.name].name == case.name
    with pytest.raises(InputError, match="no case named"):
        vis["nope"]


# ------------------------------------------------------------------------------------------------
# 3D brains
# ------------------------------------------------------------------------------------------------
def test_oasis_pairs_order_and_one_case():
    oasis = dataset("brain3d-oasis-trt20")
    consecutive = [f"subject{b:02d}<-subject{a:02d}" for a, b in zip(range(1, 12, 2), range(2, 13, 2))]
    assert oasis.names[:6] == consecutive and len(oasis) == 12 * 11
    for seed in (0, 1):
        chosen = oasis.cases(9, seed=seed).names
        assert chosen[:6] == consecutive and chosen == oasis.cases(9, seed=seed).names
    assert oasis.cases(9, seed=0).names[6:] != oasis.cases(9, seed=1).names[6:]
    case = oasis[0]  # the one 3D load of this file
    assert case.name == "subject02<-subject01" and case.kind == "deformable"
    assert case.fixed.shape == case.moving.shape == (256, 256, 160)
    assert case.fixed_labels.grid.same_as(case.fixed.grid) and case.fixed_labels.data.dtype == torch.int64
    fixed_ids = set(np.unique(case.fixed_labels.data.numpy())) - {0}
    moving_ids = set(np.unique(case.moving_labels.data.numpy())) - {0}
    assert set(case.label_ids) == fixed_ids & moving_ids and len(case.label_ids) > 90
    assert {1002, 2035, 17, 53} <= set(case.label_ids)  # DKT cortical and FreeSurfer subcortical labels


def test_aseg_pair_labels_from_labels_npz():
    aseg = dataset("brain3d-aseg-pair")
    assert aseg.names == ["subject_1<-test", "test<-subject_1"]
    labels = np.load(DATA / "brain3d-aseg-pair" / "labels.npz")["labels"].tolist()
    assert aseg._label_ids() == labels and len(labels) == 30
    case = aseg[0]
    assert case.fixed.shape == case.moving.shape == case.fixed_labels.shape == (160, 192, 224)
    assert case.label_ids == labels
    present = set(np.unique(case.fixed_labels.data.numpy()))
    assert set(labels) <= present


# ------------------------------------------------------------------------------------------------
# 2D brains and multimodal
# ------------------------------------------------------------------------------------------------
def test_brain2d_landmarks_are_blob_centroids_in_raster_world():
    brain = dataset("brain2d")
    assert brain.names == ["r16<-r85", "r85<-r16"]
    case = brain[0]
    assert case.fixed.shape == (256, 256) and case.fixed_points.shape == case.moving_points.shape == (2, 2)
    # the same blobs drawn in r16sliceLM.jpg, located with (row, col) array indices: world x = col, y = row
    from PIL import Image as PILImage

    drawn = np.asarray(PILImage.open(DATA / "brain2d" / "r16sliceLM.jpg")).astype(float)
    blobs, count = ndimage.label(drawn > 60)
    centres = np.array(ndimage.center_of_mass(drawn > 60, blobs, range(1, count + 1)))[:, ::-1]  # -> (x, y)
    for point in case.fixed_points:
        assert np.min(np.linalg.norm(centres - point, axis=1)) < 0.5
    assert np.linalg.norm(case.fixed_points - case.moving_points, axis=1).max() > 5  # a real inter-subject offset
    image, labels = brain.atlas()
    assert image.shape == labels.shape == (160, 192) and labels.data.dtype == torch.int64


def test_itk_slices_ground_truth_reproduces_the_unmoved_pd_slice():
    itk = dataset("multimodal/itk-t1-pd-slices")
    assert itk.names[0] == "t1<-pd" and "BrainProtonDensitySliceBSplined10.png" in itk.skipped
    assert {"t1<-pd_Shifted13x17y", "t1<-pd_Rotated10", "t1<-pd_R10X13Y17", "t1<-pd_R10X13Y17S12"} <= set(itk.names)
    from alignkit.io import read_image

    pd = grey(read_image(DATA / "multimodal" / "itk-t1-pd-slices" / "BrainProtonDensitySliceBorder20.png"))
    for case in itk:
        assert case.kind == "affine" and case.fixed.shape == case.moving.shape == (257, 221)
        moving = grey(case.moving)
        aligned = ncc(warp_raster_by_matrix(moving, case.matrix, pd.shape), pd)
        if case.name == "t1<-pd":
            assert np.allclose(case.matrix, np.eye(3)) and aligned > 0.999
            continue
        wrong = ncc(warp_raster_by_matrix(moving, np.linalg.inv(case.matrix), pd.shape), pd)
        assert aligned > 0.995 and aligned > wrong + 0.05, (case.name, aligned, wrong)
        # only R10X13Y17 is not moved as its name says: its truth is measured, the others are given
        assert case.truth == ("measured" if case.name == "t1<-pd_R10X13Y17" else "given"), case.name
    # the measured R10X13Y17 map: the loader's value before it moved into a data file was the named
    # rotation with the shift (13, 16) found by an NCC scan; the measurement must agree with it within
    # its stated uncertainty, and explain the slice better than the shift the name states
    case = itk["t1<-pd_R10X13Y17"]
    centre = np.array([110.5, 128.5])
    rotation = np.array([[np.cos(np.radians(10)), -np.sin(np.radians(10))], [np.sin(np.radians(10)), np.cos(np.radians(10))]])
    before = np.eye(3)
    before[:2, :2], before[:2, 2] = rotation, centre - rotation @ centre + [13, 16]
    assert 0 < case.truth_uncertainty < 0.1 and "measure_ground_truth.py" in case.truth_source
    assert corner_distance(case.matrix, before, (257, 221)) <= case.truth_uncertainty
    named = itk_slice_matrix("R10X13Y17", 221, 257)
    moving = grey(case.moving)
    assert ncc(warp_raster_by_matrix(moving, case.matrix, pd.shape), pd) > ncc(
        warp_raster_by_matrix(moving, named, pd.shape), pd) + 0.01
    # the two conventions measured on the files: positive angles turn +x to +y about (w/2, h/2)
    rotated = itk_slice_matrix("Rotated10", 221, 257)
    assert np.allclose(rotated @ [110.5, 128.5, 1], [110.5, 128.5, 1])
    assert rotated[1, 0] > 0
    assert itk_slice_matrix("BSplined10", 221, 257) is None


def corner_distance(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance between the images of a raster's corner pixels (x = column, y = row) under two
    2D matrices, or of a 3D grid's corner world points (``shape`` then holds the (8, 3) points)."""
    if len(shape) == 2:
        rows, cols = shape
        points = np.array([[0, 0], [cols - 1, 0], [0, rows - 1], [cols - 1, rows - 1]], dtype=np.float64)
    else:
        points = np.asarray(shape, dtype=np.float64)
    h = np.hstack([points, np.ones((len(points), 1))]).T
    return float(np.linalg.norm((a @ h)[:-1] - (b @ h)[:-1], axis=0).max())


def test_t1_pd_3d_reference_beats_the_header_identity():
    from alignkit.spatial import resize_image

    t1pd = dataset("multimodal/t1-pd-3d")
    case = t1pd["t1<-pd"]
    assert case.kind == "affine" and case.fixed.shape == (188, 256, 190) and case.moving.shape == (191, 256, 54)
    assert np.allclose(t1pd["pd<-t1"].matrix @ case.matrix, np.eye(4))
    assert case.truth == t1pd["pd<-t1"].truth == "measured" and 0.3 < case.truth_uncertainty < 2.0
    assert "SimpleITK" in case.truth_source
    # the loader's matrix before it moved into a data file (the mean of two earlier rigid fits, gradient
    # NCC and MI, stated as uncertain to ~1 mm): the re-measurement agrees within its uncertainty
    before = np.array([[0.99974, 0.02165, -0.007093, -1.0402], [-0.022472, 0.988318, -0.150741, -1.766247],
                       [0.003747, 0.150862, 0.988548, 7.618662], [0.0, 0.0, 0.0, 1.0]])
    affine = case.fixed.grid.world_from_voxel.numpy()
    voxels = np.array([[i, j, k] for i in (0, 187) for j in (0, 255) for k in (0, 189)], dtype=np.float64)
    corners = voxels @ affine[:3, :3].T + affine[:3, 3]
    assert corner_distance(case.matrix, before, corners) <= case.truth_uncertainty
    # the headers alone (identity) leave a visible tilt; the shipped reference must line up both the
    # edges (gradient-magnitude NCC) and the intensities (mutual information) far better
    grid = case.fixed.grid.downsampled(3)
    fixed = resize_image(case.fixed.batch(), grid.shape)[0, 0].double().numpy()
    points = grid.world_points(dtype=torch.float64)
    voxel = apply_matrix(case.moving.grid.voxel_from_world, apply_matrix(torch.as_tensor(case.matrix), points))
    upper = torch.tensor(case.moving.shape, dtype=torch.float64).view(1, 3, 1, 1, 1) - 1
    mask = (((voxel >= 4) & (voxel <= upper - 4)).all(1)[0].numpy()) & (fixed > 5)
    scores = {}
    for label, matrix in (("reference", case.matrix), ("header identity", np.eye(4))):
        world = apply_matrix(torch.as_tensor(matrix), points)
        moving = sample_world(case.moving.batch(dtype=torch.float64), case.moving.grid, world)[0, 0].numpy()
        scores[label] = (ncc(gradient_magnitude(moving, 1.0), gradient_magnitude(fixed, 1.0), mask),
                         mutual_information(fixed[mask], moving[mask]))
    assert scores["reference"][0] > scores["header identity"][0] + 0.15, scores
    assert scores["reference"][1] > 2 * scores["header identity"][1], scores


def test_ct_mr_ground_truth_from_the_displaced_ct_copy():
    ctmr = dataset("multimodal/ct-mr-2d")
    assert ctmr.names == ["mri<-ct_true", "mri<-ct_moving"]
    assert np.array_equal(ctmr[0].matrix, np.eye(3)) and ctmr[0].truth == "given"
    case = ctmr["mri<-ct_moving"]
    assert case.fixed.shape == (882, 1106) and case.moving.shape == (882, 1121)
    assert case.truth == "measured" and 0 < case.truth_uncertainty < 0.05 and "ECC" in case.truth_source
    # OpenCV findTransformECC (MOTION_AFFINE, pyramid 8-4-2-1) of ct_2d_moving onto ct_2d_true, run once
    # while writing the first loader: the measured map must agree to a few hundredths of a pixel
    ecc = np.array([[0.9774105, -0.2113273, 237.25839], [0.2113264, 0.9774138, -165.07000], [0, 0, 1]])
    assert corner_distance(case.matrix, ecc, (882, 1106)) < 0.1
    # the matrix the loader computed at load time (Gauss-Newton same-image fit) before it moved into a
    # data file: the same within the stated uncertainty
    before = np.array([[0.9773828506, -0.2113052871, 237.2662140004], [0.2113139062, 0.9773957302, -165.0556231867],
                       [0, 0, 1]])
    assert corner_distance(case.matrix, before, (882, 1106)) <= case.truth_uncertainty
    assert np.degrees(np.arctan2(case.matrix[1, 0], case.matrix[0, 0])) == pytest.approx(12.2, abs=0.05)
    # the measured map explains the displaced copy: NCC with the true CT
    true = grey(ctmr[0].moving)
    assert ncc(warp_raster_by_matrix(grey(case.moving), case.matrix, true.shape), true) > 0.9999


def test_measured_truth_applies_only_to_the_files_measured(tmp_path):
    source = data_path("multimodal", "ct-mr-2d")
    for name in ("mri_2d.tif", "ct_2d_true.tif"):
        (tmp_path / name).symlink_to(source / name)
    (tmp_path / "ct_2d_moving.tif").symlink_to(source / "ct_2d_true.tif")  # another file, same name
    ctmr = load_dataset(tmp_path, layout="multimodal/ct-mr-2d")
    assert ctmr.names == ["mri<-ct_true"] and "no ground truth" in ctmr.skipped["ct_2d_moving.tif"]
    # a T1/PD folder with other files: the identity of the headers, given, not the measured map
    head = data_path("multimodal", "t1-pd-3d")
    other = tmp_path / "head"
    other.mkdir()
    (other / "chris_t1.nii.gz").symlink_to(head / "chris_t1.nii.gz")
    (other / "chris_PD.nii.gz").symlink_to(head / "chris_t1.nii.gz")
    case = load_dataset(other, layout="multimodal/t1-pd-3d")["t1<-pd"]
    assert case.truth == "given" and np.array_equal(case.matrix, np.eye(4)) and "header" in case.meta["note"]


def test_prostate_labels_and_centroid_points():
    prostate = dataset("multimodal/prostate-mr-us")
    assert len(prostate) == 10 and "train/case000000" in prostate.names and "test/case000025" in prostate.names
    case = prostate["train/case000000"]
    assert case.fixed.shape == (44, 59, 41) and case.moving.shape == (64, 64, 60)  # fixed = US, moving = MR
    assert case.fixed_labels.grid.same_as(case.fixed.grid) and case.label_ids == [1]
    assert set(np.unique(case.fixed_labels.data.numpy())) == {0, 1, 2, 3}
    assert case.fixed_points.shape == case.moving_points.shape == (3, 3)
    # the gland centroid lies inside the fixed volume's world box
    lo = case.fixed.grid.world_from_voxel.numpy() @ [0, 0, 0, 1]
    hi = case.fixed.grid.world_from_voxel.numpy() @ [43, 58, 40, 1]
    assert np.all(case.fixed_points[0] >= np.minimum(lo, hi)[:3]) and np.all(case.fixed_points[0] <= np.maximum(lo, hi)[:3])
    gland_only = prostate["train/case000002"]  # a case with the gland label only
    assert gland_only.fixed_points.shape == (1, 3)


# ------------------------------------------------------------------------------------------------
# flow and stereo: warping moving by the ground truth must explain fixed
# ------------------------------------------------------------------------------------------------
def test_middlebury_flow_direction():
    middlebury = dataset("flow/middlebury")
    assert middlebury.names == ["Dimetrodon", "Grove2", "Hydrangea", "RubberWhale"]
    case = middlebury["Dimetrodon"]
    assert case.kind == "flow" and case.flow.shape == (2, 388, 584) and case.flow.dtype == np.float32
    assert 0.9 < case.valid.mean() < 1.0 and np.isfinite(case.flow).all()  # unknown (>1e9) entries masked
    warped, unwarped = photometric_errors(case)
    negated, _ = photometric_errors(Case("neg", case.fixed, case.moving, kind="flow", flow=-case.flow, valid=case.valid))
    assert warped < 0.5 * unwarped and warped < 0.5 * negated, (warped, unwarped, negated)


def test_sintel_flow_occlusion_and_invalid_masks():
    case = dataset("flow/sintel/final")["medium/frame_0002"]
    assert case.flow.shape == (2, 436, 1024) and case.occluded.shape == case.valid.shape == (436, 1024)
    assert 0.01 < case.occluded.mean() < 0.2 and 0.99 < case.valid.mean() < 1.0
    warped, unwarped = photometric_errors(case)
    assert warped < 0.4 * unwarped, (warped, unwarped)


def test_mmflow_crops():
    crops = dataset("flow/mmflow-crops")
    assert crops.names == ["0000000_01", "0000000_10", "00001"]
    forward = crops["0000000_01"]
    assert forward.fixed.shape == (50, 50) and forward.occluded is not None and forward.occluded.any()
    chairs = crops["00001"]  # FlyingChairs-style .ppm pair
    assert chairs.fixed.channels == 3 and chairs.flow.shape == (2, 50, 50)
    warped, unwarped = photometric_errors(chairs)
    assert warped < 0.7 * unwarped, (warped, unwarped)


@pytest.mark.parametrize("name", ["motorcycle", "aloe"])
def test_stereo_disparity_as_flow(name):
    case = dataset("stereo")[name]
    assert case.kind == "stereo" and np.all(case.flow[0] == 0) and np.all(case.flow[1] <= 0)  # (rows, columns)
    assert 0.85 < case.valid.mean() < 0.99
    warped, unwarped = photometric_errors(case)
    assert warped < 0.35 * unwarped, (warped, unwarped)


def test_kitti_format_flow_reads_through_alignkit_io():
    pytest.importorskip("cv2")
    from alignkit.io import read_image, read_kitti_flow

    folder = data_path("flow", "kitti-format")
    flow, valid = read_kitti_flow(folder / "flow_gt.png")
    image = read_image(folder / "image.png")
    assert flow.shape == (*image.shape, 2) and valid.shape == image.shape
    assert 0.05 < valid.mean() < 0.95 and np.isfinite(flow[valid]).all()
    assert 1.0 < np.abs(flow[valid]).max() < 512.0  # pixels, within KITTI's 16-bit range


# ------------------------------------------------------------------------------------------------
# homographies and VIS-NIR affines
# ------------------------------------------------------------------------------------------------
def test_homogr_matrix_maps_fixed_points_onto_moving_points():
    homogr = dataset("homography/homogr")
    assert len(homogr) == 8 and "adam" in homogr.names
    case = homogr["adam"]
    assert case.kind == "homography" and case.matrix[2, 2] == pytest.approx(1.0)
    mapped = apply_matrix(torch.as_tensor(case.matrix), torch.as_tensor(case.fixed_points).T[None])[0].T.numpy()
    assert np.abs(mapped - case.moving_points).max() < 1.0  # px (the file's H fits its points to 1e-12)
    assert np.abs(case.fixed_points - case.moving_points).max() > 50  # not a trivial pair
    fixed, moving = grey(case.fixed), grey(case.moving)
    aligned = ncc(gradient_magnitude(warp_raster_by_matrix(moving, case.matrix, fixed.shape)), gradient_magnitude(fixed))
    inverse = ncc(gradient_magnitude(warp_raster_by_matrix(moving, np.linalg.inv(case.matrix), fixed.shape)),
                  gradient_magnitude(fixed))
    assert aligned > 0.6 and aligned > inverse + 0.3, (aligned, inverse)


def test_vis_nir_affine_direction():
    vis = dataset("vis-nir")
    for name in ("indoor/0001", "forest/0002"):
        case = vis[name]
        assert case.kind == "affine" and case.matrix.shape == (3, 3)
        fixed, moving = grey(case.fixed), grey(case.moving)
        gm_fixed = gradient_magnitude(fixed)
        scores = {label: ncc(gradient_magnitude(warp_raster_by_matrix(moving, m, fixed.shape)), gm_fixed)
                  for label, m in (("gt", case.matrix), ("inverse", np.linalg.inv(case.matrix)), ("none", np.eye(3)))}
        assert scores["gt"] > 0.5 and scores["gt"] > scores["inverse"] + 0.3 and scores["gt"] > scores["none"] + 0.3, scores


# ------------------------------------------------------------------------------------------------
# synthetic generators: moving ∘ ground truth == fixed
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def photo() -> Image:
    """A real photograph (scikit-image's camera), 96x128, on the raster grid."""
    skdata = pytest.importorskip("skimage.data")
    camera = skdata.camera().astype(np.float32)[::4, ::4][:96]
    return Image.from_array(camera / 255.0, path="skimage:camera")


def interior(shape: tuple[int, ...], margin: int) -> tuple[slice, ...]:
    return tuple(slice(margin, s - margin) for s in shape)


def test_random_affine_ground_truth_direction(photo):
    case = random_affine(photo, seed=3, rotation=12.0, translation=0.05)
    assert case.kind == "affine" and case.moving is photo and case.fixed.grid.same_as(photo.grid)
    moving = grey(photo)
    # an independent resampler (scipy, pixel (row, col) = world (y, x)) through Case.matrix gives fixed
    expected = warp_raster_by_matrix(moving, case.matrix, moving.shape)
    inside = np.isfinite(expected)
    assert inside.mean() > 0.8
    assert np.abs(expected - grey(case.fixed))[inside].max() < 1e-4
    wrong = warp_raster_by_matrix(moving, np.linalg.inv(case.matrix), moving.shape)
    assert np.nanmean(np.abs(wrong - grey(case.fixed))) > 20 * np.abs(expected - grey(case.fixed))[inside].mean()
    again = random_affine(photo, seed=3, rotation=12.0, translation=0.05)
    assert np.array_equal(again.matrix, case.matrix) and torch.equal(again.fixed.data, case.fixed.data)
    assert not np.array_equal(random_affine(photo, seed=4).matrix, case.matrix)


def test_random_affine_3d_with_labels():
    grid = Grid.from_spacing((20, 24, 18), (2.0, 1.0, 1.5), origin=(5.0, -3.0, 1.0))
    rng = np.random.default_rng(0)
    volume = ndimage.gaussian_filter(rng.random(grid.shape), 2.0).astype(np.float32)
    labels = Image(torch.from_numpy((volume > np.median(volume)).astype(np.int64))[None], grid)
    image = Image(torch.from_numpy(volume)[None], grid)
    case = random_affine(image, seed=1, labels=labels)
    world = apply_matrix(torch.as_tensor(case.matrix), grid.world_points(dtype=torch.float64))
    resampled = sample_world(image.batch(dtype=torch.float64), grid, world)[0]
    assert torch.allclose(resampled.float(), case.fixed.data, atol=1e-5)
    warped_labels = sample_world(labels.batch(dtype=torch.float64), grid, world, mode="nearest")[0].round().long()
    assert torch.equal(warped_labels, case.fixed_labels.data) and case.moving_labels is labels


def test_random_homography_corners_and_direction(photo):
    case = random_homography(photo, seed=5, corner_displacement=10.0)
    offsets = case.moving_points - case.fixed_points
    assert case.kind == "homography" and np.abs(offsets).max() <= 10.0 and np.abs(offsets).max() > 2.0
    assert np.allclose(case.fixed_points, [[0, 0], [127, 0], [127, 95], [0, 95]])
    mapped = case.matrix @ np.c_[case.fixed_points, np.ones(4)].T
    assert np.allclose((mapped[:2] / mapped[2]).T, case.moving_points, atol=1e-8)
    expected = warp_raster_by_matrix(grey(photo), case.matrix, photo.shape)
    inside = np.isfinite(expected)
    assert np.abs(expected - grey(case.fixed))[inside].max() < 1e-4
    with pytest.raises(Exception, match="2D"):
        random_homography(Image(torch.zeros(1, 4, 4, 4), Grid.from_spacing((4, 4, 4))))


def test_homography_from_points_least_squares():
    h = np.array([[1.1, 0.05, 3.0], [-0.02, 0.95, -2.0], [1e-4, -2e-4, 1.0]])
    src = np.random.default_rng(0).uniform(0, 200, (12, 2))
    dst = h @ np.c_[src, np.ones(12)].T
    assert np.allclose(homography_from_points(src, (dst[:2] / dst[2]).T), h, atol=1e-9)


def test_random_smooth_deformation_flow_reproduces_fixed(photo):
    atlas_labels = Image(torch.from_numpy((grey(photo) > 0.5).astype(np.int64))[None], photo.grid)
    case = random_smooth_deformation(photo, seed=2, translation=3.0, amplitude=5.0, labels=atlas_labels)
    assert case.kind == "deformable" and case.matrix is None and case.flow.shape == (2, 96, 128)
    assert case.meta["jacobian_min"] > 0.3 and len(case.meta["params"]["centres"]) == 4
    assert 1.0 < np.abs(case.flow).max() < 3.0 + 4 * 5.0
    # fixed(p) == moving(p + flow(p)) with flow = (rows, columns) pixels, read by an independent resampler
    expected = warp_raster_by_flow(grey(photo), case.flow)
    inside = np.isfinite(expected)
    assert np.abs(expected - grey(case.fixed))[inside].max() < 1e-4
    swapped = warp_raster_by_flow(grey(photo), case.flow[::-1].copy())  # (x, y) order would be wrong
    assert np.nanmean(np.abs(swapped - grey(case.fixed))) > 5 * np.abs(expected - grey(case.fixed))[inside].mean()
    rows, cols = np.mgrid[0:96, 0:128]
    nearest = grey(atlas_labels)[np.clip(np.rint(rows + case.flow[0]), 0, 95).astype(int),
                                 np.clip(np.rint(cols + case.flow[1]), 0, 127).astype(int)]
    core = interior((96, 128), 12)
    assert np.mean(nearest[core] == case.fixed_labels.data[0].numpy()[core]) > 0.99


def test_smooth_deformation_flow_is_in_voxels_of_an_anisotropic_grid():
    grid = Grid.from_spacing((16, 20, 12), (2.0, 1.0, 0.5))
    volume = ndimage.gaussian_filter(np.random.default_rng(1).random(grid.shape), 1.5).astype(np.float32)
    image = Image(torch.from_numpy(volume)[None], grid)
    case = random_smooth_deformation(image, seed=0, amplitude=2.0, translation=1.0, sigma=(0.2, 0.3))
    spacing = np.array([2.0, 1.0, 0.5]).reshape(3, 1, 1, 1)
    world = grid.world_points(dtype=torch.float64) + torch.from_numpy(case.flow * spacing)[None].double()
    resampled = sample_world(image.batch(dtype=torch.float64), grid, world)[0]
    assert torch.allclose(resampled.float(), case.fixed.data, atol=1e-5)


def test_flow_of_a_permuted_anisotropic_raster_is_in_array_axis_order_and_scores_exactly():
    """On a raster grid (x = column) with different row and column sizes, Case.flow's component 0 is
    in rows and component 1 in columns (array-axis order, voxels); scoring the true map gives EPE 0,
    and a 1-column shift gives EPE 1 (the flow convention is shared by the generator and the scorer)."""
    from alignkit.evaluate.method import Prediction
    from alignkit.evaluate.scoring import score_case

    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    grid = Grid.from_spacing((24, 30), (2.0, 0.5), direction=swap)  # rows 2 units, columns 0.5
    assert grid.spacing.tolist() == [2.0, 0.5]  # (row, column)
    picture = ndimage.gaussian_filter(np.random.default_rng(2).random(grid.shape), 2.0).astype(np.float32)
    case = random_smooth_deformation(Image(torch.from_numpy(picture)[None], grid), seed=0, amplitude=1.0)
    rows, cols = np.mgrid[0:24, 0:30]
    world = grid.world_points(dtype=torch.float64)[0].numpy()
    # fixed pixel (row, col) maps to moving pixel (row + flow[0], col + flow[1]); world (x, y) = (0.5 col, 2 row)
    expected = np.stack([cols + case.flow[1], rows + case.flow[0]]) * np.array([0.5, 2.0]).reshape(2, 1, 1)
    true_map = world + (expected - np.stack([cols, rows]) * np.array([0.5, 2.0]).reshape(2, 1, 1))
    assert score_case(case, Prediction(world_map=true_map))["epe"] == pytest.approx(0.0, abs=1e-5)
    one_column = true_map + np.array([0.5, 0.0]).reshape(2, 1, 1)
    assert score_case(case, Prediction(world_map=one_column))["epe"] == pytest.approx(1.0, abs=1e-5)


def test_photometric_and_modality_change_keep_geometry(photo):
    base = random_affine(photo, seed=0)
    changed = photometric(base, seed=1)
    assert np.array_equal(changed.matrix, base.matrix) and changed.fixed is base.fixed
    assert not torch.equal(changed.moving.data, base.moving.data)
    assert torch.equal(photometric(base, seed=1).moving.data, changed.moving.data)  # seeded, noise included
    assert changed.meta["intensity"][0]["generator"] == "photometric"
    pair = photometric(photo, seed=2, noise=(0.0, 0.0), blur=(0.0, 0.0))
    assert pair.kind == "affine" and np.array_equal(pair.matrix, np.eye(3)) and pair.fixed is photo
    remapped = modality_change(random_affine(photo, seed=0), seed=3)
    assert np.array_equal(remapped.matrix, base.matrix)


def test_modality_change_defeats_correlation_but_not_mutual_information(photo):
    case = modality_change(photo, seed=7)
    fixed, moving = grey(case.fixed), grey(case.moving)
    table = np.asarray(case.meta["intensity"][0]["params"]["lookup_table"])
    steps = np.diff(table)
    assert (steps > 0).any() and (steps < 0).any()  # non-monotonic
    assert abs(ncc(fixed, moving)) < 0.6  # correlation (and SSD) no longer recognises the pair
    shifted = np.roll(moving, 4, axis=1)
    core = interior(fixed.shape, 8)
    assert mutual_information(fixed[core], moving[core]) > 1.5 * mutual_information(fixed[core], shifted[core])


def test_synthetic_dataset_is_reproducible_in_any_order(photo):
    ds = SyntheticDataset([photo, photometric(photo, seed=0).moving], "homography", n=4, seed=11,
                          corner_displacement=6.0)
    assert len(ds) == 4 and ds.names[0] == "homography/0000" and isinstance(ds, CaseDataset)
    backwards = [ds[i].matrix for i in reversed(range(4))][::-1]
    forwards = [case.matrix for case in SyntheticDataset([photo, photo], "homography", n=4, seed=11,
                                                         corner_displacement=6.0)]
    assert all(np.array_equal(a, b) for a, b in zip(backwards, forwards))
    assert not np.array_equal(forwards[0], forwards[1])
    assert ds[3].meta["dataset"] == "synthetic/homography" and ds.cases(2, seed=0).names != []
    with pytest.raises(InputError, match="unknown generator"):
        SyntheticDataset(photo, "nope", n=1)


def test_synthetic_dataset_from_a_real_dataset_with_labels():
    brain = dataset("brain2d")
    image, labels = brain.atlas()
    from_atlas = SyntheticDataset((image, labels), "deformation", n=2, seed=0)
    case = from_atlas[1]
    assert case.fixed_labels is not None and case.moving_labels is labels and case.flow.shape == (2, 160, 192)
    from_cases = SyntheticDataset(brain, random_affine, n=1, seed=0, rotation=5.0)
    assert from_cases[0].moving.shape == (256, 256) and from_cases[0].meta["base"] == "r16<-r85"
