"""The CuPy fast path: fused CUDA kernels for float32/float64 batch norm.

CuPy 14 has no cuDNN, and the generic array-API code launches a dozen
elementwise and reduction kernels per call, each reading or writing an
x-sized array. These kernels do the minimum number of passes over memory:

* forward (train): one read of x for the statistics (per-thread groups of 8
  values by two passes in registers, merged with Chan's formula across
  threads, blocks and, in float64, across the blocks of a channel), one read
  of x and one write of y;
* backward (train): one read of x and dy for ``sum(dy)`` and
  ``sum(dy * (x - mean))``, one read of both and one write of dx.

Layouts: x viewed without a copy as ``(N, C, S)`` with ``S > 1`` ("planes":
a block per ``(n, c)`` row, threads along the contiguous S), or ``(P, C)``
("rows", channels last: 32 channels per warp, coalesced). Other strides are
copied to C order first.

Numerics follow :mod:`anybn._numpy_kernels`: the mean is kept as a float32
``mean_hi`` plus the float64 remainder, y is ``(x - mean_hi) * scale + shift``
with the remainder folded into ``shift``, so offset data does not cancel.

float16 inputs take the generic path. The kernels compile with NVRTC on first
use (cached by CuPy). They are tested against the generic path wherever a GPU
is present (tests/test_fastpaths.py); this module is imported only for CuPy
arrays.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["backward", "forward", "supports"]

Array = Any

_SOURCE = r"""
template <typename A>
__device__ __forceinline__ void chan_merge(A& n, A& mean, A& m2, A nb, A meanb, A m2b) {
    if (nb == (A)0) return;
    const A tot = n + nb;
    const A delta = meanb - mean;
    const A f = nb / tot;
    mean += delta * f;
    m2 += m2b + delta * delta * n * f;
    n = tot;
}

// Welford/Chan state of up to G values p[0], p[stride], ..., p[(k-1)*stride]:
// two passes in registers, then one merge into (n, mean, m2).
template <typename T, typename A, int G>
__device__ __forceinline__ void accumulate(const T* __restrict__ p, long long stride, int k,
                                           A& n, A& mean, A& m2) {
    A v[G];
    A s = 0;
#pragma unroll
    for (int j = 0; j < G; ++j) {
        if (j < k) { v[j] = (A)p[j * stride]; s += v[j]; }
    }
    const A m = s / (A)k;
    A q = 0;
#pragma unroll
    for (int j = 0; j < G; ++j) {
        if (j < k) { const A d = v[j] - m; q += d * d; }
    }
    chan_merge(n, mean, m2, (A)k, m, q);
}

template <typename A>
__device__ __forceinline__ void warp_merge(A& n, A& mean, A& m2) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const A nb = __shfl_down_sync(0xffffffffu, n, off);
        const A mb = __shfl_down_sync(0xffffffffu, mean, off);
        const A qb = __shfl_down_sync(0xffffffffu, m2, off);
        chan_merge(n, mean, m2, nb, mb, qb);
    }
}

template <typename A>
__device__ __forceinline__ void warp_sum2(A& a, A& b) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        a += __shfl_down_sync(0xffffffffu, a, off);
        b += __shfl_down_sync(0xffffffffu, b, off);
    }
}

// Row/column range of block b of B over a channel's (N, S) values.
__device__ __forceinline__ void split(long long N, long long S, int b, int B,
                                      long long& n0, long long& n1, long long& s0, long long& s1) {
    if (N >= B) { n0 = N * b / B; n1 = N * (b + 1) / B; s0 = 0; s1 = S; }
    else { n0 = 0; n1 = N; s0 = S * b / B; s1 = S * (b + 1) / B; }
}

#define GROUP 8

// ---- planes: x is (N, C, S); grid (C, B); blockDim.x a multiple of 32, <= 1024 ----

template <typename T, typename A>
__global__ void stats_planes(const T* __restrict__ x, long long N, long long C, long long S,
                             A* __restrict__ part) {
    const long long c = blockIdx.x;
    const int b = blockIdx.y, B = gridDim.y;
    long long n0, n1, s0, s1;
    split(N, S, b, B, n0, n1, s0, s1);
    A n = 0, mean = 0, m2 = 0;
    const long long nt = blockDim.x;
    for (long long r = n0; r < n1; ++r) {
        const T* row = x + (r * C + c) * S;
        for (long long s = s0 + threadIdx.x; s < s1; s += nt * GROUP) {
            const long long left = (s1 - s + nt - 1) / nt;
            accumulate<T, A, GROUP>(row + s, nt, left < GROUP ? (int)left : GROUP, n, mean, m2);
        }
    }
    warp_merge(n, mean, m2);
    __shared__ A sh[3][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if (lane == 0) { sh[0][warp] = n; sh[1][warp] = mean; sh[2][warp] = m2; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < nwarps; ++w) chan_merge(n, mean, m2, sh[0][w], sh[1][w], sh[2][w]);
        part[(b * 3 + 0) * C + c] = n;
        part[(b * 3 + 1) * C + c] = mean;
        part[(b * 3 + 2) * C + c] = m2;
    }
}

template <typename T, typename A>
__global__ void sums_planes(const T* __restrict__ dy, const T* __restrict__ x,
                            const T* __restrict__ mean, long long N, long long C, long long S,
                            A* __restrict__ part) {
    const long long c = blockIdx.x;
    const int b = blockIdx.y, B = gridDim.y;
    long long n0, n1, s0, s1;
    split(N, S, b, B, n0, n1, s0, s1);
    const A m = (A)mean[c];
    A sdy = 0, sdc = 0;
    for (long long r = n0; r < n1; ++r) {
        const long long base = (r * C + c) * S;
#pragma unroll 4
        for (long long s = s0 + threadIdx.x; s < s1; s += blockDim.x) {
            const A g = (A)dy[base + s];
            sdy += g;
            sdc += g * ((A)x[base + s] - m);
        }
    }
    warp_sum2(sdy, sdc);
    __shared__ A sh[2][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if (lane == 0) { sh[0][warp] = sdy; sh[1][warp] = sdc; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < nwarps; ++w) { sdy += sh[0][w]; sdc += sh[1][w]; }
        part[(b * 2 + 0) * C + c] = sdy;
        part[(b * 2 + 1) * C + c] = sdc;
    }
}

// y = (x - centre) * scale + shift, one block per (n, c) row
template <typename T, typename A>
__global__ void affine_planes(const T* __restrict__ x, T* __restrict__ y, long long C, long long S,
                              const A* __restrict__ centre, const A* __restrict__ scale,
                              const A* __restrict__ shift) {
    const long long row = blockIdx.x;
    const long long c = row % C;
    const A m = centre[c], a = scale[c], sh = shift[c];
    const T* xr = x + row * S;
    T* yr = y + row * S;
#pragma unroll 4
    for (long long s = threadIdx.x; s < S; s += blockDim.x) {
        yr[s] = (T)(((A)xr[s] - m) * a + sh);
    }
}

// dx = (dy - mdy) * scale + (x - mean) * negk, one block per (n, c) row
template <typename T, typename A>
__global__ void grad_planes(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                            long long C, long long S, const A* __restrict__ mean,
                            const A* __restrict__ negk, const A* __restrict__ mdy,
                            const A* __restrict__ scale) {
    const long long row = blockIdx.x;
    const long long c = row % C;
    const A m = mean[c], k = negk[c], g0 = mdy[c], a = scale[c];
    const long long base = row * S;
#pragma unroll 4
    for (long long s = threadIdx.x; s < S; s += blockDim.x) {
        dx[base + s] = (T)(((A)dy[base + s] - g0) * a + ((A)x[base + s] - m) * k);
    }
}

// ---- rows: x is (P, C), channels contiguous; block (32, 8) ----

// grid (ceil(C / 32), B): 32 channels per warp, rows split over the B blocks and 8 warps
template <typename T, typename A>
__global__ void stats_rows(const T* __restrict__ x, long long P, long long C,
                           A* __restrict__ part) {
    const long long c = (long long)blockIdx.x * 32 + threadIdx.x;
    const int b = blockIdx.y, B = gridDim.y;
    const long long p0 = P * b / B, p1 = P * (b + 1) / B;
    A n = 0, mean = 0, m2 = 0;
    if (c < C) {
        for (long long p = p0 + threadIdx.y; p < p1; p += 8 * GROUP) {
            const long long left = (p1 - p + 7) / 8;
            accumulate<T, A, GROUP>(x + p * C + c, 8 * C, left < GROUP ? (int)left : GROUP,
                                    n, mean, m2);
        }
    }
    __shared__ A sh[3][8][32];
    sh[0][threadIdx.y][threadIdx.x] = n;
    sh[1][threadIdx.y][threadIdx.x] = mean;
    sh[2][threadIdx.y][threadIdx.x] = m2;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        const int t = threadIdx.x;
        for (int j = 1; j < 8; ++j) chan_merge(n, mean, m2, sh[0][j][t], sh[1][j][t], sh[2][j][t]);
        part[(b * 3 + 0) * C + c] = n;
        part[(b * 3 + 1) * C + c] = mean;
        part[(b * 3 + 2) * C + c] = m2;
    }
}

template <typename T, typename A>
__global__ void sums_rows(const T* __restrict__ dy, const T* __restrict__ x,
                          const T* __restrict__ mean, long long P, long long C,
                          A* __restrict__ part) {
    const long long c = (long long)blockIdx.x * 32 + threadIdx.x;
    const int b = blockIdx.y, B = gridDim.y;
    const long long p0 = P * b / B, p1 = P * (b + 1) / B;
    A sdy = 0, sdc = 0;
    if (c < C) {
        const A m = (A)mean[c];
#pragma unroll 4
        for (long long p = p0 + threadIdx.y; p < p1; p += 8) {
            const A g = (A)dy[p * C + c];
            sdy += g;
            sdc += g * ((A)x[p * C + c] - m);
        }
    }
    __shared__ A sh[2][8][32];
    sh[0][threadIdx.y][threadIdx.x] = sdy;
    sh[1][threadIdx.y][threadIdx.x] = sdc;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        for (int j = 1; j < 8; ++j) { sdy += sh[0][j][threadIdx.x]; sdc += sh[1][j][threadIdx.x]; }
        part[(b * 2 + 0) * C + c] = sdy;
        part[(b * 2 + 1) * C + c] = sdc;
    }
}

// grid (ceil(P / 64), ceil(C / 32)): 64 rows by 32 channels per block
template <typename T, typename A>
__global__ void affine_rows(const T* __restrict__ x, T* __restrict__ y, long long P, long long C,
                            const A* __restrict__ centre, const A* __restrict__ scale,
                            const A* __restrict__ shift) {
    const long long c = (long long)blockIdx.y * 32 + threadIdx.x;
    if (c >= C) return;
    const A m = centre[c], a = scale[c], sh = shift[c];
    const long long p0 = (long long)blockIdx.x * 64;
    const long long p1 = p0 + 64 < P ? p0 + 64 : P;
#pragma unroll 4
    for (long long p = p0 + threadIdx.y; p < p1; p += 8) {
        y[p * C + c] = (T)(((A)x[p * C + c] - m) * a + sh);
    }
}

template <typename T, typename A>
__global__ void grad_rows(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                          long long P, long long C, const A* __restrict__ mean,
                          const A* __restrict__ negk, const A* __restrict__ mdy,
                          const A* __restrict__ scale) {
    const long long c = (long long)blockIdx.y * 32 + threadIdx.x;
    if (c >= C) return;
    const A m = mean[c], k = negk[c], g0 = mdy[c], a = scale[c];
    const long long p0 = (long long)blockIdx.x * 64;
    const long long p1 = p0 + 64 < P ? p0 + 64 : P;
#pragma unroll 4
    for (long long p = p0 + threadIdx.y; p < p1; p += 8) {
        const long long i = p * C + c;
        dx[i] = (T)(((A)dy[i] - g0) * a + ((A)x[i] - m) * k);
    }
}

// ---- per channel: merge the B partials in double ----

// out: mean (T), invstd (T), var_unbiased (double), centre (A), scale (A), shift (A)
template <typename T, typename A>
__global__ void finish_stats(const A* __restrict__ part, int B, long long C, double eps,
                             const T* __restrict__ weight, const T* __restrict__ bias,
                             int has_weight, int has_bias,
                             T* __restrict__ mean_out, T* __restrict__ invstd_out,
                             double* __restrict__ unbiased_out,
                             A* __restrict__ centre, A* __restrict__ scale, A* __restrict__ shift) {
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double n = 0, mean = 0, m2 = 0;
    for (int b = 0; b < B; ++b) {
        chan_merge(n, mean, m2, (double)part[(b * 3 + 0) * C + c],
                   (double)part[(b * 3 + 1) * C + c], (double)part[(b * 3 + 2) * C + c]);
    }
    const double var = m2 / n;
    const double invstd = 1.0 / sqrt(var + eps);
    const double s = has_weight ? invstd * (double)weight[c] : invstd;
    const A hi = (A)mean;              // x - hi is exact for data near its mean
    const double lo = mean - (double)hi;
    mean_out[c] = (T)mean;
    invstd_out[c] = (T)invstd;
    unbiased_out[c] = n > 1 ? m2 / (n - 1) : 0.0;
    centre[c] = hi;
    scale[c] = (A)s;
    shift[c] = (A)((has_bias ? (double)bias[c] : 0.0) - lo * s);
}

// out: dweight, dbias (T); negk, mdy, scale, mean (A) for the dx kernels
template <typename T, typename A>
__global__ void finish_sums(const A* __restrict__ part, int B, long long C, double count,
                            const T* __restrict__ weight, int has_weight,
                            const T* __restrict__ mean, const T* __restrict__ invstd, int training,
                            T* __restrict__ dweight, T* __restrict__ dbias,
                            A* __restrict__ mean_a, A* __restrict__ negk, A* __restrict__ mdy,
                            A* __restrict__ scale) {
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double sdy = 0, sdc = 0;
    for (int b = 0; b < B; ++b) {
        sdy += (double)part[(b * 2 + 0) * C + c];
        sdc += (double)part[(b * 2 + 1) * C + c];
    }
    const double inv = (double)invstd[c];
    const double sum_dy_xhat = inv * sdc;
    const double s = has_weight ? inv * (double)weight[c] : inv;
    dweight[c] = (T)sum_dy_xhat;
    dbias[c] = (T)sdy;
    mean_a[c] = (A)mean[c];
    scale[c] = (A)s;
    negk[c] = training ? (A)(-(s * inv * sum_dy_xhat) / count) : (A)0;
    mdy[c] = training ? (A)(sdy / count) : (A)0;
}
"""

_TYPES = {"float32": ("float", "float"), "float64": ("double", "double")}
_KERNELS = (
    "stats_planes",
    "sums_planes",
    "affine_planes",
    "grad_planes",
    "stats_rows",
    "sums_rows",
    "affine_rows",
    "grad_rows",
    "finish_stats",
    "finish_sums",
)
_modules: dict[int, Any] = {}


def _kernel(name: str, dtype: Any) -> Any:
    """The compiled kernel ``name<T, A>`` for ``dtype`` on the current device."""
    import cupy

    device = cupy.cuda.Device().id
    module = _modules.get(device)
    if module is None:
        names = [f"{k}<{t}, {a}>" for k in _KERNELS for t, a in _TYPES.values()]
        module = cupy.RawModule(code=_SOURCE, options=("-std=c++14",), name_expressions=names)
        _modules[device] = module
    t, a = _TYPES[str(dtype)]
    return module.get_function(f"{name}<{t}, {a}>")


def supports(x: Array) -> bool:
    """float32/float64 CuPy arrays with values."""
    return str(x.dtype) in _TYPES and x.size > 0


def _layout(x: Array, axis: int) -> tuple[Array, bool, int, int, int] | None:
    """``(contiguous x, planes, outer, C, inner)`` or None if x must be copied."""
    import cupy

    shape = tuple(int(s) for s in x.shape)
    channels = shape[axis]
    if x.flags.c_contiguous:
        outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
        return x, inner > 1, outer, channels, inner
    moved = cupy.moveaxis(x, axis, -1)
    if moved.flags.c_contiguous:
        return x, False, x.size // channels, channels, 1
    return None


def _empty_like_layout(x: Array, planes: bool, axis: int, dtype: Any) -> Array:
    """A new array of x's shape whose memory order is that of x's canonical view."""
    import cupy

    if planes or x.flags.c_contiguous:
        return cupy.empty(x.shape, dtype=dtype)
    shape = tuple(x.shape)
    moved_shape = (*shape[:axis], *shape[axis + 1 :], shape[axis])
    return cupy.moveaxis(cupy.empty(moved_shape, dtype=dtype), -1, axis)


def _splits(channels: int, outer: int, inner: int, planes: bool) -> int:
    """Blocks per channel (or per 32-channel tile) for the reductions: ~4096 blocks in all."""
    tiles = channels if planes else -(-channels // 32)
    per_channel = outer * inner
    return max(1, min(-(-4096 // tiles), per_channel // 2048 or 1, 65535))


def _threads(inner: int) -> int:
    return int(min(256, max(32, -(-inner // 32) * 32)))


def _as(a: Array, dtype: Any) -> Array:
    return a if a.dtype == dtype else a.astype(dtype)


def forward(
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    axis: int,
) -> tuple[Array, ...] | None:
    """``(y, mean, invstd, new_running_mean, new_running_var)``, or None (float16)."""
    import cupy

    if not supports(x):
        return None
    layout = _layout(x, axis)
    if layout is None:
        x = cupy.ascontiguousarray(x)
        layout = _layout(x, axis)
        assert layout is not None
    x, planes, outer, channels, inner = layout
    dtype = x.dtype
    y = _empty_like_layout(x, planes, axis, dtype)
    i64 = np.int64
    if training:
        splits = _splits(channels, outer, inner, planes)
        part = cupy.empty((splits, 3, channels), dtype=dtype)
        if planes:
            _kernel("stats_planes", dtype)(
                (channels, splits),
                (_threads(inner),),
                (x, i64(outer), i64(channels), i64(inner), part),
            )
        else:
            _kernel("stats_rows", dtype)(
                (-(-channels // 32), splits), (32, 8), (x, i64(outer), i64(channels), part)
            )
        mean = cupy.empty(channels, dtype=dtype)
        invstd = cupy.empty(channels, dtype=dtype)
        unbiased = cupy.empty(channels, dtype=np.float64)
        centre = cupy.empty(channels, dtype=dtype)
        scale = cupy.empty(channels, dtype=dtype)
        shift = cupy.empty(channels, dtype=dtype)
        unused = cupy.zeros(1, dtype=dtype)  # stands in for a missing weight or bias
        w = unused if weight is None else _as(weight, dtype)
        b = unused if bias is None else _as(bias, dtype)
        _kernel("finish_stats", dtype)(
            (-(-channels // 128),),
            (128,),
            (
                part, np.int32(splits), i64(channels), np.float64(eps), w, b,
                np.int32(weight is not None), np.int32(bias is not None),
                mean, invstd, unbiased, centre, scale, shift,
            ),
        )  # fmt: skip
    else:
        assert running_mean is not None and running_var is not None
        mean = _as(running_mean, dtype)
        invstd = 1.0 / cupy.sqrt(_as(running_var, dtype) + eps)
        centre = mean
        scale = invstd if weight is None else invstd * _as(weight, dtype)
        shift = cupy.zeros(channels, dtype=dtype) if bias is None else _as(bias, dtype)
    if planes:
        _kernel("affine_planes", dtype)(
            (outer * channels,),
            (_threads(inner),),
            (x, y, i64(channels), i64(inner), centre, scale, shift),
        )
    else:
        _kernel("affine_rows", dtype)(
            (-(-outer // 64), -(-channels // 32)),
            (32, 8),
            (x, y, i64(outer), i64(channels), centre, scale, shift),
        )
    new_rm, new_rv = running_mean, running_var
    if training and running_mean is not None and running_var is not None:
        new_rm = ((1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean).astype(
            running_mean.dtype
        )
        new_rv = ((1.0 - momentum) * running_var.astype(np.float64) + momentum * unbiased).astype(
            running_var.dtype
        )
    return y, mean, invstd, new_rm, new_rv


def backward(
    dy: Array,
    x: Array,
    weight: Array | None,
    mean: Array,
    invstd: Array,
    *,
    training: bool,
    axis: int,
) -> tuple[Array, Array, Array] | None:
    """``(dx, dweight, dbias)``, or None (float16)."""
    import cupy

    if not supports(x):
        return None
    layout = _layout(x, axis)
    if layout is None:
        x = cupy.ascontiguousarray(x)
        layout = _layout(x, axis)
        assert layout is not None
    x, planes, outer, channels, inner = layout
    dtype = x.dtype
    dx = _empty_like_layout(x, planes, axis, dtype)
    if dy.dtype != dtype or dy.strides != x.strides:
        dy_like = _empty_like_layout(x, planes, axis, dtype)
        dy_like[...] = dy
        dy = dy_like
    mean = _as(mean, dtype)
    invstd = _as(invstd, dtype)
    i64 = np.int64
    splits = _splits(channels, outer, inner, planes)
    part = cupy.empty((splits, 2, channels), dtype=dtype)
    if planes:
        _kernel("sums_planes", dtype)(
            (channels, splits),
            (_threads(inner),),
            (dy, x, mean, i64(outer), i64(channels), i64(inner), part),
        )
    else:
        _kernel("sums_rows", dtype)(
            (-(-channels // 32), splits), (32, 8), (dy, x, mean, i64(outer), i64(channels), part)
        )
    dweight = cupy.empty(channels, dtype=dtype)
    dbias = cupy.empty(channels, dtype=dtype)
    mean_a = cupy.empty(channels, dtype=dtype)
    negk = cupy.empty(channels, dtype=dtype)
    mdy = cupy.empty(channels, dtype=dtype)
    scale = cupy.empty(channels, dtype=dtype)
    w = cupy.zeros(1, dtype=dtype) if weight is None else _as(weight, dtype)
    _kernel("finish_sums", dtype)(
        (-(-channels // 128),),
        (128,),
        (
            part, np.int32(splits), i64(channels), np.float64(outer * inner), w,
            np.int32(weight is not None), mean, invstd, np.int32(training),
            dweight, dbias, mean_a, negk, mdy, scale,
        ),
    )  # fmt: skip
    if training:
        if planes:
            _kernel("grad_planes", dtype)(
                (outer * channels,),
                (_threads(inner),),
                (dy, x, dx, i64(channels), i64(inner), mean_a, negk, mdy, scale),
            )
        else:
            _kernel("grad_rows", dtype)(
                (-(-outer // 64), -(-channels // 32)),
                (32, 8),
                (dy, x, dx, i64(outer), i64(channels), mean_a, negk, mdy, scale),
            )
    else:  # dx = dy * scale: the affine kernel with centre 0 and shift 0
        zeros = cupy.zeros(channels, dtype=dtype)
        if planes:
            _kernel("affine_planes", dtype)(
                (outer * channels,),
                (_threads(inner),),
                (dy, dx, i64(channels), i64(inner), zeros, scale, zeros),
            )
        else:
            _kernel("affine_rows", dtype)(
                (-(-outer // 64), -(-channels // 32)),
                (32, 8),
                (dy, dx, i64(outer), i64(channels), zeros, scale, zeros),
            )
    return dx, dweight, dbias
