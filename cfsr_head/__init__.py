"""cfsr_head: a dual-view fusion head for any sequential recommender, plus a kit to train and
evaluate it honestly (stage 2 of LLM-CFSR)."""
__version__ = "0.1.0"
