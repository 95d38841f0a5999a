"""The tiny language model's own corpus: a character tokenizer, a seeded toy grammar, and synthetic
long-context tasks with exact-match answers (no downloads, fully deterministic given a seed).

Tasks (each returns :class:`Example` ``(prompt, answer)`` pairs whose prompts all have the same length,
at most ``context_len`` tokens including ``<bos>``, so they batch):

* ``kv_recall``: ``"<bos>kv: abc=123; def=456; ... \\n? def="`` → ``"456"`` (many key–value pairs, one
  queried key, three-digit values).
* ``needle``: grammar filler with ``"the secret code is 4821. "`` hidden at a controlled ``depth`` (0 =
  start, 1 = end), then ``"\\nwhat is the secret code? "`` → ``"4821"``.
* ``copy``: ``"<bos>copy: <words>\\n<sep>"`` → ``"<words>"``: the prompt is ``context_len`` tokens and the
  answer is the whole span (``context_len - 9`` characters), so prompt plus answer is about twice as long.

:func:`evaluate` runs greedy decoding (optionally with a KV-cache eviction ``policy``) and returns the
exact-match accuracy.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>")
CHARS = "\n abcdefghijklmnopqrstuvwxyz0123456789.,:;?!'-=()"


class CharTokenizer:
    """Fixed character vocabulary: ids 0–3 are ``<pad> <bos> <eos> <sep>``, then newline, space, a–z,
    0–9 and ``.,:;?!'-=()``. Special tokens are written ``<name>`` in text."""

    def __init__(self):
        self.itos = list(SPECIALS) + list(CHARS)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.sep_id = (self.stoi[s] for s in SPECIALS)

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Text → ids; ``<pad> <bos> <eos> <sep>`` are parsed as single tokens. Unknown characters raise."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids, i = [], 0
        while i < len(text):
            if text[i] == "<":
                j = text.find(">", i)
                tok = text[i:j + 1] if j > 0 else ""
                if tok not in SPECIALS:
                    raise ValueError(f"unknown special token starting at {i}: {text[i:i + 8]!r}")
                ids.append(self.stoi[tok])
                i = j + 1
                continue
            c = text[i]
            if c not in self.stoi:
                raise ValueError(f"character {c!r} at {i} is not in the vocabulary")
            ids.append(self.stoi[c])
            i += 1
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for t in ids:
            if not 0 <= int(t) < len(self.itos):
                raise ValueError(f"token id {t} out of range [0, {len(self.itos)})")
            out.append(self.itos[int(t)])
        return "".join(out)


TOKENIZER = CharTokenizer()

# ------------------------------------------------------------------------------------------- grammar
ADJ = ("red", "blue", "green", "small", "big", "old", "young", "quiet", "happy", "tired", "bright", "dark",
       "brave", "lazy", "clever", "gentle", "wild", "soft", "cold", "warm")
NOUN = ("cat", "dog", "bird", "fox", "child", "farmer", "teacher", "river", "tree", "house", "boat", "horse",
        "king", "queen", "robot", "sailor", "garden", "window", "mountain", "village")
VERB_T = ("sees", "finds", "follows", "likes", "paints", "visits", "watches", "helps", "carries", "remembers")
VERB_I = ("sleeps", "runs", "sings", "waits", "laughs", "walks", "dreams", "rests")
ADV = ("slowly", "quickly", "quietly", "often", "again", "today", "happily", "alone")
PREP = ("near", "behind", "under", "beside", "across", "inside")
NAMES = ("anna", "ben", "clara", "david", "emma", "felix", "grace", "hugo", "iris", "jack")


def _np(_: Any, rng: np.random.Generator) -> str:
    return f"the {rng.choice(ADJ)} {rng.choice(NOUN)}" if rng.random() < 0.6 else f"the {rng.choice(NOUN)}"


def sentence(rng: np.random.Generator) -> str:
    """One sentence of the toy grammar (no digits, so digits in a prompt always belong to a task)."""
    r = rng.integers(6)
    if r == 0:
        s = f"{_np(NOUN, rng)} {rng.choice(VERB_T)} {_np(NOUN, rng)}."
    elif r == 1:
        s = f"{_np(NOUN, rng)} {rng.choice(VERB_I)} {rng.choice(PREP)} {_np(NOUN, rng)}."
    elif r == 2:
        s = f"{rng.choice(NAMES)} {rng.choice(VERB_T)} {_np(NOUN, rng)} {rng.choice(ADV)}."
    elif r == 3:
        s = f"{rng.choice(NAMES)} and {rng.choice(NAMES)} {rng.choice(VERB_I).removesuffix('s')} {rng.choice(ADV)}."
    elif r == 4:
        s = f"does {_np(NOUN, rng)} {rng.choice(('see', 'like', 'help', 'find'))} {rng.choice(NAMES)}? yes, it does."
    else:
        s = f"when {_np(NOUN, rng)} {rng.choice(VERB_I)}, {rng.choice(NAMES)} {rng.choice(VERB_I)} too."
    return s


def grammar_text(n_chars: int, rng: np.random.Generator) -> str:
    """Exactly ``n_chars`` characters of grammar sentences separated by spaces (the last may be cut)."""
    parts, total = [], 0
    while total < n_chars:
        s = sentence(rng) + (" " if rng.random() < 0.9 else "\n")
        parts.append(s)
        total += len(s)
    return "".join(parts)[:n_chars]


# --------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Example:
    """A prompt (text, starting with ``<bos>``) and the exact answer the model must generate."""
    prompt: str
    answer: str


def _check_task_args(n: int, context_len: int, minimum: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(context_len, bool) or not isinstance(context_len, int) or context_len < minimum:
        raise ValueError(f"context_len must be an integer ≥ {minimum}, got {context_len!r}")


def _rng(seed: Any) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


def kv_recall(n: int, context_len: int = 256, seed: Any = 0) -> list[Example]:
    """``n`` key–value recall prompts of ``≤ context_len`` tokens: distinct three-letter keys, three-digit
    values, ``"; "``-separated, then ``"\\n? key="``; the answer is the key's value (3 characters)."""
    _check_task_args(n, context_len, 32)
    rng = _rng(seed)
    head = "<bos>kv: "  # 5 tokens; each pair "abc=123; " 9 tokens; the query "\n? abc=" 7 tokens
    n_pairs = (context_len - 12) // 9
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out = []
    for _ in range(n):
        keys: set[str] = set()
        while len(keys) < n_pairs:
            keys.add("".join(rng.choice(letters, 3)))
        keys_l = sorted(keys)  # a set's iteration order depends on PYTHONHASHSEED
        rng.shuffle(keys_l)
        vals = [f"{v:03d}" for v in rng.integers(0, 1000, n_pairs)]
        q = int(rng.integers(n_pairs))
        body = "".join(f"{k}={v}; " for k, v in zip(keys_l, vals))
        out.append(Example(f"{head}{body}\n? {keys_l[q]}=", vals[q]))
    return out


NEEDLE_Q = "\nwhat is the secret code? "


def needle(n: int, context_len: int = 256, seed: Any = 0, depth: float | None = None) -> list[Example]:
    """``n`` needle-in-a-haystack prompts of exactly ``context_len`` tokens: grammar filler with
    ``"the secret code is dddd. "`` inserted at fraction ``depth`` of the filler (uniform in [0, 1] when
    ``None``), then the question; the answer is the four digits."""
    _check_task_args(n, context_len, 64)
    if depth is not None and not (isinstance(depth, (int, float)) and 0.0 <= depth <= 1.0):
        raise ValueError(f"depth must be a number in [0, 1] or None, got {depth!r}")
    rng = _rng(seed)
    out = []
    for _ in range(n):
        code = f"{int(rng.integers(0, 10000)):04d}"
        nd = f"the secret code is {code}. "
        n_fill = context_len - 1 - len(nd) - len(NEEDLE_Q)
        filler = grammar_text(n_fill, rng)
        d = float(rng.random()) if depth is None else float(depth)
        cut = int(round(d * n_fill))
        if 0 < cut < n_fill:  # move to the next word boundary
            sp = filler.find(" ", cut)
            cut = n_fill if sp < 0 else sp + 1
        out.append(Example("<bos>" + filler[:cut] + nd + filler[cut:] + NEEDLE_Q, code))
    return out


def copy_task(n: int, context_len: int = 256, seed: Any = 0) -> list[Example]:
    """``n`` copy prompts of exactly ``context_len`` tokens: ``"<bos>copy: " + span + "\\n<sep>"`` where the
    span is random lexicon words; the answer is the span (``context_len - 9`` characters)."""
    _check_task_args(n, context_len, 16)
    rng = _rng(seed)
    words = ADJ + NOUN + VERB_I + ADV + NAMES
    m = context_len - 9  # <bos> + "copy: " (6) + "\n" + <sep>
    out = []
    for _ in range(n):
        parts, total = [], 0
        while total < m:
            w = str(rng.choice(words)) + " "
            parts.append(w)
            total += len(w)
        span = "".join(parts)[:m]
        out.append(Example("<bos>copy: " + span + "\n<sep>", span))
    return out


TASKS: dict[str, Callable[..., list[Example]]] = {"kv_recall": kv_recall, "needle": needle, "copy": copy_task}


def make_task(name: str, n: int, context_len: int = 256, seed: Any = 0, **kwargs: Any) -> list[Example]:
    """Dispatch to one of :data:`TASKS`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name](n, context_len, seed, **kwargs)


def training_segments(rng: np.random.Generator, max_len: int, p_text: float = 0.25, n_extra_queries: int = 3,
                      prompt_weight: float = 0.0, text_weight: float = 1.0,
                      task_probs: Sequence[float] | None = None) -> list[tuple[str, float]]:
    """One training document as ``(text, loss weight)`` segments: grammar text (probability ``p_text``, weight
    ``text_weight``) or a task example with a random context length: the prompt (weight ``prompt_weight``),
    then the answer (weight 1) and ``<eos>``. Key–value documents get ``n_extra_queries`` more queries with
    their answers, in the prompt's format, so that each carries more supervised answers. Tasks are drawn
    uniformly, or with probabilities ``task_probs`` for (kv_recall, needle, copy)."""
    if rng.random() < p_text:
        return [("<bos>" + grammar_text(int(rng.integers(32, max_len)), rng) + "<eos>", text_weight)]
    names = ("kv_recall", "needle", "copy")
    task = names[int(rng.integers(3))] if task_probs is None else names[int(rng.choice(3, p=task_probs))]
    if task == "copy":
        ctx = int(rng.integers(16, max(17, max_len // 2)))
    else:
        ctx = int(rng.integers(64, max(65, max_len - 8)))
    ex = make_task(task, 1, ctx, rng)[0]
    segs = [(ex.prompt, prompt_weight), (ex.answer, 1.0)]
    if task == "kv_recall" and n_extra_queries:
        pairs = re.findall(r"([a-z]{3})=(\d{3}); ", ex.prompt)
        for j in rng.choice(len(pairs), min(n_extra_queries, len(pairs)), replace=False):
            segs += [(f"\n? {pairs[j][0]}=", prompt_weight), (pairs[j][1], 1.0)]
    return segs + [("<eos>", 1.0)]


def training_stream(rng: np.random.Generator, max_len: int, p_text: float = 0.25, n_extra_queries: int = 3) -> str:
    """The text of one :func:`training_segments` document."""
    return "".join(t for t, _ in training_segments(rng, max_len, p_text, n_extra_queries))


def training_batch(rng: np.random.Generator, batch_size: int, seq_len: int, p_text: float = 0.25,
                   max_doc_len: int | None = None, n_extra_queries: int = 3, prompt_weight: float = 0.0,
                   text_weight: float = 1.0, task_probs: Sequence[float] | None = None, return_weights: bool = False):
    """``(batch_size, seq_len + 1)`` int64 ids: documents from :func:`training_segments` packed back to back
    (each row starts at a document boundary). With ``return_weights`` also the float32 loss weight of each
    token as a *target* (same shape; use ``weights[:, 1:]`` with ``ids[:, 1:]``)."""
    max_doc_len = seq_len if max_doc_len is None else max_doc_len
    rows, wrows = [], []
    for _ in range(batch_size):
        ids: list[int] = []
        ws: list[float] = []
        while len(ids) < seq_len + 1:
            for text, w in training_segments(rng, max_doc_len, p_text, n_extra_queries, prompt_weight, text_weight,
                                              task_probs):
                t = TOKENIZER.encode(text)
                ids += t
                ws += [w] * len(t)
        rows.append(ids[: seq_len + 1])
        wrows.append(ws[: seq_len + 1])
    ids_t = torch.tensor(rows, dtype=torch.long)
    return (ids_t, torch.tensor(wrows, dtype=torch.float32)) if return_weights else ids_t


# ---------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: torch.nn.Module, task: str | Sequence[Example], n: int = 50, context_len: int = 256,
             seed: int = 1234, policy: Callable | None = None, batch_size: int = 25, record: bool = False,
             return_details: bool = False, **task_kwargs: Any) -> float | dict[str, Any]:
    """Exact-match accuracy of greedy decoding on a task.

    Args:
        model: a :class:`~refimpl.models.tiny_lm.TinyLM`.
        task: a task name from :data:`TASKS` (then ``n``, ``context_len``, ``seed`` and ``task_kwargs`` make
            the examples) or a list of :class:`Example`.
        policy: ``policy(model, cache)`` called after the prefill and after each decoding step; may evict with
            ``cache.keep(layer, indices)``.
        record: give the policy a cache that records ``last_queries``/``last_attn`` (implied when a policy is set).
        return_details: return ``{"accuracy", "char_accuracy", "n", "predictions", "answers"}`` instead of the
            accuracy.

    Examples are batched by equal prompt and answer length (the task generators make them equal).
    """
    from refimpl.models.tiny_lm import KVCache, TinyLM
    if not isinstance(model, TinyLM):
        raise TypeError(f"model must be a TinyLM, got {type(model).__name__}")
    examples = make_task(task, n, context_len, seed, **task_kwargs) if isinstance(task, str) else list(task)
    if not examples or not all(isinstance(e, Example) for e in examples):
        raise ValueError("task must be a task name or a non-empty list of Example")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds: list[str] = [""] * len(examples)
    groups: dict[tuple[int, int], list[int]] = {}
    enc = [TOKENIZER.encode(e.prompt) for e in examples]
    for i, (e, p) in enumerate(zip(examples, enc)):
        groups.setdefault((len(p), len(e.answer)), []).append(i)
    for (_, alen), idx in groups.items():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            toks = torch.tensor([enc[i] for i in chunk], dtype=torch.long, device=device)
            cache = KVCache(model.cfg.n_layers, record=record or policy is not None)
            gen = model.generate(toks, alen, cache=cache, policy=policy)
            for i, g in zip(chunk, gen):
                preds[i] = TOKENIZER.decode(g)
    model.train(was_training)
    answers = [e.answer for e in examples]
    acc = float(np.mean([p == a for p, a in zip(preds, answers)]))
    if not return_details:
        return acc
    char_acc = float(np.mean([np.mean([x == y for x, y in zip(p, a)]) for p, a in zip(preds, answers)]))
    return {"accuracy": acc, "char_accuracy": char_acc, "n": len(examples), "predictions": preds, "answers": answers}
