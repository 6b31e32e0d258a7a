"""``alignkit methods``, method options through ``alignkit register``, and ``alignkit train --recipe``."""

from __future__ import annotations

import numpy as np
import pytest
from phantoms import phantom

import alignkit
from alignkit.cli import main


def test_methods_lists_each_method_with_kind_dimensions_and_checkpoint_needs(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "classical  (optimisation)" in out and "voxelmorph  (learned)" in out
    assert "modalities: mono, multi" in out  # classical handles several modalities
    assert "train: alignkit train --method voxelmorph" in out
    assert "checkpoint: needed for 2D" in out  # no 2D VoxelMorph ships


def test_available_matches_the_listing():
    infos = {info.name: info for info in alignkit.methods.available()}
    assert infos["voxelmorph"].needs_checkpoint and infos["voxelmorph"].reference.startswith("Balakrishnan")
    assert set(infos["classical"].case_kinds) == {"deformable", "affine", "homography", "flow", "stereo"}


def test_options_a_method_does_not_take_are_one_line_errors(tmp_path, capsys):
    fixed, moving = tmp_path / "f.npy", tmp_path / "m.npy"
    np.save(fixed, phantom(0))
    np.save(moving, phantom(1))
    code = main(["register", str(fixed), str(moving), "-o", str(tmp_path / "o"), "--method", "voxelmorph",
                 "--preset", "brain"])
    err = capsys.readouterr().err
    assert code == 2 and "takes no option 'preset'" in err and err.count("\n") == 1
    code = main(["register", str(fixed), str(moving), "-o", str(tmp_path / "o"), "--method", "voxelmorph"])
    err = capsys.readouterr().err
    assert code == 2 and "no voxelmorph model ships for 2D images" in err and "alignkit train" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(alignkit.ConfigError, match="unknown method 'nonesuch'"):
        alignkit.register(phantom(0), phantom(1), method="nonesuch")


def test_refine_applies_to_any_method():
    plain = alignkit.register(phantom(0), phantom(1), preset="default2d", transform="affine")
    refined = alignkit.register(phantom(0), phantom(1), preset="default2d", transform="affine", refine=10)
    assert refined.stages == ["affine", "svf"] and refined.metrics["refine_iterations"] == 10
    assert refined.metrics["ncc_after"] > plain.metrics["ncc_after"]


def test_train_recipe_names_a_shipped_model(tmp_path, capsys):
    code = main(["train", "--recipe", "nonesuch", "-o", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown shipped model or recipe 'nonesuch'" in err and "voxelmorph_oasis3d" in err


def test_option_flags_reach_the_method_and_unknown_ones_are_one_line_errors(tmp_path, capsys):
    from alignkit.cli import parse_options

    assert parse_options(["mode=fast", "steps=3", "weights=[1, 2]", "max-level=0.5", "flag=true"]) == {
        "mode": "fast", "steps": 3, "weights": [1, 2], "max_level": 0.5, "flag": True}
    with pytest.raises(alignkit.ConfigError, match="KEY=VALUE"):
        parse_options(["novalue"])
    fixed, moving = tmp_path / "f.npy", tmp_path / "m.npy"
    np.save(fixed, phantom(0))
    np.save(moving, phantom(1))
    for flags, name in ((["--mode", "fast"], "'mode'"), (["--option", "nonesuch=1"], "'nonesuch'"),
                        (["--method", "voxelmorph", "--max-disparity", "64"], "'max_disparity'")):
        code = main(["register", str(fixed), str(moving), "-o", str(tmp_path / "o"), *flags])
        err = capsys.readouterr().err
        assert code == 2 and f"takes no option {name}" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
