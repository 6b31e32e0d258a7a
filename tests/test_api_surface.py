"""The public API, pinned: the names ``alignkit`` and ``alignkit.methods`` export and the CLI's commands
and options. A change here is a decision (update this test in the same commit), not an accident."""

from __future__ import annotations

import argparse
import inspect

import alignkit
import alignkit.methods
from alignkit.cli import build_parser

ALIGNKIT = ["AlignkitError", "ConfigError", "Grid", "Image", "InputError", "NotInvertibleError", "Registration",
            "ShapeError", "methods", "register"]
METHODS = ["LearnedMethod", "LearnedModel", "Method", "MethodInfo", "MethodOutput", "ShippedModel", "available",
           "build_model", "get_method", "learned_method", "load_model", "method_names", "register",
           "register_method", "shipped_models", "train_method"]
COMMON = ["--device", "--help", "--quiet", "--seed", "-h"]
CLI = {
    "apply": (["transforms", "image"], ["--device", "--help", "--invert", "--labels", "--output", "--points",
                                        "--reference", "-h", "-o", "-r"]),
    "demo": ([], sorted([*COMMON, "--dim", "--output", "-o"])),
    "evaluate": ([], sorted([*COMMON, "--dataset", "--layout", "--list", "--method", "--no-isolate", "--output",
                             "--pairs", "--reference", "--threads", "--timeout", "-o", "--option"])),
    "methods": ([], ["--help", "-h"]),
    "presets": ([], ["--help", "-h"]),
    "register": (["fixed", "moving"], sorted([*COMMON, "--checkpoint", "--config", "--fixed-labels",
                                              "--fixed-landmarks", "--initial-transform", "--method", "--moving-labels",
                                              "--moving-landmarks", "--no-qc", "--output", "--preset", "--refine",
                                              "--similarity", "--transform", "-o", "--mode", "--tile",
                                              "--min-disparity", "--max-disparity", "--option"])),
    "train": ([], sorted([*COMMON, "--batch-size", "--config", "--dataset", "--epochs", "--layout", "--lr",
                          "--init-from", "--method", "--output", "--pairs", "--prealign", "--recipe", "--resume", "--size", "--stage",
                          "--subjects", "--val-subjects", "--workers", "-o", "--option"])),
}


def test_alignkit_exports():
    assert sorted(alignkit.__all__) == ALIGNKIT
    assert all(hasattr(alignkit, name) for name in ALIGNKIT)


def test_alignkit_methods_exports():
    assert sorted(alignkit.methods.__all__) == METHODS
    assert all(hasattr(alignkit.methods, name) for name in METHODS)


def test_register_is_one_call_for_every_method():
    parameters = inspect.signature(alignkit.register).parameters
    assert list(parameters)[:2] == ["fixed", "moving"]
    assert {"method", "refine", "fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks", "device",
            "seed", "quiet"} <= set(parameters)
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())  # the method's options
    assert alignkit.register is alignkit.methods.register


def test_built_in_methods():
    names = alignkit.methods.method_names()
    assert names[0] == "classical" and "voxelmorph" in names


def test_cli_commands_and_options():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(CLI)
    for name, (positional, options) in CLI.items():
        command = sub.choices[name]
        assert [a.dest for a in command._actions if not a.option_strings] == positional, name
        assert sorted(o for a in command._actions for o in a.option_strings) == options, name
