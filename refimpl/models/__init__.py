"""Small models the project trains itself and commits (no downloads at run time).

:mod:`refimpl.models.tiny_lm` is the book's tiny character-level language model (Llama layout, explicit
KV cache), :mod:`refimpl.models.corpus` its tokenizer, training corpus and long-context tasks, and
:mod:`refimpl.models.hf_export` converts it to ``transformers.LlamaForCausalLM``. It is shared by the
KV-cache, early-exit, layer-skipping, speculative-decoding and LLM-quantization chapters.
"""
from refimpl.models.tiny_lm import KVCache, TinyLM, TinyLMConfig, load_tiny_lm

__all__ = ["KVCache", "TinyLM", "TinyLMConfig", "load_tiny_lm"]
