"""The fields and loading logic shared by `MixtralOffloadLLM` and `ChatMixtralOffload`.

A pydantic mixin: it turns the LangChain-facing options into a shared model, a tokenizer and a streamed generation
of the model's session (`mixtral_offload_plugin.Session`), and knows nothing about LangChain's message or output
types.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from mixtral_offload_plugin import GenerationError, Session
from mixtral_offload_plugin.runtime.session import Generation

from . import _runtime

# generate() options a caller may override per call (`model.bind(max_tokens=8)`, `model.invoke(x, seed=1)`)
CALL_OPTIONS = ("temperature", "max_tokens", "top_p", "top_k", "seed", "timeout")
# per-call constraints on the reply (`model.invoke(x, json_schema={...})`; the session's options of the same names)
CONSTRAINT_OPTIONS = ("json_schema", "regex", "grammar")
# keyword arguments LangChain itself may pass down, which have no meaning for a local generation
IGNORED_KWARGS = ("stream", "ls_structured_output_format")


class OffloadParams(BaseModel):
    """Fields shared by the completion and chat classes."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), arbitrary_types_allowed=True)

    model_path: str | None = None
    """Checkpoint folder (plain Hugging Face or offload format). None: the embedded demo model."""

    model: Any = Field(default=None, exclude=True)
    """An already loaded model (from `mixtral_offload_plugin.load_model` or the `load_offloaded_model` hook).

    Several LangChain objects given the same model share one runtime.
    Give either this or `model_path`/`offload`."""

    tokenizer: Any = Field(default=None, exclude=True)
    """A tokenizer folder or a transformers tokenizer object. None: the one saved with the checkpoint."""

    offload: dict[str, Any] = Field(default_factory=dict)
    """`OffloadConfig` options, e.g. `{"experts_per_layer": 2, "expert_bits": 4}`; validated on construction.

    Models are cached per (model_path, offload) for the whole process: equal options share one loaded model."""

    temperature: float = 0.7
    """Sampling temperature; 0 is greedy decoding (deterministic)."""

    max_tokens: int = 256
    """Most new tokens to generate per call."""

    top_p: float | None = 0.95
    """Nucleus sampling: keep the most likely tokens whose probabilities add up to `top_p` (unused when greedy)."""

    top_k: int | None = None
    """Sample among the `top_k` most likely tokens only (ignored when greedy). None: the model's default."""

    stop: list[str] | None = None
    """Stop strings: the output ends just before the first one; generation halts as soon as one appears."""

    seed: int | None = None
    """Seed of torch's random generator, set right before each generation while the model is held: equal seeds
    and inputs give equal outputs, also when other threads use the same model. None: not reseeded."""

    timeout: float | None = None
    """Seconds a call may take, waiting for the shared model included; past it the generation is halted and
    `TimeoutError` raised. None: no limit."""

    max_retries: int = 0
    """Accepted for LangChain's standard parameters. Generation is local: there is no network failure to
    retry, and a failed generation fails the same way again, so calls are never retried whatever this is."""

    reuse_prefix: bool = True
    """Keep the KV cache of the model's last request and reuse it for the prompt prefix the next call shares with
    it (a conversation one turn later, or a prompt that extends the previous one): only the new tokens are
    processed, and the output is what a fresh generation gives. One cache per loaded model, shared by every
    instance using it; calls from other conversations start fresh."""

    streaming: bool = False
    """Chat model: make `invoke` take the streaming path, so callbacks get each token (the completion
    class always does). The output is the same either way."""

    _config: Any = PrivateAttr(default=None)
    _path: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check_options(self) -> OffloadParams:
        if self.model is not None and (self.model_path is not None or self.offload):
            msg = "give either model= (an already loaded model) or model_path=/offload=, not both"
            raise ValueError(msg)
        if self.model is None:
            self._config = _runtime.make_config(self.offload)
        if self.temperature < 0:
            msg = f"temperature={self.temperature!r} is invalid: use 0 (greedy) or a positive number"
            raise ValueError(msg)
        if self.top_p is not None and not 0 < self.top_p <= 1:
            msg = f"top_p={self.top_p!r} is invalid: use a number in (0, 1]"
            raise ValueError(msg)
        if self.max_tokens < 1:
            msg = f"max_tokens={self.max_tokens!r} is invalid: use an integer >= 1"
            raise ValueError(msg)
        if self.timeout is not None and self.timeout <= 0:
            msg = f"timeout={self.timeout!r} is invalid: use a positive number of seconds, or None"
            raise ValueError(msg)
        return self

    # -- loading ---------------------------------------------------------------------------------------------

    def _load(self) -> tuple[Any, Any]:
        """The shared model and tokenizer, loaded on first use."""
        model = self.model if self.model is not None else _runtime.shared_model(self._checkpoint_dir(), self._config)
        source = self.tokenizer
        if source is None:
            source = self._checkpoint_dir(model)
            if source is None:
                msg = (
                    "cannot tell where the model's tokenizer is; pass tokenizer=<folder or tokenizer object>"
                )
                raise ValueError(msg)
        return model, _runtime.shared_tokenizer(source)

    def _checkpoint_dir(self, model: Any = None) -> str | None:
        if self.model is None:
            if self._path is None:  # resolved on first use: the demo model may have to be made first
                self._path = _runtime.resolve_path(self.model_path)
            return self._path
        model = model if model is not None else self.model
        return Session(model).path

    @property
    def model_name(self) -> str:
        """The checkpoint folder's name (what LangSmith and response metadata report)."""
        if self.model is None and self.model_path is None:
            return "mixtral-offload-demo"
        folder = self._checkpoint_dir()
        return Path(folder).name if folder else type(self.model).__name__

    # -- per-call options ------------------------------------------------------------------------------------

    def _call_options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(kwargs) - set(CALL_OPTIONS) - set(CONSTRAINT_OPTIONS) - set(IGNORED_KWARGS))
        if unknown:
            msg = (f"unknown generation option(s) {unknown}; known: {list(CALL_OPTIONS)}, stop and the constraints "
                   f"{list(CONSTRAINT_OPTIONS)}")
            raise TypeError(msg)
        opts = {name: kwargs.get(name, getattr(self, name)) for name in CALL_OPTIONS}
        stops = list(self.stop or [])
        stops += [s for s in stop or [] if s not in stops]
        opts["stop"] = stops
        return opts

    def _start(self, model: Any, tok: Any, input_ids: Any, stop: list[str] | None, kwargs: dict[str, Any],
               constraint: dict[str, Any] | None = None) -> Generation:
        """Start the session's generation; `constraint` (a forced tool call's) or the call's own json_schema/regex/
        grammar option constrains the reply."""
        o = self._call_options(stop, kwargs)
        given = {k: kwargs[k] for k in CONSTRAINT_OPTIONS if kwargs.get(k) is not None}
        if constraint and given:
            msg = f"a forced tool call is already constrained: drop {sorted(given)} or use tool_choice='auto'"
            raise ValueError(msg)
        try:
            gen = Session(model, tok).generate(
                input_ids,
                max_new_tokens=o["max_tokens"],
                temperature=o["temperature"] or 0.0,
                top_p=o["top_p"],
                top_k=o["top_k"],
                seed=o["seed"],
                timeout=o["timeout"],
                stop=o["stop"],
                reuse_prefix=self.reuse_prefix,
                source="langchain",
                **(constraint or given),
            )
        except GenerationError as exc:  # LangChain's callers expect ValueError for bad options
            raise ValueError(str(exc)) from None
        return gen.start()

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_path": self._checkpoint_dir(),
            "offload": dict(self.offload),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": self.stop,
            "reuse_prefix": self.reuse_prefix,
        }

    def _ls_params(self, model_type: str, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        name = kwargs.get("model")
        params: dict[str, Any] = {
            "ls_provider": "mixtral_offload",
            "ls_model_name": name if isinstance(name, str) else self.model_name,
            "ls_model_type": model_type,
            "ls_temperature": kwargs.get("temperature", self.temperature),
            "ls_max_tokens": kwargs.get("max_tokens", self.max_tokens),
        }
        stops = stop or self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params
