"""Training learned registration methods: pairs, methods, the training loop, checkpoints, inference.

    from alignkit.train import TrainConfig, train, load
    result = train(TrainConfig(dataset="brain2d", size=64, epochs=20), "runs/vxm2d")
    method = load("runs/vxm2d")                      # no config file needed
    alignkit.register(fixed, moving, method="voxelmorph", checkpoint="runs/vxm2d", refine=50)

Command line: ``alignkit train --method voxelmorph --dataset NAME|DIR -o RUNDIR`` (and under
``torchrun --nproc-per-node N -m alignkit train ...`` for DistributedDataParallel).
"""

from alignkit.train.checkpoint import load_checkpoint, save_checkpoint
from alignkit.train.methods import (
    METHODS,
    LearnedMethod,
    LearnedSVF,
    VoxelMorph,
    build_method,
    method_names,
    register_method,
)
from alignkit.train.pairs import (
    AtlasPairs,
    InterSubjectPairs,
    PairDataset,
    SyntheticPairs,
    build_pairs,
)
from alignkit.train.subjects import Subject, SubjectSet, load_subjects, prepare_subject, to_network_grid
from alignkit.train.trainer import TrainConfig, TrainResult, load, train

__all__ = [
    "METHODS",
    "AtlasPairs",
    "InterSubjectPairs",
    "LearnedMethod",
    "LearnedSVF",
    "PairDataset",
    "Subject",
    "SubjectSet",
    "SyntheticPairs",
    "TrainConfig",
    "TrainResult",
    "VoxelMorph",
    "build_method",
    "build_pairs",
    "load",
    "load_checkpoint",
    "load_subjects",
    "method_names",
    "prepare_subject",
    "register_method",
    "save_checkpoint",
    "to_network_grid",
    "train",
]
