"""The training loop: stages, Adam with a schedule, mixed precision on CUDA, checkpoints, resume, logs, DDP.

The loop knows no method by name: it is handed a :class:`~alignkit.train.protocol.TrainableMethod`
(or a factory ``(ndim, size) -> method`` called once the data fix them) -- :func:`alignkit.methods.train_method`
and ``alignkit train --method NAME`` hand it one from the method registry.

Determinism (CPU)
-----------------
* the networks are initialised after ``torch.manual_seed(seed)``;
* the order of pairs is :class:`~torch.utils.data.DistributedSampler`'s seeded permutation of epoch
  ``e`` (``seed + e``), used with one replica in a single process too, so one process with batch
  ``N b`` sees, at each step, exactly the pairs that ``N`` processes with batch ``b`` see together;
* random pairs are pure functions of ``(seed, epoch, index)`` (:mod:`alignkit.train.pairs`), so
  workers, their seeds and the number of processes do not change them;
* a checkpoint after every epoch holds the model, optimizer, scheduler, grad-scaler and RNG states,
  the epoch and the log history: resuming runs the remaining epochs exactly as an uninterrupted
  run would (bit-identical on CPU).

Stages
------
The method's :meth:`training_stages` run one after another over consecutive epochs (global epoch
numbers); each stage freezes the networks it does not name, and gets a fresh optimiser (one
parameter group per trained network) and schedule over its own steps.

Distributed
-----------
Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) the process group is initialised
(NCCL on CUDA, gloo on CPU), the method is wrapped in DistributedDataParallel, each rank reads its
shard of the sampler, and only rank 0 validates and writes ``log.csv``, TensorBoard events and
checkpoints; every rank meets at a barrier after each epoch and at the end.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from alignkit.errors import ConfigError, InputError
from alignkit.train.checkpoint import default_name, find_checkpoint, load_checkpoint, save_checkpoint
from alignkit.train.config import TrainConfig
from alignkit.train.distributed import (
    DistInfo,
    device_for,
    init_distributed,
    rng_state,
    seed_worker,
    set_rng_state,
)
from alignkit.train.pairs import PairDataset, build_pairs
from alignkit.train.protocol import TrainableMethod, TrainingStage
from alignkit.train.subjects import load_subjects

EpochCallback = Callable[[int, dict[str, Any]], None]
MethodFactory = Callable[[int, tuple[int, ...]], TrainableMethod]

#: the first and last columns of ``log.csv``; the method's validation metrics go in between
LOG_HEAD = ("epoch", "stage", "train_loss", "val_loss")
LOG_TAIL = ("lr", "seconds", "pairs_per_s")


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained method (unwrapped, on its device), the log rows and
    the checkpoint path (None on ranks other than 0)."""

    method: Any
    history: list[dict[str, Any]]
    checkpoint: Path | None
    epoch: int


# -- data ----------------------------------------------------------------------------------------
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
            **({} if config.intensity_percentiles is None else {"percentiles": config.intensity_percentiles}),
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
        val_subjects=config.val_subjects, pose_augment=config.pose_augment,
    )


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


# -- stages --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Stage:
    index: int
    spec: TrainingStage
    first_epoch: int
    last_epoch: int


def plan_stages(method: TrainableMethod, config: TrainConfig) -> list[_Stage]:
    """The method's stages over consecutive global epochs (``stage_epochs`` overrides by name)."""
    specs = list(method.training_stages()) or [TrainingStage("train")]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{method.method_name}: training stage names repeat: {names}")
    if config.stages is not None:
        def selected(name: str) -> bool:
            return any(name == pick or name.startswith(f"{pick}-") for pick in config.stages or ())

        unknown_picks = [pick for pick in config.stages if not any(n == pick or n.startswith(f"{pick}-") for n in names)]
        if unknown_picks:
            raise ConfigError(f"{method.method_name} has no training stage {unknown_picks[0]!r}; its stages: {names}")
        specs = [s for s in specs if selected(s.name)]
    unknown = sorted(set(config.stage_epochs) - set(names))
    if unknown:
        raise ConfigError(f"stage_epochs names unknown stages {unknown}; {method.method_name}'s stages: {names}")
    specs = [s for s in specs if config.stage_epochs.get(s.name, 1) != 0]
    if not specs:
        raise ConfigError(f"{method.method_name}: stage_epochs skips every selected training stage")
    known_networks = set(method.networks())
    plan: list[_Stage] = []
    epoch = 1
    for index, spec in enumerate(specs):
        missing = sorted(set(spec.networks or ()) - known_networks)
        if missing:
            raise ConfigError(f"{method.method_name}: stage {spec.name!r} trains unknown networks {missing}")
        epochs = config.stage_epochs.get(spec.name) or (spec.epochs if len(specs) > 1 else None) or config.epochs
        plan.append(_Stage(index, spec, epoch, epoch + int(epochs) - 1))
        epoch += int(epochs)
    return plan


def _stage_of(plan: Sequence[_Stage], epoch: int) -> _Stage:
    for stage in plan:
        if epoch <= stage.last_epoch:
            return stage
    return plan[-1]


def _enter_stage(method: TrainableMethod, stage: _Stage) -> list[dict[str, Any]]:
    """Freeze the networks the stage does not train; its parameter groups (one per trained network)."""
    method.set_stage(stage.spec.name)
    trained = stage.spec.networks
    groups: list[dict[str, Any]] = []
    for name, network in method.networks().items():
        train_it = trained is None or name in trained
        network.requires_grad_(train_it)
        params = [p for p in network.parameters()]
        if train_it and params:
            groups.append({"params": params, "name": name})
    if not groups:
        raise ConfigError(f"{method.method_name}: stage {stage.spec.name!r} has no parameters to train")
    return groups


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int) -> Any:
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_epochs * steps_per_epoch, gamma=config.gamma)
    return None


# -- validation and logs -------------------------------------------------------------------------
@torch.no_grad()
def validate(method: TrainableMethod, dataset: Dataset, *, batch_size: int, device: torch.device, epoch: int = 0) -> dict[str, float]:
    """Mean over validation pairs of the loss and of each of the method's validation metrics
    (``val_<name>``; per-pair values that are NaN -- not applicable to that pair -- are skipped)."""
    module = method if isinstance(method, nn.Module) else None
    was_training = bool(module is not None and module.training)
    if module is not None:
        module.eval()
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
            output = method(batch)
            n = int(batch["fixed"].shape[0])
            loss, _ = method.loss(batch, output, epoch=epoch)
            add("val_loss", float(loss), n)
            for name, value in method.validation_metrics(batch, output).items():
                key = name if name.startswith("val_") else f"val_{name}"
                value = torch.as_tensor(value).detach().float().cpu()
                if value.dim() == 0:
                    add(key, float(value), n)  # a batch mean
                else:
                    for item in value.flatten().tolist():
                        add(key, item)
    finally:
        if module is not None:
            module.train(was_training)
    return {name: sums[name] / counts[name] for name in sums}


def log_columns(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """``log.csv``'s columns: epoch, stage, losses, then every other key in the order first seen."""
    middle: list[str] = []
    for row in history:
        for key in row:
            if key not in LOG_HEAD and key not in LOG_TAIL and key not in middle:
                middle.append(key)
    return [*LOG_HEAD, *middle, *LOG_TAIL]


def _write_log(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite ``log.csv`` from the history (a resumed run drops rows of epochs it re-runs)."""
    tmp = path.with_name(f".{path.name}.tmp")
    columns = log_columns(history)
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
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


_RESUME_FREE = {"epochs", "quiet", "device", "num_workers", "dataset", "layout"}


def _check_resume_config(stored: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    differing = sorted(k for k in current if k not in _RESUME_FREE and stored.get(k) != current.get(k))
    if differing:
        details = ", ".join(f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in differing)
        raise ConfigError(f"--resume with a different configuration ({details}); use a new run folder")


def _progress(loader: DataLoader, epoch: int, total: int, cfg: TrainConfig, info: DistInfo) -> Any:
    if cfg.quiet or not info.is_main:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=f"epoch {epoch}/{total}", leave=False, dynamic_ncols=True, unit="batch")


def _format_row(row: Mapping[str, Any]) -> str:
    parts = [f"epoch {row['epoch']}"]
    for key, value in row.items():
        if (key.endswith("loss") or key.startswith("val_")) and isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
    parts.append(f"{row['pairs_per_s']:.1f} pairs/s")
    return ", ".join(parts)


# -- the loop ------------------------------------------------------------------------------------
def train(
    config: TrainConfig | Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    method: TrainableMethod | MethodFactory,
    train_set: Dataset | None = None,
    val_set: Dataset | None = None,
    resume: bool = False,
    callbacks: Sequence[EpochCallback] = (),
) -> TrainResult:
    """Train ``method`` and write the checkpoint (``model.safetensors``/``model.pt``), ``log.csv`` and
    ``config.json`` into ``out_dir``.

    ``method`` is a trainable method, or a factory ``(ndim, size) -> method`` called after the
    pairs are built (and after ``torch.manual_seed(config.seed)``, so the initial weights repeat);
    on resume its weights are replaced by the checkpoint's. ``train_set``/``val_set`` (pair data
    sets, see :mod:`alignkit.train.pairs`) default to the pairs built from ``config.dataset``.
    ``resume=True`` continues from the checkpoint in ``out_dir`` (when there is one) with the same
    configuration. ``callbacks`` run after each epoch's checkpoint with ``(epoch, log row)``.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    out = Path(out_dir)
    from alignkit.solve import resolve_device

    info = init_distributed(resolve_device(cfg.device).type)
    try:
        return _train(cfg, out, info, method, train_set, val_set, resume, callbacks)
    finally:
        if info.owns_group:
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig,
    out: Path,
    info: DistInfo,
    method_or_factory: TrainableMethod | MethodFactory,
    train_set: Dataset | None,
    val_set: Dataset | None,
    resume: bool,
    callbacks: Sequence[EpochCallback],
) -> TrainResult:
    device = device_for(cfg, info)
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

    torch.manual_seed(cfg.seed)  # the networks' initial weights
    method = method_or_factory if isinstance(method_or_factory, nn.Module) else method_or_factory(ndim, size)
    if not isinstance(method, nn.Module) or not isinstance(method, TrainableMethod):
        raise ConfigError(f"{type(method).__name__} is not a trainable method (see alignkit.train.protocol)")
    # the labels scored: the training pairs', else the validation pairs' (unlabelled training
    # subjects validated on labelled held-out ones)
    label_ids = getattr(train_set, "label_ids", None) or getattr(val_set, "label_ids", None)
    if getattr(method, "label_ids", "absent") is None and label_ids:
        method.label_ids = label_ids  # type: ignore[attr-defined]
    if state is not None:
        method.load_state_dict(state["model"])
    elif cfg.init_from:
        initial = load_checkpoint(cfg.init_from)
        if initial.get("method", {}).get("name") != method.method_name:
            raise ConfigError(f"init_from {cfg.init_from} holds a {initial.get('method', {}).get('name')!r} model, "
                              f"not {method.method_name!r}")
        method.load_state_dict(initial["model"])  # float16 (shipped) weights are cast on copy
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
    plan = plan_stages(method, cfg)
    total_epochs = plan[-1].last_epoch
    use_amp = bool(cfg.amp if cfg.amp is not None else device.type == "cuda") and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    history: list[dict[str, Any]] = []
    start_epoch = 1
    if state is not None:
        history = [dict(row) for row in state["history"]]
        start_epoch = int(state["epoch"]) + 1
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])

    writer = _summary_writer(out, start_epoch if state is not None else 0) if info.is_main else None
    if info.is_main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    if state is None and val_set is not None and info.is_main:
        # epoch 0: the untrained network (≈ identity, i.e. the pre-alignment alone) as the baseline
        method.set_stage(plan[0].spec.name)
        history.append({"epoch": 0, "stage": plan[0].spec.name,
                        **validate(method, val_set, batch_size=cfg.batch_size, device=device, epoch=0)})
        _write_log(out / "log.csv", history)
        _log_scalars(writer, history[-1])
    info.barrier()

    last_path: Path | None = checkpoint_path if state is not None else None
    stage: _Stage | None = None
    model: nn.Module = method
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    try:
        for epoch in range(start_epoch, total_epochs + 1):
            if stage is None or epoch > stage.last_epoch:
                stage = _stage_of(plan, epoch)
                groups = _enter_stage(method, stage)
                for group in groups:
                    group["lr"] = cfg.lr * stage.spec.lr_scale
                optimizer = torch.optim.Adam(groups, lr=cfg.lr * stage.spec.lr_scale, weight_decay=cfg.weight_decay)
                stage_epochs = stage.last_epoch - stage.first_epoch + 1
                scheduler = _scheduler(cfg, optimizer, stage_epochs * steps_per_epoch, steps_per_epoch)
                resumed_mid_stage = state is not None and int(state["epoch"]) >= stage.first_epoch
                if resumed_mid_stage and state is not None:
                    optimizer.load_state_dict(state["optimizer"])
                    if scheduler is not None and state.get("scheduler") is not None:
                        scheduler.load_state_dict(state["scheduler"])
                        if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                            # more epochs asked: a longer horizon
                            scheduler.T_max = max(stage_epochs * steps_per_epoch, 1)
                if state is not None and epoch == start_epoch:
                    set_rng_state(state["rng"])
                model = method
                if info.enabled:  # wrapped per stage: DDP registers the parameters that train now
                    model = nn.parallel.DistributedDataParallel(
                        method, device_ids=[device.index] if device.type == "cuda" else None
                    )
            assert optimizer is not None
            started = time.perf_counter()
            sampler.set_epoch(epoch)
            if hasattr(train_set, "set_epoch"):
                train_set.set_epoch(epoch)
            loader = _loader(train_set, batch_size=cfg.batch_size, sampler=sampler, config=cfg, epoch=epoch,
                             device=device, drop_last=True)
            model.train()
            loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of batch losses x pairs, pairs)
            bar = _progress(loader, epoch, total_epochs, cfg, info)
            for batch in bar:
                batch = _to_device(batch, device)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                    output = model(batch)
                loss, _ = method.loss(batch, output, epoch=epoch)
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
                "stage": stage.spec.name,
                "train_loss": float(loss_sum[0] / loss_sum[1].clamp_min(1)),
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": round(seconds, 3),
                "pairs_per_s": round(float(loss_sum[1]) / max(seconds, 1e-9), 3),
            }
            if info.is_main:
                if val_set is not None:
                    row.update(validate(method, val_set, batch_size=cfg.batch_size, device=device, epoch=epoch))
                history.append(row)
                last_path = save_checkpoint(checkpoint_path, {
                    "method": {"name": method.method_name, "config": method.config},
                    "networks": method.network_specs(),
                    "train": cfg.to_dict(),
                    "epoch": epoch,
                    "stage": stage.spec.name,
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
    for network in method.networks().values():
        network.requires_grad_(True)
    method.eval()
    return TrainResult(method, history, last_path if info.is_main else None, history[-1]["epoch"] if history else 0)
