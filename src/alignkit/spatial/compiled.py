"""Compiled (numba) kernels of the dense greedy iteration: the optional fast path of PICSL Greedy's update
(:mod:`alignkit.solve.greedy`) and of the LNCC force (:meth:`alignkit.losses.LNCC.value_and_gradient`).

Why: one greedy iteration on a 2 mm brain (112x92x81 voxels, two threads) was ~290 ms of torch
operations -- the warp and autograd's backward through ``grid_sample`` (~70 ms: the 3D sampler's
backward is a scalar loop that also writes the gradient of the image), the five LNCC window sums and
their three adjoint sums as banded matrix products with a copy before and after each (~80 ms), the
composition of the field with the step (a second 3-channel ``grid_sample``, ~80 ms) and the two
Gaussians (~20 ms each) -- most of it memory traffic between small elementwise operations, and at the
coarse levels (15k voxels) mostly Python and dispatch overhead. Here each step is one fused loop over
the volume:

* :func:`warp_with_gradient` -- the moving image sampled through ``fixed voxel -> fixed world (+ the
  displacement) -> moving voxel`` (an affine prior folded into the last matrix) and, in the same pass,
  the derivative of the trilinear interpolant with respect to the displacement (what autograd's
  ``grid_sample`` backward returns), plus the inside mask;
* :func:`local_ncc_force` -- the squared or signed local NCC (zero-padded box windows, true voxel
  counts at the border), its masked mean and its closed-form gradient with respect to the warped image;
* :func:`compose_step` -- ``u <- s + u o (id + s)`` with trilinear, border-clamped sampling (the step
  scaled on the fly), and :func:`longest_squared`, the step's normalisation (its longest voxel vector);
* :func:`gaussian` / :func:`box_sum` -- separable filters (replicate / zero padding);
* :func:`parzen_joint` / :func:`parzen_gather` -- Mattes mutual information's joint histogram (cubic
  B-spline kernels on both sides) and its gradient back to the samples (:class:`alignkit.losses.MattesMI`
  on float32 CPU samples; the 3D compiled sampler of :func:`alignkit.spatial.points.sample_voxels_with_inside`
  uses :func:`warp_with_gradient` too).

Every kernel works on ``(D, H, W)`` volumes; a 2D image is a volume of depth 1 (a singleton axis
changes nothing: its window sum is the value itself, its normalised Gaussian too, and a sample along
it is clamped to the one slice), so the 2D and 3D paths are the same code. The torch functions these
replace stay as the reference (``tests/test_compiled_greedy.py`` checks agreement); the callers use
this path only for one float32 image on the CPU with numba installed (``pip install alignkit[fast]``),
and ``ALIGNKIT_COMPILED=0`` turns it off.

The derivative of the trilinear interpolant jumps at voxel centres (from the cell below to the cell
above); ``grid_sample`` takes the cell above, and so does this kernel once a coordinate within
:data:`SNAP` voxels of a centre is snapped onto it. An identity start puts every voxel exactly there,
where the float32 rounding of the reference's voxel -> world -> voxel chain lands it a hair below or
above the centre and so picks either cell (at the first iteration of an identity-started level the two
paths' derivatives differ at such voxels; with an affine start, as in the presets, coordinates are
generic and they agree). As
in ``grid_sample``'s backward, a coordinate on the first or last voxel of an axis, or beyond, has no
derivative along that axis.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import numpy as np

#: replaced by ``numba.prange`` when the kernels are compiled (``range`` keeps the module importable,
#: and the kernels readable as plain Python, without numba)
prange = range

_KERNELS: list = []

#: voxels: sampling coordinates this close to an integer are taken as that integer (float rounding of
#: the voxel -> world -> voxel chain), so the one-sided derivative at a voxel centre is grid_sample's
SNAP = 1e-5

#: voxels of a row one job of the row filter takes at a time (a block and its source rows stay in L1)
ROW_BLOCK = 1024


def available() -> bool:
    """Whether the compiled path may run: numba is installed and ``ALIGNKIT_COMPILED`` is not ``0``.
    numba itself is imported on first use, so ``import alignkit`` does not pay for it."""
    if os.environ.get("ALIGNKIT_COMPILED", "1") == "0":
        return False
    return importlib.util.find_spec("numba") is not None


def fits(*tensors) -> bool:
    """Whether torch tensors can go through the kernels as they are: ``(1, C, *S)`` float32 on the CPU, 2D
    or 3D, with no autograd graph to keep (the kernels are not differentiable). Not whether numba is
    installed: :func:`available`."""
    import torch

    return all(
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and t.shape[0] == 1
        and t.dim() in (4, 5)
        and not (t.requires_grad and torch.is_grad_enabled())
        for t in tensors
    )


def volumes(tensor) -> np.ndarray:
    """A ``(1, C, *S)`` torch tensor as the kernels' contiguous ``(C, D, H, W)`` float32 array (a 2D image
    is a volume of depth 1; shares memory with the tensor where it is contiguous)."""
    array = tensor[0].detach().contiguous().numpy()
    return array if array.ndim == 4 else array[:, None]


def _kernel(function):
    _KERNELS.append(function)
    return function


_HELPERS: list = []


def _helper(function):
    # a per-voxel step the kernels call: compiled into them (numba inline="always"), so one piece of
    # code serves every axis without a call per voxel
    _HELPERS.append(function)
    return function


@functools.cache
def _compiled() -> dict:
    """The jitted kernels by name (compiled on first use; ``cache=True``: once per installation). The
    helpers replace their plain-Python selves in this module's globals first, so the kernels compiled
    later resolve them to jitted code."""
    import numba

    globals()["prange"] = numba.prange
    for function in _HELPERS:
        globals()[function.__name__] = numba.njit(cache=True, inline="always")(function)
    jitted = {}
    for function in _KERNELS:
        jitted[function.__name__] = numba.njit(cache=True, parallel=True, nogil=True, fastmath=False)(function)
    return jitted


def _threads() -> None:
    """numba's thread count follows torch's (``--threads``, ``torch.set_num_threads``)."""
    import numba
    import torch

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


# ------------------------------------------------------------------------------------------------
# separable filters over the last three axes of (C, D, H, W) float32 arrays


@_kernel
def _filter_axis2(src, out, taps, replicate):
    # along W (contiguous): out[.., x] = sum_k taps[k] src[.., x + k - r]. The shifted reads go through
    # slices so that every index is a loop counter from 0: numba then drops its negative-index check
    # and the loop vectorises (5x faster than indexing src[.., x + offset], measured)
    channels, depth, height, width = src.shape
    radius = taps.shape[0] // 2
    for job in prange(channels * depth):
        c = job // depth
        z = job % depth
        for y in range(height):
            source = src[c, z, y]
            target = out[c, z, y]
            for x in range(width):
                target[x] = 0.0
            for k in range(taps.shape[0]):
                offset = k - radius
                weight = taps[k]
                start = min(max(0, -offset), width)
                stop = max(min(width, width - offset), start)
                shifted_target = target[start:stop]
                shifted_source = source[start + offset:stop + offset]
                for i in range(stop - start):
                    shifted_target[i] += weight * shifted_source[i]
                if replicate:
                    for x in range(start):
                        target[x] += weight * source[0]
                    for x in range(stop, width):
                        target[x] += weight * source[width - 1]


@_kernel
def _filter_axis1(src, out, taps, replicate):
    # along H, whole rows at a time (vectorised over x), one block of a row per job: every tap adds into
    # a block that stays in the L1 cache (a D pass on the (C, 1, D, H*W) view has 10k-voxel rows, whose
    # read-modify-write per tap otherwise streams through L2). Along D it is the same loop on that view
    # (see _separable)
    channels, depth, height, width = src.shape
    radius = taps.shape[0] // 2
    blocks = (width + ROW_BLOCK - 1) // ROW_BLOCK
    for job in prange(channels * depth * height * blocks):
        row_job = job // blocks
        start = (job % blocks) * ROW_BLOCK
        stop = min(start + ROW_BLOCK, width)
        c = row_job // (depth * height)
        z = (row_job // height) % depth
        y = row_job % height
        target = out[c, z, y, start:stop]
        for x in range(stop - start):
            target[x] = 0.0
        for k in range(taps.shape[0]):
            row = y + k - radius
            if row < 0 or row >= height:
                if not replicate:
                    continue
                row = min(max(row, 0), height - 1)
            source = src[c, z, row, start:stop]
            weight = taps[k]
            for x in range(stop - start):
                target[x] += weight * source[x]


def _separable(volume: np.ndarray, taps: np.ndarray, replicate: bool, out: np.ndarray | None = None) -> np.ndarray:
    kernels = _compiled()
    _threads()
    first = np.empty_like(volume)
    second = np.empty_like(volume)
    channels, depth, height, width = volume.shape
    kernels["_filter_axis2"](volume, first, taps, replicate)
    kernels["_filter_axis1"](first, second, taps, replicate)
    target = first if out is None else out
    # along D: axis 1 of the (C, 1, D, H*W) view (rows of H*W voxels)
    kernels["_filter_axis1"](
        second.reshape(channels, 1, depth, height * width), target.reshape(channels, 1, depth, height * width), taps,
        replicate,
    )
    return target


def gaussian(volume: np.ndarray, taps: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``volume (C, D, H, W)`` float32 filtered by the odd 1D kernel ``taps`` along each of its three
    spatial axes, samples beyond the border replaced by the edge sample (replicate padding). ``out``: a
    contiguous array of the same shape to write the result into (not ``volume`` itself), else a new one."""
    if out is not None and (out.shape != volume.shape or out.dtype != np.float32 or not out.flags.c_contiguous
                            or np.shares_memory(out, volume)):
        raise ValueError("gaussian: out must be a separate contiguous float32 array shaped like the volume")
    return _separable(volume, taps.astype(np.float32), True, out)


def box_sum(volume: np.ndarray, window: int) -> np.ndarray:
    """``volume (C, D, H, W)`` float32 summed over a centred ``window``-voxel cube (zero padding)."""
    return _separable(volume, np.ones(int(window), dtype=np.float32), False)


# ------------------------------------------------------------------------------------------------
# trilinear sampling with border clamping


@_helper
def _snapped(q):
    # a coordinate a rounding error away from a voxel centre is that centre (an identity start puts every
    # voxel there): the derivative jumps there, and grid_sample takes the cell above it
    centre = math.floor(q + 0.5)
    return float(centre) if abs(q - centre) < SNAP else q


@_helper
def _clamped(q, size):
    # border clamping: (the coordinate within [0, size - 1], its derivative factor); on or beyond the
    # border there is no derivative (grid_sample's backward counts the borders as outside)
    if q <= 0:
        return 0.0, 0.0
    if q >= size - 1:
        return size - 1.0, 0.0
    return q, 1.0


@_helper
def _cell(q, size):
    # the linear-interpolation cell of a clamped coordinate: lower corner (at most size - 2, so the last
    # voxel reads the last cell), upper corner, fraction
    lower = min(math.floor(q), max(size - 2, 0))
    return lower, min(lower + 1, size - 1), q - lower


@_kernel
def _warp_with_gradient(moving, displacement, world_from_voxel, moving_voxel_from_world, warped, gradient, inside):
    depth, height, width = warped.shape
    size0, size1, size2 = moving.shape
    a = world_from_voxel
    m = moving_voxel_from_world
    for z in prange(depth):
        for y in range(height):
            for x in range(width):
                # fixed voxel -> world point (+ the displacement) -> moving voxel
                w0 = a[0, 0] * z + a[0, 1] * y + a[0, 2] * x + a[0, 3] + displacement[0, z, y, x]
                w1 = a[1, 0] * z + a[1, 1] * y + a[1, 2] * x + a[1, 3] + displacement[1, z, y, x]
                w2 = a[2, 0] * z + a[2, 1] * y + a[2, 2] * x + a[2, 3] + displacement[2, z, y, x]
                q0 = m[0, 0] * w0 + m[0, 1] * w1 + m[0, 2] * w2 + m[0, 3]
                q1 = m[1, 0] * w0 + m[1, 1] * w1 + m[1, 2] * w2 + m[1, 3]
                q2 = m[2, 0] * w0 + m[2, 1] * w1 + m[2, 2] * w2 + m[2, 3]
                # snapped onto voxel centres before the inside test and the clamping
                q0, q1, q2 = _snapped(q0), _snapped(q1), _snapped(q2)
                is_inside = q0 >= 0 and q0 <= size0 - 1 and q1 >= 0 and q1 <= size1 - 1 and q2 >= 0 and q2 <= size2 - 1
                inside[z, y, x] = 1.0 if is_inside else 0.0
                q0, g0 = _clamped(q0, size0)
                q1, g1 = _clamped(q1, size1)
                q2, g2 = _clamped(q2, size2)
                i0, j0, f0 = _cell(q0, size0)
                i1, j1, f1 = _cell(q1, size1)
                i2, j2, f2 = _cell(q2, size2)
                c000 = moving[i0, i1, i2]
                c001 = moving[i0, i1, j2]
                c010 = moving[i0, j1, i2]
                c011 = moving[i0, j1, j2]
                c100 = moving[j0, i1, i2]
                c101 = moving[j0, i1, j2]
                c110 = moving[j0, j1, i2]
                c111 = moving[j0, j1, j2]
                # interpolate along axis 2, then 1, then 0, keeping the differences for the derivatives
                c00 = c000 + f2 * (c001 - c000)
                c01 = c010 + f2 * (c011 - c010)
                c10 = c100 + f2 * (c101 - c100)
                c11 = c110 + f2 * (c111 - c110)
                c0 = c00 + f1 * (c01 - c00)
                c1 = c10 + f1 * (c11 - c10)
                warped[z, y, x] = c0 + f0 * (c1 - c0)
                d0 = (c1 - c0) * g0
                d1 = ((1.0 - f0) * (c01 - c00) + f0 * (c11 - c10)) * g1
                e0 = (1.0 - f1) * (c001 - c000) + f1 * (c011 - c010)
                e1 = (1.0 - f1) * (c101 - c100) + f1 * (c111 - c110)
                d2 = ((1.0 - f0) * e0 + f0 * e1) * g2
                # chain rule to the world displacement: d q / d w = the linear part of m
                gradient[0, z, y, x] = m[0, 0] * d0 + m[1, 0] * d1 + m[2, 0] * d2
                gradient[1, z, y, x] = m[0, 1] * d0 + m[1, 1] * d1 + m[2, 1] * d2
                gradient[2, z, y, x] = m[0, 2] * d0 + m[1, 2] * d1 + m[2, 2] * d2


def _as_3d_matrix(matrix: np.ndarray) -> np.ndarray:
    """A 2D homogeneous ``3x3`` matrix as the ``3x4`` of a volume of depth 1 (axis 0 untouched), or the
    top ``3x4`` of a 3D ``4x4``; float64."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape == (3, 3):
        full = np.eye(4)
        full[1:, 1:] = matrix
        matrix = full
    return np.ascontiguousarray(matrix[:3])


def warp_with_gradient(
    moving: np.ndarray, displacement: np.ndarray, world_from_voxel: np.ndarray, moving_voxel_from_world: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``moving (D, H, W)`` sampled at ``moving_voxel_from_world @ (world_from_voxel @ p + displacement(p))``
    for every voxel ``p`` of the fixed grid (trilinear, border clamping), with the derivative of each
    sample with respect to the world displacement ``(3, D, H, W)`` and the inside mask (every moving
    voxel coordinate within ``[0, n - 1]``). Matrices are homogeneous ``4x4`` in array-axis (voxel) and
    world component order, as :class:`alignkit.spatial.Grid` keeps them; float32 volumes."""
    kernels = _compiled()
    _threads()
    shape = displacement.shape[1:]
    warped = np.empty(shape, dtype=np.float32)
    gradient = np.empty((3, *shape), dtype=np.float32)
    inside = np.empty(shape, dtype=np.float32)
    kernels["_warp_with_gradient"](
        moving, displacement, _as_3d_matrix(world_from_voxel), _as_3d_matrix(moving_voxel_from_world), warped, gradient,
        inside,
    )
    return warped, gradient, inside


@_kernel
def _compose_step(field, step, factor, voxel_from_world, out):
    # out = s + field sampled at p + (voxel vector of s(p)), s = factor * step (float32, as torch scales
    # a float32 tensor), border clamping, world units
    channels, depth, height, width = field.shape
    m = voxel_from_world
    for z in prange(depth):
        for y in range(height):
            for x in range(width):
                s0 = step[0, z, y, x] * factor
                s1 = step[1, z, y, x] * factor
                s2 = step[2, z, y, x] * factor
                q0 = min(max(z + m[0, 0] * s0 + m[0, 1] * s1 + m[0, 2] * s2, 0.0), depth - 1.0)
                q1 = min(max(y + m[1, 0] * s0 + m[1, 1] * s1 + m[1, 2] * s2, 0.0), height - 1.0)
                q2 = min(max(x + m[2, 0] * s0 + m[2, 1] * s1 + m[2, 2] * s2, 0.0), width - 1.0)
                i0, j0, f0 = _cell(q0, depth)
                i1, j1, f1 = _cell(q1, height)
                i2, j2, f2 = _cell(q2, width)
                for c in range(channels):
                    c00 = field[c, i0, i1, i2] + f2 * (field[c, i0, i1, j2] - field[c, i0, i1, i2])
                    c01 = field[c, i0, j1, i2] + f2 * (field[c, i0, j1, j2] - field[c, i0, j1, i2])
                    c10 = field[c, j0, i1, i2] + f2 * (field[c, j0, i1, j2] - field[c, j0, i1, i2])
                    c11 = field[c, j0, j1, i2] + f2 * (field[c, j0, j1, j2] - field[c, j0, j1, i2])
                    c0 = c00 + f1 * (c01 - c00)
                    c1 = c10 + f1 * (c11 - c10)
                    sc = s0 if c == 0 else (s1 if c == 1 else s2)
                    out[c, z, y, x] = sc + c0 + f0 * (c1 - c0)


def compose_step(field: np.ndarray, step: np.ndarray, voxel_from_world: np.ndarray, factor: float = 1.0) -> np.ndarray:
    """``s + field o (id + s)`` with ``s = factor * step``, for world-unit ``(3, D, H, W)`` float32 fields
    of one grid (``voxel_from_world``: its homogeneous matrix; only the linear part is used -- these are
    vectors). ``factor`` is applied in float32, as multiplying a float32 tensor by a float32 scalar."""
    kernels = _compiled()
    _threads()
    out = np.empty_like(field)
    kernels["_compose_step"](field, step, np.float32(factor), _as_3d_matrix(voxel_from_world), out)
    return out


@_kernel
def _longest_squared(vectors, linear, per_slice):
    # the largest squared length of linear @ v over the voxels, rounded as the torch reference rounds it
    # (a float32 einsum, float32 squares, their sum, max)
    depth, height, width = vectors.shape[1:]
    for z in prange(depth):
        largest = np.float32(0.0)
        for y in range(height):
            for x in range(width):
                v0 = vectors[0, z, y, x]
                v1 = vectors[1, z, y, x]
                v2 = vectors[2, z, y, x]
                w0 = linear[0, 0] * v0 + linear[0, 1] * v1 + linear[0, 2] * v2
                w1 = linear[1, 0] * v0 + linear[1, 1] * v1 + linear[1, 2] * v2
                w2 = linear[2, 0] * v0 + linear[2, 1] * v1 + linear[2, 2] * v2
                length = w0 * w0 + w1 * w1 + w2 * w2
                if length > largest or math.isnan(length):  # NaN wins, as in torch's max
                    largest = length
        per_slice[z] = largest


def longest_squared(vectors: np.ndarray, voxel_from_world: np.ndarray) -> float:
    """The largest squared length, in voxels, of the world-unit vectors ``(3, D, H, W)`` float32 (the
    linear part of ``voxel_from_world`` applied), a float32 value (NaN if any vector is NaN)."""
    kernels = _compiled()
    _threads()
    linear = np.ascontiguousarray(_as_3d_matrix(voxel_from_world)[:, :3], dtype=np.float32)
    per_slice = np.empty(vectors.shape[1], dtype=np.float32)
    kernels["_longest_squared"](vectors, linear, per_slice)
    return float(per_slice.max())


# ------------------------------------------------------------------------------------------------
# local NCC: the score, its masked mean and its gradient with respect to the warped image


@_kernel
def _ncc_coefficients(sums, mask, counts0, counts1, counts2, eps, squared, coefficients, totals):
    # sums: (5, D, H, W) window sums of x, y, xx, yy, xy; writes the three maps whose window sums make
    # the gradient (the score's derivative with respect to sx, sxy and sxx, times the voxel's weight)
    # and per-slice sums of weight * score and of the weights
    depth, height, width = mask.shape
    for z in prange(depth):
        score_sum = 0.0
        weight_sum = 0.0
        for y in range(height):
            for x in range(width):
                count = counts0[z] * counts1[y] * counts2[x]
                sx = sums[0, z, y, x]
                sy = sums[1, z, y, x]
                cross = sums[4, z, y, x] - sx * sy / count
                raw_x = sums[2, z, y, x] - sx * sx / count
                raw_y = sums[3, z, y, x] - sy * sy / count
                var_x = max(raw_x, eps)
                var_y = max(raw_y, eps)
                if squared:
                    score = cross * cross / (var_x * var_y)
                    d_cross = 2.0 * cross / (var_x * var_y)
                    d_var_x = -score / var_x
                else:
                    root = math.sqrt(var_x * var_y)
                    score = cross / root
                    d_cross = 1.0 / root
                    d_var_x = -0.5 * score / var_x
                if not raw_x > eps:
                    d_var_x = 0.0
                weight = mask[z, y, x]
                score_sum += weight * score
                weight_sum += weight
                coefficients[0, z, y, x] = weight * (-d_cross * sy - 2.0 * d_var_x * sx) / count
                coefficients[1, z, y, x] = weight * d_cross
                coefficients[2, z, y, x] = weight * d_var_x
        totals[z, 0] = score_sum
        totals[z, 1] = weight_sum


@_kernel
def _stack_products(x, y, out):
    depth, height, width = x.shape
    for z in prange(depth):
        for i in range(height):
            for j in range(width):
                a = x[z, i, j]
                b = y[z, i, j]
                out[0, z, i, j] = a
                out[1, z, i, j] = b
                out[2, z, i, j] = a * a
                out[3, z, i, j] = b * b
                out[4, z, i, j] = a * b


@_kernel
def _ncc_gradient(back, x, y, scale, out):
    depth, height, width = x.shape
    for z in prange(depth):
        for i in range(height):
            for j in range(width):
                out[z, i, j] = scale * (back[0, z, i, j] + y[z, i, j] * back[1, z, i, j] + 2.0 * x[z, i, j] * back[2, z, i, j])


@_kernel
def _ncc_gradient_chained(back, x, y, scale, derivative, out):
    # _ncc_gradient's force (rounded to float32 as that kernel stores it) times the derivative of the
    # warped voxel with respect to each displacement component: d loss / d displacement, in one pass
    depth, height, width = x.shape
    for z in prange(depth):
        for i in range(height):
            for j in range(width):
                force = np.float32(
                    scale * (back[0, z, i, j] + y[z, i, j] * back[1, z, i, j] + 2.0 * x[z, i, j] * back[2, z, i, j])
                )
                for c in range(3):
                    out[c, z, i, j] = derivative[c, z, i, j] * force


def local_ncc_force(
    warped: np.ndarray, fixed: np.ndarray, mask: np.ndarray | None, window: int, eps: float, squared: bool,
    *, gradient: bool = True, derivative: np.ndarray | None = None,
) -> tuple[float, np.ndarray | None]:
    """LNCC's loss ``1 - weighted mean of the local score`` and its gradient with respect to ``warped``
    (``(D, H, W)`` float32 volumes, ``mask`` the voxel weights or None), as
    :meth:`alignkit.losses.LNCC.value_and_gradient` defines them for one channel and an undilated window;
    ``gradient=False``: the loss alone (None for the gradient). ``derivative``: the ``(3, D, H, W)``
    derivative of each warped voxel with respect to the displacement (:func:`warp_with_gradient`'s); the
    gradient returned is then the loss's with respect to the displacement (their product, one pass)."""
    kernels = _compiled()
    _threads()
    depth, height, width = warped.shape
    radius = int(window) // 2
    # voxels of each zero-padded window, per axis (their product is the window's count)
    counts = [
        (np.minimum(np.arange(n) + radius, n - 1) - np.maximum(np.arange(n) - radius, 0) + 1).astype(np.float32)
        for n in (depth, height, width)
    ]
    stacked = np.empty((5, depth, height, width), dtype=np.float32)
    kernels["_stack_products"](warped, fixed, stacked)
    sums = box_sum(stacked, window)
    weights = np.ones_like(warped) if mask is None else mask
    coefficients = np.empty((3, depth, height, width), dtype=np.float32)
    totals = np.empty((depth, 2), dtype=np.float64)
    kernels["_ncc_coefficients"](sums, weights, counts[0], counts[1], counts[2], np.float32(eps), squared, coefficients,
                                 totals)
    weight_total = max(float(totals[:, 1].sum()), float(np.finfo(np.float32).tiny))
    value = 1.0 - float(totals[:, 0].sum()) / weight_total
    if not gradient:
        return value, None
    back = box_sum(coefficients, window)
    scale = np.float32(-1.0 / weight_total)
    if derivative is not None:
        chained = np.empty_like(derivative)
        kernels["_ncc_gradient_chained"](back, warped, fixed, scale, derivative, chained)
        return value, chained
    force = np.empty_like(warped)
    kernels["_ncc_gradient"](back, warped, fixed, scale, force)
    return value, force


# ------------------------------------------------------------------------------------------------
# Mattes mutual information: the Parzen joint histogram with cubic B-spline kernels on both sides, and
# the gather of its gradient back to the samples (alignkit.losses.MattesMI's sparse histogram, whose
# torch form is four weighted bincounts of 4N indices and sixteen gathers)

#: samples per job of the histogram: each job fills its own histogram (no write races), summed after
HISTOGRAM_CHUNK = 1 << 14


@_helper
def _bspline_weights(t):
    # the cubic B-spline's four weights and derivatives at bin coordinate t, and its first bin (floor - 1),
    # in float32 as the torch form computes them
    whole = math.floor(t)
    f = np.float32(t - whole)
    g = np.float32(1.0) - f
    f2 = f * f
    g2 = g * g
    third = np.float32(2.0 / 3.0)
    half = np.float32(0.5)
    w0 = g2 * g / np.float32(6.0)
    w1 = third - f2 + half * f2 * f
    w2 = third - g2 + half * g2 * g
    w3 = f2 * f / np.float32(6.0)
    d0 = -half * g2
    d1 = np.float32(1.5) * f2 - np.float32(2.0) * f
    d2 = np.float32(2.0) * g - np.float32(1.5) * g2
    d3 = half * f2
    return int(whole) - 1, w0, w1, w2, w3, d0, d1, d2, d3


@_kernel
def _parzen_joint(moving, fixed, weights, partial):
    # partial: (jobs, rows, bins, bins) float64 zeros; job j fills partial[j] from its chunk of samples
    rows, count = moving.shape
    jobs = partial.shape[0]
    for job in prange(jobs):
        start = job * HISTOGRAM_CHUNK
        stop = min(count, start + HISTOGRAM_CHUNK)
        for r in range(rows):
            for i in range(start, stop):
                m_first, m0, m1, m2, m3, _, _, _, _ = _bspline_weights(moving[r, i])
                f_first, f0, f1, f2, f3, _, _, _, _ = _bspline_weights(fixed[r, i])
                w = weights[r, i]
                for a in range(4):
                    fa = (f0 if a == 0 else (f1 if a == 1 else (f2 if a == 2 else f3))) * w
                    partial[job, r, f_first + a, m_first] += fa * m0
                    partial[job, r, f_first + a, m_first + 1] += fa * m1
                    partial[job, r, f_first + a, m_first + 2] += fa * m2
                    partial[job, r, f_first + a, m_first + 3] += fa * m3


@_kernel
def _parzen_gather(moving, fixed, weights, grad, out):
    # out[r, i]: d (sum_ab grad[r, a, b] J_ab) / d moving[r, i] -- the sample's 4 x 4 bins, weighted by
    # the fixed kernel (times the sample's weight) and the moving kernel's derivative
    rows, count = moving.shape
    for i in prange(count):
        for r in range(rows):
            m_first, _, _, _, _, d0, d1, d2, d3 = _bspline_weights(moving[r, i])
            f_first, f0, f1, f2, f3, _, _, _, _ = _bspline_weights(fixed[r, i])
            w = weights[r, i]
            total = 0.0
            for a in range(4):
                fa = (f0 if a == 0 else (f1 if a == 1 else (f2 if a == 2 else f3))) * w
                row = f_first + a
                total += fa * (d0 * grad[r, row, m_first] + d1 * grad[r, row, m_first + 1]
                               + d2 * grad[r, row, m_first + 2] + d3 * grad[r, row, m_first + 3])
            out[r, i] = total


def parzen_joint(moving: np.ndarray, fixed: np.ndarray, weights: np.ndarray, bins: int) -> np.ndarray:
    """The ``(rows, bins, bins)`` float64 joint histogram (fixed bins first) of the ``(rows, N)`` float32
    bin coordinates ``moving`` and ``fixed`` (within ``[1, bins - 2)``: every sample's 4 x 4 bins exist),
    each sample counted with its ``weights`` times the two cubic B-spline kernels."""
    kernels = _compiled()
    _threads()
    rows, count = moving.shape
    jobs = max(1, -(-count // HISTOGRAM_CHUNK))
    partial = np.zeros((jobs, rows, bins, bins), dtype=np.float64)
    kernels["_parzen_joint"](moving, fixed, weights, partial)
    return partial.sum(axis=0)


def parzen_gather(moving: np.ndarray, fixed: np.ndarray, weights: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """``(rows, N)`` float32: each sample's derivative of ``sum_ab grad[r, a, b] J[r, a, b]`` with respect to
    its moving bin coordinate (``J`` = :func:`parzen_joint`; ``grad`` float32 ``(rows, bins, bins)``)."""
    kernels = _compiled()
    _threads()
    out = np.empty_like(moving)
    kernels["_parzen_gather"](moving, fixed, weights, grad, out)
    return out
