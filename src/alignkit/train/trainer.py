"""The training loop: Adam with a schedule, mixed precision on CUDA, checkpoints, resume, logs, DDP.

Determinism (CPU)
-----------------
* the network is initialised after ``torch.manual_seed(seed)``;
* the order of pairs is :class:`~torch.utils.data.DistributedSampler`'s seeded permutation of epoch
  ``e`` (``seed + e``), used with one replica in a single process too, so one process with batch
  ``N b`` sees, at each step, exactly the pairs that ``N`` processes with batch ``b`` see together;
* random pairs are pure functions of ``(seed, epoch, index)`` (:mod:`alignkit.train.pairs`), so
  workers, their seeds and the number of processes do not change them;
* a checkpoint after every epoch holds the model, optimizer, scheduler, grad-scaler and RNG states,
  the epoch and the log history: resuming runs the remaining epochs exactly as an uninterrupted
  run would (bit-identical on CPU).

Distributed
-----------
Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) the process group is initialised
(NCCL on CUDA, gloo on CPU), the method is wrapped in DistributedDataParallel, each rank reads its
shard of the sampler, and only rank 0 validates and writes ``log.csv``, TensorBoard events and
checkpoints; every rank meets at a barrier after each epoch and at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from alignkit.errors import ConfigError, InputError
from alignkit.train.checkpoint import default_name, find_checkpoint, load_checkpoint, save_checkpoint
from alignkit.train.methods import LearnedMethod, build_method
from alignkit.train.pairs import PairDataset, build_pairs
from alignkit.train.subjects import load_subjects

ScheduleName = Literal["cosine", "step", "constant"]
PairChoice = Literal["auto", "inter", "atlas", "synthetic", "warped-copy", "cases"]
EpochCallback = Callable[[int, dict[str, Any]], None]

LOG_COLUMNS = (
    "epoch", "train_loss", "val_loss", "val_similarity", "val_dice", "val_epe", "val_tre", "lr", "seconds",
    "pairs_per_s",
)


@dataclass
class TrainConfig:
    """Everything a training run needs; stored in every checkpoint and in ``RUNDIR/config.json``.

    ``network`` overrides the method's default network spec (e.g. ``{"features": [8, 16, 16]}``);
    ``method_options`` go to the method (``similarity``, ``regularizer_weight``, ``dice_weight`` ...).
    ``pairs="auto"`` trains on the data set's own pairs when it defines them (flow, multimodal),
    else on inter-subject pairs when it has two images or more, else on synthetic deformations.
    ``layout="folder"`` reads ``dataset`` as a plain folder of images (labels ``<stem>_seg``).
    ``subjects`` (shell-style patterns of subject names: file stems of a folder, ``subject01`` ...)
    keeps only the matching images; ``val_subjects`` names the held-out validation subjects instead
    of the seeded ``val_fraction`` split (:func:`~alignkit.train.pairs.build_pairs`). ``prealign`` is
    also recorded in the method, so :func:`alignkit.register` runs the same pre-alignment before the
    network unless ``method_options`` says otherwise. ``amp`` (mixed precision) applies on CUDA only;
    None = on when the device is CUDA. ``schedule`` steps per optimisation step: ``cosine`` decays
    to 0 over the run, ``step`` multiplies by ``gamma`` every ``step_epochs`` epochs.
    """

    method: str = "voxelmorph"
    method_options: dict[str, Any] = field(default_factory=dict)
    network: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    layout: str | None = None
    subjects: list[str] | None = None
    val_subjects: list[str] | None = None
    pairs: PairChoice = "auto"
    size: list[int] | int | str = 64  # stored as a list: [64] (every axis) or one value per axis
    prealign: str | None = None
    max_pairs: int | None = None
    synthetic_length: int | None = None
    magnitude: float = 3.0
    val_fraction: float = 0.2
    epochs: int = 10
    batch_size: int = 1
    lr: float = 1e-3  # 10x VoxelMorph's 1e-4: short CPU runs; the cosine schedule brings it down
    schedule: ScheduleName = "cosine"
    step_epochs: int = 10
    gamma: float = 0.5
    weight_decay: float = 0.0
    grad_clip: float | None = None
    amp: bool | None = None
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        # one spelling of the size ("64", 64, [64] are the same run): a list of ints, broadcast per
        # axis later (parse_size), so a resumed run compares equal to the stored one
        if isinstance(self.size, str):
            try:
                self.size = [int(v) for v in self.size.replace("x", ",").split(",") if v.strip()]
            except ValueError:
                raise ConfigError(f"size must be integers like 64 or 64,80, got {self.size!r}") from None
        elif isinstance(self.size, int):
            self.size = [self.size]
        else:
            self.size = [int(v) for v in self.size]
        for name in ("subjects", "val_subjects"):
            value = getattr(self, name)
            if isinstance(value, str):  # "r27*,r30*" from a command line
                value = [v.strip() for v in value.split(",") if v.strip()]
            if value is not None:
                value = [str(v) for v in value]
                if not value:
                    raise ConfigError(f"{name} must name at least one subject pattern")
            setattr(self, name, value)
        if self.pairs not in get_args(PairChoice):
            raise ConfigError(f"pairs must be one of {', '.join(get_args(PairChoice))}, got {self.pairs!r}")
        if self.schedule not in get_args(ScheduleName):
            raise ConfigError(f"schedule must be one of {', '.join(get_args(ScheduleName))}, got {self.schedule!r}")
        for name in ("epochs", "batch_size", "step_epochs"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training configuration keys: {', '.join(unknown)}")
        return cls(**dict(data))


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained method (unwrapped, on its device), the log rows and
    the checkpoint path (None on ranks other than 0)."""

    method: LearnedMethod
    history: list[dict[str, Any]]
    checkpoint: Path | None
    epoch: int


# -- distributed ---------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group ``torchrun`` describes (env ``WORLD_SIZE`` > 1), or use one already
    initialised; a single process otherwise."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, True)


def _device_for(config: TrainConfig, info: DistInfo) -> torch.device:
    from alignkit.solve import resolve_device

    device = resolve_device(config.device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    return device


# -- RNG states ----------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as checkpoint-safe values."""
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": _plain_python_state(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain_python_state(state: Any) -> Any:
    if isinstance(state, tuple):
        return [_plain_python_state(s) for s in state]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: numpy and Python seeded from the worker's torch seed (itself derived
    from the loader's seeded generator), so augmentations drawn with them repeat run to run."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# -- building blocks -----------------------------------------------------------------------------
def build_datasets(
    config: TrainConfig, *, cache_dir: str | os.PathLike | None = None, info: DistInfo | None = None
) -> tuple[PairDataset, PairDataset | None]:
    """The training and validation pairs that ``config`` describes (from ``config.dataset``)."""
    if config.dataset is None:
        raise ConfigError("no data set given (--dataset NAME|DIR)")
    info = info or DistInfo()

    def load() -> Any:
        return load_subjects(
            config.dataset, config.size, layout=config.layout, prealign=config.prealign,  # type: ignore[arg-type]
            cache_dir=cache_dir, seed=config.seed, include=config.subjects, held_out=config.val_subjects,
        )

    # rank 0 fills the pre-alignment cache first; the others then read it instead of re-registering
    subjects = load() if info.is_main else None
    info.barrier()
    if subjects is None:
        subjects = load()
    kind = config.pairs
    if kind == "auto":
        # a data set's own pairs (flow frames, multimodal pairs), else pairs of its subjects
        kind = "cases" if subjects.case_pairs else "inter" if len(subjects) >= 2 else "synthetic"
    return build_pairs(
        kind, subjects, val_fraction=config.val_fraction, max_pairs=config.max_pairs,
        synthetic_length=config.synthetic_length, magnitude=config.magnitude, seed=config.seed,
        val_subjects=config.val_subjects,
    )


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    total = config.epochs * steps_per_epoch
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_epochs * steps_per_epoch, gamma=config.gamma)
    return None


def _loader(dataset: Dataset, *, batch_size: int, sampler: Any, config: TrainConfig, epoch: int, device: torch.device,
            drop_last: bool) -> DataLoader:
    from alignkit.train.pairs import item_generator

    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        drop_last=drop_last,
        num_workers=config.num_workers,
        worker_init_fn=seed_worker if config.num_workers else None,
        # one generator per epoch: worker seeds depend on (seed, epoch), not on how many epochs
        # this process has run (a resumed run starts mid-way)
        generator=item_generator(config.seed, 0x10AD, epoch),
        pin_memory=device.type == "cuda",
    )


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def validate(method: LearnedMethod, dataset: Dataset, *, batch_size: int, device: torch.device) -> dict[str, float]:
    """Mean over validation pairs of the loss, the similarity term, the mean Dice over the method's
    label ids (labels warped nearest-neighbour, :func:`alignkit.metrics.dice_per_label`), the
    end-point error to a true field and the landmark error (both in network-grid voxels), each where
    it applies."""
    from alignkit.metrics import dice_per_label
    from alignkit.train.methods import landmark_errors

    was_training = method.training
    method.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def add(name: str, value: float, n: int = 1) -> None:
        if math.isfinite(value):
            sums[name] = sums.get(name, 0.0) + value * n
            counts[name] = counts.get(name, 0) + n

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    try:
        for batch in loader:
            batch = _to_device(batch, device)
            output = method(batch["fixed"], batch["moving"])
            n = int(batch["fixed"].shape[0])
            loss, _ = method.loss(batch, output)
            add("val_loss", float(loss), n)
            add("val_similarity", float(method.similarity_score(output["warped"], batch["fixed"])), n)
            if "flow" in batch:
                epe = (output["displacement"] - batch["flow"]).norm(dim=1).flatten(1).mean(1)
                for value in epe.tolist():
                    add("val_epe", value)
            if "fixed_points" in batch:
                errors = landmark_errors(output["displacement"], batch["fixed_points"], batch["moving_points"],
                                         batch["points_mask"])
                for value in errors.tolist():
                    add("val_tre", value)  # NaN (a pair without landmarks) is skipped
            ids = getattr(method, "label_ids", None)
            if "fixed_labels" in batch and ids:
                warped = method.warp(batch["moving_labels"].float(), output["displacement"], mode="nearest")
                for k in range(n):
                    if not (batch["fixed_labels"][k].any() and batch["moving_labels"][k].any()):
                        continue  # an unlabelled subject in a partly labelled data set: nothing to score
                    scores = dice_per_label(warped[k, 0].round().long(), batch["fixed_labels"][k, 0], ids)
                    if scores:
                        add("val_dice", float(np.mean(list(scores.values()))))
    finally:
        method.train(was_training)
    return {name: sums[name] / counts[name] for name in sums}


def _write_log(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite ``log.csv`` from the history (a resumed run drops rows of epochs it re-runs)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(LOG_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in LOG_COLUMNS})
    os.replace(tmp, path)


def _summary_writer(out_dir: Path, first_epoch: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional; log.csv always has the numbers
        return None
    # purge_step: a resumed run drops the events an interrupted one wrote for the epochs it re-runs,
    # as log.csv drops their rows
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=first_epoch or None)


def _log_scalars(writer: Any, row: Mapping[str, Any]) -> None:
    """One ``log.csv`` row as TensorBoard scalars at step ``row["epoch"]`` (no-op without a writer)."""
    if writer is None:
        return
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)):
            writer.add_scalar(key, value, row["epoch"])
    writer.flush()


def _unwrap(model: nn.Module) -> LearnedMethod:
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    assert isinstance(inner, LearnedMethod)
    return inner


_RESUME_FREE = {"epochs", "quiet", "device", "num_workers", "dataset", "layout"}


def _check_resume_config(stored: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    differing = sorted(k for k in current if k not in _RESUME_FREE and stored.get(k) != current.get(k))
    if differing:
        details = ", ".join(f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in differing)
        raise ConfigError(f"--resume with a different configuration ({details}); use a new run folder")


# -- the loop ------------------------------------------------------------------------------------
def train(
    config: TrainConfig | Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    train_set: Dataset | None = None,
    val_set: Dataset | None = None,
    method: LearnedMethod | None = None,
    resume: bool = False,
    callbacks: Sequence[EpochCallback] = (),
) -> TrainResult:
    """Train a learned method and write ``model.pt``/``model.safetensors``, ``log.csv`` and
    ``config.json`` into ``out_dir``.

    ``train_set``/``val_set`` (pair data sets, see :mod:`alignkit.train.pairs`) default to the
    pairs built from ``config.dataset``; ``method`` defaults to ``build_method(config.method, ...)``
    (pass one to train a custom network -- it must be a registered :mod:`alignkit.nets` network for
    the checkpoint to rebuild it). ``resume=True`` continues from the checkpoint in ``out_dir``
    (when there is one) with the same configuration. ``callbacks`` run after each epoch's checkpoint
    with ``(epoch, log row)``.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    out = Path(out_dir)
    from alignkit.solve import resolve_device

    info = init_distributed(resolve_device(cfg.device).type)
    try:
        return _train(cfg, out, info, train_set, val_set, method, resume, callbacks)
    finally:
        if info.owns_group:
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig,
    out: Path,
    info: DistInfo,
    train_set: Dataset | None,
    val_set: Dataset | None,
    method: LearnedMethod | None,
    resume: bool,
    callbacks: Sequence[EpochCallback],
) -> TrainResult:
    device = _device_for(cfg, info)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / default_name()
    state = None
    if resume:
        try:
            found = find_checkpoint(out)
        except InputError:  # nothing to resume from: start afresh, as torchrun's restarts expect
            found = None
        if found is not None:
            checkpoint_path = found
            state = load_checkpoint(found)
            _check_resume_config(state["train"], cfg.to_dict())

    if train_set is None:
        train_set, built_val = build_datasets(cfg, cache_dir=out / "prealign", info=info)
        val_set = built_val if val_set is None else val_set
    ndim = int(getattr(train_set, "ndim", 0)) or int(train_set[0]["fixed"].dim() - 1)
    size = tuple(getattr(train_set, "size", ())) or tuple(train_set[0]["fixed"].shape[1:])

    torch.manual_seed(cfg.seed)  # the network's initial weights
    if method is None:
        if state is not None:
            method = build_method(state["method"]["name"], network=state["network"], **state["method"]["config"])
        else:
            options = dict(cfg.method_options)
            if cfg.prealign is not None and "prealign" in _method_parameters(cfg.method):
                options.setdefault("prealign", cfg.prealign)  # inference pre-aligns as training did
            method = build_method(cfg.method, ndim=ndim, size=size, network=cfg.network, **options)
    # the labels scored: the training pairs', else the validation pairs' (unlabelled training
    # subjects validated on labelled held-out ones)
    label_ids = getattr(train_set, "label_ids", None) or getattr(val_set, "label_ids", None)
    if getattr(method, "label_ids", "absent") is None and label_ids:
        method.label_ids = label_ids  # type: ignore[attr-defined]
    method.to(device)

    per_rank = len(train_set) // info.world_size  # type: ignore[arg-type]
    if per_rank < cfg.batch_size:
        raise ConfigError(
            f"{len(train_set)} training pairs cannot fill a batch of {cfg.batch_size} on each of {info.world_size} process(es)"  # type: ignore[arg-type]
        )
    sampler: DistributedSampler = DistributedSampler(
        train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed, drop_last=False
    )
    steps_per_epoch = math.ceil(len(train_set) / info.world_size) // cfg.batch_size  # type: ignore[arg-type]

    model: nn.Module = method
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(method.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _scheduler(cfg, optimizer, steps_per_epoch)
    use_amp = bool(cfg.amp if cfg.amp is not None else device.type == "cuda") and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    history: list[dict[str, Any]] = []
    start_epoch = 1
    if state is not None:
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
            if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                scheduler.T_max = max(cfg.epochs * steps_per_epoch, 1)  # more epochs asked: a longer horizon
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        history = [dict(row) for row in state["history"]]
        start_epoch = int(state["epoch"]) + 1

    network_spec = _network_spec(method)
    writer = _summary_writer(out, start_epoch if state is not None else 0) if info.is_main else None
    if info.is_main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    if state is None and val_set is not None and info.is_main:
        # epoch 0: the untrained network (≈ identity, i.e. the pre-alignment alone) as the baseline
        history.append({"epoch": 0, **validate(method, val_set, batch_size=cfg.batch_size, device=device)})
        _write_log(out / "log.csv", history)
        _log_scalars(writer, history[-1])
    info.barrier()

    last_path: Path | None = checkpoint_path if state is not None else None
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            started = time.perf_counter()
            sampler.set_epoch(epoch)
            if hasattr(train_set, "set_epoch"):
                train_set.set_epoch(epoch)
            loader = _loader(train_set, batch_size=cfg.batch_size, sampler=sampler, config=cfg, epoch=epoch,
                             device=device, drop_last=True)
            model.train()
            loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of batch losses x pairs, pairs)
            bar = _progress(loader, epoch, cfg, info)
            for batch in bar:
                batch = _to_device(batch, device)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                    output = model(batch["fixed"], batch["moving"])
                loss, _ = method.loss(batch, output)
                if not torch.isfinite(loss):
                    raise ConfigError(f"epoch {epoch}: the training loss became {float(loss)}; lower --lr or check the data")
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(method.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                if scheduler is not None:
                    scheduler.step()
                n = batch["fixed"].shape[0]
                loss_sum += torch.tensor([float(loss.detach()) * n, n], dtype=torch.float64, device=device)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{float(loss.detach()):.4g}", refresh=False)
            if info.enabled:
                dist.all_reduce(loss_sum)
            seconds = time.perf_counter() - started
            row: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": float(loss_sum[0] / loss_sum[1].clamp_min(1)),
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": round(seconds, 3),
                "pairs_per_s": round(float(loss_sum[1]) / max(seconds, 1e-9), 3),
            }
            if info.is_main:
                if val_set is not None:
                    row.update(validate(method, val_set, batch_size=cfg.batch_size, device=device))
                history.append(row)
                last_path = save_checkpoint(checkpoint_path, {
                    "method": {"name": method.method_name, "config": method.config},
                    "network": network_spec,
                    "train": cfg.to_dict(),
                    "epoch": epoch,
                    "model": method.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if use_amp else None,
                    "rng": rng_state(),
                    "history": history,
                })
                _write_log(out / "log.csv", history)
                _log_scalars(writer, row)
                if not cfg.quiet:
                    print(_format_row(row), flush=True)
            info.barrier()
            for callback in callbacks:
                callback(epoch, row)
    finally:  # an interrupted run leaves complete event files too
        if writer is not None:
            writer.close()
    info.barrier()
    method.eval()
    return TrainResult(method, history, last_path if info.is_main else None, history[-1]["epoch"] if history else 0)


def _method_parameters(name: str) -> set[str]:
    """The keyword options the method ``name`` takes (empty for an unknown name: build_method says so)."""
    import inspect

    from alignkit.train.methods import METHODS

    cls = METHODS.get(name)
    return set(inspect.signature(cls.__init__).parameters) if cls is not None else set()


def _network_spec(method: LearnedMethod) -> dict[str, Any]:
    from alignkit.train.methods import network_spec

    return network_spec(method.network)


def _progress(loader: DataLoader, epoch: int, cfg: TrainConfig, info: DistInfo) -> Any:
    if cfg.quiet or not info.is_main:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, dynamic_ncols=True, unit="batch")


def _format_row(row: Mapping[str, Any]) -> str:
    parts = [f"epoch {row['epoch']}"]
    for key in ("train_loss", "val_loss", "val_dice", "val_epe"):
        if row.get(key) is not None:
            parts.append(f"{key} {row[key]:.4f}")
    parts.append(f"{row['pairs_per_s']:.1f} pairs/s")
    return ", ".join(parts)


# -- loading -------------------------------------------------------------------------------------
def load(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> LearnedMethod:
    """Rebuild the trained method stored in a checkpoint (a file, or a run folder) in eval mode.

    Needs nothing but the checkpoint: the method's options and the network spec are in it.
    """
    state = load_checkpoint(path)
    method = build_method(state["method"]["name"], network=state["network"], **state["method"]["config"])
    method.load_state_dict(state["model"])
    return method.to(torch.device(device)).eval()
