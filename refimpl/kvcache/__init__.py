"""Part "kvcache": what to keep in a language model's key/value cache, and how to keep less of it."""
