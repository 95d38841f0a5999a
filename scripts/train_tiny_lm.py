"""Train the book's tiny character-level language model (refimpl.models.tiny_lm) on its own corpus.

    python scripts/train_tiny_lm.py            # reproduces refimpl/models/weights/tiny_lm.{safetensors,json}

CPU only, seeded (default seed 2, see below). Two phases (see --help): phase 1 as below; phase 2 continues with a
fresh AdamW, a new data stream (seed + 1) and a retrieval-heavy task mix (--phase2-*), which makes sure the model
answers key-value and needle questions, not only copies. ``--phase1-checkpoint`` resumes from a phase-1 output (a
test checks that this equals one full run bit for bit). ``val_loss`` in the .json is the *unweighted* loss on fresh
training rows, random prompt characters included (they are not trained, so it is high); the task accuracies are the
meaningful figures.

Retrieval emerges abruptly (the loss drops from about 1.0 to 0.2 within a few hundred steps), and *when* depends on
the seed: with seed 2 it happens during phase 1; with seeds 0 and 1 it had not happened by phase-2 step 1,900 and
step 2,200 of phase 1 respectively (loss still near 1.0 and 0.4), so the book uses seed 2.

Data: documents from ``refimpl.models.corpus.training_stream`` (toy-grammar text and the
key–value recall, needle and copy tasks with random context lengths) packed into rows of ``seq_len``
tokens; next-token cross-entropy, weighted: task answers 1, task prompts ``--prompt-weight`` (0: their
random keys, values, codes and words cannot be predicted, and their loss drowns the answers' signal —
with it the model learned no retrieval in 1,600 steps), grammar-text documents ``--text-weight``. The first ``--short-frac`` of the steps use documents of at most ``--short-doc-len`` tokens. Phase 1 trains on rows of ``--seq-len`` tokens, the
last ``--long-frac`` of the steps on rows of ``--long-seq-len`` tokens (documents up to that length), at the
same number of tokens per step. AdamW, linear warm-up then cosine decay, gradient clipping.

Determinism: the data stream (NumPy ``default_rng(seed)``), the initialisation (``torch.manual_seed``) and
the schedule are fully determined by the arguments (not by ``PYTHONHASHSEED``: a test trains in two processes with
different hash seeds); on the same machine, torch version and thread count
the run is bit-for-bit reproducible. Across machines / thread counts float reductions may sum in another
order, so weights agree only up to float round-off amplified by training (task accuracies agree to a
few points). ``--threads 1`` is the default: on a shared 2-core machine one thread was ~4x faster than two.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from refimpl._common import seed_everything  # noqa: E402
from refimpl.models.corpus import TOKENIZER, evaluate, training_batch  # noqa: E402
from refimpl.models.tiny_lm import DEFAULT_WEIGHTS, TinyLM, TinyLMConfig, load_metadata, load_tiny_lm  # noqa: E402

EVAL_CONTEXTS = {"kv_recall": (128, 256, 512, 1024), "needle": (128, 256, 512, 1024), "copy": (64, 128, 256, 512)}


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def eval_tasks(model: TinyLM, n: int, seed: int, contexts: dict = EVAL_CONTEXTS) -> tuple[dict, dict]:
    """Exact-match and per-character accuracy of greedy decoding, per task and context length."""
    acc: dict = {}
    char: dict = {}
    for task, cs in contexts.items():
        for c in cs:
            d = evaluate(model, task, n=n, context_len=c, seed=seed, return_details=True)
            acc.setdefault(task, {})[str(c)] = d["accuracy"]
            char.setdefault(task, {})[str(c)] = round(d["char_accuracy"], 4)
    return acc, char


def run_eval(model: TinyLM, meta: dict, args: argparse.Namespace) -> None:
    t1 = time.time()
    meta["task_accuracy"], meta["task_char_accuracy"] = eval_tasks(model, args.eval_n, args.eval_seed)
    meta["eval"] = {"n": args.eval_n, "seed": args.eval_seed, "metric": "exact match, greedy decoding",
                    "wall_time_s": round(time.time() - t1, 1)}


@torch.no_grad()
def val_loss(model: TinyLM, seed: int, seq_len: int, batches: int = 4, batch_size: int = 8) -> float:
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(batches):
        b = training_batch(rng, batch_size, seq_len)
        logits = model(b[:, :-1])
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1)).item())
    return float(np.mean(losses))


def train_step(model: TinyLM, opt: torch.optim.Optimizer, batch: torch.Tensor, weights: torch.Tensor,
               clip: float) -> float:
    """One AdamW step on the weighted next-token cross-entropy ``Σ w·CE / Σ w`` (0 when no target is weighted)."""
    logits = model(batch[:, :-1])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
    w = weights[:, 1:].reshape(-1)
    loss = (ce * w).sum() / w.sum().clamp_min(1e-12)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss.item()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--long-seq-len", type=int, default=512)
    p.add_argument("--long-frac", type=float, default=0.2, help="fraction of steps (at the end) on long rows")
    p.add_argument("--short-doc-len", type=int, default=96, help="curriculum: longest document in the first phase")
    p.add_argument("--short-frac", type=float, default=0.4, help="fraction of steps (at the start) on short documents")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--p-text", type=float, default=0.2, help="probability that a document is grammar text")
    p.add_argument("--prompt-weight", type=float, default=0.0, help="loss weight of the task prompts")
    p.add_argument("--text-weight", type=float, default=0.2, help="loss weight of grammar-text documents")
    p.add_argument("--phase2-steps", type=int, default=2400)
    p.add_argument("--phase2-lr", type=float, default=1e-3)
    p.add_argument("--phase2-p-text", type=float, default=0.1)
    p.add_argument("--phase2-task-probs", default="0.45,0.45,0.1", help="kv_recall,needle,copy probabilities")
    p.add_argument("--phase1-checkpoint", default="",
                   help="skip phase 1 and start from this checkpoint (written by this script with the same args)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=384)
    p.add_argument("--seed", type=int, default=2,
                   help="2: the committed checkpoint (with seed 0 retrieval had not emerged by phase-2 step 1,900)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-n", type=int, default=50, help="examples per task and context length")
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--out", default=DEFAULT_WEIGHTS)
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--eval-only", action="store_true", help="re-evaluate the checkpoint at --out and rewrite its .json")
    p.add_argument("--monitor-every", type=int, default=200, help="steps between quick kv-recall checks (0: never)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.eval_only:
        model = load_tiny_lm(args.out)
        meta = load_metadata(args.out)
        meta.pop("config")
        run_eval(model, meta, args)
        model.save(args.out, meta)
        print(meta["task_accuracy"])
        return meta
    seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = TinyLMConfig(vocab_size=len(TOKENIZER), d_model=args.d_model, n_layers=args.n_layers,
                       n_heads=args.n_heads, d_ff=args.d_ff)
    model = TinyLM(cfg)
    decay = [p_ for n_, p_ in model.named_parameters() if p_.dim() >= 2]
    no_decay = [p_ for n_, p_ in model.named_parameters() if p_.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    long_start = int(round(args.steps * (1 - args.long_frac)))
    short_end = int(round(args.steps * args.short_frac))
    t0 = time.time()
    losses = []
    monitor = "-"
    if args.phase1_checkpoint:  # phase 1 already run by this script with the same arguments (deterministic)
        model = load_tiny_lm(args.phase1_checkpoint).train()
        phase1_meta = load_metadata(args.phase1_checkpoint)
        phase1_time = phase1_meta["train_wall_time_s"]
        losses = [float(x) for x in phase1_meta["loss_curve"]]  # 100-step means
        loss_curve1 = phase1_meta["loss_curve"]
    else:
        bar = tqdm(range(args.steps), desc="train tiny_lm (phase 1)", mininterval=5.0)
        for step in bar:
            long = step >= long_start
            seq_len = args.long_seq_len if long else args.seq_len
            bs = max(1, args.batch_size * args.seq_len // seq_len) if long else args.batch_size
            max_doc = args.short_doc_len if step < short_end else seq_len
            batch, weights = training_batch(rng, bs, seq_len, p_text=args.p_text, max_doc_len=max_doc,
                                            prompt_weight=args.prompt_weight, text_weight=args.text_weight,
                                            return_weights=True)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args)
            losses.append(train_step(model, opt, batch, weights, args.clip))
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", T=seq_len, kv=monitor)
            if args.monitor_every and (step + 1) % args.monitor_every == 0:  # cheap progress check (own seeds)
                monitor = f"{evaluate(model, 'kv_recall', n=10, context_len=96, seed=7):.1f}"
                model.train()
        phase1_time = time.time() - t0
        loss_curve1 = [round(float(np.mean(losses[i:i + 100])), 4) for i in range(0, len(losses), 100)]
    # phase 2: fresh optimizer and data stream, retrieval-heavy task mix (copy is learned first in phase 1;
    # key-value recall and the needle need the extra steps)
    t2 = time.time()
    rng2 = np.random.default_rng(args.seed + 1)
    torch.manual_seed(args.seed + 1)
    opt2 = torch.optim.AdamW([{"params": [q for q in model.parameters() if q.dim() >= 2], "weight_decay": args.weight_decay},
                              {"params": [q for q in model.parameters() if q.dim() < 2], "weight_decay": 0.0}],
                             lr=args.phase2_lr, betas=(0.9, 0.95))
    probs = [float(x) for x in args.phase2_task_probs.split(",")]
    a2 = argparse.Namespace(lr=args.phase2_lr, warmup=args.warmup, steps=args.phase2_steps, min_lr_frac=args.min_lr_frac)
    losses2 = []
    bar = tqdm(range(args.phase2_steps), desc="train tiny_lm (phase 2)", mininterval=5.0)
    for step in bar:
        batch, weights = training_batch(rng2, args.batch_size, args.seq_len, p_text=args.phase2_p_text,
                                        prompt_weight=args.prompt_weight, text_weight=args.text_weight,
                                        task_probs=probs, return_weights=True)
        for g in opt2.param_groups:
            g["lr"] = lr_at(step, a2)
        losses2.append(train_step(model, opt2, batch, weights, args.clip))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses2[-20:]):.3f}", kv=monitor)
        if args.monitor_every and (step + 1) % args.monitor_every == 0:
            monitor = f"{evaluate(model, 'kv_recall', n=10, context_len=96, seed=7):.1f}"
            model.train()
    train_time = phase1_time + time.time() - t2
    loss_curve2 = [round(float(np.mean(losses2[i:i + 100])), 4) for i in range(0, len(losses2), 100)]
    model.eval()
    meta = {
        "training": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "final_train_loss": float(np.mean(losses2[-50:])) if losses2 else float(np.mean(losses[-50:])),
        "val_loss": {str(args.seq_len): val_loss(model, 10_000 + args.seed, args.seq_len),
                     str(args.long_seq_len): val_loss(model, 10_000 + args.seed, args.long_seq_len)},
        "loss_curve": loss_curve1,
        "loss_curve_phase2": loss_curve2,
        "phase1_wall_time_s": round(phase1_time, 1),
        "num_parameters": model.num_parameters(),
        "torch_version": torch.__version__,
        "train_wall_time_s": round(train_time, 1),
    }
    if not args.no_eval:
        run_eval(model, meta, args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    model.save(args.out, meta)
    print({k: meta[k] for k in ("final_train_loss", "val_loss", "train_wall_time_s")})
    print(meta.get("task_accuracy"))
    return meta


if __name__ == "__main__":
    main()
