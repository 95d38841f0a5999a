"""Retrofit the book's tiny language model with Dynamic Memory Compression (DMC, Nawrot et al., 2024).

    python scripts/retrofit_dmc.py --target-cr 2     # writes refimpl/models/weights/tiny_lm_dmc_cr2.{safetensors,json}

Continues training ``refimpl/models/weights/tiny_lm.safetensors`` as a :class:`DMCTinyLM`
(``refimpl/kvcache/dynamic_memory_compression.py``): the last feature of every head's query/key becomes the
importance/decision neuron (removed from the attention dot product and from RoPE), decisions are relaxed with a
Gumbel sigmoid (temperature 0.1), keys/values are partially accumulated over a 12-token window and the attention
gets the mask log(1 − α̃) (eqs. D5-D7). Loss = weighted next-token cross-entropy (as in the model's phase-2
training: task answers 1, prompts 0, grammar text 0.2) + the compression loss (eq. D8) whose target ratio is
annealed linearly from 1 to ``--target-cr`` over the first ``--anneal-frac`` of the steps and then held (the
official code's two regimes: annealing, then ``--dmc-finetune`` at the target). AdamW, constant learning rate
after a short warm-up, gradient clipping at 1. CPU, one thread, seeded (NumPy data stream and torch noise).

The .json records the sha256 of the base checkpoint it started from (``base_checkpoint_sha256``), the arguments,
the loss / compression curves, the wall time, and the measured results: exact match and achieved compression
ratio with the append-or-merge cache on kv_recall / needle at context 256 (``evaluate_dmc``, n=50, seed 1234) and
the per-layer, per-head fraction of the cache kept.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from refimpl._common import seed_everything  # noqa: E402
from refimpl.kvcache.dynamic_memory_compression import DMCTinyLM, dmc_loss, evaluate_dmc, straight_through, target_compression  # noqa: E402
from refimpl.models.corpus import training_batch  # noqa: E402
from refimpl.models.tiny_lm import WEIGHTS_DIR, load_tiny_lm  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target-cr", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--anneal-frac", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--neuron-lr-mult", type=float, default=20.0,
                   help="learning-rate multiplier of the decision/importance rows (feature D-1 of each head in "
                        "W_q and W_k): a short retrofit must move the decision logits by ~5 (not in the paper)")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--window", type=int, default=12)
    p.add_argument("--p-text", type=float, default=0.1)
    p.add_argument("--task-probs", default="0.45,0.45,0.1")
    p.add_argument("--text-weight", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-n", type=int, default=50)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    out = args.out or os.path.join(WEIGHTS_DIR, f"tiny_lm_dmc_cr{args.target_cr:g}.safetensors")
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    rng = np.random.default_rng(args.seed + 100)
    gen = torch.Generator().manual_seed(args.seed)
    with open(os.path.join(WEIGHTS_DIR, "tiny_lm.safetensors"), "rb") as f:
        base_sha = hashlib.sha256(f.read()).hexdigest()
    model = DMCTinyLM(load_tiny_lm(), window=args.window)
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters()], lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    probs = [float(x) for x in args.task_probs.split(",")]
    cfg = model.cfg
    rows = torch.arange(cfg.n_heads) * cfg.d_head + cfg.d_head - 1  # feature D-1 of every head
    neuron_w = [m for blk in model.base.layers for m in (blk.self_attn.q_proj.weight, blk.self_attn.k_proj.weight)]
    anneal = max(1, int(round(args.steps * args.anneal_frac)))
    curve = []
    t0 = time.time()
    bar = tqdm(range(args.steps), desc=f"DMC retrofit (CR {args.target_cr:g})", mininterval=5.0)
    for step in bar:
        batch, weights = training_batch(rng, args.batch_size, args.seq_len, p_text=args.p_text, prompt_weight=0.0,
                                        text_weight=args.text_weight, task_probs=probs, return_weights=True)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        logits, alpha = model(batch[:, :-1], mode="train", temperature=args.temperature, generator=gen)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        w = weights[:, 1:].reshape(-1)
        lm = (ce * w).sum() / w.sum()
        tgt_cr, prior = target_compression(step, anneal, args.target_cr)
        dec = straight_through(alpha).mean(dim=(2, 3))  # (n_layers, B): official layer_decisions
        closs, cr = dmc_loss(dec, prior)
        loss = lm + closs
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        before = [w.detach()[rows].clone() for w in neuron_w]
        opt.step()
        with torch.no_grad():  # per-row learning-rate multiplier: scale this step's update of the neuron rows
            for w, b0 in zip(neuron_w, before):
                w[rows] = b0 + args.neuron_lr_mult * (w[rows] - b0)
        curve.append((lm.item(), closs.item(), cr.item(), tgt_cr))
        if step % 10 == 0:
            bar.set_postfix(lm=f"{lm.item():.3f}", cr=f"{cr.item():.2f}", tgt=f"{tgt_cr:.2f}")
    train_time = time.time() - t0
    model.eval()
    c = np.array(curve)
    meta = {
        "training": {k: v for k, v in vars(args).items() if k != "out"},
        "base_checkpoint": "tiny_lm.safetensors",
        "base_checkpoint_sha256": base_sha,
        "train_wall_time_s": round(train_time, 1),
        "torch_version": torch.__version__,
        "curve_every_10": {"lm_loss": [round(float(x), 4) for x in c[::10, 0]],
                           "dmc_loss": [round(float(x), 4) for x in c[::10, 1]],
                           "train_cr": [round(float(x), 3) for x in c[::10, 2]],
                           "target_cr": [round(float(x), 3) for x in c[::10, 3]]},
        "final_train_cr": float(np.mean(c[-20:, 2])),
        "final_lm_loss": float(np.mean(c[-20:, 0])),
    }
    res = {}
    for task in ("kv_recall", "needle"):
        d = evaluate_dmc(model, task, n=args.eval_n, context_len=256, return_details=True)
        res[task] = {"accuracy": d["accuracy"], "compression_ratio": round(d["compression_ratio"], 4),
                     "kept_fraction": [[round(float(x), 4) for x in row] for row in d["kept_fraction"]]}
    meta["eval_256"] = res
    model.base.save(out, meta)
    print({k: (v["accuracy"], v["compression_ratio"]) for k, v in res.items()}, meta["final_train_cr"], round(train_time))
    return meta


if __name__ == "__main__":
    main()
