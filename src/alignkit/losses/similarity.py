"""Image similarity losses: every one is an ``nn.Module`` returning a scalar to **minimise**.

Convention
----------
``forward(warped, fixed, mask=None)`` with ``warped`` and ``fixed`` of shape ``(B, C, *S)``
(``S`` = ``(H, W)`` or ``(D, H, W)``), ``warped = moving ∘ map`` already resampled on the fixed
grid. ``mask`` is an optional ``(B, 1, *S)`` (or ``(1, 1, *S)``) tensor of non-negative voxel
weights -- typically the overlap of the warped moving image's domain with the fixed grid; it
weights the voxels (for window statistics: the window *centres*). Each batch item gets its own
weighted average; the loss is the mean over the batch.

Half precision (``float16``/``bfloat16``) inputs are promoted to ``float32`` for the statistics
(sums of squares overflow or lose every digit in half precision); the returned scalar has the
dtype of ``warped``.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError, ShapeError
from alignkit.spatial.banded import fast_box_sum
from alignkit.spatial.bspline import cubic_bspline
from alignkit.spatial.filters import box_sum, separable_filter

SimilarityName = Literal["mse", "ncc", "lncc", "mk-lncc", "mi", "charbonnier", "l1", "flow-data"]
ParzenKernel = Literal["bspline", "gaussian"]


# -- shared helpers ---------------------------------------------------------------------------
def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half types (statistics overflow or underflow there), else the input dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _check_pair(warped: Tensor, fixed: Tensor, mask: Tensor | None) -> Tensor | None:
    """Validate shapes; return the mask broadcast to ``(B, 1, *S)`` (or None)."""
    if warped.dim() < 3:
        raise ShapeError(f"images must be (B, C, *spatial), got warped {tuple(warped.shape)}")
    if warped.shape != fixed.shape:
        raise ShapeError(
            f"warped {tuple(warped.shape)} and fixed {tuple(fixed.shape)} must have the same shape"
        )
    if mask is None:
        return None
    batch, spatial = warped.shape[0], tuple(warped.shape[2:])
    if (
        mask.dim() != warped.dim()
        or mask.shape[1] != 1
        or tuple(mask.shape[2:]) != spatial
        or mask.shape[0] not in (1, batch)
    ):
        raise ShapeError(f"mask must be ({batch} or 1, 1, *{spatial}), got {tuple(mask.shape)}")
    return mask.expand(batch, 1, *spatial)


def _weighted_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Per-batch-item mean of ``values (B, C, *S)`` over channels and voxels (mask-weighted), then
    mean over the batch."""
    flat = values.flatten(1)
    if mask is None:
        return flat.mean(dim=1).mean()
    weights = mask.to(values.dtype).expand_as(values).flatten(1)
    # clamp: an all-zero mask (no overlap) gives a zero loss instead of 0/0.
    return ((flat * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(torch.finfo(values.dtype).tiny)).mean()


def _window_sum(x: Tensor, window: int, dilation: int) -> Tensor:
    """Sum over a centred window of ``window`` taps spaced ``dilation`` voxels (zero padding)."""
    if dilation == 1 and all(window <= n for n in x.shape[2:]):
        return box_sum(x, window)
    # Dilated taps, or a window longer than an axis (coarse pyramid levels; box_sum's pooling
    # refuses those): the same zero-padded sum as a separable convolution.
    kernel = torch.zeros((window - 1) * dilation + 1, dtype=x.dtype, device=x.device)
    kernel[::dilation] = 1.0
    return separable_filter(x, [kernel] * (x.dim() - 2), padding_mode="zeros")


def _fast_window_sum(x: Tensor, window: int, dilation: int) -> Tensor:
    """:func:`_window_sum` by matrix products (:func:`alignkit.spatial.banded.fast_box_sum`) for
    undilated windows: the same sums to rounding, several times faster on a CPU."""
    return fast_box_sum(x, window) if dilation == 1 else _window_sum(x, window, dilation)


def global_ncc(x: Tensor, y: Tensor, weights: Tensor | None = None, *, eps: float = 1e-8) -> Tensor:
    """Weighted Pearson correlation of ``x`` and ``y`` ``(B, C, N)`` over their last axis: ``(B, C)``.

    ``weights`` ``(B or 1, 1 or C, N)`` are non-negative voxel weights (None: all equal); means,
    covariance and variances are weighted averages. ``eps`` bounds the product of the variances from
    below, so a constant image gives 0 (its covariance is exactly 0), not NaN. The one global NCC
    of alignkit: the :class:`NCC` loss and :func:`alignkit.metrics.ncc` both call it.
    """
    if weights is None:
        weights = torch.ones_like(x[:, :1])
    weights = weights / weights.sum(dim=2, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    dx = x - (weights * x).sum(2, keepdim=True)
    dy = y - (weights * y).sum(2, keepdim=True)
    cov = (weights * dx * dy).sum(2)
    var = ((weights * dx * dx).sum(2) * (weights * dy * dy).sum(2)).clamp_min(eps)
    return cov / torch.sqrt(var)


def _local_ncc(x: Tensor, y: Tensor, window: int, dilation: int, eps: float, squared: bool) -> Tensor:
    """Local NCC map ``(B, C, *S)`` of float tensors ``x``, ``y`` (Shen et al. 2019 eq. 2 per window).

    The number of voxels in each window is counted (``box_sum`` of ones), so windows cut by the
    border use the voxels they really contain instead of a fixed count.
    """
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    count = _window_sum(ones, window, dilation)
    # the five window sums as the channels of one tensor: each channel is summed exactly as on its
    # own (same values), but one pass over a stack is ~3x faster than five (measured on an
    # 86x110x84 volume, two threads: 0.25 s against 0.74 s), and so is its backward
    channels = x.shape[1]
    stacked = _window_sum(torch.cat([x, y, x * x, y * y, x * y], dim=1), window, dilation)
    sx, sy, sxx, syy, sxy = stacked.split(channels, dim=1)
    cross = sxy - sx * sy / count
    # Sums of squared deviations; clamped because rounding makes them slightly negative on
    # constant patches, and because eps keeps flat windows from dividing by zero (fp16 NaNs).
    var_x = (sxx - sx * sx / count).clamp_min(eps)
    var_y = (syy - sy * sy / count).clamp_min(eps)
    if squared:
        return cross * cross / (var_x * var_y)
    return cross / torch.sqrt(var_x * var_y)


# -- intensity differences ------------------------------------------------------------------
class MSE(nn.Module):
    """Mean squared difference over channels and voxels: 0 for identical images."""

    def forward(self, warped: Tensor, fixed: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = _check_pair(warped, fixed, mask)
        dtype = _compute_dtype(warped)
        diff = warped.to(dtype) - fixed.to(dtype)
        return _weighted_mean(diff * diff, mask).to(warped.dtype)


class L1(nn.Module):
    """Mean absolute difference (robust to outliers; channels, e.g. RGB, averaged)."""

    def forward(self, warped: Tensor, fixed: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = _check_pair(warped, fixed, mask)
        dtype = _compute_dtype(warped)
        return _weighted_mean((warped.to(dtype) - fixed.to(dtype)).abs(), mask).to(warped.dtype)


class Charbonnier(nn.Module):
    """Generalised Charbonnier penalty ``((w - f)^2 + eps^2)^alpha`` averaged over channels and
    voxels (the robust photometric loss of optical flow; ``alpha = 0.45`` as in Sun et al.).

    Its minimum, for identical images, is ``eps^(2 alpha)``, not 0.
    """

    def __init__(self, *, eps: float = 1e-3, alpha: float = 0.45) -> None:
        super().__init__()
        if eps <= 0 or alpha <= 0:
            raise ConfigError(f"Charbonnier needs eps > 0 and alpha > 0, got eps={eps}, alpha={alpha}")
        self.eps = float(eps)
        self.alpha = float(alpha)

    def forward(self, warped: Tensor, fixed: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = _check_pair(warped, fixed, mask)
        dtype = _compute_dtype(warped)
        diff = warped.to(dtype) - fixed.to(dtype)
        return _weighted_mean((diff * diff + self.eps**2) ** self.alpha, mask).to(warped.dtype)


# -- correlation ------------------------------------------------------------------------------
class NCC(nn.Module):
    """Global normalised cross-correlation; returns ``1 - NCC`` (0 when perfectly correlated,
    1 when uncorrelated, 2 for an image against its negation).

    NCC is computed per batch item and channel over the (mask-weighted) voxels, then averaged.
    ``eps`` clamps the product of the variances (constant images give NCC = 0, not NaN).
    """

    def __init__(self, *, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, warped: Tensor, fixed: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = _check_pair(warped, fixed, mask)
        dtype = _compute_dtype(warped)
        weights = None if mask is None else mask.to(dtype).flatten(2)
        ncc = global_ncc(warped.to(dtype).flatten(2), fixed.to(dtype).flatten(2), weights, eps=self.eps)
        return (1.0 - ncc.mean()).to(warped.dtype)


class LNCC(nn.Module):
    """Local (windowed) NCC; returns ``1 - mean local score``.

    With ``squared=True`` (default, VoxelMorph/ANTs "CC") the local score is ``NCC^2`` in [0, 1],
    so anti-correlated windows also score; with ``squared=False`` it is the signed NCC of
    Shen et al. 2019 eq. 2 (loss in [0, 2]). Window sums use :func:`alignkit.spatial.box_sum` (separable,
    zero padding; border windows use their true voxel count). ``window`` is an odd number of voxels
    per axis; ``dilation`` spaces the taps (Shen et al. 2019 uses 2 for mk-LNCC). ``eps`` clamps each
    window's sum of squared deviations (intensity units squared): flat patches score 0, never NaN.
    Statistics are computed in float32 for half-precision inputs.
    """

    def __init__(
        self, *, window: int = 9, dilation: int = 1, squared: bool = True, eps: float = 1e-5
    ) -> None:
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ConfigError(f"LNCC window must be a positive odd integer, got {window}")
        if dilation < 1:
            raise ConfigError(f"LNCC dilation must be >= 1, got {dilation}")
        self.window = int(window)
        self.dilation = int(dilation)
        self.squared = bool(squared)
        self.eps = float(eps)

    def forward(self, warped: Tensor, fixed: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = _check_pair(warped, fixed, mask)
        if self._compiled_value_applies(warped, fixed, mask):
            # a value without autograd (the never-worse rule's evaluations): the fused loops of
            # alignkit.spatial.compiled, without the float64 running sums of five full-size volumes
            from alignkit.spatial import compiled

            value, _ = compiled.local_ncc_force(
                compiled.volumes(warped)[0], compiled.volumes(fixed)[0],
                None if mask is None else compiled.volumes(mask.to(torch.float32))[0], self.window, self.eps,
                self.squared, gradient=False,
            )
            return torch.tensor(value, dtype=warped.dtype)
        dtype = _compute_dtype(warped)
        score = _local_ncc(
            warped.to(dtype), fixed.to(dtype), self.window, self.dilation, self.eps, self.squared
        )
        return (1.0 - _weighted_mean(score, mask)).to(warped.dtype)

    def _compiled_value_applies(self, warped: Tensor, fixed: Tensor, mask: Tensor | None) -> bool:
        """One 3D/2D float32 image on the CPU, no autograd, an undilated window, numba installed."""
        from alignkit.spatial import compiled

        if self.dilation != 1 or warped.shape[1] != 1 or not compiled.fits(warped, fixed):
            return False
        if mask is not None and (mask.shape[:2] != (1, 1) or mask.shape[2:] != warped.shape[2:]):
            return False
        return compiled.available()

    @torch.no_grad()
    def value_and_gradient(self, warped: Tensor, fixed: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The loss and its gradient with respect to ``warped``, in closed form (Avants et al.'s
        cross-correlation gradient, "Symmetric diffeomorphic image registration with cross-correlation",
        generalised to the masked, signed or squared score): one stacked pass of window sums forward and
        one of three coefficient maps back (a centred window sum is its own adjoint), both as matrix
        products (:func:`_fast_window_sum`), instead of autograd through the five running sums. The
        reference is autograd through :meth:`forward` (``tests/test_greedy_update.py`` checks the two).
        ``fixed`` and ``mask`` are constants here."""
        mask = _check_pair(warped, fixed, mask)
        dtype = _compute_dtype(warped)
        x, y = warped.to(dtype), fixed.to(dtype)
        channels = x.shape[1]
        window, dilation = self.window, self.dilation
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=dtype, device=x.device)
        count = _fast_window_sum(ones, window, dilation)
        sx, sy, sxx, syy, sxy = _fast_window_sum(torch.cat([x, y, x * x, y * y, x * y], dim=1), window, dilation).split(
            channels, dim=1
        )
        cross = sxy - sx * sy / count
        raw_x, raw_y = sxx - sx * sx / count, syy - sy * sy / count
        var_x, var_y = raw_x.clamp_min(self.eps), raw_y.clamp_min(self.eps)
        if self.squared:
            score = cross * cross / (var_x * var_y)
            d_cross = 2.0 * cross / (var_x * var_y)
            d_var_x = -score / var_x
        else:
            root = torch.sqrt(var_x * var_y)
            score = cross / root
            d_cross = 1.0 / root
            d_var_x = -0.5 * score / var_x
        d_var_x = torch.where(raw_x > self.eps, d_var_x, torch.zeros_like(d_var_x))  # clamped: no gradient
        # d loss / d score per voxel: -(weight) / (sum of weights over channels and voxels) / batch
        batch = x.shape[0]
        if mask is None:
            weight = torch.full_like(score, -1.0 / (batch * score[0].numel()))
        else:
            weights = mask.to(dtype)
            total = (weights.flatten(1).sum(dim=1) * channels).clamp_min(torch.finfo(dtype).tiny)
            weight = (-weights / (batch * total.view(-1, *([1] * (x.dim() - 1))))).expand_as(score)
        value = (1.0 - _weighted_mean(score, mask)).to(warped.dtype)
        # the score's derivatives with respect to the window sums of x, y*x and x*x at each centre ...
        g_sxy = weight * d_cross
        g_sxx = weight * d_var_x
        g_sx = weight * (-d_cross * sy - 2.0 * d_var_x * sx) / count
        # ... spread back over each window: d sx / d x = 1, d sxy / d x = y, d sxx / d x = 2 x
        back_sx, back_sxy, back_sxx = _fast_window_sum(torch.cat([g_sx, g_sxy, g_sxx], dim=1), window, dilation).split(
            channels, dim=1
        )
        gradient = back_sx + y * back_sxy + 2.0 * x * back_sxx
        return value, gradient.to(warped.dtype)


class MultiKernelLNCC(nn.Module):
    """Multi-kernel LNCC (Shen et al. 2019, eqs. 2-3): ``1 - sum_i w_i * LNCC_{s_i}`` with ``sum w_i = 1``.

    ``windows`` entries are odd voxel counts (``int``) or fractions of the smallest spatial size
    ``S`` (``float`` in (0, 1]), rounded to the nearest odd count >= 3. The defaults are the
    paper's ``(w, s) = {(0.3, S/4), (0.7, S/2)}`` with kernel dilation 2 and the signed NCC of
    eq. 2 (``squared=False``). The paper evaluates windows at a stride of ``S/4``; here every voxel
    is a window centre (a denser estimate of the same mean; the separable sums make it cheap).
    """

    def __init__(
        self,
        *,
        windows: Sequence[int | float] = (0.25, 0.5),
        weights: Sequence[float] = (0.3, 0.7),
        dilation: int = 2,
        squared: bool = False,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if len(windows) == 0 or len(windows) != len(weights):
            raise ConfigError(
                f"mk-LNCC needs as many weights as windows, got {len(windows)} windows, {len(weights)} weights"
            )
        if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
            raise ConfigError(
                f"mk-LNCC weights must be >= 0 and sum to 1 (Shen et al. 2019 eq. 3), got {tuple(weights)}"
            )
        for s in windows:
            if isinstance(s, float) and not 0.0 < s <= 1.0:
                raise ConfigError(f"fractional mk-LNCC windows must be in (0, 1], got {s}")
            if isinstance(s, int) and (s < 1 or s % 2 == 0):
                raise ConfigError(f"mk-LNCC windows in voxels must be positive odd integers, got {s}")
        if dilation < 1:
            raise ConfigError(f"mk-LNCC dilation must be >= 1, got {dilation}")
        self.windows = tuple(windows)
        self.weights = tuple(float(w) for w in weights)
        self.dilation = int(dilation)
        self.squared = bool(squared)
        self.eps = float(eps)

    def window_sizes(self, spatial: Sequence[int]) -> list[int]:
        """The odd voxel counts used for an image of spatial size ``spatial``."""
        smallest = min(spatial)
        sizes = []
        for s in self.windows:
            if isinstance(s, float):
                n = max(3, round(s * smallest))
                sizes.append(n if n % 2 == 1 else n + 1)
            else:
                sizes.append(int(s))
        return sizes

    def forward(self, warped: Tensor, fixed: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = _check_pair(warped, fixed, mask)
        dtype = _compute_dtype(warped)
        x, y = warped.to(dtype), fixed.to(dtype)
        total = x.new_zeros(())
        for weight, size in zip(self.weights, self.window_sizes(x.shape[2:])):
            score = _local_ncc(x, y, size, self.dilation, self.eps, self.squared)
            total = total + weight * _weighted_mean(score, mask)
        return (1.0 - total).to(warped.dtype)


# -- mutual information -----------------------------------------------------------------------

def _bspline_planes(t: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """:func:`~alignkit.spatial.bspline.cubic_bspline_taps` as four separate tensors shaped like ``t``
    (one per tap) instead of a trailing axis of 4: every later operation is then on contiguous
    vectors, faster on a CPU than broadcasting over an axis of 4 (one run, 100k samples, one thread,
    best of 3: MI forward + backward 31.5 ms with the axis of 4, 24.7 ms like this; the closed-form
    :meth:`MattesMI.value_and_gradient` 20.6 ms)."""
    whole = torch.floor(t)
    f = t - whole
    g = 1.0 - f
    f2, g2 = f * f, g * g
    weights = [g2 * g / 6.0, 2.0 / 3.0 - f2 + 0.5 * f2 * f, 2.0 / 3.0 - g2 + 0.5 * g2 * g, f2 * f / 6.0]
    derivatives = [-0.5 * g2, 1.5 * f2 - 2.0 * f, 2.0 * g - 1.5 * g2, 0.5 * f2]
    return (whole - 1.0).long(), weights, derivatives


def _parzen_taps(moving_coords: Tensor, fixed_coords: Tensor, weights: Tensor, bins: int):
    """Per sample (``(rows, N)`` bin coordinates): the flat index of its first bin in the stacked
    ``(rows, bins, bins)`` histograms, the fixed kernel's 4 weights (times the voxel weights) and the
    moving kernel's 4 weights and 4 derivatives, each a ``(rows, N)`` tensor."""
    m_first, m_w, m_dw = _bspline_planes(moving_coords)
    f_first, f_w, _ = _bspline_planes(fixed_coords)
    f_w = [w * weights for w in f_w]
    rows = moving_coords.shape[0]
    first = (torch.arange(rows, device=moving_coords.device).unsqueeze(-1) * bins + f_first) * bins + m_first
    return first, f_w, m_w, m_dw


def _parzen_joint(first: Tensor, f_w: list[Tensor], m_w: list[Tensor], bins: int) -> Tensor:
    """The flat float64 joint histogram: per fixed tap one weighted ``bincount`` of the 4 bins of every
    sample (the transient index stays at 4 N)."""
    size = first.shape[0] * bins * bins
    joint = torch.zeros(size, dtype=torch.float64, device=first.device)
    for a in range(4):
        index = torch.cat([(first + (a * bins + b)).flatten() for b in range(4)])
        weight = torch.cat([(f_w[a] * m_w[b]).flatten() for b in range(4)])
        joint += torch.bincount(index, weight, minlength=size).to(torch.float64)
    return joint


def _parzen_gather(flat: Tensor, first: Tensor, f_w: list[Tensor], m_dw: list[Tensor], bins: int) -> Tensor:
    """``(rows, N)``: each sample's derivative of ``sum_ab flat[a, b] J_ab`` with respect to its moving
    bin coordinate -- the 4 x 4 bins it touches, weighted by the fixed kernel and the moving kernel's
    derivative."""
    out = torch.zeros_like(m_dw[0])
    for b in range(4):
        per_moving_tap = torch.zeros_like(out)  # sum over the fixed taps a of f_w[a] * flat[a, b]
        for a in range(4):
            per_moving_tap += f_w[a] * flat[first + (a * bins + b)]
        out += per_moving_tap * m_dw[b]
    return out


class _SparseJointHistogram(torch.autograd.Function):
    """Parzen joint histogram ``(M, bins, bins)`` with cubic B-spline kernels on both sides.

    Each sample touches 4 x 4 bins, so the histogram is 4 weighted ``bincount`` s of ``4 N`` values
    instead of the dense ``(N, bins)`` soft-assignment product, whose element-wise kernel evaluations
    over all bins are memory bound (measured 4-8x slower in one run: ``benchmarks/similarity_speed.py``).
    The backward pass gathers the same 16 bins; only ``moving_coords`` (the warped image) receives a
    gradient.
    """

    @staticmethod
    def forward(ctx, moving_coords: Tensor, fixed_coords: Tensor, weights: Tensor, bins: int) -> Tensor:  # type: ignore[override]
        first, f_w, m_w, m_dw = _parzen_taps(moving_coords, fixed_coords, weights, bins)
        joint = _parzen_joint(first, f_w, m_w, bins)
        ctx.save_for_backward(first, *f_w, *m_dw)
        ctx.bins = bins
        return joint.to(moving_coords.dtype).view(moving_coords.shape[0], bins, bins)

    @staticmethod
    def backward(ctx, grad_joint: Tensor):  # type: ignore[override]
        first, *taps = ctx.saved_tensors
        flat = grad_joint.reshape(-1)
        return _parzen_gather(flat, first, list(taps[:4]), list(taps[4:]), ctx.bins), None, None, None


class _CompiledJointHistogram(torch.autograd.Function):
    """:class:`_SparseJointHistogram` by the compiled loops of :mod:`alignkit.spatial.compiled`
    (:func:`~alignkit.spatial.compiled.parzen_joint` / :func:`~alignkit.spatial.compiled.parzen_gather`):
    each sample's 16 bins added in place, per thread, instead of four ``bincount`` s over 4N indices, and
    the gather in one pass. float32 CPU coordinates; the torch form is the reference
    (``tests/test_losses.py``)."""

    @staticmethod
    def forward(ctx, moving_coords: Tensor, fixed_coords: Tensor, weights: Tensor, bins: int) -> Tensor:  # type: ignore[override]
        from alignkit.spatial import compiled

        arrays = tuple(t.detach().contiguous().numpy() for t in (moving_coords, fixed_coords, weights))
        ctx.arrays = arrays
        joint = compiled.parzen_joint(*arrays, bins)
        return torch.from_numpy(joint).to(moving_coords.dtype)

    @staticmethod
    def backward(ctx, grad_joint: Tensor):  # type: ignore[override]
        from alignkit.spatial import compiled

        grad = grad_joint.detach().to(torch.float32).contiguous().numpy()
        return torch.from_numpy(compiled.parzen_gather(*ctx.arrays, grad)), None, None, None


def _compiled_histogram_applies(*coords: Tensor) -> bool:
    """Whether the compiled joint histogram takes these ``(rows, N)`` coordinates: float32 on the CPU,
    numba installed and ``ALIGNKIT_COMPILED`` not ``0``."""
    from alignkit.spatial import compiled

    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in coords) and compiled.available()


class MattesMI(nn.Module):
    """Mattes mutual information; returns ``-MI`` (nats), to minimise.

    * Each image (per batch item, per channel) is mapped to ``[0, 1]`` by a robust min/max (the
      ``percentile`` and ``100 - percentile`` quantiles of the sampled voxels, mask ignored,
      clipped), unless a
      fixed ``fixed_range`` / ``moving_range`` is given. Like ITK, the range is a constant of the
      metric: no gradient flows through it.
    * Parzen windowing: a cubic B-spline kernel on the moving (``warped``) side, a cubic B-spline
      or a unit-width Gaussian (``fixed_kernel``) on the fixed side, over ``bins`` bins of which
      the two outer ones on each side are padding for the kernel support (as in ITK).
    * The joint histogram is ``W_f^T diag(mask) W_m`` with soft-assignment matrices
      ``(N, bins)``; with B-spline kernels on both sides each sample touches 4 x 4 bins and the
      histogram and its gradient are built from those alone (memory linear in voxels).
      ``samples`` draws that many voxels
      (without replacement, the same voxels for the whole batch) with ``generator`` if given to
      :meth:`forward`, else a fresh generator seeded with ``seed`` (same voxels on every call),
      else the global RNG (``seed=None``). ``samples=None`` uses every voxel.
    * Half inputs are processed in float32; logs use ``+ tiny`` so empty bins give 0, not NaN.
    Channels are treated independently and their MI averaged.
    """

    def __init__(
        self,
        *,
        bins: int = 32,
        samples: int | None = None,
        seed: int | None = 0,
        percentile: float = 0.5,
        fixed_kernel: ParzenKernel = "bspline",
        fixed_range: tuple[float, float] | None = None,
        moving_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if bins < 8:
            raise ConfigError(f"MattesMI needs bins >= 8 (4 are kernel padding), got {bins}")
        if samples is not None and samples < 1:
            raise ConfigError(f"MattesMI samples must be None or >= 1, got {samples}")
        if not 0.0 <= percentile < 50.0:
            raise ConfigError(f"MattesMI percentile must be in [0, 50), got {percentile}")
        if fixed_kernel not in get_args(ParzenKernel):
            raise ConfigError(f"fixed_kernel must be one of {get_args(ParzenKernel)}, got {fixed_kernel!r}")
        for name, rng in (("fixed_range", fixed_range), ("moving_range", moving_range)):
            if rng is not None and not rng[1] > rng[0]:
                raise ConfigError(f"{name} must be (low, high) with high > low, got {rng}")
        self.bins = int(bins)
        self.samples = samples
        self.seed = seed
        self.percentile = float(percentile)
        self.fixed_kernel: ParzenKernel = fixed_kernel
        self.fixed_range = fixed_range
        self.moving_range = moving_range

    def __getstate__(self) -> dict:
        # the fixed-side cache holds a weak reference, which neither pickles nor means anything elsewhere
        state = dict(self.__dict__)
        state.pop("_fixed_cache", None)
        return state

    def _bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The ``percentile`` and ``100 - percentile`` order statistics of ``x (B, C, N)`` along N
        (``kthvalue``'s, exactly): the k-th smallest is the largest of the k smallest, and ``topk`` of a
        tail is about twice as fast as ``kthvalue`` (100k samples: 0.85 against 1.58 ms for both bounds,
        measured) -- it ran for every MI evaluation, ~20 % of the multimodal preset on CT <-> MR.
        (Not ``torch.quantile``: it refuses inputs above 2^24 elements.)"""
        n = x.shape[-1]
        k_lo = min(n, round(self.percentile / 100.0 * (n - 1)) + 1)
        k_hi = min(n, round((1.0 - self.percentile / 100.0) * (n - 1)) + 1)
        if k_lo <= n // 20:
            lo = x.topk(k_lo, dim=-1, largest=False, sorted=False).values.amax(dim=-1, keepdim=True)
            hi = x.topk(n - k_hi + 1, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
            return lo, hi
        return x.kthvalue(k_lo, dim=-1, keepdim=True).values, x.kthvalue(k_hi, dim=-1, keepdim=True).values

    def _normalise(self, x: Tensor, value_range: tuple[float, float] | None) -> Tensor:
        """``x (B, C, N)`` -> ``[0, 1]`` per batch item and channel; the range is detached."""
        if value_range is not None:
            lo = torch.full_like(x[..., :1], value_range[0])
            hi = torch.full_like(x[..., :1], value_range[1])
        else:
            lo, hi = self._bounds(x.detach())
        scale = (hi - lo).clamp_min(torch.finfo(x.dtype).eps)
        return ((x - lo) / scale).clamp(0.0, 1.0)

    def _fixed_bins(self, y: Tensor, fixed: Tensor, index: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """The fixed samples' bin coordinates ``2 + (bins - 5) * normalised(y)``, made once per fixed
        image: an optimiser evaluates the metric hundreds of times against the same fixed image and
        the same samples (every voxel, or the seeded subset), and their percentiles cost as much as
        the moving side's. Recomputed when ``fixed`` is another tensor (held by a weak reference, so a
        freed image's address reused by a new one is never mistaken for it) or was modified in
        place, when the samples are drawn by a caller's generator, or when ``y`` carries a graph."""
        span = self.bins - 5
        if y.requires_grad or (index is not None and generator is not None):
            return 2.0 + span * self._normalise(y, self.fixed_range)
        key = (fixed._version, tuple(fixed.shape), y.dtype, y.shape, index is None, self.samples, self.seed,
               self.percentile, self.fixed_range, self.bins)
        cached = self.__dict__.get("_fixed_cache")
        if cached is not None and cached[0]() is fixed and cached[1] == key:
            return cached[2]
        ty = 2.0 + span * self._normalise(y, self.fixed_range)
        self.__dict__["_fixed_cache"] = (weakref.ref(fixed), key, ty)
        return ty

    def _parzen(self, t: Tensor, kernel: ParzenKernel) -> Tensor:
        """Soft assignment ``(..., N, bins)`` of bin coordinates ``t (..., N)``."""
        centres = torch.arange(self.bins, dtype=t.dtype, device=t.device)
        u = t.unsqueeze(-1) - centres
        if kernel == "bspline":
            return cubic_bspline(u)
        weights = torch.exp(-0.5 * u * u)
        return weights / weights.sum(dim=-1, keepdim=True)

    def forward(
        self,
        warped: Tensor,
        fixed: Tensor,
        mask: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        x, y, w, index = self._flat_samples(warped, fixed, mask, generator)
        dtype = x.dtype
        # Intensities -> continuous bin coordinates in [2, bins - 3]: two padding bins on each
        # side hold the support of the cubic kernel, so every sample's weights sum to 1.
        span = self.bins - 5
        tx = 2.0 + span * self._normalise(x, self.moving_range)
        ty = self._fixed_bins(y, fixed, index, generator)
        # the sparse histogram differentiates the warped side only; a learned fixed side (feature
        # images) or a mask that depends on the transform take the dense path
        if self.fixed_kernel == "bspline" and not (ty.requires_grad or w.requires_grad):
            batch, channels = tx.shape[:2]
            weights = w.expand_as(ty)
            histogram = _CompiledJointHistogram if _compiled_histogram_applies(tx, ty, weights) else _SparseJointHistogram
            joint = histogram.apply(
                tx.flatten(0, 1), ty.flatten(0, 1), weights.flatten(0, 1), self.bins
            ).view(batch, channels, self.bins, self.bins)
        else:
            wm = self._parzen(tx, "bspline")  # (B, C, N, bins)
            wf = self._parzen(ty, self.fixed_kernel) * w.unsqueeze(-1)
            joint = wf.transpose(-1, -2) @ wm  # (B, C, bins_f, bins_m)
        joint = joint / joint.sum(dim=(-1, -2), keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        p_f, p_m = joint.sum(dim=-1), joint.sum(dim=-2)
        tiny = torch.finfo(dtype).tiny
        # MI = H(f) + H(m) - H(f, m); p log p with +tiny is 0 for empty bins and NaN-free.

        def plogp(p: Tensor) -> Tensor:
            return (p * torch.log(p + tiny)).flatten(2).sum(-1)

        mi = plogp(joint) - plogp(p_f) - plogp(p_m)
        return (-mi.mean()).to(warped.dtype)

    def _flat_samples(
        self, warped: Tensor, fixed: Tensor, mask: Tensor | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(B, C, N)`` warped and fixed intensities and ``(B, 1, N)`` weights in the compute dtype, on
        the random subset of ``samples`` voxels when set (``index``; None when every voxel is used)."""
        mask = _check_pair(warped, fixed, mask)
        dtype = _compute_dtype(warped)
        x = warped.to(dtype).flatten(2)
        y = fixed.to(dtype).flatten(2)
        w = torch.ones_like(x[:, :1]) if mask is None else mask.to(dtype).flatten(2)
        n = x.shape[-1]
        index = None
        if self.samples is not None and self.samples < n:
            if generator is None and self.seed is not None:
                generator = torch.Generator(device=x.device).manual_seed(self.seed)
            index = torch.randperm(n, generator=generator, device=x.device)[: self.samples]
            x, y, w = x[..., index], y[..., index], w[..., index]
        return x, y, w, index

    @torch.no_grad()
    def value_and_gradient(
        self, warped: Tensor, fixed: Tensor, mask: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """The loss and its gradient with respect to ``warped``, in closed form (Mattes et al.'s
        analytic MI derivative): with ``p = J / S`` the normalised Parzen joint histogram and
        ``g = d MI / d p = log(p) - log(p_f) - log(p_m)`` (+ the ``tiny`` terms of :meth:`forward`),
        ``d MI / d J = (g - <p, g>) / S`` and each sample's derivative gathers its 4 x 4 bins with the
        moving kernel's derivative, times ``d t / d x`` of the intensity normalisation (0 where it
        clips). One pass forward, one gather back, no autograd graph -- the greedy update's fast path
        (``solve/engine.py``). The reference is autograd through :meth:`forward`
        (``tests/test_losses.py`` checks the two). B-spline kernels on both sides only (the default);
        ``fixed`` and ``mask`` are constants; with ``samples`` the gradient is zero off the sample."""
        if self.fixed_kernel != "bspline":
            raise ConfigError("MattesMI.value_and_gradient needs fixed_kernel='bspline'; use autograd through forward")
        shape = warped.shape
        x, y, w, index = self._flat_samples(warped, fixed, mask, generator)
        dtype, n = x.dtype, warped[0, 0].numel()
        span = self.bins - 5
        if self.moving_range is not None:
            lo = torch.full_like(x[..., :1], self.moving_range[0])
            hi = torch.full_like(x[..., :1], self.moving_range[1])
        else:
            lo, hi = self._bounds(x)
        scale = (hi - lo).clamp_min(torch.finfo(dtype).eps)
        u = (x - lo) / scale
        # clamp's derivative (1 on the closed interval, as autograd's) times the bin scale
        d_t = torch.where((u >= 0.0) & (u <= 1.0), span / scale, torch.zeros_like(u))
        tx = 2.0 + span * u.clamp(0.0, 1.0)
        ty = self._fixed_bins(y, fixed, index, generator)
        batch, channels = tx.shape[:2]
        bins = self.bins
        tx, ty = tx.flatten(0, 1), ty.flatten(0, 1)  # (rows, N)
        weights = w.expand(batch, channels, -1).flatten(0, 1)
        rows = tx.shape[0]
        first, f_w, m_w, m_dw = _parzen_taps(tx, ty, weights, bins)
        joint = _parzen_joint(first, f_w, m_w, bins)
        joint = joint.to(dtype).view(rows, bins, bins)
        tiny = torch.finfo(dtype).tiny
        total = joint.sum(dim=(-1, -2), keepdim=True)
        p = joint / total.clamp_min(tiny)
        p_f, p_m = p.sum(dim=-1), p.sum(dim=-2)

        def plogp(q: Tensor) -> Tensor:
            return (q * torch.log(q + tiny)).flatten(1).sum(-1)

        def d_plogp(q: Tensor) -> Tensor:
            return torch.log(q + tiny) + q / (q + tiny)

        mi = plogp(p) - plogp(p_f) - plogp(p_m)  # (rows,)
        g = d_plogp(p) - d_plogp(p_f).unsqueeze(-1) - d_plogp(p_m).unsqueeze(-2)
        inner = (p * g).flatten(1).sum(-1).view(rows, 1, 1)
        # through the normalisation p = J / max(S, tiny): no S-derivative where the clamp holds
        d_joint = torch.where(total > tiny, (g - inner) / total.clamp_min(tiny), g / tiny)
        d_joint = d_joint * (-1.0 / rows)  # loss = -mean over the rows of MI
        gradient = (_parzen_gather(d_joint.reshape(-1), first, f_w, m_dw, bins) * d_t.flatten(0, 1)).view(
            batch, channels, -1
        )
        if index is not None:
            full = torch.zeros(batch, channels, n, dtype=dtype, device=warped.device)
            full[..., index] = gradient
            gradient = full
        value = (-mi.mean()).to(warped.dtype)
        return value, gradient.view(shape).to(warped.dtype)


# -- registry ---------------------------------------------------------------------------------
_SIMILARITIES: dict[str, type[nn.Module]] = {
    "mse": MSE,
    "ncc": NCC,
    "lncc": LNCC,
    "mk-lncc": MultiKernelLNCC,
    "mi": MattesMI,
    "charbonnier": Charbonnier,
    "l1": L1,
}


def build_loss(cls: type[nn.Module], what: str, options: dict[str, object]) -> nn.Module:
    """``cls(**options)``, with unknown option names refused in one line that lists the valid ones
    (losses take keyword-only options, so the constructor's signature is the list)."""
    parameters = inspect.signature(cls.__init__).parameters
    valid = [p.name for p in parameters.values() if p.kind == inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for {what}; "
            f"valid options: {', '.join(valid) or 'none'}"
        )
    try:
        return cls(**options)
    except TypeError as exc:  # e.g. a list where a number belongs
        raise ConfigError(f"bad options for {what}: {str(exc).splitlines()[0]}") from None


def build_similarity(name: SimilarityName | str, **options: object) -> nn.Module:
    """Build a similarity loss by name (see :data:`SimilarityName`) with keyword options.

    An unknown name or option raises a one-line :class:`ConfigError` naming it and the choices."""
    key = str(name).lower()
    if key == "flow-data":  # optical-flow data terms live in flow_terms (imports this module)
        from alignkit.losses.flow_terms import FlowData

        _SIMILARITIES[key] = FlowData
    if key not in _SIMILARITIES:
        raise ConfigError(f"unknown similarity {name!r}; valid names: {', '.join(get_args(SimilarityName))}")
    return build_loss(_SIMILARITIES[key], f"similarity {key!r}", options)
