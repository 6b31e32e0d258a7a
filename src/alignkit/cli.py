"""Command line: ``alignkit register | apply | methods | demo | presets | evaluate | train``.

Every error alignkit raises on purpose (bad file, bad option) is printed as one line on stderr with
exit code 2; nothing half-written is left in the output folder.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from alignkit.errors import AlignkitError, ConfigError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; CPU runs are repeatable (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    from alignkit.solve.config import FIELD_MODELS, LINEAR_MODELS
    from alignkit.solve.presets import preset_names

    parser = _Parser(prog="alignkit", description="Image registration, classical and learned, 2D and 3D.")
    parser.add_argument("--version", action="version", version=f"alignkit {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    reg = sub.add_parser("register", help="register MOVING to FIXED and write the results into OUTDIR")
    reg.add_argument("fixed", help="fixed image (NIfTI, MetaImage/NRRD, PNG/JPEG/TIFF, .npy/.npz)")
    reg.add_argument("moving", help="moving image, resampled onto the fixed grid")
    reg.add_argument("-o", "--output", required=True, help="output folder")
    reg.add_argument(
        "--transform",
        help=f"comma-separated chain of models, e.g. rigid,affine,svf ({', '.join(LINEAR_MODELS + FIELD_MODELS)}); "
        "with a learned --method: the linear pre-alignment before the network (e.g. affine, or none)",
    )
    reg.add_argument("--similarity", choices=["lncc", "mk-lncc", "mi", "mse", "ncc", "charbonnier", "l1"])
    reg.add_argument("--preset", choices=preset_names(), help="tuned configuration (default: brain in 3D, default2d in 2D)")
    reg.add_argument("--config", help="JSON or TOML configuration (a full stage list, or a preset plus options)")
    reg.add_argument(
        "--initial-transform", metavar="FILE",
        help="start from this linear transform (ANTs .mat, ITK .txt/.tfm, elastix TransformParameters, greedy:FILE, "
        "fsl:FILE with FIXED/MOVING as FLIRT's -ref/-in); the linear stages refine it (--transform svf skips them); "
        "recorded in the manifest",
    )
    reg.add_argument("--fixed-labels", help="label map on the fixed grid (Dice in metrics.json)")
    reg.add_argument("--moving-labels", help="label map on the moving grid (also written warped)")
    reg.add_argument("--fixed-landmarks", help="CSV of world points x,y[,z] in the fixed image")
    reg.add_argument("--moving-landmarks", help="CSV of the corresponding world points in the moving image")
    reg.add_argument("--no-qc", action="store_true", help="skip qc.png")
    reg.add_argument(
        "--method", default="classical",
        help="a method of `alignkit methods`: classical (default) or a learned one such as voxelmorph "
        "(its shipped model, or --checkpoint)",
    )
    reg.add_argument("--checkpoint", help="trained model of a learned --method: a checkpoint file or its RUNDIR "
                     "(default: the model shipped for the images' dimension)")
    reg.add_argument(
        "--refine", type=int, default=0, metavar="K",
        help="refine the learned prediction with K iterations of the classical solver (instance optimisation)",
    )
    reg.add_argument("--mode", help="the method's inference mode, where it has several (e.g. fast or accurate for c2f)")
    reg.add_argument("--tile", type=int, metavar="PX", help="infer in overlapping tiles of PX pixels (large images; "
                     "methods that tile)")
    reg.add_argument("--min-disparity", type=float, help="stereo: smallest disparity searched, in pixels")
    reg.add_argument("--max-disparity", type=float, help="stereo: largest disparity searched, in pixels")
    reg.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="any other option of the method (`alignkit methods` lists them); VALUE is read as JSON when it "
        "parses (3, 0.5, true, [1,2]), else as text; repeatable",
    )
    _add_common(reg)

    app = sub.add_parser(
        "apply", help="apply a saved transform (alignkit's, or ANTs/ITK/Greedy/elastix/FSL files) to an image or points",
        description="TRANSFORM is the transform/ folder of `alignkit register`, or a chain of files of ANTs, ITK/"
        "SimpleITK, Greedy, elastix or FSL FLIRT in ANTs' order (as ants.apply_transforms' transformlist: "
        "e.g. 1Warp.nii.gz 0GenericAffine.mat). Text matrices need their tool named: greedy:FILE or fsl:FILE "
        "(FLIRT's -ref is --reference, its -in is IMAGE).",
    )
    app.add_argument("transforms", nargs="+", metavar="TRANSFORM", help="transform folder or files, ANTs order")
    app.add_argument("image", nargs="?", help="image in the moving space, resampled onto the fixed grid "
                     "(the last positional argument)")
    app.add_argument("-o", "--output", required=True, help="output image (or CSV with --points)")
    app.add_argument("-r", "--reference", help="image whose grid the output takes (the fixed image; default: the "
                     "alignkit folder's fixed grid, or the grid of a displacement field listed first)")
    app.add_argument("--invert", action="append", default=[], metavar="TRANSFORM",
                     help="use the inverse of this TRANSFORM of the chain (repeatable; a field needs its "
                     "*InverseWarp file next to it)")
    app.add_argument("--labels", action="store_true", help="the image is a label map (nearest neighbour)")
    app.add_argument("--points", help="CSV of fixed-space world points to map into the moving space")
    app.add_argument("--device", default="cpu")

    demo = sub.add_parser("demo", help="register a real image warped by a known deformation and report the error")
    demo.add_argument("-o", "--output", default="alignkit-demo", help="output folder (default: alignkit-demo)")
    demo.add_argument("--dim", type=int, choices=[2, 3], default=3, help="3D MNI152 template (default) or 2D photograph")
    _add_common(demo)

    sub.add_parser("presets", help="list the presets and their stages")
    sub.add_parser("methods", help="list the registration methods: kind, dimensions, modalities, shipped models")
    _add_train_parser(sub)

    ev = sub.add_parser(
        "evaluate",
        help="run methods (alignkit presets, peers) on the same cases of a data set and tabulate the scores",
        description="Writes results.csv, results.json, summary.md and boxplot_<metric>.png into OUTDIR.",
    )
    ev.add_argument("--dataset", help="data set name (a folder name of the shared data) or a folder")
    ev.add_argument("--layout", help="layout of a --dataset folder, e.g. flow/middlebury")
    ev.add_argument("--pairs", type=int, help="number of cases, drawn reproducibly with --seed (default: all)")
    ev.add_argument(
        "--method", action="append", default=[], help="alignkit:<preset>, <peer>:<setting> or voxelmorph:<checkpoint>[+refineK]; repeat for several"
    )
    ev.add_argument("-o", "--output", help="output folder")
    ev.add_argument("--threads", type=int, default=2, help="threads per run: torch, BLAS, OpenMP, ITK (default: 2)")
    ev.add_argument("--no-isolate", action="store_true", help="run in this process (no peak memory, no crash guard)")
    ev.add_argument("--timeout", type=float, help="seconds per run before it is killed and reported as an error")
    ev.add_argument("--reference", help="method the ratio columns divide by (default: the first peer)")
    ev.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the registered methods given (c2f, dio, stereo-net ...; not presets or peers), "
                         "as alignkit register --option takes it, e.g. mode=accurate or tile=1024; repeatable")
    ev.add_argument("--list", action="store_true", help="list the data sets and methods, then exit")
    _add_common(ev)
    return parser


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    from typing import get_args

    from alignkit.train.config import PairChoice

    # Every option defaults to None so that only the flags given on the command line override the
    # --config file (and, with --resume, the run's stored configuration).
    tr = sub.add_parser(
        "train",
        help="train a learned method on a data set; writes the model and log.csv into RUNDIR",
        description="Under `torchrun --nproc-per-node N -m alignkit train ...` runs DistributedDataParallel.",
    )
    tr.add_argument("--method", help="learned method of `alignkit methods` (default: voxelmorph)")
    tr.add_argument("--recipe", help="train a shipped model again from its committed recipe (e.g. voxelmorph_oasis3d)")
    tr.add_argument("--stage", help="train only these stages of the method, comma-separated (e.g. affine or vsvf "
                    "for avsm; default: all)")
    tr.add_argument("--init-from", help="checkpoint or RUNDIR whose weights start the training (e.g. a trained "
                    "affine stage under --stage vsvf), or shipped:NAME for a model shipped with alignkit")
    tr.add_argument("--dataset", help="data set name (a folder name of the shared data) or a folder of images")
    tr.add_argument("--layout", help="layout of a --dataset folder; 'folder' reads it as a plain folder of images")
    tr.add_argument(
        "--subjects", help="comma-separated name patterns of the subjects to use, e.g. 'r*slice' (default: all)"
    )
    tr.add_argument(
        "--val-subjects",
        help="comma-separated name patterns of held-out validation subjects (default: a seeded split)",
    )
    tr.add_argument("-o", "--output", required=True, help="run folder (RUNDIR)")
    tr.add_argument("--epochs", type=int, help="number of epochs (default: 10)")
    tr.add_argument("--batch-size", type=int, help="pairs per step and process (default: 1)")
    tr.add_argument("--size", help="network input size, one value or one per axis: 64 or 64,80 (default: 64)")
    tr.add_argument("--lr", type=float, help="Adam learning rate (default: 1e-3, cosine decay)")
    tr.add_argument(
        "--pairs", choices=list(get_args(PairChoice)), help="kind of training pairs"
    )
    tr.add_argument("--prealign", choices=["affine", "rigid"], help="align every image to the first one first (cached)")
    tr.add_argument("--workers", type=int, help="data-loader worker processes (default: 0)")
    tr.add_argument("--config", help="JSON or TOML training configuration (keys of alignkit.train.TrainConfig)")
    tr.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the method (method_options), VALUE read as JSON when it parses; repeatable")
    tr.add_argument("--resume", action="store_true", help="continue the run in RUNDIR from its last checkpoint")
    tr.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto)")
    tr.add_argument("--seed", type=int, help="random seed; CPU runs are repeatable (default: 0)")
    tr.add_argument("--quiet", action="store_true", help="no progress output")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("alignkit")
    except Exception:  # noqa: BLE001 - any failure to read the metadata means "unknown"
        return "unknown"


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["mode=fast", "steps=3"]`` → ``{"mode": "fast", "steps": 3}`` (dashes in keys become
    underscores; values are JSON when they parse, else text)."""
    import json

    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--option takes KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(text)
        except ValueError:
            options[key] = text
    return options


def _register(args: argparse.Namespace) -> int:
    import alignkit

    out = Path(args.output)
    # only the options given reach the method: each method says which it takes
    options = {key: value for key, value in (
        ("preset", args.preset), ("transform", args.transform), ("similarity", args.similarity),
        ("config", args.config), ("checkpoint", args.checkpoint), ("initial", args.initial_transform),
        ("mode", args.mode), ("tile", args.tile), ("min_disparity", args.min_disparity),
        ("max_disparity", args.max_disparity),
    ) if value is not None}
    for key, value in parse_options(args.option).items():
        if key in options:
            raise ConfigError(f"--option {key}=... repeats an option given by its own flag")
        options[key] = value
    result = alignkit.register(
        args.fixed,
        args.moving,
        method=args.method,
        refine=args.refine,
        fixed_labels=args.fixed_labels,
        moving_labels=args.moving_labels,
        fixed_landmarks=args.fixed_landmarks,
        moving_landmarks=args.moving_landmarks,
        device=args.device,
        seed=args.seed,
        quiet=args.quiet,
        **options,
    )
    result.save(out, qc=not args.no_qc)
    if not args.quiet:
        m = result.metrics
        line = f"ncc {m['ncc_before']:.3f} -> {m['ncc_after']:.3f}"
        if "dice_mean" in m:
            line += f", mean Dice {m['dice_mean_before']:.3f} -> {m['dice_mean']:.3f}"
        if "tre" in m:
            line += f", TRE {m['tre_before']['mean']:.2f} -> {m['tre']['mean']:.2f}"
        line += f", non-positive Jacobians {m['nonpositive_jacobian_percent']:.3f}%, {m['seconds']:.1f} s"
        print(line)
        print(f"wrote {out}/")
    return 0


def _apply(args: argparse.Namespace) -> int:
    from alignkit.errors import InputError
    from alignkit.io import read_image, read_points, write_image, write_points
    from alignkit.io.foreign import split_format
    from alignkit.registration import map_points, resample_image
    from alignkit.transforms.files import default_reference, read_transform_chain

    specs = [*args.transforms, *([args.image] if args.image else [])]
    # the last positional is the IMAGE, except with --points -- where an FSL matrix still needs it (FLIRT's -in)
    wants_image = not args.points or any(split_format(s)[0] == "fsl" for s in specs[:-1])
    image_path = specs.pop() if wants_image and len(specs) > 1 else None
    if wants_image and image_path is None:
        raise InputError("give the TRANSFORM(s) and then the IMAGE to resample, or --points CSV")
    names = [{spec, split_format(spec)[1]} for spec in specs]  # --invert FILE also matches fsl:FILE
    unknown = sorted(set(args.invert) - set().union(*names))
    if unknown:
        raise InputError(f"--invert names {', '.join(unknown)}, which is not a TRANSFORM of the chain")
    invert = [bool(n & set(args.invert)) for n in names]
    image = read_image(image_path, labels=args.labels) if image_path else None
    reference = read_image(args.reference).grid if args.reference else None
    transform = read_transform_chain(specs, invert=invert, fixed=reference, moving=image)
    if args.points:
        points = read_points(args.points, transform.ndim)
        write_points(args.output, map_points(transform, points))
        return 0
    assert image is not None  # wants_image holds without --points
    if image.ndim != transform.ndim:
        raise InputError(f"is {image.ndim}D but the transform is {transform.ndim}D", image.name)
    fixed_grid = reference or default_reference(specs, transform, invert=invert)
    if fixed_grid is None:
        raise InputError(f"{specs[0]} does not say which grid to resample onto: give --reference FIXED")
    write_image(resample_image(transform, fixed_grid, image, labels=args.labels, device=args.device), args.output)
    return 0


def _train(args: argparse.Namespace) -> int:
    import json

    from alignkit.methods import train_method
    from alignkit.solve import load_config_file
    from alignkit.train import TrainConfig

    out = Path(args.output)
    values: dict = {}
    if args.recipe:
        from alignkit.methods.shipped import get_shipped

        values.update(get_shipped(args.recipe).recipe())
    if args.config:
        values.update(load_config_file(args.config))
    stored = out / "config.json"
    if args.resume and stored.is_file():
        values.update(json.loads(stored.read_text()))
    flags = {
        "method": args.method, "dataset": args.dataset, "layout": args.layout, "epochs": args.epochs,
        "batch_size": args.batch_size, "size": args.size, "lr": args.lr, "pairs": args.pairs,
        "subjects": args.subjects, "val_subjects": args.val_subjects,
        "prealign": args.prealign, "num_workers": args.workers, "device": args.device, "seed": args.seed,
        "stages": args.stage, "init_from": args.init_from,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.option:
        values["method_options"] = {**values.get("method_options", {}), **parse_options(args.option)}
    if args.quiet:
        values["quiet"] = True
    result = train_method(TrainConfig.from_dict(values), out, resume=args.resume)
    if result.checkpoint is not None and not values.get("quiet"):
        last = result.history[-1] if result.history else {}
        line = f"wrote {result.checkpoint} and {out / 'log.csv'} ({result.epoch} epochs"
        if last.get("val_dice") is not None:
            line += f", val Dice {result.history[0].get('val_dice', float('nan')):.3f} -> {last['val_dice']:.3f}"
        print(line + ")")
    return 0


def _methods() -> int:
    from alignkit.methods import available, shipped_models

    for info in available():
        print(f"{info.name}  ({info.kind}) {info.summary}")
        print(f"    {'/'.join(map(str, info.ndims))}D; modalities: {', '.join(info.modalities)}; "
              f"evaluated on: {', '.join(info.case_kinds)}")
        shipped = shipped_models(info.name)
        if info.kind == "learned":
            dims = {m.ndim for m in shipped}
            needs = [f"{d}D" for d in info.ndims if d not in dims]
            line = f"    checkpoint: {'needed for ' + '/'.join(needs) if needs else 'optional'}"
            line += f"; train: alignkit train --method {info.name} --dataset NAME -o RUNDIR"
            print(line)
        for model in shipped:
            print(f"    shipped: {model.name} ({model.ndim}D, {model.path().stat().st_size / 1024:.0f} KiB) "
                  f"{model.summary}")
            card = model.card()
            score = _card_score(card)
            if score:
                print(f"      held-out {score}")
            if card.get("weights_licence"):
                print(f"      weights licence: {card['weights_licence']}")
        if info.reference:
            print(f"    reference: {info.reference}")
    return 0


def _card_score(card: dict) -> str:
    """``"Dice: affine only 0.432, voxelmorph 0.444 (2 pairs: ...)"`` from a model card's held-out means."""
    held_out = card.get("held_out") if isinstance(card.get("held_out"), dict) else {}
    means = held_out.get("mean") if isinstance(held_out.get("mean"), dict) else {}
    scores = [f"{name} {values['dice_mean']:.3f}" for name, values in means.items()
              if isinstance(values, dict) and isinstance(values.get("dice_mean"), float)]
    pairs = [p.get("pair") for p in held_out.get("pairs", []) if isinstance(p, dict) and p.get("pair")]
    if not scores:
        return ""
    return f"Dice: {', '.join(scores)}" + (f" ({len(pairs)} pairs: {', '.join(pairs)})" if pairs else "")


def _presets() -> int:
    from alignkit.solve.presets import get_preset, preset_names

    for name in preset_names():
        cfg = get_preset(name)
        chain = " -> ".join(f"{s.transform}({s.similarity})" for s in cfg.stages)
        print(f"{name:12s} {chain}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from alignkit.errors import ConfigError

    if args.list:
        return _evaluate_list()
    missing = [flag for flag, value in (("--dataset", args.dataset), ("--method", args.method), ("-o", args.output))
               if not value]
    if missing:
        raise ConfigError(f"evaluate needs {', '.join(missing)} (or --list)")
    if args.pairs is not None and args.pairs < 1:
        raise ConfigError(f"--pairs must be >= 1, got {args.pairs}")
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    from alignkit.evaluate.learned_methods import parse_spec
    from alignkit.evaluate.registry import resolve_method

    options = parse_options(args.option)
    # options go to the methods of the registry (what `register --method` runs), which pass them to
    # alignkit.register; presets and peers have fixed settings of their own
    takes_options = [name for name in args.method if parse_spec(name) is not None]
    if options and not takes_options:
        raise ConfigError("--option goes to registered methods (c2f, dio, stereo-net ...), and no --method names one")
    # resolve the names before loading any data: a typo fails in a second, not after the loading
    methods = [resolve_method(name, **(options if name in takes_options else {})) for name in args.method]
    from alignkit.data.datasets import load_dataset
    from alignkit.evaluate.runner import evaluate

    dataset = load_dataset(args.dataset, layout=args.layout)
    cases = dataset.cases(n=args.pairs, seed=args.seed)
    name = Path(args.dataset).name if Path(args.dataset).is_dir() else args.dataset
    rows = evaluate(
        cases,
        methods,
        out_dir=args.output,
        seed=args.seed,
        device=args.device,
        isolate=not args.no_isolate,
        threads=args.threads,
        timeout=args.timeout,
        progress=not args.quiet,
        reference=args.reference,
        dataset=name,
    )
    errors = sum(r["status"] == "error" for r in rows)
    if not args.quiet:
        print((Path(args.output) / "summary.md").read_text(), end="")
        print(f"wrote {args.output}/ ({len(rows)} runs, {errors} errors)")
    return 0


def _evaluate_list() -> int:
    from alignkit.evaluate.method import MethodUnavailable
    from alignkit.evaluate.registry import list_methods, resolve_method

    try:
        from alignkit.data.datasets import available_datasets
    except ImportError:  # the loaders are optional to the listing of methods
        datasets: list[str] = []
    else:
        datasets = list(available_datasets())
    print("datasets:")
    for name in datasets:
        print(f"  {name}")
    if not datasets:
        print("  (none found)")
    print("methods:")
    for name in list_methods():
        method = resolve_method(name)
        try:
            method.check_available()
            note = ""
        except MethodUnavailable as exc:
            note = f"  (unavailable: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'unavailable'})"
        print(f"  {name:24s} {'/'.join(method.kinds)}{note}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (exit 2), --help and --version (exit 0)
        return int(exc.code or 0)
    try:
        if args.command == "register":
            return _register(args)
        if args.command == "apply":
            return _apply(args)
        if args.command == "demo":
            from alignkit.data.demo import run_demo

            return run_demo(args.output, ndim=args.dim, device=args.device, seed=args.seed, quiet=args.quiet)
        if args.command == "presets":
            return _presets()
        if args.command == "methods":
            return _methods()
        if args.command == "train":
            return _train(args)
        if args.command == "evaluate":
            return _evaluate(args)
    except AlignkitError as exc:
        print(f"alignkit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("alignkit: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
