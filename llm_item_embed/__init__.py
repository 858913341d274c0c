"""llm_item_embed: attribute tables -> recommendation-aware item embeddings.

Masked-prompt contrastive LoRA tuning of any Hugging Face language model (stage 1 of LLM-CFSR).
"""
__version__ = "0.1.0"
