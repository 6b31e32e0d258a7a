"""The VoxelMorph model shipped in the package registers a 3D pair out of the box (no training, no
checkpoint): through ``alignkit.register``, the CLI and ``alignkit evaluate``; on real OASIS-TRT-20
subjects it was never trained on, it reproduces its card's held-out Dice."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import alignkit
from alignkit.cli import main
from alignkit.image import Image
from alignkit.methods.shipped import MAX_BYTES, get_shipped, shipped_for

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
from make_golden import volume

SHIPPED = get_shipped("voxelmorph_oasis3d")


def _brainish(seed: int) -> Image:
    """A 3D blob phantom at 4 mm, about a head's extent."""
    return Image.from_array(volume(seed, (40, 48, 40)), spacing=4.0)


def test_the_model_ships_within_the_size_limit_and_is_found_by_dimension():
    assert SHIPPED.available(), "the shipped model file is missing (benchmarks/ship_model.py writes it)"
    assert SHIPPED.path().stat().st_size <= MAX_BYTES
    assert shipped_for("voxelmorph", 3) == SHIPPED and shipped_for("voxelmorph", 2) is None
    assert SHIPPED.card()["method"] == "voxelmorph" and SHIPPED.recipe()["method"] == "voxelmorph"


def test_voxelmorph_registers_a_3d_pair_without_a_checkpoint(tmp_path):
    fixed, moving = _brainish(0), _brainish(1)
    result = alignkit.register(fixed, moving, method="voxelmorph")
    assert result.metrics["checkpoint"] == str(SHIPPED.path())
    assert result.stages[-2:] == ["affine", "svf"]  # the recipe's affine pre-alignment, then the network
    assert result.metrics["nonpositive_jacobian_percent"] < 0.1
    fixed_file, moving_file = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"
    for image, path in ((fixed, fixed_file), (moving, moving_file)):
        nib.save(nib.Nifti1Image(image.data[0].numpy(), np.diag([4.0, 4.0, 4.0, 1.0])), str(path))
    out = tmp_path / "out"
    assert main(["register", str(fixed_file), str(moving_file), "-o", str(out), "--method", "voxelmorph",
                 "--quiet", "--no-qc"]) == 0
    manifest = json.loads((out / "transform" / "manifest.json").read_text())
    assert manifest["method"] == "voxelmorph" and manifest["stages"][-1] == "svf"
    assert (out / "warped.nii.gz").is_file() and (out / "transform" / "warp.nii.gz").is_file()


@pytest.mark.slow
def test_held_out_dice_reproduces_the_card():
    """Full-resolution registration of the card's first held-out pair gives the card's Dice."""
    from conftest import data_path

    from alignkit.data.datasets import load_dataset

    data_path("brain3d-oasis-trt20")  # skips when the shared data are absent

    card = SHIPPED.card()
    pair = card["held_out"]["pairs"][0]
    dataset = load_dataset("brain3d-oasis-trt20")
    case = dataset[f"{pair['fixed']}<-{pair['moving']}"]
    result = alignkit.register(case.fixed, case.moving, method="voxelmorph", fixed_labels=case.fixed_labels,
                               moving_labels=case.moving_labels)
    assert result.metrics["dice_mean"] == pytest.approx(pair["voxelmorph"]["dice_mean"], abs=2e-3)
