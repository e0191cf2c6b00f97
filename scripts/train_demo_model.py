#!/usr/bin/env python3
"""Train the small embedded Mixtral-architecture demo model.

The model is a genuine ``MixtralForCausalLM`` (8 experts, top-2 routing,
grouped-query attention) trained from scratch on English quotations from the
Debian ``fortunes`` and ``fortunes-min`` packages, with its own byte-level BPE
tokenizer.  It is small enough to ship inside the package (< 25 MB in bf16)
and trains on one CPU thread in well under an hour.

Corpus setup (Debian/Ubuntu, as root)::

    apt-get update && apt-get install -y fortunes fortunes-min

Example::

    python scripts/train_demo_model.py --out mixtral_offload_plugin/models/demo_model \
        --seed 0 --steps 360 --threads 1 --aux-coef 0.04

``--minutes`` may be given instead of ``--steps``: the script then times a few
warm-up steps and fixes the total step count from that estimate (printed, so
the run can be reproduced exactly with ``--steps``).  Given ``--steps`` the run
is deterministic for a given seed, thread count and library versions.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import time
from pathlib import Path

import torch

from mixtral_offload_plugin.errors import MixtralOffloadError
from mixtral_offload_plugin.models.demo_model import corpus

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] | trim + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# --------------------------------------------------------------------------- data
# The recipe (files read, preparation, the seeded split) lives in the package (models/demo_model/corpus.py), so
# `mixtral-offload eval` rebuilds the very held-out split this script trains without.
normalise, split_docs = corpus.normalise, corpus.split_docs


def load_fortunes(fortune_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """Return (documents, source file names) in a deterministic order."""
    try:
        return corpus.load_fortunes(fortune_dir)
    except MixtralOffloadError as exc:
        sys.exit(str(exc))


# ---------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        # like the Llama/Mixtral tokenizers: prepend <s> when add_special_tokens=True
        processors.TemplateProcessing(
            single="<s> $A:0",
            pair="<s> $A:0 <s> $B:1",
            special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))],
        ),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    tokenizer.save_pretrained(out_dir)
    # Name the generic fast-tokenizer class so that both transformers 4.x and 5.x
    # resolve it (5.x writes its internal alias "TokenizersBackend").
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def encode_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    return torch.tensor(corpus.encode_stream(tokenizer, docs), dtype=torch.long)


# -------------------------------------------------------------------------- model
def build_config(args, tokenizer):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.ctx,
        num_local_experts=8,
        num_experts_per_tok=2,
        output_router_logits=False,  # enabled explicitly during training
        router_aux_loss_coef=args.aux_coef,
        router_jitter_noise=0.0,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        sliding_window=None,
        attention_dropout=0.0,
        initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


@torch.no_grad()
def evaluate(model, data: torch.Tensor, ctx: int, batch: int) -> float:
    """Mean next-token cross entropy over non-overlapping windows of ``data``."""
    model.eval()
    n = (data.numel() - 1) // ctx
    total, count = 0.0, 0
    for i in range(0, n, batch):
        idx = torch.arange(i, min(i + batch, n)) * ctx
        x = torch.stack([data[j : j + ctx] for j in idx.tolist()])
        y = torch.stack([data[j + 1 : j + ctx + 1] for j in idx.tolist()])
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += y.numel()
    model.train()
    return total / max(count, 1)


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float, decay_frac: float) -> float:
    """Warmup-stable-decay: linear warmup, constant peak, cosine decay over the last
    ``decay_frac`` of the steps.  Before the decay starts the schedule does not
    depend on ``total``, so a run can be given its final length late (see --ckpt)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_start = int(total * (1.0 - decay_frac))
    if step < decay_start:
        return peak
    p = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * p))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory for the model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="number of optimiser steps")
    ap.add_argument("--minutes", type=float, default=None,
                    help="time budget; total steps are estimated from timed warm-up steps")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--decay-frac", type=float, default=0.25,
                    help="fraction of the steps spent in the final cosine decay")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.04, help="per-layer router load-balancing loss coefficient")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--val-frac", type=float, default=0.05)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--log-json", default=None, help="optional path for a JSON training summary")
    ap.add_argument("--ckpt", default=None,
                    help="resumable training checkpoint, written every --ckpt-every steps and "
                         "resumed from if it exists (--steps then overrides the stored total, "
                         "which gives the same run as that --steps from scratch as long as the "
                         "decay phase had not started). SIGUSR1 writes it and exits.")
    ap.add_argument("--ckpt-every", type=int, default=50)
    args = ap.parse_args(argv)
    if args.steps is None and args.minutes is None:
        ap.error("give --steps or --minutes")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    from transformers import GenerationConfig, MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    t_start = time.time()
    docs, used = load_fortunes()
    train_docs, val_docs = split_docs(docs, args.seed, args.val_frac)
    print(f"corpus: {len(docs)} documents from {len(used)} files; "
          f"train {len(train_docs)} / val {len(val_docs)}", flush=True)

    tokenizer = train_tokenizer(train_docs, args.vocab)
    train_ids = encode_stream(tokenizer, train_docs)
    val_ids = encode_stream(tokenizer, val_docs)
    print(f"tokenizer: vocab {len(tokenizer)}; train tokens {train_ids.numel()}, "
          f"val tokens {val_ids.numel()}", flush=True)

    config = build_config(args, tokenizer)
    model = MixtralForCausalLM(config)
    model.router_aux_loss_coef = 0.0  # per-layer aux loss is added in the loop below
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    # Deterministic data order: random window offsets from a seeded generator.
    gen = torch.Generator().manual_seed(args.seed)
    max_start = train_ids.numel() - args.ctx - 1

    def get_batch():
        starts = torch.randint(0, max_start, (args.batch,), generator=gen)
        return torch.stack([train_ids[s : s + args.ctx] for s in starts.tolist()])

    total_steps = args.steps
    calib_steps = 10
    t_calib = None  # --minutes: set when step 3 starts, read when step calib_steps + 3 starts
    history = []
    t_train = time.time()
    step = 0
    ema = None
    ckpt = Path(args.ckpt) if args.ckpt else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, ema, history, total_steps = state["step"], state["ema"], state["history"], state["total_steps"]
        t_train -= state["train_seconds"]
        if args.steps is not None and args.steps != total_steps:
            if step >= int(total_steps * (1.0 - args.decay_frac)):
                print("warning: changing the length after the decay phase started", flush=True)
            total_steps = args.steps
        print(f"resumed from {ckpt} at step {step} of {total_steps}", flush=True)

    stop = {"flag": False}

    def request_stop(signum, frame):  # SIGUSR1: finish the current step, checkpoint, exit
        stop["flag"] = True
        print("stop requested: checkpointing after this step", flush=True)

    def save_ckpt():
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                    "step": step, "ema": ema, "history": history, "total_steps": total_steps,
                    "train_seconds": time.time() - t_train}, ckpt)

    signal.signal(signal.SIGUSR1, request_stop)

    while True:
        if stop["flag"] and ckpt is not None and total_steps is not None:
            save_ckpt()
            print(f"paused at step {step}; checkpoint {ckpt}", flush=True)
            return 0
        if total_steps is None and step == calib_steps + 3:
            per_step = (time.time() - t_calib) / calib_steps
            remaining = args.minutes * 60 - (time.time() - t_start) - 60  # reserve for eval/save
            total_steps = max(step + 1, step + int(remaining / per_step))
            print(f"timing: {per_step:.2f}s/step -> total steps {total_steps} "
                  f"(reproduce with --steps {total_steps})", flush=True)
        if total_steps is not None and step >= total_steps:
            break
        if step == 3:
            t_calib = time.time()
        lr = lr_at(step, total_steps or 10**9, args.warmup, args.lr, args.min_lr, args.decay_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        x = get_batch()
        # labels are shifted inside the model.  The built-in aux loss pools the
        # router statistics of all layers, which lets each layer collapse onto
        # a couple of experts as long as different layers pick different ones;
        # so it is switched off (coefficient 0 on the module) and the
        # load-balancing loss is applied to every layer separately instead.
        out = model(input_ids=x, labels=x, output_router_logits=True)
        aux_layers = [
            load_balancing_loss_func((g,), config.num_local_experts, config.num_experts_per_tok)
            for g in out.router_logits
        ]
        aux = torch.stack(aux_layers).mean()
        loss = out.loss + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lm = out.loss.item()
        ema = lm if ema is None else 0.95 * ema + 0.05 * lm
        if step % args.log_every == 0 or step == (total_steps or 0) - 1:
            el = time.time() - t_train
            with torch.no_grad():
                top = [torch.bincount(torch.topk(g, config.num_experts_per_tok, dim=-1).indices.reshape(-1),
                                      minlength=config.num_local_experts).max().item()
                       / (g.shape[0] * config.num_experts_per_tok) for g in out.router_logits]
            print(f"step {step:5d} lr {lr:.2e} loss {lm:.4f} (ema {ema:.4f}) "
                  f"aux {aux.item():.4f} max-usage/layer {' '.join(f'{t:.2f}' for t in top)} "
                  f"elapsed {el / 60:.1f}m", flush=True)
            history.append({"step": step, "loss": lm, "ema": ema, "aux": aux.item(), "max_usage": top})
        if args.eval_every and step > 0 and step % args.eval_every == 0:
            vl = evaluate(model, val_ids, args.ctx, 8)
            print(f"step {step:5d} val loss {vl:.4f} ppl {math.exp(vl):.2f}", flush=True)
        step += 1
        if ckpt is not None and total_steps is not None and step % args.ckpt_every == 0:
            save_ckpt()

    train_minutes = (time.time() - t_train) / 60
    val_loss = evaluate(model, val_ids, args.ctx, 8)
    print(f"final: train loss (ema) {ema:.4f}, val loss {val_loss:.4f}, "
          f"val ppl {math.exp(val_loss):.2f}, train time {train_minutes:.1f} min", flush=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        max_new_tokens=64,
    ).save_pretrained(out_dir)
    info = {
        "seed": args.seed,
        "steps": step,
        "threads": args.threads,
        "args": vars(args),
        "corpus_files": used,
        "train_docs": len(train_docs),
        "val_docs": len(val_docs),
        "train_tokens": int(train_ids.numel()),
        "val_tokens": int(val_ids.numel()),
        "parameters": n_params,
        "final_train_loss_ema": ema,
        "final_val_loss_fp32": val_loss,
        "final_val_ppl_fp32": math.exp(val_loss),
        "train_minutes": train_minutes,
        "total_minutes": (time.time() - t_start) / 60,
        "torch": torch.__version__,
        "history": history,
    }
    if args.log_json:
        Path(args.log_json).write_text(json.dumps(info, indent=1) + "\n")
    print(f"saved to {out_dir} ({info['total_minutes']:.1f} min total)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
