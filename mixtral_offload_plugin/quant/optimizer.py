"""Affine group quantization of one matrix: round-to-nearest, or HQQ's optimizer of the zero-points, vectorized.

`quantize_groups(w, bits, group_size, method)` returns q [N, K] (uint8), scale and zero [N, K/g] (float32) with
`W ~ (q - zero) * scale` per group of `group_size` consecutive weights of a row (HQQ's axis=1 convention).
The starting point is the group's min/max (HQQ's own initialisation); "rtn" stops there, "hqq" then runs HQQ's
half-quadratic proximal solver (`hqq.core.optimize.optimize_weights_proximal_legacy`, hqq's default: lp-norm 0.7,
beta 10, at most 20 steps, scales fixed, zero-points updated):

    d = u - clamp(round(u), 0, 2**bits - 1),  u = W / scale + zero        (the rounding residual, in code units)
    zero <- zero - mean_group(d - shrink(d * scale) / scale),  shrink(x) = sign(x) * relu(|x| - |x|**(p-1) / beta)

which is hqq's update rewritten in code units (one pass over the weights per step). Where every |d * scale| lies
below the shrink threshold (the common case: it needs a group range above about 1.0 at 2 bits) the shrink term is
exactly zero and the step is the residual's mean; groups near the threshold take the full formula.
Differences from hqq, all measured to keep or improve its error (docs/benchmarks.md): groups are processed in chunks
that stop when their own mean error stops falling (hqq stops the whole matrix at once), the best zero-points seen are
kept when a step makes the error worse (hqq returns those after the failing step), and the steps run as one fused
kernel per step when torch.compile works here (a C++ compiler is needed; otherwise eager torch, same math). This module
knows nothing about byte forms.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

METHODS = ("hqq", "rtn")
LP_NORM, BETA, ITERS = 0.7, 10.0, 20  # hqq's defaults for optimize_weights_proximal (its legacy solver: beta fixed)
SHRINK_FREE = BETA ** (-1.0 / (2.0 - LP_NORM))  # |D| at or below this: the shrink term is exactly zero
CHUNK = 1 << 20  # weights per chunk: one step's working set stays in the CPU's cache
COMPILE_MIN = 1 << 22  # smaller matrices run eagerly (compiling costs ~10-20 s per matrix shape, once per process)


def _residual(ws: torch.Tensor, zero: torch.Tensor, maxv: float) -> torch.Tensor:
    u = ws + zero
    return u - torch.round(u).clamp(0, maxv)


def _prepare(w: torch.Tensor, group_size: int, maxv: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ's starting point per group: [min, max] maps onto [0, maxv]. -> (weights in code units before the zero
    [n, g], scale [n, 1], zero [n, 1])."""
    wg = w.float().reshape(-1, group_size)
    lo, hi = wg.aminmax(dim=1, keepdim=True)
    denom = hi - lo
    inv = torch.where(denom.abs() <= 1e-4, torch.ones_like(denom), maxv / denom).clamp(max=2e4)
    return wg * inv, 1.0 / inv, -lo * inv


def _codes(ws: torch.Tensor, zero: torch.Tensor, maxv: float) -> torch.Tensor:
    return torch.round(ws + zero).clamp(0, maxv).to(torch.uint8)


def _step_fast(ws: torch.Tensor, zero: torch.Tensor, zero0: torch.Tensor, scale: torch.Tensor,
               maxv: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step where no residual reaches the shrink threshold: the zero moves by the residual's mean.

    Returns (the zero's decrement [n, 1], the summed absolute error in weight units, the largest residual any group
    can have in weight units: max(0.5, |zero - zero0|) * scale, since clamped codes move with the zero)."""
    d = _residual(ws, zero, maxv)
    bound = ((zero - zero0).abs().clamp(min=0.5) * scale).max()
    return d.mean(dim=1, keepdim=True), (d.abs().sum(dim=1, keepdim=True) * scale).sum(), bound


def _step_full(ws: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, maxv: float,
               inv_beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hqq's step with the lp shrinkage, in weight units D = d * scale."""
    d = _residual(ws, zero, maxv)
    a = (d * scale).abs()
    shrunk = torch.sign(d) * torch.relu(a - a.pow(LP_NORM - 1) * inv_beta)
    return (d - shrunk / scale).mean(dim=1, keepdim=True), a.sum(dim=1, keepdim=True).sum()


_EAGER: dict[str, Callable[..., Any]] = {"prepare": _prepare, "codes": _codes, "fast": _step_fast, "full": _step_full}
_compiled: dict[str, Any] = {}


def _functions(numel: int) -> dict[str, Callable[..., Any]]:
    """Eager functions for small matrices; compiled ones (fused loops) for large ones."""
    if numel < COMPILE_MIN or os.environ.get("MIXTRAL_OFFLOAD_COMPILE", "1") == "0" or _compiled.get("failed"):
        return _EAGER
    if not _compiled:
        # the number of groups is dynamic (marked per call), the group size static: inductor's code for a reduction
        # over a symbolic group size is ~20x slower. One compilation per group size, bits and input dtype.
        _compiled.update({name: _static_groups(torch.compile(fn, dynamic=False)) for name, fn in _EAGER.items()})
    return _compiled


def _static_groups(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim():
                torch._dynamo.mark_dynamic(a, 0)
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64):
            return fn(*args)

    return call


def _optimize_chunk(ws: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxv: float,
                    fns: dict[str, Callable[..., Any]]) -> torch.Tensor:
    """HQQ's zero-point iterations on one chunk of groups (ws [n, g] = weights / scale); returns the best zero."""
    zero0, best_zero, best_err = zero, zero, float("inf")
    for _ in range(ITERS):
        step, err, bound = fns["fast"](ws, zero, zero0, scale, maxv)
        # the shrink term is zero where |D| ** (2 - p) <= 1 / beta: if a residual may pass that, redo the step in full
        if float(bound) >= SHRINK_FREE:
            step, err = fns["full"](ws, zero, scale, maxv, torch.tensor(1.0 / BETA))
        e = float(err)
        if not e < best_err:
            return best_zero
        best_err, best_zero = e, zero
        zero = zero - step
    return zero  # still improving after the last step: keep its update, as hqq does


def quantize_groups(w: torch.Tensor, bits: int, group_size: int, method: str = "hqq",
                    device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype) -> q uint8 [N, K], scale float32 [N, K/g], zero float32 [N, K/g], on the CPU.

    `device`: where the arithmetic runs (e.g. "cuda": eager torch there, chunk by chunk; the results come back)."""
    if method not in METHODS:
        msg = f"unknown quantization method {method!r}; use one of {METHODS}"
        raise ConfigError(msg)
    n, k = w.shape
    if k % group_size:
        msg = f"a {n}x{k} matrix cannot use group size {group_size}: {k} is not a multiple of it"
        raise ConfigError(msg)
    maxv = float(2**bits - 1)
    g = k // group_size
    q = torch.empty(n, k, dtype=torch.uint8)
    scale = torch.empty(n, g, dtype=torch.float32)
    zero = torch.empty(n, g, dtype=torch.float32)
    rows = max(1, CHUNK // k)
    device = torch.device(device)
    fns = _functions(w.numel()) if device.type == "cpu" else _EAGER
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a chunk is ~1 ms of work: two threads wait on each other more than they help
    try:
        with torch.inference_mode():
            _quantize_rows(w, group_size, maxv, method, fns, rows, (q, scale, zero), device)
    finally:
        torch.set_num_threads(threads)
    return q, scale, zero


def _quantize_rows(w: torch.Tensor, group_size: int, maxv: float, method: str, fns: dict[str, Callable[..., Any]],
                   rows: int, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor], device: torch.device) -> None:
    """Fill `out` (q, scale, zero) chunk of rows by chunk of rows (falling back to eager torch if compiling fails)."""
    q, scale, zero = out
    n, k = w.shape
    g = k // group_size
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        chunk = w[r0:r1].detach().to(device)
        try:
            s, z = _quantize_chunk(chunk, group_size, maxv, method, q[r0:r1], fns)
        except Exception as exc:  # torch.compile without a working C++ compiler, or an inductor bug
            if fns is _EAGER:
                raise
            log.warning("torch.compile is unavailable here (%s: %s); quantizing with eager torch (slower)",
                        type(exc).__name__, (str(exc).splitlines() or [""])[0])
            _compiled["failed"] = True
            fns = _EAGER
            s, z = _quantize_chunk(chunk, group_size, maxv, method, q[r0:r1], fns)
        scale[r0:r1] = s.view(r1 - r0, g)
        zero[r0:r1] = z.view(r1 - r0, g)


def _quantize_chunk(w: torch.Tensor, group_size: int, maxv: float, method: str, out: torch.Tensor,
                    fns: dict[str, Callable[..., Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    ws, scale, zero = fns["prepare"](w, group_size, maxv)
    if method == "hqq":
        zero = _optimize_chunk(ws, scale, zero, maxv, fns)
    out.copy_(fns["codes"](ws, zero, maxv).view(out.shape))
    return scale, zero
