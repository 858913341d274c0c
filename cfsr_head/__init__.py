"""cfsr_head: a dual-view fusion head for any sequential recommender, plus a kit to train and
evaluate it honestly (stage 2 of LLM-CFSR).

>>> from cfsr_head import DualViewHead, SASRecEncoder, Trainer, TrainConfig, evaluate, grid_search, recommend
"""
__version__ = "0.1.0"

from .data import InteractionData, default_data_dir, kcore_filter, load_amazon2014, load_dataset, load_movielens_raw
from .download import download_dataset
from .split import ItemIndex, SplitData, align_semantic, leave_one_out
from .encoders import GRU4RecEncoder, PmixerSASRecAdapter, RecBoleSASRecAdapter, SASRecEncoder, SequenceEncoder
from .adjust import Adjustment, PopularityAdjusted, SemanticPrior, choose_adjustment, choose_popularity_beta
from .evaluate import EvalResult, GroupSpec, PopularityModel, RandomModel, evaluate, paired_ttest
from .fusion import CrossViewAttention
from .head import DualViewConfig, DualViewHead, truncate_sequences
from .pca import PCAProjection
from .recommend import Recommendations, read_histories, recommend
from .train import TrainBatch, TrainConfig, Trainer, TrainResult
from .search import GridSearchResult, SearchRun, grid_search

__all__ = [
    "__version__", "InteractionData", "ItemIndex", "SplitData", "align_semantic", "default_data_dir",
    "download_dataset", "kcore_filter", "leave_one_out", "load_amazon2014", "load_dataset", "load_movielens_raw",
    "GRU4RecEncoder", "PmixerSASRecAdapter", "RecBoleSASRecAdapter", "SASRecEncoder", "SequenceEncoder",
    "EvalResult", "GroupSpec", "PopularityModel", "RandomModel", "evaluate", "paired_ttest",
    "Adjustment", "PopularityAdjusted", "SemanticPrior", "choose_adjustment", "choose_popularity_beta",
    "CrossViewAttention", "DualViewConfig", "DualViewHead", "truncate_sequences", "PCAProjection",
    "Recommendations", "read_histories", "recommend",
    "TrainBatch", "TrainConfig", "Trainer", "TrainResult", "GridSearchResult", "SearchRun", "grid_search",
]
