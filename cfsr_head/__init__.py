"""cfsr_head: a dual-view fusion head for any sequential recommender, plus a kit to train and
evaluate it honestly (stage 2 of LLM-CFSR)."""
__version__ = "0.1.0"
from .data import InteractionData, ItemIndex, SplitData, align_semantic, default_data_dir, download_dataset, kcore_filter, leave_one_out, load_amazon2014, load_dataset, load_movielens_raw
from .evaluate import EvalResult, GroupSpec, PopularityModel, RandomModel, evaluate, paired_ttest
from .encoders import GRU4RecEncoder, PmixerSASRecAdapter, RecBoleSASRecAdapter, SASRecEncoder, SequenceEncoder
from .fusion import CrossViewAttention
from .head import DualViewConfig, DualViewHead, truncate_sequences
from .pca import PCAProjection
from .train import TrainBatch, TrainConfig, Trainer, TrainResult
