"""Benchmarks and the paper-style study (``python -m benchmarks.reproduce``); built only from the
public APIs of ``llm_item_embed`` and ``cfsr_head``."""
