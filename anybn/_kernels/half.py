"""float16 for the compiled CPU kernels: exact conversions as Numba intrinsics.

Numba has no float16 on the CPU, so :mod:`anybn._kernels.numba_cpu` hands the kernels
float16 arrays as ``uint16`` views (the same memory) and reads and writes every
element through two helpers that the kernels call for every dtype:

* ``read(v)``: an element as a float; float16 bits (a ``uint16``) become the exact
  float32 value (normal, subnormal, inf, NaN);
* ``written(out, v)``: a value as an element of ``out``; for a ``uint16`` array the
  float32 rounded once to float16 bits, to nearest, ties to even (NumPy's
  ``astype``), overflow to inf, NaN kept (quiet, sign kept).

bfloat16 (torch tensors; NumPy has none) reaches the kernels the same way, as ``int16``
views: ``read`` widens its bits to the exact float32 value, ``written`` rounds a float32 to
nearest, ties to even (PyTorch's rounding), NaN kept quiet with its sign.

For float32/float64 arrays both are the identity, so one kernel source serves
every dtype and Numba compiles a version per dtype. The conversions are the CPU's
own where it has them (x86 F16C ``vcvtph2ps``/``vcvtps2ph``, AArch64 ``fcvt``),
else LLVM integer and float operations on 32-bit lanes, branch-free (selects), so
that the kernels' loops stay vectorised: F. Giesen's ``half_to_float_fast5`` and
``float_to_half_fast3_rtne`` (public domain, https://gist.github.com/rygorous/2156668).
Both give the same bits (NaN payloads aside).

Numba's on-disk cache of the kernels is keyed by ``cpu.py``'s source and timestamp only:
after an edit here, touch ``cpu.py`` (or delete ``anybn/_kernels/__pycache__``), or the
kernels cached before keep the old conversions.
"""

from __future__ import annotations

import platform
from typing import Any

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

__all__ = [
    "bfloat16_to_float",
    "float_to_bfloat16",
    "float_to_half",
    "half_to_float",
    "read",
    "soft_float_to_half",
    "soft_half_to_float",
    "written",
]

_I16, _I32, _F32 = ir.IntType(16), ir.IntType(32), ir.FloatType()


def _u32(v: int) -> ir.Constant:
    return ir.Constant(_I32, v)


def _f32(v: float) -> ir.Constant:
    return ir.Constant(_F32, v)


def _hardware(context: Any) -> bool:
    """Whether the target CPU converts half <-> float itself (x86 F16C, any AArch64).

    Then LLVM's ``fpext``/``fptrunc`` become ``vcvtph2ps``/``vcvtps2ph`` (8 or 16 values an
    instruction, round to nearest even, subnormals exact); elsewhere they would be libcalls
    that Numba's JIT may not resolve, so the integer code below runs instead. Numba keys its
    cache by CPU name and features: code compiled with F16C is never loaded without it.
    """
    features = str(getattr(context.codegen(), "_tm_features", ""))
    return "+f16c" in features.split(",") or platform.machine().lower() in ("arm64", "aarch64")


def _soft_half_to_float(b: ir.IRBuilder, h: Any) -> Any:
    """float16 bits -> float32 in integer and float32 operations, exact."""
    u = b.zext(h, _I32)
    # exponent and mantissa moved to float32's places, then the exponent rebased by a
    # multiply by 2^(127 - 15), exact also for subnormal halves (float32 normals then)
    f = b.fmul(b.bitcast(b.shl(b.and_(u, _u32(0x7FFF)), _u32(13)), _F32), _f32(2.0**112))
    bits = b.bitcast(f, _I32)
    infnan = b.fcmp_ordered(">=", f, _f32(65536.0))  # was 0x7c00 or above: inf or NaN
    bits = b.select(infnan, b.or_(bits, _u32(0x7F800000)), bits)
    sign = b.shl(b.and_(u, _u32(0x8000)), _u32(16))
    return b.bitcast(b.or_(bits, sign), _F32)


def _soft_float_to_half(b: ir.IRBuilder, f: Any) -> Any:
    """float32 -> float16 bits in integer and float32 operations, to nearest, ties to even."""
    u = b.bitcast(f, _I32)
    sign = b.and_(u, _u32(0x80000000))
    a = b.xor(u, sign)  # |f|
    # 65520 and above (rounds to inf), inf, NaN (made quiet)
    big = b.select(b.icmp_unsigned(">", a, _u32(0x7F800000)), _u32(0x7E00), _u32(0x7C00))
    # below 2^-14 (subnormal half): adding 0.5 rounds the mantissa in the FPU (even ties)
    tiny = b.sub(b.bitcast(b.fadd(b.bitcast(a, _F32), _f32(0.5)), _I32), _u32(0x3F000000))
    # normal: rebase the exponent and round the 13 dropped bits (+0xfff, +1 if odd)
    odd = b.and_(b.lshr(a, _u32(13)), _u32(1))
    normal = b.lshr(b.add(b.add(a, _u32(0xC8000FFF)), odd), _u32(13))
    o = b.select(b.icmp_unsigned("<", a, _u32(0x38800000)), tiny, normal)
    o = b.select(b.icmp_unsigned(">=", a, _u32(0x47800000)), big, o)
    return b.trunc(b.or_(o, b.lshr(sign, _u32(16))), _I16)


def _hard_half_to_float(b: ir.IRBuilder, h: Any) -> Any:
    return b.fpext(b.bitcast(h, ir.HalfType()), _F32)


def _hard_float_to_half(b: ir.IRBuilder, f: Any) -> Any:
    return b.bitcast(b.fptrunc(f, ir.HalfType()), _I16)


def _conversion(signature: Any, soft: Any, hard: Any, hardware: bool | None) -> Any:
    """An intrinsic that emits ``hard`` where the CPU converts itself (``hardware=None``) or
    always (``True``), else ``soft``."""

    @intrinsic
    def convert(typingctx: Any, v: Any) -> Any:
        def codegen(context: Any, b: ir.IRBuilder, sig: Any, args: Any) -> Any:
            if hardware is False or (hardware is None and not _hardware(context)):
                return soft(b, args[0])
            return hard(b, args[0])

        return signature, codegen

    return convert


def _bfloat16_to_float(b: ir.IRBuilder, h: Any) -> Any:
    """bfloat16 bits -> float32: the upper half of its bits, exact."""
    return b.bitcast(b.shl(b.zext(h, _I32), _u32(16)), _F32)


def _float_to_bfloat16(b: ir.IRBuilder, f: Any) -> Any:
    """float32 -> bfloat16 bits, to nearest, ties to even; NaN quiet, sign kept."""
    u = b.bitcast(f, _I32)
    odd = b.and_(b.lshr(u, _u32(16)), _u32(1))
    rounded = b.lshr(b.add(b.add(u, _u32(0x7FFF)), odd), _u32(16))
    nan = b.or_(b.lshr(u, _u32(16)), _u32(0x40))
    o = b.select(b.fcmp_unordered("uno", f, f), nan, rounded)
    return b.trunc(o, _I16)


@intrinsic
def bfloat16_to_float(typingctx: Any, v: Any) -> Any:
    """bfloat16 bits (an ``int16``) -> float32, exact; compiled code only."""

    def codegen(context: Any, b: ir.IRBuilder, sig: Any, args: Any) -> Any:
        return _bfloat16_to_float(b, args[0])

    return types.float32(types.int16), codegen


@intrinsic
def float_to_bfloat16(typingctx: Any, v: Any) -> Any:
    """float32 -> bfloat16 bits (an ``int16``), to nearest even; compiled code only."""

    def codegen(context: Any, b: ir.IRBuilder, sig: Any, args: Any) -> Any:
        return _float_to_bfloat16(b, args[0])

    return types.int16(types.float32), codegen


_TO_FLOAT = (types.float32(types.uint16), _soft_half_to_float, _hard_half_to_float)
_TO_HALF = (types.uint16(types.float32), _soft_float_to_half, _hard_float_to_half)
#: float16 bits (uint16) -> float32, exact; float32 -> float16 bits, to nearest even.
half_to_float, float_to_half = _conversion(*_TO_FLOAT, None), _conversion(*_TO_HALF, None)
#: The same in integer operations only (what CPUs without F16C run; the tests check both).
soft_half_to_float = _conversion(*_TO_FLOAT, False)
soft_float_to_half = _conversion(*_TO_HALF, False)


def read(v: Any) -> Any:
    """An array element as a float (float16 and bfloat16 bits converted); compiled code only."""
    raise NotImplementedError


def written(out: Any, v: Any) -> Any:
    """``v`` as an element of ``out`` (float16 bits for uint16, bfloat16 bits for int16);
    compiled code only."""
    raise NotImplementedError


@overload(read)
def _read(v):  # no annotations: Numba compares them with the implementation's
    if v == types.uint16:
        return lambda v: half_to_float(v)
    if v == types.int16:
        return lambda v: bfloat16_to_float(v)
    return lambda v: v


@overload(written)
def _written(out, v):
    if out.dtype == types.uint16:
        return lambda out, v: float_to_half(np.float32(v))
    if out.dtype == types.int16:
        return lambda out, v: float_to_bfloat16(np.float32(v))
    return lambda out, v: v
