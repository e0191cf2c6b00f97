"""Stand-in for `modules.loaders`: loader -> Model-tab element names, loader -> samplers, cached helpers."""

import functools
from collections import OrderedDict

loaders_and_params = OrderedDict({
    "llama.cpp": ["gpu_layers", "ctx_size", "cache_type", "cpu_moe"],
    "Transformers": ["gpu_split", "cpu_memory", "compute_dtype", "cpu", "bf16", "no_use_fast", "ctx_size"],
})


def transformers_samplers():
    return {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "dry_multiplier", "xtc_threshold",
            "seed", "ban_eos_token", "add_bos_token", "grammar_string"}


loaders_samplers = {
    "Transformers": transformers_samplers(),
    "llama.cpp": {"temperature", "top_p", "top_k", "min_p", "seed"},
}


@functools.cache
def list_all_samplers():
    return sorted({s for samplers in loaders_samplers.values() for s in samplers})


@functools.cache
def get_all_params():
    return sorted({p for params in loaders_and_params.values() for p in params})


@functools.cache
def list_model_elements():
    return ["filter_by_loader", "loader", "cpu_memory", "gpu_layers", "ctx_size", "cache_type", "gpu_split",
            "compute_dtype", "cpu", "bf16", "no_use_fast", "cpu_moe"]


def blacklist_samplers(loader, dynamic_temperature):
    """Visibility per sampler (TextGen returns gr.update objects); indexes the table, so unknown loaders fail."""
    return [loader == "All" or s in loaders_samplers[loader] for s in list_all_samplers()]


def make_loader_params_visible(loader):
    params = loaders_and_params.get(loader, [])
    return [p in params for p in get_all_params()]
