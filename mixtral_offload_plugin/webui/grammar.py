"""TextGen's grammar with our loader: the Parameters tab's `grammar_string` (GBNF; the API's `grammar_string` too)
constrains the reply through our constraint (llguidance, `runtime/constraints.py`) instead of TextGen's own grammar
processor.

Owns the extension's `state_modifier` (`constrain`). TextGen would add its own grammar logits processor on the HF
path our loader uses; it works with our model, but it is pure Python (a token trie walked per step) and has no
budget. When the loaded model is ours and a request carries a grammar, `constrain` compiles the grammar for the
loaded tokenizer (one that cannot be used is TextGen's error: the UI's toast, the API's error response), hands TextGen
our processor the way TextGen passes one (`state["logits_processor"]`, beside any it already holds, e.g. the API's
logit bias), and empties the grammar in the request's copy of the state so TextGen adds nothing of its own. TextGen
sorts such processors ahead of its samplers; they run on our fused decode path and with prefix reuse like any
generation. Other loaders' requests, and ours without llguidance installed (TextGen's processor then applies), are
left as they are. Knows nothing about how the model was loaded.
"""

from __future__ import annotations

import logging
from typing import Any

from . import LOADER

_warned: list[bool] = []


def constrain(state: dict[str, Any], model: Any, tokenizer: Any, error: type[Exception],
              log: Any = None) -> dict[str, Any]:
    """`state`, or a copy whose `logits_processor` holds our constraint of its `grammar_string` (emptied). `model` is
    the loaded model when it is ours (else None: nothing changes); `error` is the exception class TextGen shows
    (integration.py's), raised for a grammar that cannot be used; `log`, TextGen's logger."""
    log = log or logging.getLogger(__name__)
    grammar = str(state.get("grammar_string") or "").strip()
    if not grammar or model is None:
        return state
    from ..errors import BackendUnavailableError, ConstraintError
    from ..runtime.session import Session

    session = Session(model, tokenizer)
    try:
        compiled = session.constraint(grammar=grammar)
    except BackendUnavailableError as exc:
        if not _warned:
            _warned.append(True)
            log.warning("%s: %s; TextGen's own grammar processor applies (slower)", LOADER, exc)
        return state
    except ConstraintError as exc:
        msg = f"{LOADER}: the grammar cannot be used: {exc}"
        raise error(msg) from None
    if compiled is None:
        return state
    from transformers import LogitsProcessorList

    budget = None if state.get("auto_max_new_tokens") else int(state.get("max_new_tokens") or 0) or None
    given = state.get("logits_processor")
    given = [] if given is None else list(given) if isinstance(given, list | tuple) else [given]
    out = dict(state)
    out["grammar_string"] = ""
    out["logits_processor"] = LogitsProcessorList([*given, compiled.processor(budget)])
    log.info("%s: the reply is constrained to the grammar (llguidance)", LOADER)
    return out
