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
This module owns the byte forms and that math only: the kernels that multiply are in `cpu.py` and `cuda.py`, the
choice between them in `kernels.py`. It knows nothing about experts, caches or files.
"""

from __future__ import annotations

import functools
import os

import torch

from ..errors import ConfigError

INT4_GROUPS = (32, 64, 128, 256)  # group sizes torch's CPU int4 kernel accepts
META_GROUP = 128  # values per group when scales/zeros are quantized to 8 bits


# -- bit packing ---------------------------------------------------------------------------------------------------
def bitpack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 values < 2**bits (any shape) -> packed uint8 1-D."""
    flat = q.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if bits == 4:
        v = flat.view(-1, 2)
        return v[:, 0] | (v[:, 1] << 4)
    if bits == 2:
        v = flat.view(-1, 4)
        return v[:, 0] | (v[:, 1] << 2) | (v[:, 2] << 4) | (v[:, 3] << 6)
    if bits == 3:
        v = flat.view(-1, 8).to(torch.int32)
        acc = sum(v[:, i] << (3 * i) for i in range(8))
        return torch.stack([acc & 255, (acc >> 8) & 255, (acc >> 16) & 255], dim=1).to(torch.uint8).reshape(-1)
    msg = f"cannot bit-pack {bits}-bit values (supported: 2, 3, 4, 8)"
    raise ConfigError(msg)


def packed_numel(numel: int, bits: int) -> int:
    return numel * 3 // 8 if bits == 3 else numel * bits // 8


def bitunpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `bitpack`: uint8 1-D of `numel` values."""
    if bits == 8:
        return packed[:numel]
    if bits in (2, 4):
        mask = (1 << bits) - 1
        parts = [(packed >> s) & mask for s in range(0, 8, bits)]
        return torch.stack(parts, dim=1).reshape(-1)[:numel]
    if bits == 3:
        b = packed.view(-1, 3).to(torch.int32)
        acc = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        return torch.stack([(acc >> (3 * i)) & 7 for i in range(8)], dim=1).to(torch.uint8).reshape(-1)[:numel]
    msg = f"cannot unpack {bits}-bit values (supported: 2, 3, 4, 8)"
    raise ConfigError(msg)


def int4_offset(bits: int) -> int:
    """2/3-bit values are stored in int4 nibbles as q + offset (centred in 0..15, see `int4_scale_zeros`)."""
    return 8 - (1 << (bits - 1))


@functools.cache
def _lut(plane: str, bits: int) -> torch.Tensor:
    """Tables turning one byte of a 2-bit plane (4 nibbles) or a 1-bit plane (8 nibbles) into int4pack bytes."""
    b = torch.arange(256, dtype=torch.int64)
    if plane == "lo":  # 4 values of 2 bits -> 2 bytes (int16): nibble t = ((b >> 2t) & 3) + offset
        nib = [((b >> (2 * t)) & 3) + int4_offset(bits) for t in range(4)]
        return (nib[0] | (nib[1] << 4) | (nib[2] << 8) | (nib[3] << 12)).to(torch.int16)
    nib = [((b >> t) & 1) * 4 for t in range(8)]  # "hi": the third bit of 3-bit values, worth 4
    out = torch.zeros(256, dtype=torch.int64)
    for t in range(8):
        out |= nib[t] << (4 * t)
    return out.to(torch.int32)  # 8 nibbles of 0 or 4: at most 0x44444444, fits a signed int32


def lut_pack(packed: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """int4pack bytes holding 2/3-bit values (+ offset) -> planes in the same nibble order: "lo" (2 bits each, 4 per
    byte) and, for 3 bits, "hi" (1 bit each, 8 per byte). `lut_unpack` rebuilds the int4pack bytes with one table
    lookup per plane byte, instead of re-running torch's packing at every cache load."""
    flat = packed.reshape(-1)
    v = (torch.stack([flat & 15, flat >> 4], dim=1).reshape(-1).to(torch.int16) - int4_offset(bits)).to(torch.uint8)
    lo = (v & 3).view(-1, 4)
    out = {"lo": (lo[:, 0] | (lo[:, 1] << 2) | (lo[:, 2] << 4) | (lo[:, 3] << 6)).contiguous()}
    if bits == 3:
        hi = (v >> 2).view(-1, 8)
        out["hi"] = sum((hi[:, t] << t) for t in range(8)).to(torch.uint8).contiguous()
    return out


def nibble_planes(q: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """`lut_pack` of the int4pack bytes of q [N, K] (2/3-bit values, any offset) computed straight from q.

    torch's CPU int4 layout orders values by 64-row block, then column, then byte j (rows j and 32 + j of the block),
    then nibble; the N % 64 remaining rows follow by column, then row pair (see `int4pack_values`). The same bytes
    hold the real columns of a group-16 matrix padded to group 32 (`pad16_pack`), so both int4lut forms share these
    planes. One permuted copy of q instead of torch's packing of an int32 (padded) matrix: ~20x less time."""
    n, k = q.shape
    nb, r = n // 64, n % 64
    parts = [q[: nb * 64].reshape(nb, 2, 32, k).permute(0, 3, 2, 1).reshape(-1)] if nb else []
    if r:
        parts.append(q[nb * 64:].reshape(r // 2, 2, k).permute(2, 0, 1).reshape(-1))
    v = (torch.cat(parts) if len(parts) > 1 else parts[0]).to(torch.uint8)
    lo = (v & 3).view(-1, 4)
    out = {"lo": lo[:, 0] | (lo[:, 1] << 2) | (lo[:, 2] << 4) | (lo[:, 3] << 6)}
    if bits == 3:
        hi = (v >> 2).view(-1, 8)
        acc = hi[:, 0].clone()
        for t in range(1, 8):
            acc |= hi[:, t] << t
        out["hi"] = acc
    return out


def lut_unpack(lo: torch.Tensor, hi: torch.Tensor | None, bits: int, out: torch.Tensor) -> torch.Tensor:
    """Inverse of `lut_pack` into `out` (uint8, the int4pack bytes): one gather per plane, no repacking."""
    torch.index_select(_lut("lo", bits), 0, lo.to(torch.int32), out=out.view(torch.int16))
    if hi is not None:  # no carry: a nibble is at most 3 + offset 4, plus 4 = 11
        out.view(torch.int32).add_(torch.index_select(_lut("hi", bits), 0, hi.to(torch.int32)))
    return out


def quantize_meta(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit min/step quantization of scales or zeros: -> (uint8 same shape, float32 [groups, 2])."""
    flat = v.float().reshape(-1)
    g = META_GROUP if flat.numel() % META_GROUP == 0 else flat.numel()
    grp = flat.view(-1, g)
    lo, hi = grp.min(dim=1).values, grp.max(dim=1).values
    step = (hi - lo) / 255
    step = torch.where(step > 0, step, torch.ones_like(step))
    q = ((grp - lo[:, None]) / step[:, None]).round_().clamp_(0, 255).to(torch.uint8)
    return q.view(v.shape), torch.stack([lo, step], dim=1)


def dequantize_meta(q: torch.Tensor, mm: torch.Tensor) -> torch.Tensor:
    grp = q.reshape(mm.shape[0], -1).float()
    return (grp * mm[:, 1:2] + mm[:, 0:1]).view(q.shape)


@functools.cache
def plane_row_order(n: int) -> torch.Tensor:
    """Rows in the order the CPU kernels decode a 2/3-bit plane: per block of 64 rows 2t, 2t+32, 2t+1, 2t+33 for
    t = 0..15 (the four values of a plane byte), then the N % 64 last rows in order."""
    p = torch.arange(64)
    within = 2 * (p % 16) + (p // 16 % 2) * 32 + p // 32
    full = (torch.arange(n // 64)[:, None] * 64 + within).reshape(-1)
    return torch.cat([full, torch.arange(n // 64 * 64, n)])


def _block_entries(n: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the kernel order of an [N, G] meta array: the position in it of every value (as a permutation of the flat
    row-major index) and the entry (block and group, then tail group) each position belongs to."""
    nb, r = n // 64, n % 64
    flat = torch.arange(n * g).view(n, g)
    parts, entries = [], []
    if nb:
        parts.append(flat[plane_row_order(n)[: nb * 64]].view(nb, 64, g).transpose(1, 2).reshape(-1))
        entries.append(torch.arange(nb * g).repeat_interleave(64))
    if r:
        parts.append(flat[nb * 64:].t().reshape(-1))
        entries.append((nb * g + torch.arange(g)).repeat_interleave(r))
    return torch.cat(parts), torch.cat(entries)


def quantize_meta_blocks(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit min/step quantization of scales or zeros [N, G] in the planes' kernel order: (uint8 [N*G] holding, per
    block of 64 rows and group (then per group of the N % 64 last rows), the rows in `plane_row_order`; float32
    [entries/2, 2], one (min, step) per two consecutive entries: 128 values for full blocks, as `quantize_meta`)."""
    n, g = v.shape
    order, entry = _block_entries(n, g)
    vals = v.float().reshape(-1)[order]
    pair = entry // 2
    pairs = int(pair[-1]) + 1
    lo = torch.full((pairs,), float("inf")).scatter_reduce(0, pair, vals, "amin")
    hi = torch.full((pairs,), float("-inf")).scatter_reduce(0, pair, vals, "amax")
    step = (hi - lo) / 255
    step = torch.where(step > 0, step, torch.ones_like(step))
    q = ((vals - lo[pair]) / step[pair]).round_().clamp_(0, 255).to(torch.uint8)
    return q, torch.stack([lo, step], dim=1)


def dequantize_meta_blocks(q: torch.Tensor, mm: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `quantize_meta_blocks`: float32 [N, G]."""
    g = q.numel() // n
    order, entry = _block_entries(n, g)
    pair = entry // 2
    out = torch.empty(n * g)
    out[order] = q.float() * mm[pair, 1] + mm[pair, 0]
    return out.view(n, g)


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
        if zero_t:
            w = (q - (1 << (bits - 1))) * s[..., None] + z[..., None]
        else:
            w = (q - z[..., None]) * s[..., None]
        out[r0:r1].copy_(w.view(r1 - r0, k))
    return out
