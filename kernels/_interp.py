"""The Triton interpreter's bf16 arithmetic made an NVIDIA GPU's, so CPU tests see the GPU's bits.

The CPU tests run every kernel under TRITON_INTERPRET=1, and compare it to a
torch reference. Triton's interpreter (3.9) keeps bf16 as raw uint16 and
differs from the hardware in two places this project's kernels hit:

- fp32 -> bf16 casts (`.to(tl.bfloat16)`, a bf16 store of an fp32 value)
  truncate. A GPU's `cvt.rn.bf16.f32` rounds to nearest even, as torch does.
  Truncation is biased: an MoE whose per-pair outputs are stored in bf16 came
  out with ~1.8x the error of a bf16 reference that rounds more often, where
  on the GPU it is ~1x (kernels.check). Tests had to allow an ulp that a GPU
  never shows. Casts between bf16 and anything but fp32 went through numpy's
  astype on the raw uint16: wrong values.
- `tl.dot` on bf16 operands multiplies the raw uint16 codes (NOTES §4's
  "garbage"). Here both operands are widened exactly to fp32 first (a bf16
  product fits in fp32's mantissa) and accumulated in fp32, as the tensor
  cores do.

Every fp32 -> bf16 cast at the default rounding reaches the builder's
cast_impl (an explicit `fp_downcast_rounding="rtz"` goes elsewhere and
truncates, as asked). `install()` patches the builder class once; compiled
kernels never use it, so it changes nothing on a GPU. kernels._triton calls it on import.
tests/kernels/test_interp.py checks the casts bit for bit against torch.
"""

from __future__ import annotations

import numpy as np

_installed = False


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 values -> bf16 bit patterns (uint16), rounded to nearest even; NaN stays a (quiet) NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    nan = np.isnan(x)
    # add half an ulp, less one unless the kept lsb is odd (ties to even); a carry out of the mantissa
    # correctly bumps the exponent, up to inf. Only negative NaNs could overflow the add: masked off.
    r = (np.where(nan, 0, u) + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    r = np.where(nan, (u >> np.uint32(16)) | np.uint32(0x0040), r)
    return r.astype(np.uint16)


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> fp32 values, exactly (subnormals kept)."""
    return (np.ascontiguousarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def install() -> None:
    """Patch triton.runtime.interpreter.InterpreterBuilder's casts and dot (idempotent)."""
    global _installed
    if _installed:
        return
    import triton.language as tl
    try:  # written against 3.9's interpreter; another version's, without these hooks, stays as it is
        from triton.runtime import interpreter as it
        builder = it.InterpreterBuilder
        cast, dot, _ = builder.cast_impl, builder.create_dot, it.TensorHandle
    except (ImportError, AttributeError):
        _installed = True
        return
    bf16, f32 = tl.bfloat16, tl.float32

    def widen(h):
        return it.TensorHandle(bf16_bits_to_f32(h.data).reshape(np.shape(h.data)), f32)

    def cast_impl(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if s == bf16 and d != bf16:  # through fp32: exact, then the interpreter's own fp32 -> d
            w = widen(src)
            return w if d == f32 else cast(self, w, dst_type)
        if d == bf16 and s != bf16:  # (np.ascontiguousarray makes a scalar 1-d: shapes restored)
            w = src if s == f32 else cast(self, src, f32)  # ints, fp16, fp64: numpy's astype to fp32 first
            return it.TensorHandle(f32_to_bf16_bits(w.data).reshape(np.shape(w.data)), bf16)
        return cast(self, src, dst_type)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == bf16:
            a = widen(a)
        if b.dtype.scalar == bf16:
            b = widen(b)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.cast_impl, builder.create_dot = cast_impl, create_dot
    _installed = True
