"""The training loop for learned registration methods: pairs, the loop, checkpoints, DDP.

    from alignkit.methods import train_method, load_model
    result = train_method({"method": "voxelmorph", "dataset": "brain2d", "size": 64, "epochs": 20}, "runs/vxm2d")
    model = load_model("runs/vxm2d")                     # no config file needed

This package knows no method by name: :func:`train` is handed a model (or a factory) that follows
:mod:`alignkit.train.protocol`; :func:`alignkit.methods.train_method` and ``alignkit train --method
NAME`` hand it one from the method registry. Command line: ``alignkit train --method voxelmorph
--dataset NAME|DIR -o RUNDIR`` (and under ``torchrun --nproc-per-node N -m alignkit train ...`` for
DistributedDataParallel).
"""

from alignkit.train.checkpoint import load_checkpoint, save_checkpoint
from alignkit.train.config import TrainConfig
from alignkit.train.loop import TrainResult, build_datasets, train, validate
from alignkit.train.pairs import (
    AtlasPairs,
    InterSubjectPairs,
    PairDataset,
    SyntheticAffinePairs,
    SyntheticPairs,
    build_pairs,
)
from alignkit.train.protocol import TrainableMethod, TrainingStage
from alignkit.train.subjects import Subject, SubjectSet, load_subjects, prepare_subject, to_network_grid

__all__ = [
    "AtlasPairs",
    "InterSubjectPairs",
    "PairDataset",
    "Subject",
    "SubjectSet",
    "SyntheticAffinePairs",
    "SyntheticPairs",
    "TrainConfig",
    "TrainResult",
    "TrainableMethod",
    "TrainingStage",
    "build_datasets",
    "build_pairs",
    "load_checkpoint",
    "load_subjects",
    "prepare_subject",
    "save_checkpoint",
    "to_network_grid",
    "train",
    "validate",
]
