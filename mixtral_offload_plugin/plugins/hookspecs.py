"""Every hook a mixtral-offload plugin can implement, in one place.

Registration hooks receive a `register(name, factory)` callback and are called once when a model is built (never per
token). Observer hooks fire once per event with frozen data. `load_offloaded_model` is the one "pick one" hook: the
adapters (LangChain, Gradio demo, TextGen loader) obtain the runtime through it, so another runtime can stand in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("mixtral_offload")
hookimpl = pluggy.HookimplMarker("mixtral_offload")

Register = Callable[[str, Any], None]

# -- backends: called once when a model is built ------------------------------------------------------------------


@hookspec
def register_cache_policies(register: Register) -> None:
    """Register eviction policies for the expert cache.

    :param register: call ``register(name, factory)``; ``factory()`` returns a new object with
        ``on_insert(key)``, ``on_access(key)``, ``on_remove(key)`` and ``victim(candidates) -> key``
        (see ``mixtral_offload_plugin.cache.policies.EvictionPolicy``), and optionally ``attach(cache)``, called
        once first, to share per-cache state such as ``cache.routing_stats.routing_stats(cache)``. One instance is
        made per slot pool. Selected with ``OffloadConfig(policy=name)``; built-ins "history" (default), "lru",
        "lfu", "lfru".
    """


@hookspec
def register_expert_stores(register: Register) -> None:
    """Register expert stores (the slow tier holding every packed expert).

    :param register: call ``register(name, factory)``; ``factory(config, device)`` returns an object with
        ``put(key, packed)``, ``layout(key)``, ``read_into(key, out)``, ``host_tensor(key)`` and ``close()``
        (see ``mixtral_offload_plugin.storage.stores.ExpertStore``). Selected with ``OffloadConfig(store=name)``.
    """


@hookspec
def register_quantizers(register: Register) -> None:
    """Register quantizers (how experts and attention projections are packed, and their kernels).

    :param register: call ``register(name, factory)``; ``factory()`` returns an object with
        ``pack_expert(weights, spec, device)``, ``expert_kernel(layout, device)`` and
        ``quantize_linear(linear, spec, device)`` (see ``mixtral_offload_plugin.quant.Quantizer``).
        The built-ins are "none" (16-bit) and "hqq" (2/3/4/8-bit).
    """


@hookspec
def register_prefetchers(register: Register) -> None:
    """Register speculative prefetchers.

    :param register: call ``register(name, factory)``; ``factory(cache, arch, blocks, config)`` returns a prefetcher
        or None. Once per MoE layer call, the layer calls the prefetcher's optional
        ``propose(layer, hidden_states) -> Tensor | None`` (device-side guesses, e.g. int64 ``[depth, n]``; must not
        sync the host), makes one host transfer carrying both the routed experts and the proposal, then calls
        ``after_route(layer, hidden_states, experts, proposal=...)`` with the proposal as nested lists (or None).
        A prefetcher without ``propose`` is called as ``after_route(layer, hidden_states, experts)``.
        Selected with ``OffloadConfig(prefetch=name)``; built-ins "gate+history" (default),
        "history", "gate" and "none".
    """


@hookspec
def register_architectures(register: Register) -> None:
    """Register model families (how to find their MoE layers and map checkpoint names to experts).

    :param register: call ``register(name, architecture)`` with a
        ``mixtral_offload_plugin.models.architectures.Architecture``; it is chosen by ``config.json``'s ``model_type``.
    """


@hookspec
def register_checkpoint_formats(register: Register) -> None:
    """Register checkpoint formats: readers of folders laid out otherwise than plain Hugging Face safetensors.

    :param register: call ``register(name, fmt)`` with a
        ``mixtral_offload_plugin.runtime.checkpoints.CheckpointFormat``: ``detect(path) -> bool`` (cheap: asked of
        every folder loaded) and ``open(path, config)`` returning a reader with the members of
        ``mixtral_offload_plugin.storage.reader.CheckpointReader`` (``config_dict``, ``keys()``, ``get(key)``,
        ``nbytes()``, ``close()``) and any of the optional ones of ``ReaderDefaults`` (packed experts through
        ``packed = True``, ``expert_layouts``, ``packed_expert`` and ``quantizer_name``); a reader lacking a
        required member is refused when opened. Formats are tried in registration order (built-ins "offload" and
        "mixtral-offloading" first); a folder none detects is read as plain safetensors.
    """


# -- the runtime: adapters obtain the model through this ----------------------------------------------------------


@hookspec(firstresult=True)
def load_offloaded_model(path: str, config: Any) -> Any:
    """Load a model for the adapters (LangChain, Gradio demo, TextGen loader).

    Stops at first non-None result. The built-in implementation (``trylast``) calls
    ``mixtral_offload_plugin.load_model``.

    :param path: checkpoint folder (plain Hugging Face or offload format).
    :param config: an ``OffloadConfig``.
    :return: an HF-compatible causal LM with ``offload_stats()`` and ``unload()``, or None to defer.
    """


# -- observers: called once per event ------------------------------------------------------------------------------


@hookspec
def on_model_loaded(model: Any, config: Any) -> None:
    """A model finished loading.

    :param model: the loaded model.
    :param config: the ``OffloadConfig`` it was built with.
    """


@hookspec
def on_generation_finished(stats: Any) -> None:
    """One ``generate()`` call finished (also when called through LangChain, the demo or TextGen).

    :param stats: a frozen ``mixtral_offload_plugin.stats.GenerationStats``.
    """
