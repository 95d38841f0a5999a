"""Export :class:`~refimpl.models.tiny_lm.TinyLM` to ``transformers.LlamaForCausalLM`` (no hub access), so that
packages built on ``transformers`` (e.g. kvpress) run on the very same weights.

The mapping is one-to-one, because :class:`TinyLM` already uses Llama's layout and parameter names:

====================================  ==============================================
TinyLM                                LlamaForCausalLM
====================================  ==============================================
``embed_tokens.weight``               ``model.embed_tokens.weight``
``layers.i.input_layernorm.weight``   ``model.layers.i.input_layernorm.weight``
``layers.i.self_attn.{q,k,v,o}_proj`` ``model.layers.i.self_attn.{q,k,v,o}_proj``
``layers.i.post_attention_layernorm`` ``model.layers.i.post_attention_layernorm``
``layers.i.mlp.{gate,up,down}_proj``  ``model.layers.i.mlp.{gate,up,down}_proj``
``norm.weight``                       ``model.norm.weight``
``lm_head.weight``                    ``lm_head.weight`` (untied)
====================================  ==============================================

No permutation of ``W_q``/``W_k`` is needed: both models apply RoPE in the "rotate half" layout (pairs
``(x_i, x_{i+d/2})``) to heads laid out contiguously in the projection's output (head ``h`` = rows
``h·d_head .. (h+1)·d_head - 1``). (The permutation in HF's ``convert_llama_weights_to_hf.py`` converts
Meta's *interleaved* pairs ``(x_{2i}, x_{2i+1})``, which this model does not use.) Angles are computed in
float32 in both, so a float64 export agrees to round-off.
"""
from __future__ import annotations

from typing import Any

import torch

from refimpl.models.tiny_lm import TinyLM


def llama_config(model: TinyLM, attn_implementation: str = "eager", **overrides: Any):
    """A local ``transformers.LlamaConfig`` describing ``model`` (untied head, no biases)."""
    try:
        from transformers import LlamaConfig
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError("refimpl.models.hf_export needs the `transformers` package: "
                          "pip install 'transformers>=5' (or the project's [official] extra)") from e
    cfg = model.cfg
    kwargs = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.n_heads, head_dim=cfg.d_head, hidden_act="silu",
                  max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                  rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
                  tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(overrides)
    hf_cfg = LlamaConfig(**kwargs)
    hf_cfg._attn_implementation = attn_implementation
    return hf_cfg


def _rmsnorm_full_precision(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm without its cast to float32 (used for float64 exports only)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def to_llama(model: TinyLM, attn_implementation: str | None = None, **config_overrides: Any):
    """``transformers.LlamaForCausalLM`` with ``model``'s weights, in ``model``'s dtype, in eval mode.

    ``LlamaForCausalLM(input_ids)`` then returns the same logits as ``model(input_ids)`` (float32: ~1e-5;
    float64: ~1e-13). Token ids are the :class:`~refimpl.models.corpus.CharTokenizer`'s (no HF tokenizer).

    ``attn_implementation`` defaults to ``"eager"`` (attention weights available, as kvpress's
    attention-based presses need) for float32/16 models. Hugging Face's Llama computes RMSNorm statistics
    and the eager softmax in float32 whatever the dtype; for a float64 model the default is therefore
    ``"sdpa"`` and the exported norms are patched to keep float64, so that the export is exact to
    round-off (the difference is a float32 rounding, ~1e-6, otherwise).
    """
    if not isinstance(model, TinyLM):
        raise TypeError(f"model must be a TinyLM, got {type(model).__name__}")
    dtype = next(model.parameters()).dtype
    if attn_implementation is None:
        attn_implementation = "sdpa" if dtype == torch.float64 else "eager"
    hf_cfg = llama_config(model, attn_implementation=attn_implementation, **config_overrides)
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM(hf_cfg).to(dtype)
    sd = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v.detach().clone()
          for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping failed: missing {missing}, unexpected {unexpected}")
    if dtype == torch.float64:
        import types
        for mod in hf.modules():
            if type(mod).__name__ == "LlamaRMSNorm":
                mod.forward = types.MethodType(_rmsnorm_full_precision, mod)
    return hf.eval()
