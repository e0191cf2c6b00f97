"""Quantized weight matrices: their byte forms, exact dequantization, and the kernels that multiply by them.

A quantized matrix W [N, K] is HQQ's affine group quantization along K (axis=1): `W = (q - z) * s`, one (s, z) per
`group_size` consecutive weights of a row. It is stored under a name prefix `m` in one of two forms:

- "int4pack": torch's CPU int4 weight-only layout, ready for `aten._weight_int4pack_mm_for_cpu`:
  `m.q` uint8 [N, K/2] and `m.sz` [K/g, N, 2] (scale, zero_t = (8 - z) * s) in the kernel's activation dtype.
  A cache load is one copy; the kernel reads the slot directly.
- "bitpack": the q values bit-packed (8 bits: raw; 4: two per byte; 3: eight per three bytes; 2: four per byte) in
  `m.q`, with `m.scale`/`m.zero` [N, K/g] (16/32-bit) or, with 8-bit meta quantization, `m.scale_q`/`m.zero_q`
  uint8 [N, K/g] plus `m.scale_mm`/`m.zero_mm` float32 [groups of 128, 2] (min, step).

`dequantize` defines the exact math (float32) every kernel must reproduce; tests build their reference from it.
This module owns the byte forms and that math only (bit packing and 8-bit meta quantization are `bitpacking.py`):
the kernels that multiply are in `kernels/` (`torch_cpu.py`, `native.py`, `cuda.py`), the choice between them in
`kernels/choice.py`. It knows nothing about experts, caches or files.
"""

from __future__ import annotations

import os

import torch

from .bitpacking import (
    bitpack,
    bitunpack,
    dequantize_meta,
    dequantize_meta_blocks,
    int4_offset,
    lut_unpack,
    nibble_planes,
    packed_numel,
    quantize_meta,
    quantize_meta_blocks,
)

INT4_GROUPS = (32, 64, 128, 256)  # group sizes torch's CPU int4 kernel accepts
# -- one matrix: quantize, store, dequantize ---------------------------------------------------------------------
def hqq_quantize(w: torch.Tensor, bits: int, group_size: int,
                 method: str = "hqq") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ group quantization (axis=1) -> q uint8 [N, K], scale [N, K/g] float32, zero [N, K/g] float32 (on the CPU).

    `method` "hqq": HQQ's optimizer of the zero-points (our vectorized solver, `optimizer.py`); "rtn": round to
    nearest from the group's min/max (HQQ's starting point). It runs on the CPU unless `MIXTRAL_OFFLOAD_QUANT_DEVICE`
    names another device (e.g. "cuda")."""
    from .optimizer import quantize_groups

    return quantize_groups(w, bits, group_size, method, os.environ.get("MIXTRAL_OFFLOAD_QUANT_DEVICE", "cpu"))


def _padded_parts(buf: torch.Tensor, n: int, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For int4pack bytes of a group-16 matrix padded to [N, 2K] (each 16-column group followed by 16 zero-activation
    columns): (real, padding) views of `buf` (uint8, N*K bytes). torch's CPU layout keeps columns contiguous: 32 bytes
    per column for each 64-row block, then r/2 bytes per column for the r = N % 64 remaining rows."""
    nb, r = n // 64, n % 64
    parts = []
    if nb:
        blk = buf[: nb * 64 * k].view(nb, k // 16, 2, 16 * 32)
        parts.append((blk[:, :, 0], blk[:, :, 1]))
    if r:
        rest = buf[nb * 64 * k:].view(k // 16, 2, 16 * r // 2)
        parts.append((rest[:, 0], rest[:, 1]))
    return parts


def pad16_pack(q: torch.Tensor, offset: int) -> torch.Tensor:
    """q [N, K] (group 16) -> the int4pack bytes of its real columns only (N*K/2 bytes), in padded-layout order."""
    n, k = q.shape
    padded = torch.zeros(n, 2 * k, dtype=torch.int32)
    padded.view(n, k // 16, 2, 16)[:, :, 0] = q.to(torch.int32).view(n, k // 16, 16) + offset
    full = torch.ops.aten._convert_weight_to_int4pack_for_cpu(padded, 2).reshape(-1)
    return torch.cat([real.reshape(-1) for real, _ in _padded_parts(full, n, k)])


def pad16_unpack(real: torch.Tensor, n: int, k: int, out: torch.Tensor) -> torch.Tensor:
    """Inverse of `pad16_pack` into `out` (N*K bytes, the padded int4pack matrix). Padding bytes keep whatever they
    held: they only ever meet zero activations."""
    done = 0
    for dst, _ in _padded_parts(out, n, k):
        size = dst.numel()
        dst.copy_(real[done:done + size].view(dst.shape))
        done += size
    return out


def int4_pad16_ok(shape: tuple[int, int], group_size: int) -> bool:
    """Group-16 matrices run exactly on the int4 kernel (group 32) with zero-padded activations."""
    n, k = shape
    return group_size == 16 and n % 16 == 0 and k % 16 == 0


def int4_ok(shape: tuple[int, int], group_size: int) -> bool:
    """Whether torch's CPU int4 kernel can run this matrix exactly."""
    n, k = shape
    return group_size in INT4_GROUPS and n % 16 == 0 and k % group_size == 0 and k % 2 == 0


def int4_scale_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
    """HQQ (s, z) [N, G] -> int4 kernel's [G, N, 2] for values stored as q + offset: w = (q + offset - 8) s + zero_t.

    zero_t = (8 - offset - z) s. Centring 2/3-bit values (offset 6 / 4) keeps zero_t small, so rounding it to bf16
    costs less than with offset 0.
    """
    s, z = scale.float(), zero.float()
    return torch.stack([s, (8 - offset - z) * s], dim=-1).transpose(0, 1).contiguous().to(dtype)


def _block_meta(prefix: str, scale: torch.Tensor, zero: torch.Tensor) -> dict[str, torch.Tensor]:
    """8-bit scales and zeros quantized in the CPU kernels' block order (`quantize_meta_blocks`)."""
    bq, bmm = quantize_meta_blocks(scale)
    zbq, zbmm = quantize_meta_blocks(zero)
    return {f"{prefix}.scale_qb": bq, f"{prefix}.scale_mmb": bmm, f"{prefix}.zero_qb": zbq, f"{prefix}.zero_mmb": zbmm}


def store_matrix(prefix: str, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                 group_size: int, form: str, meta_dtype: torch.dtype, quant_scales: bool) -> dict[str, torch.Tensor]:
    """The tensors of one matrix in `form` ("int4pack" or "bitpack"), names prefixed by `prefix.`."""
    scale_raw, zero_raw = scale, zero
    if quant_scales:  # both forms honour the 8-bit meta: it changes the values the kernel uses
        sq, smm = quantize_meta(scale)
        zq, zmm = quantize_meta(zero)
        scale, zero = dequantize_meta(sq, smm), dequantize_meta(zq, zmm)
    else:
        scale, zero = scale.to(meta_dtype), zero.to(meta_dtype)
    act = torch.float32 if meta_dtype == torch.float32 else torch.bfloat16
    if form in ("int4lut", "int4lut16"):
        offset = int4_offset(bits)
        tag = "p" if form == "int4lut16" else ""  # the same planes (see `nibble_planes`), named per form
        planes = {f"{prefix}.{tag}{name}": t for name, t in nibble_planes(q, bits).items()}
        if quant_scales:  # 8-bit scales and zeros in the kernel's row order, one (min, step) per 64 rows and group
            return planes | _block_meta(prefix, scale_raw, zero_raw)
        return planes | {f"{prefix}.sz": int4_scale_zeros(scale, zero, act, offset)}
    if form == "int4pack":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
        return {f"{prefix}.q": packed, f"{prefix}.sz": int4_scale_zeros(scale, zero, act)}
    out = {f"{prefix}.q": bitpack(q, bits)}
    if quant_scales and bits in (2, 3):  # the 8-bit meta the CPU's planes store: the same weights on every device
        out.update(_block_meta(prefix, scale_raw, zero_raw))
    elif quant_scales:
        out.update({f"{prefix}.scale_q": sq, f"{prefix}.scale_mm": smm,
                    f"{prefix}.zero_q": zq, f"{prefix}.zero_mm": zmm})
    else:
        out.update({f"{prefix}.scale": scale, f"{prefix}.zero": zero})
    return out


def int4pack_values(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of torch's CPU int4 packing: uint8 [N, K/2] -> q uint8 [N, K].

    Rows come in blocks of 64: byte [b, k, j] holds row b*64+j in its low nibble and row b*64+32+j in its high one;
    the remaining r = N % 64 rows follow as bytes [k, j] holding rows 2j (low) and 2j+1 (high). Derived by probing
    `_convert_weight_to_int4pack_for_cpu` and checked against it in the tests.
    """
    flat = packed.reshape(-1)
    nb, r = n // 64, n % 64
    parts = []
    if nb:
        blk = flat[: nb * 64 * k // 2].view(nb, k, 32)  # [B, K, 32]
        lo, hi = (blk & 15).transpose(1, 2), (blk >> 4).transpose(1, 2)  # [B, 32, K]
        parts.append(torch.cat([lo, hi], dim=1).reshape(nb * 64, k))
    if r:
        rest = flat[nb * 64 * k // 2:].view(k, r // 2)
        parts.append(torch.stack([(rest & 15).t(), (rest >> 4).t()], dim=1).reshape(r, k))
    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]


def matrix_meta(views: dict[str, torch.Tensor], prefix: str, shape: tuple[int, int],
                bits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) float32 [N, G] of a stored matrix, whatever its form (the `szt` meta needs `bits`)."""
    if f"{prefix}.szt" in views:
        if bits is None:
            msg = f"{prefix}.szt: the zero point depends on the bit width; pass bits"
            raise ValueError(msg)
        szt = views[f"{prefix}.szt"].float()  # [G, N, 2]
        s, zt = szt[..., 0].t(), szt[..., 1].t()
        return s, (1 << (bits - 1)) - zt / torch.where(s == 0, torch.ones_like(s), s)
    if f"{prefix}.sz" in views:
        sz = views[f"{prefix}.sz"].float()  # [G, N, 2]
        s, zt = sz[..., 0].t(), sz[..., 1].t()
        return s, 8 - zt / torch.where(s == 0, torch.ones_like(s), s)
    if f"{prefix}.scale_q" in views:
        return (dequantize_meta(views[f"{prefix}.scale_q"], views[f"{prefix}.scale_mm"]),
                dequantize_meta(views[f"{prefix}.zero_q"], views[f"{prefix}.zero_mm"]))
    if f"{prefix}.scale_qb" in views:
        n = shape[0]
        return (dequantize_meta_blocks(views[f"{prefix}.scale_qb"].cpu(), views[f"{prefix}.scale_mmb"].cpu(), n),
                dequantize_meta_blocks(views[f"{prefix}.zero_qb"].cpu(), views[f"{prefix}.zero_mmb"].cpu(), n))
    return views[f"{prefix}.scale"].float(), views[f"{prefix}.zero"].float()


def _stored_offset(views: dict[str, torch.Tensor], prefix: str, bits: int) -> int:
    """What the stored nibbles add to q: the int4lut forms centre 2/3-bit values (see `int4_offset`)."""
    return int4_offset(bits) if f"{prefix}.lo" in views or f"{prefix}.plo" in views else 0


def matrix_values(views: dict[str, torch.Tensor], prefix: str, shape: tuple[int, int], bits: int) -> torch.Tensor:
    """The quantized values q [N, K] of a stored matrix, whatever its form (the int4pack form: as stored, 0..15)."""
    n, k = shape
    if f"{prefix}.plo" in views:  # int4lut16: real columns of the padded int4pack matrix
        real = lut_unpack(views[f"{prefix}.plo"].cpu(), views.get(f"{prefix}.phi"), bits,
                          torch.empty(n * k // 2, dtype=torch.uint8))
        padded = pad16_unpack(real, n, k, torch.zeros(n * k, dtype=torch.uint8))
        nibbles = int4pack_values(padded, n, 2 * k).view(n, k // 16, 2, 16)[:, :, 0].reshape(n, k)
        return nibbles - int4_offset(bits)
    if f"{prefix}.lo" in views:  # int4lut: rebuild the int4pack bytes
        packed = torch.empty(n * k // 2, dtype=torch.uint8)
        nibbles = int4pack_values(lut_unpack(views[f"{prefix}.lo"].cpu(), views.get(f"{prefix}.hi"), bits, packed),
                                  n, k)
        return nibbles - int4_offset(bits)
    if f"{prefix}.sz" in views:
        return int4pack_values(views[f"{prefix}.q"], n, k)
    return bitunpack(views[f"{prefix}.q"], bits, n * k).view(n, k)


def dequantize(views: dict[str, torch.Tensor], prefix: str, shape: tuple[int, int], bits: int,
               group_size: int) -> torch.Tensor:
    """The exact float32 matrix [N, K] a stored matrix stands for (int4pack: `(q - 8) * s + zero_t`)."""
    n, k = shape
    q = matrix_values(views, prefix, shape, bits).float().view(n, k // group_size, group_size)
    if f"{prefix}.sz" in views:
        sz = views[f"{prefix}.sz"].float()
        s, zt = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]
        return ((q + _stored_offset(views, prefix, bits) - 8) * s + zt).view(n, k)
    if f"{prefix}.szt" in views:  # bit-packed values with the int4 kernel's meta: the same math, offset-free values
        szt = views[f"{prefix}.szt"].float()
        s, zt = szt[..., 0].t()[..., None], szt[..., 1].t()[..., None]
        return ((q - (1 << (bits - 1))) * s + zt).view(n, k)
    s, z = matrix_meta(views, prefix, shape)
    return ((q - z[..., None]) * s[..., None]).view(n, k)


# -- device-neutral form and row-blocked dequantization (the CUDA path) -------------------------------------------
CPU_FORMS = ("int4pack", "int4lut", "int4lut16")  # laid out for torch's CPU int4 kernel: no other device reads them


def to_bitpack(views: dict[str, torch.Tensor], prefix: str, shape: tuple[int, int],
               bits: int) -> dict[str, torch.Tensor]:
    """A stored matrix (any form) -> the device-neutral "bitpack" form standing for exactly the same weights.

    The values are bit-packed in row order; the meta is kept as stored, so `dequantize` gives bit-identical results:
    8-bit scales/zeros and HQQ's (scale, zero) as they are, the int4 kernel's [G, N, 2] (scale, zero_t) as `szt`
    (w = (q - 2^(bits-1)) scale + zero_t, which is what every int4 form computes with its stored offset).
    """
    out = {f"{prefix}.q": bitpack(matrix_values(views, prefix, shape, bits), bits)}
    if f"{prefix}.sz" in views:
        out[f"{prefix}.szt"] = views[f"{prefix}.sz"].clone()
    else:
        names = ("szt",) if f"{prefix}.szt" in views else (
            ("scale_q", "scale_mm", "zero_q", "zero_mm") if f"{prefix}.scale_q" in views else
            ("scale_qb", "scale_mmb", "zero_qb", "zero_mmb") if f"{prefix}.scale_qb" in views else ("scale", "zero"))
        out.update({f"{prefix}.{name}": views[f"{prefix}.{name}"].clone() for name in names})
    return out


def _meta_rows(views: dict[str, torch.Tensor], prefix: str, bits: int, r0: int, r1: int,
               n: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(scale, zero-or-zero_t, zero_t?) float32 [rows, G] of rows r0..r1, computed exactly as `dequantize` does."""
    if f"{prefix}.szt" in views:
        szt = views[f"{prefix}.szt"][:, r0:r1].float()
        return szt[..., 0].t(), szt[..., 1].t(), True
    if f"{prefix}.scale_q" in views:
        def rows(q: torch.Tensor, mm: torch.Tensor) -> torch.Tensor:
            g = q.numel() // mm.shape[0]  # values per meta group (`quantize_meta`)
            idx = torch.arange(r0 * q.shape[1], r1 * q.shape[1], device=q.device) // g
            return (q[r0:r1].reshape(-1).float() * mm[idx, 1] + mm[idx, 0]).view(r1 - r0, q.shape[1])
        return (rows(views[f"{prefix}.scale_q"], views[f"{prefix}.scale_mm"]),
                rows(views[f"{prefix}.zero_q"], views[f"{prefix}.zero_mm"]), False)
    if f"{prefix}.scale_qb" in views:  # 8-bit meta in the CPU kernels' block order: expanded whole (small), then cut
        s, z = matrix_meta(views, prefix, (n, 0))
        device = views[f"{prefix}.scale_qb"].device
        return s[r0:r1].to(device), z[r0:r1].to(device), False
    return views[f"{prefix}.scale"][r0:r1].float(), views[f"{prefix}.zero"][r0:r1].float(), False


def dequantize_into(views: dict[str, torch.Tensor], prefix: str, shape: tuple[int, int], bits: int,
                    group_size: int, out: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """`dequantize(...)` cast to `out.dtype`, written into `out` [N, K] (any device) one block of rows at a time, so
    the float32 temporaries stay near `chunk` values whatever the matrix size. Bit-identical to
    `dequantize(...).to(out.dtype)`: the same float32 operations on the same values, row block by row block.
    Bit-packed forms only are blocked (their rows are contiguous bytes); the CPU forms are dequantized whole."""
    n, k = shape
    if f"{prefix}.q" not in views or f"{prefix}.sz" in views:
        return out.copy_(dequantize(views, prefix, shape, bits, group_size))
    packed, g = views[f"{prefix}.q"], k // group_size
    step = max(8, chunk // k // 8 * 8)  # whole rows; 3-bit rows start on a 3-byte boundary every 8 rows
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        b0, b1 = packed_numel(r0 * k, bits), packed_numel(r1 * k, bits)
        q = bitunpack(packed[b0:b1], bits, (r1 - r0) * k).float().view(r1 - r0, g, group_size)
        s, z, zero_t = _meta_rows(views, prefix, bits, r0, r1, n)
        w = ((q - (1 << (bits - 1))) * s[..., None] + z[..., None] if zero_t
             else (q - z[..., None]) * s[..., None])
        out[r0:r1].copy_(w.view(r1 - r0, k))
    return out
