"""Speed of the similarity losses, forward + backward, on random volumes of a chosen size.

Mattes MI has two code paths that give the same value and gradient (tests/test_losses.py): the
sparse Parzen histogram (each voxel touches 4 x 4 bins; used whenever only the warped image needs a
gradient) and the dense ``(N, bins)`` soft-assignment product (used when the fixed image itself
requires a gradient, e.g. learned feature images). This script times both in the same run, and LNCC
and NCC for scale, and prints ONE JSON line with the seconds per call and the dense/sparse ratio.

    python benchmarks/similarity_speed.py                  # 1M and 4M voxels, 2 threads
    python benchmarks/similarity_speed.py --quick          # 64k voxels
    python benchmarks/similarity_speed.py --voxels 262144,1048576 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, log


def _cube(voxels: int) -> tuple[int, int, int]:
    side = max(2, round(voxels ** (1.0 / 3.0)))
    return (side, side, max(2, voxels // (side * side)))


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, thread pool
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", default="1048576,4194304", help="comma-separated volume sizes")
    parser.add_argument("--quick", action="store_true", help="one 64k-voxel volume")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case (the best is kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also save the JSON line here")
    args = parser.parse_args(argv)

    import torch

    from alignkit.losses import LNCC, NCC, MattesMI

    torch.set_num_threads(args.threads)
    sizes = [1 << 16] if args.quick else [int(v) for v in args.voxels.split(",") if v.strip()]
    generator = torch.Generator().manual_seed(args.seed)
    results: list[dict[str, Any]] = []
    for voxels in sizes:
        shape = _cube(voxels)
        warped = torch.rand((1, 1, *shape), generator=generator)
        fixed = (warped**2 + 0.2 * torch.rand((1, 1, *shape), generator=generator)).contiguous()
        row: dict[str, Any] = {"shape": list(shape), "voxels": int(warped.numel())}

        def run(loss, fixed_input, warped=warped):
            w = warped.clone().requires_grad_(True)
            loss(w, fixed_input).backward()

        mi = MattesMI(bins=32)
        learned_fixed = fixed.clone().requires_grad_(True)  # a fixed side that needs a gradient: dense path
        timings = {
            "mi_sparse_s": (mi, fixed),
            "mi_dense_s": (mi, learned_fixed),
            "lncc_s": (LNCC(window=9), fixed),
            "ncc_s": (NCC(), fixed),
        }
        for key, (loss, fixed_input) in timings.items():
            row[key] = _time(lambda loss=loss, fixed_input=fixed_input: run(loss, fixed_input), args.repeats)
        row["mi_dense_over_sparse"] = row["mi_dense_s"] / row["mi_sparse_s"]
        log(f"{shape}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items() if k.endswith("_s")))
        results.append(row)
    emit(
        {
            "benchmark": "similarity_speed",
            "threads": args.threads,
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "load_avg": [round(x, 2) for x in os.getloadavg()],
            "results": results,
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
