"""Stand-in for TextGen's HF generation path (`generate_reply_HF`), as the notes describe it.

The prompt goes in as `inputs=`, stopping criteria include a stop-everything check, and streaming runs
`model.generate` in a worker thread whose per-token stopping-criteria callback feeds a queue. Leaving the loop early
(client disconnect, Stop button) makes the next callback raise in the worker, abandoning the generation mid-stream.
Replies are cumulative; a first token starting with "▁" gets its leading space back. A logits processor the state
holds (`state["logits_processor"]`, how TextGen passes one) joins the generation's.
"""

import queue
import threading

import torch
import transformers

from modules import shared


class StopNowException(Exception):
    pass


class StopEverything(transformers.StoppingCriteria):
    def __call__(self, input_ids, scores):
        return shared.stop_everything


class Stream(transformers.StoppingCriteria):
    def __init__(self, callback):
        self.callback = callback

    def __call__(self, input_ids, scores):
        self.callback(input_ids[0])
        return False


def encode(prompt):
    ids = shared.tokenizer.encode(str(prompt), return_tensors="pt")
    bos = shared.tokenizer.bos_token_id
    if bos is not None and (ids.shape[-1] == 0 or ids[0, 0] != bos):
        ids = torch.cat([torch.tensor([[bos]]), ids], 1)
    return ids.to(shared.model.device)


def decode_reply(output_ids, starting_from):
    reply = shared.tokenizer.decode(output_ids[starting_from:], skip_special_tokens=True)
    if (len(output_ids) > starting_from and not reply.startswith(" ")
            and shared.tokenizer.convert_ids_to_tokens(int(output_ids[starting_from])).startswith("\u2581")):
        reply = " " + reply
    return reply


def generate_reply_HF(question, original_question, state, stopping_strings=None, is_chat=False):
    input_ids = encode(question)
    eos = [shared.tokenizer.eos_token_id]
    params = {"inputs": input_ids, "eos_token_id": eos, "use_cache": True,
              "stopping_criteria": transformers.StoppingCriteriaList([StopEverything()]),
              "logits_processor": transformers.LogitsProcessorList(state.get("logits_processor") or []),
              "max_new_tokens": state["max_new_tokens"], "do_sample": state["do_sample"]}
    for key in ("temperature", "top_k", "top_p"):
        if key in state:
            params[key] = state[key]
    if state.get("ban_eos_token"):
        params["suppress_tokens"] = eos
    start = input_ids.shape[-1]
    if not state["stream"]:
        with torch.no_grad():
            output = shared.model.generate(**params)[0]
        yield decode_reply(output, start)
        return

    items, done, stop_now = queue.Queue(), object(), threading.Event()

    def callback(ids):
        if stop_now.is_set() or shared.stop_everything:
            raise StopNowException
        items.put(ids.clone())

    def task():
        try:
            params["stopping_criteria"].append(Stream(callback))
            with torch.no_grad():
                shared.model.generate(**params)
        except StopNowException:
            pass
        except Exception as exc:  # handed to the consumer
            items.put(exc)
        items.put(done)

    worker = threading.Thread(target=task, name="fake-textgen-stream")
    worker.start()
    reply, position = "", start
    try:
        while (output := items.get()) is not done:
            if isinstance(output, Exception):
                raise output
            if int(output[-1]) in eos:
                break
            reply += decode_reply(output, position)
            position = len(output)
            yield reply
    finally:
        stop_now.set()
