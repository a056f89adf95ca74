"""Offline data preparation: tokenizer training, tokenization + packing into webdataset shards,
and the demo corpus. Every entry point is a ``python -m data_prep.<tool>`` CLI whose failures are
one line (``error: ...``) and a non-zero exit, and whose outputs are written atomically."""
