"""weak-homography (Dong et al., "Learning to Align Images using Weak Geometric Supervision") against
its peers on VIS-NIR and homogr pairs; prints one JSON line.

Three parts (``--parts``, default ``b,c,a``), all in one run:

* **b** -- error and success at 1/3/5/10 px, and seconds per pair, of ``weak-homography``
  (default options: SIFT+MAGSAC start when trusted), ``alignkit:photo``, ``opencv:sift-ransac``,
  ``opencv:ecc``, ``elastix:affine`` (Mattes mutual information) and ``kornia:sift-ransac`` (skipped
  when kornia is not installed) on ``vis-nir`` (the first ``--visnir-per-subset`` pairs of each test
  subset by name; 0 = all 80; the corner error under the true matrix) and the 8 ``homography/homogr``
  pairs (``--no-homogr`` to leave them out; the mean error at their 8 manual correspondences, as
  ``presets2d.py``: the data set's matrix extrapolates hundreds of pixels at the corners), through
  :func:`alignkit.evaluate.evaluate` (one isolated worker per run, ``--threads``);
* **c** -- success against the start perturbation (Dong et al. 2018 Fig. 6/7): for the first
  ``--perturb-pairs`` vis-nir pairs of the subsets (after the first ``--perturb-skip`` of each), the
  case keeping the data set's kind (``affine``, as in part b), the moving image is resampled onto the fixed
  frame through the true matrix composed with a translation of ``p`` times the image size (a
  seeded direction per pair), so that every method starts from the identity with the translation
  as the only error; ``weak-homography`` (``start="identity"``, the paper's protocol), SIFT+RANSAC
  and elastix MI run on it for each ``p`` of ``--perturbations`` (with ``--c-default`` also
  ``weak-homography`` as users run it: the SIFT+MAGSAC start when trusted);
* **a** -- descriptor mAP with Dong et al. 2018 §6's protocol on the perturbation-0 pairs of part c:
  up to 2000 SIFT keypoints of the fixed (NIR) image, carried to the moving one by the true
  homography, a patch around each (the keypoint's orientation, scale clipped to the networks'),
  exact nearest neighbours (:func:`alignkit.metrics.descriptor_map`): SIFT against the siamese and
  the pseudo-siamese networks learnt on the pair by ``weak-homography`` (identity start), and the
  automatic-data-set descriptor when ``--automatic CHECKPOINT`` is given; with ``--a-homogr`` also on
  the 8 homogr pairs (keypoints inside the convex hull of their manual points, the networks learnt
  from the default start: their wide baselines are beyond an identity start), scored apart.

Run from the repository root, e.g.::

    OMP_NUM_THREADS=1 python benchmarks/weak_homography.py --visnir-per-subset 4 --perturb-pairs 4 \\
        --out-dir /tmp/wh --out /tmp/wh/result.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, emit, log

PEERS_B = ["weak-homography", "alignkit:photo", "opencv:sift-ransac", "opencv:ecc", "elastix:affine",
           "kornia:sift-ransac"]
THRESHOLDS = (1.0, 3.0, 5.0, 10.0)
SUBSETS = ("field", "forest", "indoor", "mountain")


def _visnir_names(data: Any, per_subset: int) -> list[str]:
    names = []
    for subset in SUBSETS:
        mine = sorted(n for n in data.names if n.startswith(subset + "/"))
        names += mine if per_subset <= 0 else mine[:per_subset]
    return names


def _table(rows: list[dict[str, Any]], error: str = "corner_error") -> dict[str, Any]:
    """Per method: pairs ok, mean/median ``error``, success rates (a failed run is a failure) and mean
    seconds. ``error`` is the corner error under the true matrix (vis-nir, the perturbed pairs), or on
    homogr ``tre_mean``: the mean error at the data set's 8 manual correspondences -- its matrix is a fit
    to those points and extrapolates hundreds of pixels at the image corners (``presets2d.py`` scores
    homogr the same way). The keys keep the name ``corner_error`` for both."""
    out: dict[str, Any] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ok = [r for r in mine if r["status"] == "ok"]
        errors = np.array([float(r.get(error, math.inf)) if r["status"] == "ok" else math.inf for r in mine])
        finite = errors[np.isfinite(errors)]
        entry: dict[str, Any] = {
            "n_ok": len(ok), "n_total": len(mine),
            "status": sorted({r["status"] for r in mine}),
            "corner_error_mean": float(finite.mean()) if finite.size else None,
            "corner_error_median": float(np.median(errors)) if errors.size else None,
            **{f"success_{t:g}px": float((errors <= t).mean()) if errors.size else None for t in THRESHOLDS},
            "seconds_mean": float(np.mean([r["seconds"] for r in ok])) if ok else None,
            "per_case": {r["case"]: (float(r[error]) if r["status"] == "ok" else None) for r in mine},
            "error": error,
        }
        messages = sorted({r["message"] for r in mine if r["status"] != "ok" and r.get("message")})
        if messages:
            entry["messages"] = messages[:3]
        out[method] = entry
    return out


def part_b(args: argparse.Namespace, evaluate: Any) -> dict[str, Any]:
    from alignkit.data.datasets import load_dataset

    result: dict[str, Any] = {}
    sets = ([] if args.no_visnir else [("vis-nir", None)]) + ([] if args.no_homogr else [("homography/homogr", None)])
    for dataset, _ in sets:
        data = load_dataset(dataset, root=args.data)
        names = _visnir_names(data, args.visnir_per_subset) if dataset == "vis-nir" else list(data.names)
        cases = [data[n] for n in names]
        log(f"[b] {dataset}: {len(cases)} pairs, methods {', '.join(args.methods_b)}")
        tic = time.perf_counter()
        rows = evaluate(cases, args.methods_b, out_dir=Path(args.out_dir) / f"b-{dataset.replace('/', '-')}",
                        seed=args.seed, threads=args.threads, timeout=args.timeout, progress=False,
                        reference="opencv:sift-ransac", dataset=dataset)
        table = _table(rows, "tre_mean" if dataset == "homography/homogr" else "corner_error")
        if dataset == "homography/homogr" and "opencv:sift-ransac" in table and "weak-homography" in table:
            sift, mine = table["opencv:sift-ransac"]["per_case"], table["weak-homography"]["per_case"]
            worse = [c for c in mine if mine[c] is None or (sift.get(c) is not None and mine[c] > sift[c] + 1.0)]
            table["weak-homography"]["pairs_worse_than_sift_by_1px"] = worse
        result[dataset] = {"pairs": names, "methods": table, "seconds": time.perf_counter() - tic}
    return result


def perturbed_cases(args: argparse.Namespace) -> list[tuple[float, Any]]:
    """(p, case) for every perturbation and pair of part c (module docstring)."""
    import cv2

    from alignkit.data.case import Case
    from alignkit.data.datasets import load_dataset
    from alignkit.image import Image

    data = load_dataset("vis-nir", root=args.data)
    per_subset = max(1, math.ceil(args.perturb_pairs / len(SUBSETS)))
    skip = max(0, int(getattr(args, "perturb_skip", 0)))
    # the first `skip` pairs of each subset left out (held-out curves), then `per_subset` of each
    names = [n for n in _visnir_names(data, per_subset + skip)
             if sorted(m for m in data.names if m.split("/")[0] == n.split("/")[0]).index(n) >= skip]
    names = [n for k in range(per_subset) for n in names if names.index(n) % per_subset == k][: args.perturb_pairs]
    rng = np.random.default_rng(args.seed)
    out = []
    for name in names:
        case = data[name]
        angle = rng.uniform(0.0, 2.0 * np.pi)
        rows, cols = case.fixed.shape[-2:]
        moving = case.moving.data.permute(1, 2, 0).numpy().astype(np.float32)
        for p in args.perturbations:
            shift = np.eye(3)
            shift[0, 2], shift[1, 2] = p * cols * np.cos(angle), p * rows * np.sin(angle)
            # new_moving(x) = moving(H T x): the pair differs by T only, so the truth is T^-1
            warped = cv2.warpPerspective(moving, case.matrix @ shift, (cols, rows),
                                         flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
            image = Image.from_array(warped if warped.ndim == 3 else warped[..., None])
            truth = np.linalg.inv(shift)
            out.append((p, Case(name=f"{name}@{p:g}", fixed=case.fixed, moving=image, kind=case.kind,
                                matrix=truth / truth[2, 2], meta={"dataset": "vis-nir-perturbed", "pair": name})))
    return out


def part_c(args: argparse.Namespace, evaluate: Any, cases: list[tuple[float, Any]]) -> dict[str, Any]:
    from alignkit.evaluate.registered import RegisteredMethod

    ours = RegisteredMethod("weak-homography", name="weak-homography:identity", start="identity")
    methods = [ours, "opencv:sift-ransac", "elastix:affine"]
    if args.c_default:  # the method as a user runs it: SIFT+MAGSAC start when trusted, else the identity
        methods.insert(1, "weak-homography")
    log(f"[c] {len(cases)} perturbed cases")
    tic = time.perf_counter()
    rows = evaluate([c for _, c in cases], methods, out_dir=Path(args.out_dir) / "c-perturbation", seed=args.seed,
                    threads=args.threads, timeout=args.timeout, progress=False, reference="opencv:sift-ransac",
                    dataset="vis-nir-perturbed")
    by_p: dict[str, Any] = {}
    for p in args.perturbations:
        names = {c.name for q, c in cases if q == p}
        by_p[f"{p:g}"] = {m: {k: v for k, v in entry.items() if k != "per_case"} | {"per_case": entry["per_case"]}
                          for m, entry in _table([r for r in rows if r["case"] in names]).items()}
    return {"pairs": sorted({c.meta["pair"] for _, c in cases}), "by_perturbation": by_p,
            "seconds": time.perf_counter() - tic}


def _sift_descriptors(grey: np.ndarray, keypoints: list[Any]) -> np.ndarray:
    import cv2

    _, desc = cv2.SIFT_create().compute(grey, keypoints)
    return desc.astype(np.float64)


def part_a(args: argparse.Namespace, cases: list[tuple[float, Any]]) -> dict[str, Any]:
    import cv2
    import torch

    from alignkit.methods import load_model
    from alignkit.methods.patches import (
        Keypoints,
        inside,
        sample_patches,
        standardise,
        warp_keypoints,
    )
    from alignkit.methods.weak_homography import WeakHomography, descriptor_input
    from alignkit.metrics import descriptor_map
    from alignkit.registration import prepare_inputs
    from alignkit.spatial.pyramid import downsample

    aligned = [c for p, c in cases if p == 0.0]
    if args.a_homogr:
        from alignkit.data.datasets import load_dataset

        homogr = load_dataset("homography/homogr", root=args.data)
        aligned += [homogr[n] for n in homogr.names]
    automatic = load_model(args.automatic) if args.automatic else None
    descs: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    per_set: dict[str, dict[str, tuple[list[np.ndarray], list[np.ndarray]]]] = {}
    tic = time.perf_counter()
    for case in aligned:
        log(f"[a] {case.name}")
        is_homogr = case.meta.get("dataset") != "vis-nir-perturbed"
        inputs = prepare_inputs(case.fixed, case.moving, None, None, None, None)
        grey = [cv2.normalize(descriptor_input(im.batch(), "grey")[0, 0].numpy(), None, 0, 255, cv2.NORM_MINMAX)
                .astype(np.uint8) for im in (case.fixed, case.moving)]
        found = cv2.SIFT_create(nfeatures=2000).detect(grey[0], None)[:2000]
        matrix = torch.as_tensor(case.matrix, dtype=torch.float64)  # pixels = world on these raster grids
        xy = torch.tensor([k.pt for k in found], dtype=torch.float64)
        # OpenCV's angle is in degrees, clockwise on screen = towards +y in pixel coordinates
        kps = Keypoints(xy, torch.tensor([math.radians(k.angle) for k in found], dtype=torch.float64),
                        torch.tensor([k.size for k in found], dtype=torch.float64))
        warped = warp_keypoints(matrix, kps)
        keep = inside(warped.xy, tuple(case.moving.shape[-2:]), 12.0)
        if is_homogr and case.fixed_points is not None:
            # homogr's matrix is a fit to 8 manual correspondences and extrapolates far outside them:
            # only keypoints inside their convex hull count
            hull = cv2.convexHull(np.asarray(case.fixed_points, dtype=np.float32))  # (x, y) pixel centres
            in_hull = torch.tensor([cv2.pointPolygonTest(hull, (float(x), float(y)), False) >= 0
                                    for x, y in xy.tolist()], dtype=torch.bool)
            keep = keep & in_hull
        kps, warped = kps.subset(keep), warped.subset(keep)
        found = [k for k, flag in zip(found, keep.tolist()) if flag]
        moved = [cv2.KeyPoint(float(x), float(y), float(s), float(math.degrees(a)) % 360.0)
                 for (x, y), s, a in zip(warped.xy.tolist(), warped.scale.tolist(), warped.orientation.tolist())]
        descs.setdefault("sift", ([], []))
        descs["sift"][0].append(_sift_descriptors(grey[0], found))
        descs["sift"][1].append(_sift_descriptors(grey[1], moved))
        nets: dict[str, Any] = {}
        for variant in ("siamese", "pseudo-siamese"):
            # homogr's wide baselines are out of any identity start's reach: the default start there
            method = WeakHomography(network=variant, start="auto" if is_homogr else "identity")
            nets[variant] = (method, method.fit(inputs, device=torch.device("cpu"), seed=args.seed))
        if automatic is not None:
            nets["automatic"] = (None, automatic)
        for name, (method, fit) in nets.items():
            network = fit.network if method is not None else fit.descriptor
            colour = method.colour if method is not None else "grey"
            factor = fit.factors[-1] if method is not None else 1.0
            siamese = method is not None and method.network == "siamese"
            images = []
            for image in (case.fixed, case.moving):
                tensor, _ = downsample(descriptor_input(image.batch(), colour), image.grid, factor)
                images.append(standardise(tensor))
            if siamese and images[0].shape[1] != images[1].shape[1]:
                images = [im.mean(1, keepdim=True) for im in images]
            to_level = 1.0 / factor
            patch = getattr(network, "patch_size", 16)
            out = []
            for stream, (points, image) in enumerate(zip((kps, warped), images)):
                scaled = Keypoints(points.xy * to_level, points.orientation,
                                   (points.scale * to_level / patch).clamp(1.0, 2.0))
                with torch.no_grad():
                    patches = sample_patches(image, scaled, patch)
                    out.append(torch.cat([network(chunk, stream=stream) for chunk in patches.split(512)]).numpy())
            descs.setdefault(name, ([], []))
            descs[name][0].append(out[0])
            descs[name][1].append(out[1])
        # the SIFT rows of this case were appended above, before the networks
        for name in descs:
            bucket = per_set.setdefault("homogr" if is_homogr else "vis-nir", {}).setdefault(name, ([], []))
            bucket[0].append(descs[name][0][-1])
            bucket[1].append(descs[name][1][-1])
    result: dict[str, Any] = {"pairs": [c.meta.get("pair", c.name) for c in aligned], "seconds": time.perf_counter() - tic}
    for subset, table in per_set.items():
        scores = {name: descriptor_map(a, b) for name, (a, b) in table.items()}
        result[subset] = {"map": {k: v["map"] for k, v in scores.items()}, "ap": {k: v["ap"] for k, v in scores.items()},
                          "queries": {k: v["n_queries"] for k, v in scores.items()}}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="b,c,a", help="which parts, comma-separated (b, c, a)")
    parser.add_argument("--visnir-per-subset", type=int, default=0, help="pairs per vis-nir subset in b (0: all 20)")
    parser.add_argument("--no-homogr", action="store_true", help="leave the homogr pairs out of b")
    parser.add_argument("--no-visnir", action="store_true", help="leave the vis-nir pairs out of b")
    parser.add_argument("--methods-b", default=",".join(PEERS_B), help="methods of part b")
    parser.add_argument("--perturb-pairs", type=int, default=8, help="vis-nir pairs of parts c and a")
    parser.add_argument("--perturb-skip", type=int, default=0,
                        help="leave out the first N pairs of each subset in parts c and a (held-out pairs)")
    parser.add_argument("--perturbations", default="0,0.025,0.05,0.075,0.1", help="start shifts, fractions of the size")
    parser.add_argument("--c-default", action="store_true",
                        help="part c also runs weak-homography with its default start (SIFT+MAGSAC when trusted)")
    parser.add_argument("--a-homogr", action="store_true",
                        help="part a also on the 8 homogr pairs (keypoints inside the hull of their manual points)")
    parser.add_argument("--automatic", help="checkpoint of the automatic-data-set descriptor (part a)")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--out-dir", default="/tmp/weak_homography_benchmark")
    parser.add_argument("--out", help="also save the JSON line here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per method and case")
    args = parser.parse_args(argv)
    args.methods_b = [m.strip() for m in args.methods_b.split(",") if m.strip()]
    args.perturbations = [float(p) for p in args.perturbations.split(",")]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    payload: dict[str, Any] = {"benchmark": "weak_homography", "parts": parts, "seed": args.seed,
                               "threads": args.threads}
    if not Path(args.data, "vis-nir").is_dir():
        payload.update(status="skipped", reason=f"no vis-nir data under {args.data}")
        emit(payload, args.out)
        return 0
    from alignkit.evaluate import evaluate

    started = time.perf_counter()
    cases = perturbed_cases(args) if ("c" in parts or "a" in parts) else []
    if "b" in parts:
        payload["b"] = part_b(args, evaluate)
    if "c" in parts:
        payload["c"] = part_c(args, evaluate, cases)
    if "a" in parts:
        payload["a"] = part_a(args, cases)
    import os

    payload.update(status="ok", total_seconds=time.perf_counter() - started,
                   load_avg_at_end=[round(x, 2) for x in os.getloadavg()])
    emit(payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
