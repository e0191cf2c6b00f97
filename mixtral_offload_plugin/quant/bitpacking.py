"""Bit-level forms of quantized values and of their 8-bit scales and zeros: packing q values into bytes (2/3/4/8
bits), the nibble planes and table lookups that turn 2/3-bit values into int4 form, and the 8-bit quantization of
HQQ scales and zeros (per 128 values, or in the native kernels' block order). `formats.py` builds the stored matrix
forms from these. Knows nothing about matrices' meaning, experts, caches or files.
"""

from __future__ import annotations

import functools
from typing import cast

import torch

from ..errors import ConfigError

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
        acc = cast(torch.Tensor, sum(v[:, i] << (3 * i) for i in range(8)))  # 0 + tensors: a tensor
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
        out["hi"] = cast(torch.Tensor, sum((hi[:, t] << t) for t in range(8))).to(torch.uint8).contiguous()
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
