"""llm_item_embed: attribute tables -> recommendation-aware item embeddings.

Masked-prompt contrastive LoRA tuning of any Hugging Face language model (stage 1 of LLM-CFSR).

>>> from llm_item_embed import ItemEmbedder, PromptTemplate, ItemEmbeddings
"""
__version__ = "0.1.0"

from .backbone import BackboneSettings, LoraSettings, TextEncoder, default_model_path, load_text_encoder
from .embedder import ItemEmbedder
from .embeddings import ItemEmbeddings
from .evaluation import neighbour_scores, next_item_transitions
from .losses import ContrastiveLoss
from .pairs import cooccurrence_embeddings, sequence_pairs
from .prompts import PromptTemplate
from .training import ContrastiveTrainer, FitConfig

__all__ = [
    "__version__", "ItemEmbedder", "PromptTemplate", "LoraSettings", "BackboneSettings", "TextEncoder",
    "ItemEmbeddings", "ContrastiveLoss", "FitConfig", "ContrastiveTrainer", "load_text_encoder",
    "default_model_path", "sequence_pairs", "cooccurrence_embeddings", "next_item_transitions", "neighbour_scores",
]
