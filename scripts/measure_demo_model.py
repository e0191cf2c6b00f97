#!/usr/bin/env python3
"""Measure the embedded demo model: perplexity and routing statistics.

Reports, on the held-out validation split of the training corpus (the same
split ``train_demo_model.py`` makes for the same ``--seed``/``--val-frac``):

* validation perplexity (next-token, non-overlapping windows of ``--ctx``);
* expert usage per layer: the fraction of all top-k routings that go to each
  expert (an even spread is 12.5% for 8 experts);
* per layer, the probability that a token is routed to at least one of the
  experts the previous token used in that same layer, against the value
  expected by chance, 1 - C(E-k, k) / C(E, k) (46.4% for top-2 of 8).

Routing is recorded with a forward hook on every layer's ``mlp.gate``
(``MixtralTopKRouter`` returns ``(router_logits, top_k_weights, top_k_index)``).

Example::

    python scripts/measure_demo_model.py --json /tmp/demo_metrics.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from math import comb
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE.parent / "mixtral_offload_plugin" / "models" / "demo_model"


def chance_reuse(num_experts: int, top_k: int) -> float:
    return 1.0 - comb(num_experts - top_k, top_k) / comb(num_experts, top_k)


def find_routers(model):
    layers = model.model.layers
    routers = []
    for layer in layers:
        moe = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        routers.append(moe.gate)
    return routers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory")
    ap.add_argument("--seed", type=int, default=0, help="seed used for the train/val split")
    ap.add_argument("--val-frac", type=float, default=0.05)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="compute dtype (weights are stored in bf16)")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    ap.add_argument("--sample", default="The meaning of life is",
                    help="prompt for a sample generation ('' to skip)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from train_demo_model import encode_stream, load_fortunes, split_docs
    from transformers import AutoTokenizer, MixtralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = MixtralForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model.eval()
    cfg = model.config
    n_exp, top_k = cfg.num_local_experts, cfg.num_experts_per_tok

    docs, _ = load_fortunes()
    _, val_docs = split_docs(docs, args.seed, args.val_frac)
    val_ids = encode_stream(tokenizer, val_docs)

    # ---- routing hooks
    records: list[list[torch.Tensor]] = [[] for _ in range(cfg.num_hidden_layers)]

    def make_hook(i):
        def hook(_module, _inputs, output):
            _logits, _weights, index = output
            records[i].append(index.detach().reshape(-1, top_k).clone())
        return hook

    handles = [r.register_forward_hook(make_hook(i)) for i, r in enumerate(find_routers(model))]

    ctx = args.ctx
    n_win = (val_ids.numel() - 1) // ctx
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n_win, args.batch):
            starts = [j * ctx for j in range(i, min(i + args.batch, n_win))]
            x = torch.stack([val_ids[s : s + ctx] for s in starts])
            y = torch.stack([val_ids[s + 1 : s + ctx + 1] for s in starts])
            logits = model(input_ids=x, use_cache=False).logits.float()
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
            count += y.numel()
            # router outputs are flattened (batch*seq, k); reshape back per window
            for rec in records:
                rec[-1] = rec[-1].reshape(len(starts), ctx, top_k)
    for h in handles:
        h.remove()

    val_loss = nll / count
    chance = chance_reuse(n_exp, top_k)
    layers = []
    for i, rec in enumerate(records):
        idx = torch.cat(rec, dim=0)  # (windows, ctx, k)
        counts = torch.bincount(idx.reshape(-1), minlength=n_exp).double()
        usage = (counts / counts.sum()).tolist()
        prev, cur = idx[:, :-1, :], idx[:, 1:, :]
        # reuse: any expert of the current token among the previous token's experts
        hit = (cur.unsqueeze(-1) == prev.unsqueeze(-2)).any(-1).any(-1)
        reuse = hit.double().mean().item()
        layers.append({"layer": i, "usage": usage, "reuse": reuse,
                       "max_usage": max(usage), "min_usage": min(usage)})

    result = {
        "model": str(args.model),
        "dtype": args.dtype,
        "val_tokens": int(val_ids.numel()),
        "scored_tokens": count,
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "num_experts": n_exp,
        "top_k": top_k,
        "chance_reuse": chance,
        "layers": layers,
        "all_experts_used": all(row["min_usage"] > 0 for row in layers),
        "no_expert_above_50pct": all(row["max_usage"] <= 0.5 for row in layers),
    }

    print(f"model: {args.model}")
    print(f"validation: {count} scored tokens, loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f}")
    print("\nexpert usage (% of routings) per layer:")
    print("layer | " + " | ".join(f"E{e}" for e in range(n_exp)) + " | max")
    for row in layers:
        print(f"{row['layer']:5d} | " + " | ".join(f"{100 * u:4.1f}" for u in row["usage"])
              + f" | {100 * row['max_usage']:.1f}")
    print(f"\nP(token reuses >=1 of previous token's experts), chance = {100 * chance:.1f}%:")
    for row in layers:
        print(f"  layer {row['layer']}: {100 * row['reuse']:.1f}%  ({row['reuse'] / chance:.2f}x chance)")
    print(f"\nall experts used: {result['all_experts_used']}; "
          f"no expert above 50%: {result['no_expert_above_50pct']}")

    if args.sample:
        torch.manual_seed(args.seed)
        enc = tokenizer(args.sample, return_tensors="pt")
        out = model.generate(**enc, do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=60)
        text = tokenizer.decode(out[0], skip_special_tokens=True)
        result["sample_prompt"] = args.sample
        result["sample"] = text
        print(f"\nsample (seed {args.seed}, temperature 0.8, top_p 0.95):\n{text}")

    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
