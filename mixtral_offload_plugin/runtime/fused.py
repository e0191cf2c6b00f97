"""The fused decode step: one decoded token of one sequence, every layer, in native calls (`decode.c`).

On CPU a decoded token of a small or medium MoE model spends most of its time around the matrices, in transformers'
per-layer Python (norms, rotary, cache update, attention, routing: dozens of torch calls per layer;
docs/benchmarks.md). When the experts are quantized on the native kernels, `FusedDecoder` runs the step in C instead,
calling the same matrix and expert kernels the modules call and rounding every intermediate value to the model's dtype
at the same points, so it differs from the module path only by the order of float32 sums (tests compare the two).

Every expert resident: the whole step is one call. Experts in cache slots (a store, a cache of fewer slots, prefetch):
the step stops after routing each layer, `_serve` asks the cache for that layer's experts exactly as the modules'
`OffloadedExperts` does (one counted request, the prefetcher's proposal and loads for the layers ahead, ready slots
first, misses loaded through the cache) and the native code resumes with each expert's matrices read in place from
its slot, so hit rates, loads, prefetches and traces are those of the module path.

`fused_forward` is called by the model's forward (`model.offloaded_class`) for each call; it answers None, and the
modules run, whenever the call is anything but one new token of one unpadded sequence with a plain `DynamicCache`
(prefill, batches, custom masks, outputs of attentions or hidden states, gradients, hooks on the decoder layers,
`OffloadConfig.decode="modules"`). The KV cache stays transformers' own: each layer's keys and values become views of
a buffer with room to grow, which the C code appends to; anything else holding the cache sees ordinary tensors.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..kernels import native
from .compat import cache_of, model_output
from .ragged import next_position_only

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("decode.c")
_lock = threading.Lock()
_lib: list[Any] = []  # [library or None] once tried

P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
MAT_QUANT, MAT_DENSE_BF16, MAT_DENSE_F32 = 0, 1, 2
ALLOWED_KWARGS = {"input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
                  "logits_to_keep", "return_dict", "cache_position", "output_attentions", "output_hidden_states",
                  "output_router_logits", "inputs_embeds", "labels"}


class Mat(ctypes.Structure):
    _fields_ = [("w", P), ("n", I64), ("k", I64), ("kind", I32), ("pad", I32)]


class Layer(ctypes.Structure):
    _fields_ = [("q", Mat), ("k", Mat), ("v", Mat), ("o", Mat), ("ln1", P), ("ln2", P), ("router", P),
                ("kcache", P), ("vcache", P), ("experts", P)]


class Model(ctypes.Structure):
    _fields_ = [("hidden", I64), ("heads", I64), ("kv_heads", I64), ("head_dim", I64), ("n_experts", I64),
                ("top_k", I64), ("n_layers", I64), ("cap", I64), ("bf16", I32), ("pad", I32), ("eps", F32),
                ("scale", F32), ("rope_scaling", F32), ("pad2", F32), ("inv_freq", P), ("mm", P), ("dense", P),
                ("expert", P), ("layers", P), ("embed", P), ("norm", P), ("head", Mat)]


class Step(ctypes.Structure):
    _fields_ = [("layer", I64), ("phase", I32), ("stop", I32), ("done", P), ("wts", P), ("x", P), ("act", P),
                ("out", P), ("eout", P), ("work", P)]


def library() -> Any:
    """`decode.c` built and loaded, or None (no compiler, native kernels off or unavailable)."""
    if _lib:
        return _lib[0]
    with _lock:
        if not _lib:
            lib = None
            if native.library() is not None:
                try:
                    lib = native.compile_library(native.build_variant(), SOURCE)
                    if lib.mo_decode_abi() != 2:
                        msg = "the cached decode library has another ABI version"
                        raise RuntimeError(msg)
                    lib.mo_decode_run.argtypes = [ctypes.POINTER(Model), ctypes.POINTER(Step), I64, I64, P, P,
                                                  ctypes.c_int]
                except (OSError, RuntimeError) as exc:
                    log.warning("fused decode unavailable, decoding through the modules: %s", exc)
                    lib = None
            _lib.append(lib)
    return _lib[0]


class _Kept:
    """One KV cache's growable buffers (one (keys, values) pair per layer) and the views its last step left."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = []


class Unsupported(Exception):
    """This model cannot take the fused path (the reason is logged once at debug level)."""


def _fn(lib: Any, name: str) -> int | None:
    return ctypes.cast(getattr(lib, name), P).value


def _mat(module: nn.Module, dtype: torch.dtype, keep: list[Any]) -> Mat:
    from ..quant.hqq import QuantizedLinear
    from ..quant.linear import NativeLinear

    if getattr(module, "bias", None) is not None:
        msg = "a projection with a bias"
        raise Unsupported(msg)
    if isinstance(module, QuantizedLinear):
        kernel = module._kernel()
        if type(kernel) is not native.QuantMatrix:
            msg = f"a quantized projection on the {module.plan.kind} kernel"
            raise Unsupported(msg)
        keep.append(kernel)
        return Mat(ctypes.addressof(kernel.mat), kernel.n, kernel.k, MAT_QUANT)
    if type(module) in (nn.Linear, NativeLinear) and module.weight.device.type == "cpu" and \
            module.weight.dtype == dtype and module.weight.is_contiguous():
        w = module.weight.detach()
        keep.append(w)
        kind = MAT_DENSE_BF16 if dtype == torch.bfloat16 else MAT_DENSE_F32
        return Mat(w.data_ptr(), w.shape[0], w.shape[1], kind)
    msg = f"a {type(module).__name__} projection"
    raise Unsupported(msg)


def _weight(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], keep: list[Any]) -> int:
    if t.dtype != dtype or t.device.type != "cpu" or tuple(t.shape) != shape:
        msg = f"a weight of {t.dtype} {tuple(t.shape)} (expected {dtype} {shape})"
        raise Unsupported(msg)
    t = t.detach().contiguous()
    keep.append(t)
    return t.data_ptr()


class FusedDecoder:
    """The descriptors of one loaded model for `decode.c`, and the KV buffers it appends to."""

    def __init__(self, model: Any, rt: Any, lib: Any) -> None:  # model: read as a Mixtral model, checked below
        from ..kernels.native import is_silu
        from .experts import OffloadedExperts

        kl = native.library()
        cfg = model.config
        dtype = model.get_input_embeddings().weight.dtype
        if dtype not in (torch.bfloat16, torch.float32):
            msg = f"a {dtype} model"
            raise Unsupported(msg)
        if getattr(cfg, "model_type", "") != "mixtral" or getattr(cfg, "sliding_window", None) is not None:
            msg = "not a Mixtral model without a sliding window"
            raise Unsupported(msg)
        inner = model.model
        rotary = inner.rotary_emb
        if getattr(rotary, "rope_type", "default") != "default":
            msg = f"rope type {rotary.rope_type}"
            raise Unsupported(msg)
        if not hasattr(rt.cache, "state_of"):
            msg = f"a {type(rt.cache).__name__} expert cache"
            raise Unsupported(msg)
        self.keep: list[Any] = []
        keep = self.keep
        layers = list(inner.layers[: cfg.num_hidden_layers])
        hidden, n_exp = cfg.hidden_size, cfg.num_local_experts
        attn0 = layers[0].self_attn
        d, heads, kvh = attn0.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        eps = {float(m.variance_epsilon) for layer in layers for m in (layer.input_layernorm,
                                                                       layer.post_attention_layernorm)}
        eps.add(float(inner.norm.variance_epsilon))
        if len(eps) != 1:
            msg = "norms with different epsilons"
            raise Unsupported(msg)
        self.layers = (Layer * len(layers))()
        self.experts = []
        self.blocks: list[Any] = []
        self.slots = not rt.resident  # experts in cache slots: their pointers are filled layer by layer (`_serve`)
        for i, layer in enumerate(layers):
            attn, block = layer.self_attn, layer.mlp
            experts = getattr(block, "experts", None)
            if not isinstance(experts, OffloadedExperts) or not is_silu(experts.act_fn):
                msg = "experts that are not offloaded SiLU experts"
                raise Unsupported(msg)
            router = block.gate
            top_k = int(router.top_k)
            ptrs = (P * (2 * n_exp))()
            if self.slots:
                _check_slot_kernels(rt, experts.layer_idx, n_exp)
            else:
                for e in range(n_exp):
                    state = rt.cache.state_of(experts.layer_idx, e)
                    pair: tuple[Any, Any] = (None, None)
                    if isinstance(state, dict):
                        pair = (state.get("gate_up"), state.get("down"))
                    if not all(type(m) is native.QuantMatrix for m in pair):
                        msg = "experts that are not resident on the native quantized kernels"
                        raise Unsupported(msg)
                    keep.append(pair)
                    ptrs[2 * e], ptrs[2 * e + 1] = ctypes.addressof(pair[0].mat), ctypes.addressof(pair[1].mat)
            self.experts.append(ptrs)
            self.blocks.append(experts)
            L = self.layers[i]
            L.q, L.k, L.v, L.o = (_mat(getattr(attn, p), dtype, keep) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
            L.ln1 = _weight(layer.input_layernorm.weight, dtype, (hidden,), keep)
            L.ln2 = _weight(layer.post_attention_layernorm.weight, dtype, (hidden,), keep)
            L.router = _weight(router.weight, dtype, (n_exp, hidden), keep)
            L.experts = ctypes.addressof(ptrs)
        head = model.get_output_embeddings()
        inv_freq = rotary.inv_freq.detach().to(torch.float32).contiguous()
        keep.append(inv_freq)
        self.model = Model(hidden=hidden, heads=heads, kv_heads=kvh, head_dim=d, n_experts=n_exp, top_k=top_k,
                           n_layers=len(layers), cap=0, bf16=int(dtype == torch.bfloat16), eps=eps.pop(),
                           scale=float(attn0.scaling), rope_scaling=float(rotary.attention_scaling),
                           inv_freq=inv_freq.data_ptr(), mm=_fn(kl, "mo_quant_mm"), dense=_fn(kl, "mo_dense_bf16"),
                           expert=_fn(kl, "mo_expert_silu"), layers=ctypes.addressof(self.layers),
                           embed=_weight(model.get_input_embeddings().weight, dtype, (cfg.vocab_size, hidden), keep),
                           norm=_weight(inner.norm.weight, dtype, (hidden,), keep), head=_mat(head, dtype, keep))
        self.ref = ctypes.byref(self.model)
        self.lib, self.dtype, self.kv_shape = lib, dtype, (kvh, d)
        self.context = int(rt.config.context_length)  # KV rows the memory plan counted
        self.vocab = int(self.model.head.n)
        self.routed = torch.zeros(len(layers), top_k, dtype=torch.int32)
        # decode.c's state between calls and its scratch, kept for every token (see mo_step)
        widest = max(hidden, heads * d, self.vocab)
        self.x = torch.empty(hidden, dtype=torch.float32)
        self.act, self.out = torch.empty(widest, dtype=dtype), torch.empty(widest, dtype=dtype)
        self.hidden = self.act[:hidden].view(1, hidden)  # a routed layer's experts' input (what the modules pass them)
        self.eout = torch.empty(top_k, hidden, dtype=dtype)
        self.wts = torch.empty(top_k, dtype=torch.float32)
        self.done = torch.zeros(top_k, dtype=torch.int32)
        self.work = torch.empty(3 * hidden + 2 * (heads + kvh) * d + 2 * d + widest, dtype=torch.float32)
        self.state = Step(layer=0, phase=0, stop=int(self.slots), done=self.done.data_ptr(), wts=self.wts.data_ptr(),
                          x=self.x.data_ptr(), act=self.act.data_ptr(), out=self.out.data_ptr(),
                          eout=self.eout.data_ptr(), work=self.work.data_ptr())
        self.state_ref = ctypes.byref(self.state)
        self.call: tuple[int, int, int] = (0, 0, 0)  # the token, position and logits of the step under way
        self.layer_ids = [layer.mlp.experts.layer_idx for layer in layers]
        from torch.nn.modules import module as torch_module

        bypassed = [m for layer in layers for m in layer.modules()] + [inner, inner.norm, head]
        self.hook_dicts = [d for m in bypassed for d in (m._forward_hooks, m._forward_pre_hooks)] + [
            torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks]
        self.kept: weakref.WeakKeyDictionary[Any, _Kept] = weakref.WeakKeyDictionary()  # each KV cache's buffers
        self.current: _Kept | None = None  # whose buffers the layer descriptors point at
        self.steps = 0  # tokens decoded here (tests, profiles)

    def hooked(self) -> bool:
        """Whether someone watches the modules this path skips (profilers, tracers): then the modules run."""
        return any(self.hook_dicts)

    def _adopt(self, cache_layers: list[Any], length: int) -> _Kept:
        """Copy the cache into buffers with room to grow (the first step, or after someone replaced its tensors): up to
        the context the memory plan reserved KV cache for, and by half again (at least 256 rows) past it."""
        cap = length + max(256, length // 2)
        if length < self.context:
            cap = min(cap, self.context)
        kept = _Kept(cap)
        kvh, d = self.kv_shape
        for layer in cache_layers:
            kb = torch.empty(1, kvh, cap, d, dtype=self.dtype)
            vb = torch.empty(1, kvh, cap, d, dtype=self.dtype)
            kb[:, :, :length].copy_(layer.keys)
            vb[:, :, :length].copy_(layer.values)
            kept.buffers.append((kb, vb))
        return kept

    def owns(self, cache: Any) -> bool:
        """Whether every layer of `cache` still holds the views its last step left there (then it needs no checks).
        Several caches can be owned at once: sequences decoded in turn (`runtime/batching.py`) keep their buffers."""
        kept = self.kept.get(cache)
        return kept is not None and len(kept.views) == len(cache.layers) and all(
            layer.keys is view[0] and layer.values is view[1]
            for layer, view in zip(cache.layers, kept.views, strict=True))

    def _run(self) -> int:
        token, length, logits = self.call
        rc = int(self.lib.mo_decode_run(self.ref, self.state_ref, token, length, logits, self.routed.data_ptr(),
                                        torch.get_num_threads()))
        if rc < 0 or rc > 1 or (rc == 1 and not self.slots):
            msg = "fused decode: scratch allocation failed" if rc == -1 else f"fused decode failed (code {rc})"
            raise MemoryError(msg) if rc == -1 else RuntimeError(msg)
        return rc

    def _serve(self, rt: Any, i: int) -> None:
        """Layer `i` is routed (decode.c stopped there): ask the cache for its experts exactly as `OffloadedExperts`
        does (the prefetcher's proposal, one counted request, the prefetch of the layers ahead, ready slots first,
        experts that did not fit requested on their own at the end) and give decode.c each one's matrices as soon as
        its slot is loaded. Before waiting for a load, or before a request that may evict, the experts whose pointers
        are set are computed (`_run` returns at this layer again while some are missing), so no slot is read after
        the cache may have reused it; nothing else changes slots while the native code runs (the runtime lock; the
        loader thread fills only slots assigned before, never one of this layer's)."""
        layer, block, cache, prefetcher = self.layer_ids[i], self.blocks[i], rt.cache, rt.prefetcher
        hidden, ptrs = self.hidden, self.experts[i]
        experts = self.routed[i].tolist()  # distinct, ascending (decode.c's route): the modules' sorted set
        guesses = None
        if prefetcher is not None:
            hidden = hidden.clone()  # a prefetcher may keep it; the scratch changes at the next layer
            proposal = prefetcher.propose(layer, hidden)
            guesses = proposal.tolist() if proposal is not None else None
        slots = cache.request(layer, experts)
        if prefetcher is not None:
            prefetcher.after_route(layer, hidden, experts, proposal=guesses)
        for e in experts:
            ptrs[2 * e] = ptrs[2 * e + 1] = None
        pending = False  # pointers set for experts decode.c has not computed yet
        for j in block._order(rt, slots):
            e, slot = experts[j], slots[j]
            if pending and (slot is None or not cache.is_ready(slot)):
                if self._run() != 1 or self.state.layer != i:
                    msg = "fused decode: the step went past a layer whose experts were not all given"
                    raise RuntimeError(msg)
                pending = False
            state = block._state(rt, e, slot)
            pair = (state.get("gate_up"), state.get("down")) if isinstance(state, dict) else (None, None)
            if type(pair[0]) is native.QuantMatrix and type(pair[1]) is native.QuantMatrix:
                ptrs[2 * e], ptrs[2 * e + 1] = ctypes.addressof(pair[0].mat), ctypes.addressof(pair[1].mat)
                pending = True
            else:  # another native kernel (the axis-0 ones): computed by it, as the modules compute it
                self.eout[j].copy_(rt.kernels[layer, e](state, hidden, block.act_fn).view(-1))
                self.done[j] = 1

    def step(self, rt: Any, cache: Any, token: int, length: int, owned: bool) -> torch.Tensor:
        layers = cache.layers
        kept = self.kept.get(cache) if owned else None
        if kept is None or kept.cap <= length:
            kept = self.kept[cache] = self._adopt(layers, length)
        if self.current is not kept:
            for i, (kb, vb) in enumerate(kept.buffers):
                self.layers[i].kcache, self.layers[i].vcache = kb.data_ptr(), vb.data_ptr()
            self.model.cap, self.current = kept.cap, kept
        logits = torch.empty(1, 1, self.vocab, dtype=self.dtype)
        self.call = (token, length, logits.data_ptr())
        self.state.layer, self.state.phase = 0, 0
        while self._run() == 1:  # experts in slots: stopped after routing a layer
            self._serve(rt, int(self.state.layer))
        views = []
        for layer, (kb, vb) in zip(layers, kept.buffers, strict=True):
            layer.keys, layer.values = kb[:, :, :length + 1], vb[:, :, :length + 1]
            views.append((layer.keys, layer.values))
        kept.views = views
        self.steps += 1
        if not self.slots:  # resident: every expert was there; count the routing as the modules would
            for layer_idx, routed in zip(self.layer_ids, self.routed.tolist(), strict=True):
                rt.cache.request(layer_idx, routed)  # counters, policy and listeners (routed: distinct, ascending)
        return logits


def _check_slot_kernels(rt: Any, layer: int, n_exp: int) -> None:
    """Experts served from cache slots must be quantized on our native kernels: their states are then the
    QuantMatrix pairs decode.c reads in place, or another native kernel's, computed through it (16-bit experts keep
    the modules, which equal transformers bit for bit)."""
    for e in range(n_exp):
        kinds = getattr(rt.kernels.get((layer, e)), "kinds", None) or {}
        if not kinds or not all(str(k).startswith("native") for k in kinds.values()):
            msg = "experts in cache slots that are not quantized on the native kernels"
            raise Unsupported(msg)


def _decoder(model: nn.Module, rt: Any) -> FusedDecoder | None:
    fused = rt.fused
    if fused is None:  # first eligible call: build once (False = this model cannot take the path)
        fused = False
        lib = library() if native.library() is not None else None
        # experts in cache slots with batch_size > 1: the batcher's shared steps (one load serves every row) are worth
        # more than one native call per token, and solo steps must compute as batched rows do
        batched_offload = not rt.resident and getattr(rt, "batcher", None) is not None
        if lib is not None and rt.device.type == "cpu" and rt.config.decode == "auto" and not batched_offload:
            try:
                fused = FusedDecoder(model, rt, lib)
            except Unsupported as exc:
                log.debug("fused decode not used: %s", exc)
        rt.fused = fused
    return fused or None


def fused_forward(model: nn.Module, rt: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The output of `model(**kwargs)` through the fused step, or None when the call is not one it takes."""
    from transformers.cache_utils import DynamicCache, DynamicLayer  # here: importing the package stays light
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    if args or rt.fused is False or not kwargs.keys() <= ALLOWED_KWARGS or torch.is_grad_enabled() or model.training \
            or not getattr(model.config, "return_dict", True):
        return None
    ids = kwargs.get("input_ids")
    cache = cache_of(kwargs)
    if not isinstance(ids, torch.Tensor) or ids.shape != (1, 1) or type(cache) is not DynamicCache:
        return None
    if kwargs.get("inputs_embeds") is not None or kwargs.get("labels") is not None or \
            kwargs.get("return_dict") is False or kwargs.get("use_cache") is False or \
            any(kwargs.get(f) for f in ("output_attentions", "output_hidden_states", "output_router_logits")):
        return None
    fused = _decoder(model, rt)
    if fused is None or len(cache.layers) != fused.model.n_layers or fused.hooked():
        return None
    first: Any = cache.layers[0]  # a DynamicLayer with 4-d keys: the checks below, or the last step's views
    owned = fused.owns(cache)  # the layers hold the last step's views: checked then, the same now
    if not owned and (type(first) is not DynamicLayer or not first.is_initialized or first.keys is None or
                      first.keys.dim() != 4):
        return None
    length = first.keys.shape[-2]
    if not owned and any(type(layer) is not DynamicLayer or layer.keys is None or layer.keys.shape[-2] != length or
                         layer.keys.shape[0] != 1 for layer in cache.layers):
        return None
    if not next_position_only(kwargs, length):
        return None
    token = int(ids.view(-1)[0])
    logits = fused.step(rt, cache, token, length, owned)
    return model_output(MoeCausalLMOutputWithPast, logits=logits, cache=cache)
