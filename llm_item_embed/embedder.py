"""``ItemEmbedder``: fit (masked-prompt contrastive LoRA), encode, save / load / push, export to sentence-transformers.

>>> emb = ItemEmbedder(template=PromptTemplate("This beauty product has the following attributes:",
...                                            {"title": "name", "brand": "brand"}))
>>> emb.fit(items_df, id_column="item_id", epochs=1)          # doctest: +SKIP
>>> E = emb.encode(items_df)                                  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .backbone import (BackboneSettings, LoraSettings, ModelNotFoundError, TextEncoder, load_text_encoder,
                       resolve_source, seed_untrained_lora)
from .io import (atomic_path, atomic_save_safetensors, atomic_write_json, atomic_write_text, make_staging_dir, move_tree,
                 read_json)
from .prompts import PromptTemplate

__all__ = ["ItemEmbedder", "CONFIG_NAME"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "item_embedder_config.json"
FULL_MODEL_DIR = "model"  # weights of a fully fine-tuned model (lora=None)
_SIMILARITY = {"dot": "dot", "cos": "cosine", "cosine": "cosine"}
_DEFAULT_SHARD_SIZE = 50_000
_TOKENIZE_BLOCK = 4096  # texts tokenized (and length-sorted) together


def _library_version() -> str:
    try:
        from . import __version__

        return str(__version__)
    except Exception:  # pragma: no cover
        return "unknown"


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _dist_info() -> tuple[int, int]:
    """(rank, world size) when running under several processes (``accelerate launch`` / torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState()
        return state.process_index, state.num_processes
    return 0, 1


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class ItemEmbedder:
    """Turns an item attribute table into recommendation-aware item embeddings (stage 1 of LLM-CFSR).

    Args:
        model_name_or_path: HF model id, local folder or ``.gguf`` file; ``None`` = the bundled
            all-MiniLM-L6-v2 (works offline).
        template: how rows become prompts; ``None`` = every non-id column, named after the column.
        drop_prob: probability of dropping each attribute atom in a training view (paper: 0.2).
        n_views: views per item (>= 2); views of one item are positives of each other.
        pooling: ``"mean"`` (masked mean of the last layer) or ``"last"`` (last real token).
        lora: LoRA settings (``None`` = train every weight).
        bidirectional: ``True`` lets a decoder LLM attend both ways; ``None`` keeps its own attention.
        max_length: token limit per prompt (longer prompts are truncated, with one warning per call).
        similarity: ``"dot"`` (paper) or ``"cos"``.
        temperature: initial InfoNCE temperature (``None``: the loss' default for the similarity).
        gguf_file: GGUF file inside ``model_name_or_path`` (or its absolute path).
        trust_remote_code: run model code from the Hub (off unless you trust it).
        torch_dtype: ``"float32"`` (default), ``"bfloat16"``, ``"float16"`` or ``"auto"``.
        device: where to encode; ``None`` = CUDA if available, else CPU.
        padding_side: see :class:`BackboneSettings` (default right padding).
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | None = None,
        template: PromptTemplate | None = None,
        drop_prob: float = 0.2,
        n_views: int = 2,
        pooling: str = "mean",
        lora: LoraSettings | None = LoraSettings(),
        bidirectional: bool | None = None,
        max_length: int = 256,
        similarity: str = "dot",
        temperature: float | None = None,
        gguf_file: str | None = None,
        trust_remote_code: bool = False,
        torch_dtype: str | None = None,
        device: str | torch.device | None = None,
        padding_side: str | None = "right",
        *,
        _encoder: TextEncoder | None = None,
        _adapter_path: str | os.PathLike | None = None,
    ) -> None:
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        if int(n_views) < 2:
            raise ValueError(f"n_views must be >= 2 (views of one item are each other's positives), got {n_views}")
        if similarity not in _SIMILARITY:
            raise ValueError(f"similarity must be 'dot' or 'cos', got {similarity!r}")
        if temperature is not None and not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature}")
        self.settings = BackboneSettings(
            model_name_or_path=None if model_name_or_path is None else str(model_name_or_path),
            gguf_file=gguf_file, pooling=pooling, max_length=int(max_length), bidirectional=bidirectional,
            padding_side=padding_side, trust_remote_code=trust_remote_code, torch_dtype=torch_dtype,
        )
        self.template = template if template is not None else PromptTemplate()
        self.drop_prob = float(drop_prob)
        self.n_views = int(n_views)
        self.lora = dataclasses.replace(lora) if lora is not None else None
        self.similarity = similarity
        self.temperature = None if temperature is None else float(temperature)
        self.training_summary: dict[str, Any] = {}
        self.history: list[dict] = []
        self._device = torch.device(device) if device is not None else None
        self._adapter_path = _adapter_path
        self._encoder = _encoder
        self.loss_module: torch.nn.Module | None = None
        self._fitted_table: tuple[Any, str] | None = None  # (df, id_column) of the last fit, for encode()
        if _encoder is None:
            resolve_source(self.settings)  # unknown path / offline Hub id: fail now, not at fit time

    # ------------------------------------------------------------------ model
    @property
    def base_model(self) -> str:
        """Name of the base model (Hub id, folder or GGUF file)."""
        name = self.settings.model_name_or_path
        if name is None:  # the bundled copy of this Hub model
            return "sentence-transformers/all-MiniLM-L6-v2"
        return f"{name}/{self.settings.gguf_file}" if self.settings.gguf_file else name

    @property
    def encoder(self) -> TextEncoder:
        """The :class:`TextEncoder`, loaded on first use."""
        if self._encoder is None:
            adapter = self._adapter_path
            self._encoder = load_text_encoder(self.settings, lora=None if adapter else self.lora, adapter_path=adapter)
        return self._encoder

    @property
    def device(self) -> torch.device:
        if self._device is None:
            if _dist_info()[1] > 1:  # one device per process under accelerate launch / torchrun
                from accelerate import PartialState

                self._device = PartialState().device
            else:
                self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return self._device

    @property
    def dim(self) -> int:
        return self.encoder.dim

    # ------------------------------------------------------------------ training
    def _validate(self, df: Any, id_column: str) -> None:
        if not hasattr(df, "columns") or not hasattr(df, "__len__"):
            raise TypeError(f"expected a pandas DataFrame of items, got {type(df).__name__}")
        self.template.validate(df, id_column)

    def fit(self, df: Any, id_column: str = "item_id", epochs: int = 1, batch_size: int = 64, lr: float = 2e-4,
            *, positive_pairs: Any = None, pair_prob: float = 0.5, mask_known_positives: bool = True,
            targets: Any = None, target_weight: float = 1.0, view_weight: float = 1.0,
            target_temperature: float = 0.05, target_init: str = "ridge", **fit_config: Any) -> "ItemEmbedder":
        """Contrastive LoRA fine-tuning on the items of ``df`` (two dropped views per item are positives).

        ``positive_pairs`` (beyond the paper): a two-column table (or ``(n, 2)`` array) of item ids that
        users consume together, e.g. from :func:`llm_item_embed.pairs.sequence_pairs`. With it, each view
        after the first is, with probability ``pair_prob``, a dropped view of one of the item's partners
        instead of the item itself, so collaborative neighbours become positives too. A third column
        (``sequence_pairs(..., counts=True)``) weights the partners: each is drawn in proportion to it
        instead of uniformly. With
        ``mask_known_positives`` (default), an in-batch candidate that is a partner of the anchor (or
        renders the same prompt) is left out of the anchor's negatives instead of being pushed away.

        ``targets`` (beyond the paper): an :class:`~llm_item_embed.embeddings.ItemEmbeddings` with a target
        vector per item id, e.g. :func:`llm_item_embed.pairs.cooccurrence_embeddings` of the training
        histories. Each masked view, through a linear projection trained with the adapter, is matched
        to its item's target among the batch's (:class:`~llm_item_embed.losses.TargetAlignmentLoss`,
        cosine logits over ``target_temperature``, weight ``target_weight``), beside the paper's InfoNCE
        between views (weight ``view_weight``; 0 trains the alignment alone, which is what helped on
        Amazon Beauty, see docs/results/log.md). Items without a target
        (not in ``targets``, or a zero row) are neither anchors nor candidates of the alignment.
        ``target_init="ridge"`` starts the projection at the ridge readout of the targets from the
        un-tuned model's embeddings (one extra encoding pass over the table; skipped when resuming);
        ``"random"`` at PyTorch's default. Not combined with ``positive_pairs``.

        Extra keyword arguments go to :class:`llm_item_embed.training.FitConfig` (seed, mixed precision,
        mini_batch_size for GradCache, output_dir, save_every, resume_from, ...). The table, the pairs and
        the settings are checked before the model is loaded. Returns ``self``.
        """
        from .losses import AlignedContrastiveLoss, ContrastiveLoss, TargetAlignmentLoss, check_alignment_weights
        from .pairs import PairIndex
        from .training import ContrastiveTrainer, FitConfig, ViewBatch, resume_checkpoint

        self._validate(df, id_column)
        goal = has_goal = None
        if targets is not None:
            if positive_pairs is not None:
                raise ValueError("targets and positive_pairs cannot be combined: a view of a partner would be "
                                 "matched to the anchor's target")
            goal, has_goal = _aligned_targets(targets, df[id_column].astype(str).tolist())
            if target_init not in ("ridge", "random"):
                raise ValueError(f"target_init must be 'ridge' or 'random', got {target_init!r}")
            check_alignment_weights(view_weight, target_weight)
            if not (np.isfinite(target_temperature) and target_temperature > 0):
                raise ValueError(f"target_temperature must be a positive number, got {target_temperature}")
        pair_index = None
        if positive_pairs is not None:
            if not 0.0 < pair_prob <= 1.0:
                raise ValueError(f"pair_prob must be in (0, 1], got {pair_prob}")
            pair_index = PairIndex.build(positive_pairs, df[id_column].astype(str).tolist())
        # freeze the resolved field list: later tables are rendered exactly like the training table
        self.template = PromptTemplate.from_dict(self.template.to_dict())
        config = FitConfig(epochs=epochs, batch_size=batch_size, lr=lr, **fit_config)
        n_items = len(df)
        if n_items < 2:
            raise ValueError(f"fit needs at least 2 items (in-batch negatives), got {n_items}")
        columns = [c for c, _ in self.template.columns()]
        rows = df[columns].to_dict("records")
        atoms = [self.template.atoms(r) for r in rows]
        full = [self.template.join(a) for a in atoms]
        _, group_ids = np.unique(np.asarray(full, dtype=object).astype(str), return_inverse=True)
        group_ids = group_ids.astype(np.int64)

        encoder = self.encoder  # model work starts here
        seed_untrained_lora(encoder.model, config.seed)  # the starting adapter, too, follows the seed
        self._warn_truncated(self._count_truncated(full), len(full))
        template, drop_prob, n_views = self.template, self.drop_prob, self.n_views

        def make_views(item_indices: np.ndarray, rng: np.random.Generator) -> Any:
            idx = np.asarray(item_indices, dtype=np.int64)
            if pair_index is None:
                views = [[template.join(template.drop(atoms[i], drop_prob, rng)) for i in idx] for _ in range(n_views)]
                if goal is not None:
                    return ViewBatch(views, group_ids[idx], targets=goal[idx], target_mask=has_goal[idx])
                return views, group_ids[idx]
            sources = [idx] + [pair_index.sample(idx, pair_prob, rng) for _ in range(n_views - 1)]
            views = [[template.join(template.drop(atoms[i], drop_prob, rng)) for i in src] for src in sources]
            if not mask_known_positives:
                return views, group_ids[idx]
            # candidate k of view b shows item sources[b][k]: not a negative of anchor i when it is one
            # of item i's partners or renders the same prompt as item i
            return views, None, pair_index.known_positives(idx, sources, group_ids)

        loss = self.loss_module
        if isinstance(loss, AlignedContrastiveLoss):  # a later fit keeps the learned temperature
            loss = loss.contrastive
        if loss is None:
            loss = ContrastiveLoss(similarity=_SIMILARITY[self.similarity], temperature=self.temperature)
        target_settings: dict[str, Any] = {}
        if goal is not None:
            with torch.random.fork_rng(devices=[]):  # the projection's start follows the fit's seed too
                torch.manual_seed(config.seed)
                alignment = TargetAlignmentLoss(encoder.dim, goal.shape[1], target_temperature)
            if target_init == "ridge" and resume_checkpoint(config) is None:  # a resumed run loads its projection
                _ridge_init(alignment.projection, self.encode_texts(full, show_progress_bar=False), goal, has_goal)
            loss = AlignedContrastiveLoss(loss, alignment, view_weight=view_weight, target_weight=target_weight)
            target_settings = {"items_with_target": int(has_goal.sum()), "dim": int(goal.shape[1]),
                               "target_weight": float(target_weight), "view_weight": float(view_weight),
                               "temperature": float(target_temperature), "init": target_init}
        trainer = ContrastiveTrainer(encoder, loss, config)
        view_settings = {"drop_prob": drop_prob, "n_views": n_views,
                         "pair_prob": float(pair_prob) if pair_index else None}
        if pair_index is not None and mask_known_positives:  # (added later: unmasked runs keep their fingerprint)
            view_settings["mask_known_positives"] = True
        if goal is not None:  # (added later: runs without targets keep their fingerprint)
            view_settings["targets"] = {**target_settings, "sha256": hashlib.sha256(goal.tobytes()).hexdigest()}
        result = trainer.train(make_views, n_items, data_fingerprint=_data_fingerprint(full, pair_index, view_settings))
        self.loss_module = loss
        self.temperature = float(loss.temperature)
        summary = {"n_items": int(n_items), "n_unique_prompts": int(group_ids.max() + 1),
                   **({"positive_pairs": pair_index.n_pairs, "pair_prob": float(pair_prob),
                       "mask_known_positives": bool(mask_known_positives),
                       "pair_weighted": pair_index.weights is not None} if pair_index else {}),
                   **({"targets": target_settings} if target_settings else {}),
                   "fit_config": _jsonable(dataclasses.asdict(config)) if dataclasses.is_dataclass(config) else {}}
        if isinstance(result, list) and result and isinstance(result[-1], Mapping):  # loss history
            summary.update(steps=int(result[-1].get("step", len(result))), first_loss=result[0].get("loss"),
                           final_loss=result[-1].get("loss"), final_temperature=result[-1].get("temperature"))
        self.history = list(result) if isinstance(result, list) else []
        self.training_summary = summary
        self._fitted_table = (df, id_column)
        return self

    # ------------------------------------------------------------------ encoding
    def _count_truncated(self, texts: Sequence[str]) -> int:
        n = 0
        for start in range(0, len(texts), _TOKENIZE_BLOCK):
            n += self._tokenize_block(texts[start:start + _TOKENIZE_BLOCK])[1]
        return n

    def _warn_truncated(self, n: int, total: int) -> None:
        if n:
            warnings.warn(
                f"{n} of {total} texts are longer than max_length={self.settings.max_length} tokens and were "
                f"truncated; raise max_length or shorten the template", UserWarning, stacklevel=3,
            )

    def _tokenize_block(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        """Token ids (with special tokens, truncated, unpadded) and how many texts were cut."""
        tok = self.encoder.tokenizer
        enc = tok(list(texts), truncation=True, max_length=self.settings.max_length, padding=False,
                  return_attention_mask=False, return_token_type_ids=False)
        encodings = getattr(enc, "encodings", None)
        if encodings is not None:
            cut = sum(1 for e in encodings if e.overflowing)
        else:
            cut = sum(1 for ids in enc["input_ids"] if len(ids) >= self.settings.max_length)
        return enc["input_ids"], cut

    def _collate(self, seqs: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        tok = self.encoder.tokenizer
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        width = int(lengths.max())
        ids = np.full((len(seqs), width), tok.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        left = tok.padding_side == "left"
        for row, (s, n) in enumerate(zip(seqs, lengths)):
            if left:
                ids[row, width - n:] = s
                mask[row, width - n:] = 1
            else:
                ids[row, :n] = s
                mask[row, :n] = 1
        dev = self.encoder.device
        return {"input_ids": torch.from_numpy(ids).to(dev), "attention_mask": torch.from_numpy(mask).to(dev)}

    def _iter_encode(self, texts: Sequence[str], batch_size: int, bar: Any) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, block matrix)`` for blocks of texts, in input order; counts truncations."""
        enc = self.encoder
        for start in range(0, len(texts), _TOKENIZE_BLOCK):
            seqs, cut = self._tokenize_block(texts[start:start + _TOKENIZE_BLOCK])
            self._n_truncated += cut
            order = np.argsort([-len(s) for s in seqs], kind="stable")  # longest first: OOM shows early
            out = np.empty((len(seqs), enc.dim), dtype=np.float32)
            for b in range(0, len(order), batch_size):
                rows = order[b:b + batch_size]
                feats = self._collate([seqs[i] for i in rows])
                pooled = enc(**feats)
                out[rows] = pooled.float().cpu().numpy()
                if bar is not None:
                    bar.update(len(rows))
            yield start, out

    def _prepare_encode(self) -> tuple[TextEncoder, bool]:
        enc = self.encoder
        if enc.device != self.device:
            enc.to(self.device)
        was_training = enc.training
        enc.eval()
        self._n_truncated = 0
        return enc, was_training

    def _progress(self, total: int, show: bool | None, desc: str) -> Any:
        if show is None:
            show = sys.stderr.isatty() and total > 0
        if not show:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="text")

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64, show_progress_bar: bool | None = None,
                     normalize_embeddings: bool = False) -> np.ndarray:
        """Embed already rendered texts: float32 ``[N, d]`` in input order (like ``SentenceTransformer.encode``).

        Texts are tokenized once per block, sorted by token length, batched without padding to
        ``max_length`` and run under ``torch.inference_mode``.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        bad = [i for i, t in enumerate(texts[:100_000]) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be strings; texts[{bad[0]}] is {type(texts[bad[0]]).__name__}")
        enc, was_training = self._prepare_encode()
        result = np.empty((len(texts), enc.dim), dtype=np.float32)
        bar = self._progress(len(texts), show_progress_bar, "encode")
        try:
            with torch.inference_mode():
                for start, block in self._iter_encode(texts, batch_size, bar):
                    result[start:start + len(block)] = block
        finally:
            enc.train(was_training)
            if bar is not None:
                bar.close()
        self._warn_truncated(self._n_truncated, len(texts))
        if normalize_embeddings:
            result /= np.maximum(np.linalg.norm(result, axis=1, keepdims=True), 1e-12)
        return result

    def render(self, df: Any, id_column: str = "item_id") -> list[str]:
        """The full (un-dropped) prompt of every row, as used by :meth:`encode`."""
        self._validate(df, id_column)
        columns = [c for c, _ in self.template.columns()]
        return [self.template.render(r) for r in df[columns].to_dict("records")]

    def _metadata(self) -> dict[str, Any]:
        return {
            "base_model": self.base_model,
            "pooling": self.settings.pooling,
            "template": self.template.to_dict(),
            "drop_prob": self.drop_prob,
            "n_views": self.n_views,
            "lora": self.lora.to_dict() if self.lora is not None else None,
            "backbone": self.settings.to_dict(),
            "similarity": self.similarity,
            "library_version": _library_version(),
            "dim": self.encoder.dim,
            "training": _jsonable(self.training_summary),  # {} for an un-tuned model
        }

    def encode(self, df: Any = None, id_column: str | None = None, batch_size: int = 64,
               show_progress_bar: bool | None = None, shard_dir: str | os.PathLike | None = None,
               shard_size: int = _DEFAULT_SHARD_SIZE) -> Any:
        """Embed every item's full prompt: an :class:`~llm_item_embed.embeddings.ItemEmbeddings` in table order.

        ``df`` defaults to the table of the last :meth:`fit` in this process (and ``id_column`` to its id
        column, else ``"item_id"``), so ``embedder.fit(items).encode()`` embeds the catalogue it was tuned on.

        With ``shard_dir`` the catalogue is encoded ``shard_size`` rows at a time; each shard is written
        to ``shard_dir`` as safetensors (finished shards are reused when the call is repeated) and the
        shards are assembled into one memory-mapped safetensors matrix, so peak memory does not grow with
        the catalogue. Under several processes each process encodes its part and every process gets the
        whole result, in order.
        """
        from .embeddings import ItemEmbeddings

        if df is None:
            if self._fitted_table is None:
                raise ValueError("encode() needs the items table: pass df (no fit() has run on this embedder "
                                 "in this process, e.g. it was loaded with from_pretrained)")
            df, fitted_id_column = self._fitted_table
            id_column = id_column or fitted_id_column
        id_column = id_column or "item_id"
        self._validate(df, id_column)
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        ids = df[id_column].astype(str).tolist()
        columns = [c for c, _ in self.template.columns()]
        n = len(ids)

        def texts_of(start: int, stop: int) -> list[str]:
            part = df.iloc[start:stop][columns].to_dict("records")
            return [self.template.render(r) for r in part]

        if shard_dir is not None:
            matrix = self._encode_sharded(texts_of, n, batch_size, show_progress_bar, Path(shard_dir), shard_size)
        else:
            rank, world = _dist_info()
            if world > 1:
                bounds = np.linspace(0, n, world + 1).astype(int)
                mine = self.encode_texts(texts_of(bounds[rank], bounds[rank + 1]), batch_size, show_progress_bar)
                matrix = _gather_rows(mine, bounds, self.encoder.dim)
            else:
                matrix = self.encode_texts(texts_of(0, n), batch_size, show_progress_bar)
        return ItemEmbeddings(ids, matrix, self._metadata())

    def _encode_sharded(self, texts_of: Callable[[int, int], list[str]], n: int, batch_size: int,
                        show: bool | None, shard_dir: Path, shard_size: int) -> np.ndarray:
        from safetensors import safe_open

        rank, world = _dist_info()
        shard_dir.mkdir(parents=True, exist_ok=True)
        n_shards = (n + shard_size - 1) // shard_size
        fingerprint = json.dumps({"n": n, "shard_size": shard_size, "model": self.base_model,
                                  "template": self.template.to_dict(), "pooling": self.settings.pooling,
                                  "max_length": self.settings.max_length}, sort_keys=True)
        paths = [shard_dir / f"shard-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
        enc, was_training = self._prepare_encode()
        truncated = 0
        bar = self._progress(n, show, "encode")
        try:
            for i in range(rank, n_shards, world):
                start, stop = i * shard_size, min(n, (i + 1) * shard_size)
                if _shard_ok(paths[i], fingerprint, stop - start, enc.dim):
                    if bar is not None:
                        bar.update(stop - start)
                    continue
                texts = texts_of(start, stop)
                block = np.empty((stop - start, enc.dim), dtype=np.float32)
                with torch.inference_mode():
                    for s, part in self._iter_encode(texts, batch_size, bar):
                        block[s:s + len(part)] = part
                truncated += self._n_truncated
                self._n_truncated = 0
                atomic_save_safetensors(paths[i], {"embeddings": torch.from_numpy(block)},
                                        metadata={"fingerprint": fingerprint, "start": str(start)})
                del block, texts
        finally:
            enc.train(was_training)
            if bar is not None:
                bar.close()
        self._warn_truncated(truncated, n)
        _barrier()
        out = shard_dir / "embeddings.safetensors"
        if rank == 0:
            with atomic_path(out) as tmp:
                header = {"embeddings": {"dtype": "F32", "shape": [n, enc.dim], "data_offsets": [0, n * enc.dim * 4]},
                          "__metadata__": {"fingerprint": fingerprint}}
                raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
                raw += b" " * (-len(raw) % 8)
                with open(tmp, "wb") as fh:
                    fh.write(struct.pack("<Q", len(raw)))
                    fh.write(raw)
                    for p in paths:
                        with safe_open(str(p), framework="np") as f:
                            fh.write(np.ascontiguousarray(f.get_tensor("embeddings"), dtype="<f4").tobytes())
        _barrier()
        return _memmap_safetensors(out, "embeddings")

    # ------------------------------------------------------------------ persistence
    def _config(self) -> dict[str, Any]:
        return {
            "library": "llm_item_embed",
            "library_version": _library_version(),
            "backbone": self.settings.to_dict(),
            "template": self.template.to_dict(),
            "lora": self.lora.to_dict() if self.lora is not None else None,
            "drop_prob": self.drop_prob,
            "n_views": self.n_views,
            "similarity": self.similarity,
            "temperature": self.temperature,
            "training": _jsonable(self.training_summary),
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the LoRA adapter (safetensors) and ``item_embedder_config.json`` to ``save_directory``.

        Without LoRA the whole model is saved under ``model/``. The config is written last, so an
        interrupted save never looks complete.
        """
        out = Path(save_directory)
        rank, world = _dist_info()
        if world > 1 and rank != 0:  # under several processes only the main one writes
            _barrier()
            return out
        out.mkdir(parents=True, exist_ok=True)
        enc = self.encoder
        with tempfile.TemporaryDirectory(dir=out, prefix=".saving-") as tmp:
            tmp_path = Path(tmp)
            if hasattr(enc.model, "peft_config"):
                enc.model.save_pretrained(str(tmp_path), safe_serialization=True)
            else:
                enc.model.save_pretrained(str(tmp_path / FULL_MODEL_DIR), safe_serialization=True)
                enc.tokenizer.save_pretrained(str(tmp_path / FULL_MODEL_DIR))
            if self.loss_module is not None:
                atomic_save_safetensors(tmp_path / "loss.safetensors",
                                        {k: v for k, v in self.loss_module.state_dict().items()})
            move_tree(tmp_path, out)
        from .hub import CARD_FILENAME

        atomic_write_text(out / CARD_FILENAME, self.model_card())  # replaces peft's generic card
        atomic_write_json(out / CONFIG_NAME, self._config())
        if world > 1:
            _barrier()
        return out

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
                        token: str | None = None, device: str | torch.device | None = None) -> "ItemEmbedder":
        """Load an embedder saved with :meth:`save_pretrained` from a folder or a Hub repo (cache-aware)."""
        folder = Path(os.path.expanduser(str(path_or_repo_id)))
        if not folder.is_dir():
            folder = _download(str(path_or_repo_id), revision=revision, token=token)
        if not (folder / CONFIG_NAME).is_file():
            raise ModelNotFoundError(f"{folder} has no {CONFIG_NAME}; was it written by ItemEmbedder.save_pretrained?")
        cfg = read_json(folder / CONFIG_NAME)
        settings = BackboneSettings.from_dict(cfg["backbone"])
        lora = LoraSettings.from_dict(cfg.get("lora"))
        full = folder / FULL_MODEL_DIR
        if lora is None and full.is_dir():
            settings = dataclasses.replace(settings, model_name_or_path=str(full), gguf_file=None)
        emb = cls(
            model_name_or_path=settings.model_name_or_path, template=PromptTemplate.from_dict(cfg["template"]),
            drop_prob=cfg.get("drop_prob", 0.2), n_views=cfg.get("n_views", 2), pooling=settings.pooling,
            lora=lora, bidirectional=settings.bidirectional, max_length=settings.max_length,
            similarity=cfg.get("similarity", "dot"), temperature=cfg.get("temperature"),
            gguf_file=settings.gguf_file, trust_remote_code=settings.trust_remote_code,
            torch_dtype=settings.torch_dtype, device=device, padding_side=settings.padding_side,
            _adapter_path=folder if lora is not None else None,
        )
        emb.settings = settings
        emb.training_summary = cfg.get("training") or {}
        if (folder / "loss.safetensors").is_file():
            from .io import load_safetensors
            from .losses import ContrastiveLoss

            state, _ = load_safetensors(folder / "loss.safetensors")
            loss = ContrastiveLoss(similarity=_SIMILARITY[emb.similarity], temperature=emb.temperature)
            if "alignment.projection.weight" in state:  # fitted with targets
                from .losses import AlignedContrastiveLoss, TargetAlignmentLoss

                t = emb.training_summary.get("targets") or {}
                out_dim, in_dim = state["alignment.projection.weight"].shape
                loss = AlignedContrastiveLoss(loss, TargetAlignmentLoss(in_dim, out_dim, t.get("temperature", 0.05)),
                                              view_weight=t.get("view_weight", 1.0),
                                              target_weight=t.get("target_weight", 1.0))
            loss.load_state_dict(state)
            emb.loss_module = loss
        return emb

    def model_card(self, repo_id: str | None = None) -> str:
        """The README.md model card pushed with :meth:`push_to_hub`."""
        from .hub import render_model_card

        meta = self._metadata()
        meta["training"] = self.training_summary.get("fit_config", {})
        meta["n_items"] = self.training_summary.get("n_items")
        meta["temperature"] = self.temperature
        return render_model_card("embedder", meta, repo_id=repo_id)

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = False,
                    commit_message: str | None = None) -> str:
        """Upload the adapter, config and a generated model card to a Hub model repo; returns its URL."""
        from .hub import push_folder, validate_repo_id

        validate_repo_id(repo_id)
        with tempfile.TemporaryDirectory(prefix="item-embedder-") as tmp:
            self.save_pretrained(tmp)
            return push_folder(tmp, repo_id, token=token, private=private, commit_message=commit_message,
                               card=self.model_card(repo_id))

    def save_sentence_transformer(self, save_directory: str | os.PathLike) -> Path:
        """Save a sentence-transformers model (LoRA merged into the base, matching pooling).

        ``SentenceTransformer(path).encode(texts)`` then reproduces :meth:`encode_texts`. Prompts are
        rendered by this library: give sentence-transformers rendered prompts, e.g.
        ``emb.template.render(row)`` or ``emb.render(df)``.
        """
        from sentence_transformers import SentenceTransformer

        try:
            from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
        except ImportError:  # sentence-transformers < 6
            from sentence_transformers.models import Pooling, Transformer
        import copy

        out = Path(save_directory)
        enc = self.encoder
        model = enc.model
        if hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        with tempfile.TemporaryDirectory(prefix="st-export-") as tmp:
            hf_dir = Path(tmp) / "hf"
            model.save_pretrained(str(hf_dir), safe_serialization=True)
            enc.tokenizer.save_pretrained(str(hf_dir))
            transformer = Transformer(str(hf_dir), max_seq_length=self.settings.max_length)
            pooling = Pooling(enc.dim, pooling_mode="mean" if self.settings.pooling == "mean" else "lasttoken")
            st = SentenceTransformer(modules=[transformer, pooling], device="cpu",
                                     similarity_fn_name="dot" if self.similarity == "dot" else "cosine")
            staging = make_staging_dir(out)  # beside out: same filesystem, so every file lands by rename
            try:
                st.save(str(staging))
                move_tree(staging, out)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return out

    def __repr__(self) -> str:
        return (f"ItemEmbedder(model={self.base_model!r}, pooling={self.settings.pooling!r}, "
                f"lora={self.lora}, drop_prob={self.drop_prob}, n_views={self.n_views})")


# ---------------------------------------------------------------------------------------------- helpers
def _aligned_targets(targets: Any, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix [n, t] float32, has_target [n] bool)`` of ``targets`` in the order of ``ids``; items that
    are missing or have a zero row get a zero row and False. Checked before any model work."""
    if not (hasattr(targets, "ids") and hasattr(targets, "numpy")):
        raise TypeError(f"targets must be an ItemEmbeddings (ids and a matrix), got {type(targets).__name__}")
    matrix = np.asarray(targets.numpy(), dtype=np.float32)
    target_ids = [str(i) for i in targets.ids]
    if matrix.ndim != 2 or matrix.shape[0] != len(target_ids) or matrix.shape[1] < 1:
        raise ValueError(f"targets must be an [n_ids, dim] matrix, got shape {matrix.shape} for {len(target_ids)} ids")
    bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
    if len(bad):
        raise ValueError(f"targets: the row of item {target_ids[bad[0]]!r} is not finite")
    rows = pd.Index(target_ids).get_indexer(list(ids))
    goal = np.zeros((len(ids), matrix.shape[1]), dtype=np.float32)
    goal[rows >= 0] = matrix[rows[rows >= 0]]
    has_goal = np.linalg.norm(goal, axis=1) > 0
    if has_goal.sum() < 2:
        raise ValueError(f"targets cover {int(has_goal.sum())} of the table's {len(ids)} items (by id, non-zero "
                         f"rows); the alignment needs at least 2")
    return goal, has_goal


def _ridge_init(projection: torch.nn.Linear, embeddings: np.ndarray, goal: np.ndarray, has_goal: np.ndarray,
                alpha: float = 1.0) -> None:
    """Set ``projection`` to the ridge regression of ``goal`` on ``embeddings`` over the targeted rows."""
    from sklearn.linear_model import Ridge

    fit = Ridge(alpha=alpha).fit(embeddings[has_goal], goal[has_goal])
    with torch.no_grad():
        projection.weight.copy_(torch.from_numpy(np.asarray(fit.coef_, dtype=np.float32)))
        projection.bias.copy_(torch.from_numpy(np.asarray(fit.intercept_, dtype=np.float32)))


def _data_fingerprint(prompts: Sequence[str], pair_index: Any, settings: Mapping[str, Any]) -> str:
    """SHA-256 of the training prompts (in table order), the positive-pair index and the view settings."""
    h = hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode())
    for text in prompts:
        h.update(text.encode())
        h.update(b"\0")
    if pair_index is not None:
        h.update(np.ascontiguousarray(pair_index.offsets, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(pair_index.neighbours, dtype=np.int64).tobytes())
        if pair_index.weights is not None:  # (uniform indices keep their earlier fingerprint)
            h.update(np.ascontiguousarray(pair_index.weights, dtype=np.float64).tobytes())
    return h.hexdigest()


def _shard_ok(path: Path, fingerprint: str, rows: int, dim: int) -> bool:
    """True when ``path`` is a finished shard of this very job (so a repeated call can skip it)."""
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return False
            shape = f.get_slice("embeddings").get_shape()
            return list(shape) == [rows, dim]
    except Exception:
        return False


def _memmap_safetensors(path: Path, name: str) -> np.ndarray:
    """Read-only memory map of one float32 tensor of a safetensors file (no copy into RAM)."""
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    info = header[name]
    if info["dtype"] != "F32":
        raise ValueError(f"{path}: tensor {name!r} is {info['dtype']}, expected F32")
    begin, _ = info["data_offsets"]
    shape = tuple(info["shape"])
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=np.float32)
    return np.memmap(path, dtype="<f4", mode="r", offset=8 + header_len + begin, shape=shape)


def _gather_rows(mine: np.ndarray, bounds: np.ndarray, dim: int) -> np.ndarray:
    """All-gather contiguous row blocks of different sizes from every process, in rank order."""
    import torch.distributed as dist

    world = len(bounds) - 1
    sizes = np.diff(bounds)
    width = int(sizes.max())
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    padded = torch.zeros(width, dim, dtype=torch.float32, device=device)
    padded[: len(mine)] = torch.from_numpy(mine).to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return np.concatenate([p[:s].cpu().numpy() for p, s in zip(parts, sizes)], axis=0)


def _download(repo_id: str, revision: str | None, token: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token))
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
        hint = " (HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache)" if offline else ""
        raise ModelNotFoundError(f"{repo_id!r} is neither a local folder nor a downloadable Hub repo{hint}: "
                                 f"{type(exc).__name__}") from None
