"""DualViewHead: the dual-view (semantic + collaborative) fusion head of LLM-CFSR around any
sequence encoder, with the paper's ablation switches, cold start and save/load.

Conventions (docs/architecture.md): items are 1..N, index 0 is padding; ``padding_mask`` is True
where a position is padding (default ``item_seq == 0``); left and right padding both work and the
user state is read at the last non-padding position.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoders import build_encoder
from .fusion import CrossViewAttention
from .io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json
from .pca import PCAProjection

if TYPE_CHECKING:
    from .split import ItemIndex

__all__ = ["DualViewConfig", "DualViewHead", "truncate_sequences"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "cfsr_head.DualViewHead"
LOSSES = ("bpr", "bce", "ce", "sampled_softmax")
ColdStartRows = Literal["projection", "mapping", "neighbours", "zeros"]
COLD_START_ROWS = ("projection", "mapping", "neighbours", "zeros")


@dataclass
class DualViewConfig:
    """Settings of ``DualViewHead``.

    - ``adapter_activation``: None (the paper's formula, as LLM-ESR), "gelu" or "relu" between
      the adapter's two linear layers d_llm -> d_llm/2 -> d.
    - ``adapter_init``: "default" (PyTorch's Linear init, as the paper) or "pca" (beyond the paper:
      the adapter starts as the centred PCA projection, W1 = top d_llm/2 principal directions,
      W2 = [I_d 0] times the collaborative table's scale, so the semantic view starts with the same
      item coordinates as the PCA-initialised collaborative view instead of a near-constant
      vector; exactly so without an activation; needs d <= d_llm/2).
    - ``center_semantic``: False feeds the semantic rows to the adapter as they are (the paper).
      True (beyond the paper) subtracts the table's mean item vector first (computed once, at
      construction, over items 1..N; stored as the ``semantic_mean`` buffer and applied to rows
      added later by ``add_items``). Decoder LLM embeddings are often nearly one direction
      (SmolLM2-135M on MovieLens: mean pairwise cosine 0.96), so that without it every item
      starts with almost the same semantic representation. Measured there (3 seeds) it is no
      reliable gain: +7% full-ranking N@10 (p = 0.35), -8% sampled (docs/results/log.md).
    - ``use_semantic`` / ``use_collaborative``: switch a view off ("w/o semantic", "w/o
      collaborative"); with one view the output width is d instead of 2d and there is no
      cross-attention. "w/o CFT" needs no switch: pass any semantic table.
    - ``fusion``: "cross" (causal cross-attention both ways, outputs replace the inputs) or
      "concat" (the paper's "w/o Cro": each view is encoded on its own and the views meet only in
      the concatenated logits ``[e_se : e_co] . [u_se : u_co]``).
    - ``shared_encoder``: one encoder for both views; False ("w/o Share") gives the collaborative
      view a deep copy of the encoder (same initial weights, trained separately).
    - ``collab_init``: "pca" (centred PCA of the semantic table, top-d components) or "random"
      (N(0, 0.02^2)). ``collab_init_std``: None keeps the PCA coordinates as they are (the
      paper's E_co = centred(E_se) W_pca); a float multiplies them by one scalar so that the
      table's standard deviation equals it (directions unchanged; the same scalar is applied to
      rows added later by ``add_items``). With "random" a float is the normal's std instead of 0.02.
    - ``freeze_collaborative``: keep the ID table fixed (LLM2X-style baselines).
    - ``missing_item_policy``: "error" (item indices outside 1..N raise, with count and examples)
      or "fallback" (they get one learned fallback row per view).
    - ``loss`` / ``n_negatives``: default loss of ``loss()`` and how many negatives it samples
      per position when none are given.
    - ``score_temperature``: None scores an item by the dot product of the user state and the item
      representation (the paper); a float tau scores by their cosine similarity divided by tau
      (beyond the paper: both vectors L2-normalised, in training and in ``score`` /
      ``full_scores``, so that an item's norm, which grows with its training frequency, no longer
      ranks it). ``user_state`` and ``item_representations`` stay unnormalised.
    - ``view_loss_weight``: 0 trains on the fused score only (the paper). A weight w > 0 (beyond
      the paper; needs both views) adds w times the same loss computed on each view's own score
      (``e_se . u_se`` and ``e_co . u_co``, or their cosines / tau within the view), so that each
      view must recommend on its own (trained on the fused score alone, the semantic half of the
      concatenation form ranks almost nothing by itself: ``benchmarks/bench_views.py``). Scoring
      at evaluation is unchanged; each step computes three losses instead of one.
    - ``collab_anchor_weight``: 0 lets the PCA-initialised ID table drift freely (the paper). A
      weight a > 0 (beyond the paper; needs ``collab_init="pca"``) adds ``a * mean_i ||E_co[i] -
      E_co0[i]||^2`` over items 1..N to the training loss, where ``E_co0`` is the table's PCA
      initialisation: an L2 pull toward the semantic starting point. Under full-softmax CE every
      row receives a gradient at every step, and Adam scales a rare item's tiny negative-only
      gradient up to a full-size step, so without it rare items' rows drift as far from their
      semantic coordinates as popular ones (Beauty, concatenation dual view, seed 0: cosine to the
      initial row 0.76 for head items and 0.77 for tail items, ``benchmarks/bench_drift.py``).
      Measured on Beauty (SAID, one seed) it does not pay: 0.1 leaves full-ranking N@10 unchanged,
      1 and 10 lower it (docs/results/log.md).
    - ``cold_item_dropout``: 0 trains every item on its own ID-table row (the paper). A probability
      q > 0 (beyond the paper; DropoutNet, Volkovs et al. 2017) replaces, at each training step,
      the row of each item with probability q by the row ``add_items`` gives a new item by default
      (its PCA projection, or zeros for a random table), in the inputs and among the scored items,
      so that the model also learns to rank items that have nothing but their text, as items added
      after training do. Evaluation always uses the trained rows. Measured
      (``benchmarks/bench_cold_start.py``) it is no general recipe: new items were reached 2-9x as
      often on MovieLens-100K and half as often under full ranking on Amazon Beauty.
    - ``cold_items_as_negatives``: with ``cold_item_dropout`` > 0, whether a dropped item's cold row
      also stands in for it where it is scored as a negative (True, DropoutNet's form) or only in
      the inputs and where it is the target (False: every negative keeps its trained row, so the
      model is taught to lift cold rows to their targets but never to push them down). Leave it
      True: measured on MovieLens-100K (``benchmarks/bench_cold_start.py --spare-negatives``), False
      puts the added items above nearly every known one (full-ranking N@10 of known targets about
      0, of new targets 0.11-0.14 against 0.01-0.03); it exists to show that the cold rows scored as
      negatives are what keeps added items in their place.
    - ``semantic_dim``: expected width of the semantic table (checked; filled in automatically).
    """

    d: int = 64
    adapter_activation: str | None = None
    adapter_init: str = "default"
    center_semantic: bool = False
    use_semantic: bool = True
    use_collaborative: bool = True
    fusion: str = "cross"
    shared_encoder: bool = True
    collab_init: str = "pca"
    pca_method: str = "auto"
    collab_init_std: float | None = None
    freeze_collaborative: bool = False
    n_cross_heads: int = 4
    cross_residual: bool = False
    dropout: float = 0.2
    missing_item_policy: str = "error"
    loss: str = "bpr"
    n_negatives: int = 1
    score_temperature: float | None = None
    view_loss_weight: float = 0.0
    collab_anchor_weight: float = 0.0
    cold_item_dropout: float = 0.0
    cold_items_as_negatives: bool = True
    semantic_dim: int | None = None
    seed: int = 0

    def validate(self) -> None:
        def one_of(name: str, allowed: Sequence[Any]) -> None:
            if getattr(self, name) not in allowed:
                raise ValueError(f"DualViewConfig.{name}={getattr(self, name)!r}; expected one of {list(allowed)}")

        one_of("adapter_activation", [None, "gelu", "relu"])
        one_of("adapter_init", ["default", "pca"])
        one_of("fusion", ["cross", "concat"])
        one_of("collab_init", ["pca", "random"])
        one_of("pca_method", ["auto", "exact", "randomized"])
        one_of("missing_item_policy", ["error", "fallback"])
        one_of("loss", LOSSES)
        if not (self.use_semantic or self.use_collaborative):
            raise ValueError("at least one of use_semantic / use_collaborative must be True")
        if self.d < 1 or self.n_negatives < 1 or self.n_cross_heads < 1:
            raise ValueError("d, n_negatives and n_cross_heads must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.collab_init_std is not None and not self.collab_init_std > 0:
            raise ValueError(f"collab_init_std must be > 0 (or None), got {self.collab_init_std}")
        if self.score_temperature is not None and not self.score_temperature > 0:
            raise ValueError(f"score_temperature must be > 0 (or None), got {self.score_temperature}")
        if not self.view_loss_weight >= 0:
            raise ValueError(f"view_loss_weight must be >= 0, got {self.view_loss_weight}")
        if self.view_loss_weight > 0 and not (self.use_semantic and self.use_collaborative):
            raise ValueError("view_loss_weight > 0 needs both views (use_semantic and use_collaborative)")
        if not 0 <= self.cold_item_dropout < 1:
            raise ValueError(f"cold_item_dropout must be in [0, 1), got {self.cold_item_dropout}")
        if self.cold_item_dropout > 0 and not self.use_collaborative:
            raise ValueError("cold_item_dropout > 0 needs the collaborative view (use_collaborative=True)")
        if not self.cold_items_as_negatives and self.cold_item_dropout == 0:
            raise ValueError("cold_items_as_negatives=False only applies with cold_item_dropout > 0")
        if not self.collab_anchor_weight >= 0:
            raise ValueError(f"collab_anchor_weight must be >= 0, got {self.collab_anchor_weight}")
        if self.collab_anchor_weight > 0 and not (self.use_collaborative and self.collab_init == "pca"):
            raise ValueError("collab_anchor_weight > 0 needs the collaborative view with collab_init='pca' "
                             "(it pulls the ID table toward its PCA initialisation)")
        if self.adapter_init == "pca" and not self.use_semantic:
            raise ValueError("adapter_init='pca' needs the semantic view (use_semantic=True)")
        if self.center_semantic and not self.use_semantic:
            raise ValueError("center_semantic=True needs the semantic view (use_semantic=True)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DualViewConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DualViewConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)


def as_semantic_matrix(semantic: Any, what: str = "semantic table") -> tuple[Tensor, list[str] | None]:
    """Accept an ItemEmbeddings-like object (``.ids``, ``.matrix``), a tensor or an array."""
    ids = None
    if hasattr(semantic, "matrix") and not isinstance(semantic, (np.ndarray, Tensor)):
        ids = list(getattr(semantic, "ids", []) or []) or None
        semantic = semantic.matrix
    if isinstance(semantic, Tensor):
        t = semantic.detach().cpu()
    else:
        try:
            t = torch.from_numpy(np.asarray(semantic))
        except TypeError as exc:
            raise TypeError(f"{what} must be an ItemEmbeddings-like object, a tensor or an array; "
                            f"got {type(semantic).__name__}") from exc
    if t.ndim != 2:
        raise ValueError(f"{what} must be 2-D [N, d_llm], got shape {tuple(t.shape)}")
    if not (t.is_floating_point()):
        raise ValueError(f"{what} must be floating point, got {t.dtype}")
    t = t.float()
    bad = ~torch.isfinite(t).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten()[:5].tolist()
        names = f" (ids {[ids[r] for r in rows]})" if ids else ""
        raise ValueError(f"{what} contains NaN/inf in {int(bad.sum())} of {t.shape[0]} rows, e.g. rows "
                         f"{rows} (0-based; item index = row + 1){names}")
    return t, ids


def truncate_sequences(item_seq: Tensor, padding_mask: Tensor, max_len: int,
                       *extras: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Keep, per row, the ``max_len`` positions ending at the last non-padding position (the most
    recent items). Rows come out left-padded when shorter than ``max_len``. ``extras`` (targets
    ``[B, L]`` or negatives ``[B, L, n]``) are cut the same way (0 where padded)."""
    B, L = item_seq.shape
    if L <= max_len:
        return item_seq, padding_mask, list(extras)
    real = ~padding_mask
    last = (L - 1) - real.flip(1).to(torch.int8).argmax(dim=1)  # all-padding rows: L - 1
    idx = (last - max_len + 1).unsqueeze(1) + torch.arange(max_len, device=item_seq.device)
    out_of_range = idx < 0
    idx = idx.clamp_min(0)
    seq = item_seq.gather(1, idx).masked_fill(out_of_range, 0)
    mask = padding_mask.gather(1, idx) | out_of_range
    cut = []
    for e in extras:
        if e is None:
            cut.append(None)
            continue
        ix = idx.view(B, max_len, *([1] * (e.ndim - 2))).expand(B, max_len, *e.shape[2:])
        oor = out_of_range.view(B, max_len, *([1] * (e.ndim - 2)))
        cut.append(e.gather(1, ix).masked_fill(oor, 0))
    return seq, mask, cut


class DualViewHead(nn.Module):
    """Dual-view head: semantic view (frozen table -> adapter) and collaborative view (trainable
    ID table, PCA-initialised), causal cross-attention both ways, a shared sequence encoder and
    concatenated scoring ``[e_se : e_co] . [u_se : u_co]``.

    ``semantic``: ItemEmbeddings-like (``.ids``, ``.matrix``), tensor or array ``[N, d_llm]``, one
    row per item 1..N in index order; stored as a frozen buffer with a zero padding row 0.
    ``num_items`` is required when ``semantic`` is None (then only the collaborative view with
    ``collab_init="random"`` is possible: a plain SASRec/GRU4Rec).
    Sequences longer than the encoder's ``max_len`` are cut to the most recent items
    (``truncate_sequences``) inside ``forward``, ``user_state`` and ``loss``.

    Cross-attention follows the paper: the new collaborative sequence is attention with semantic
    queries over collaborative keys/values (``cross_to_co``), the new semantic sequence the reverse
    (``cross_to_se``); both replace their inputs. Outputs, states and item representations are
    ordered ``[semantic : collaborative]``. With a shared encoder both views go through it in one
    call (batch concatenation); unshared, the semantic view uses ``encoder`` and the
    collaborative view ``encoder_co``.
    """

    def __init__(self, encoder: nn.Module, semantic: Any = None, d: int | None = None,
                 num_items: int | None = None, config: DualViewConfig | None = None,
                 _init_weights: bool = True, **overrides: Any) -> None:
        super().__init__()
        cfg = dataclasses.replace(config) if config is not None else DualViewConfig()
        names = {f.name for f in dataclasses.fields(DualViewConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown DualViewHead options {unknown}; DualViewConfig fields: {sorted(names)}")
        if d is not None:
            overrides["d"] = d
        cfg = dataclasses.replace(cfg, **overrides)
        cfg.validate()
        d = cfg.d
        hidden = getattr(encoder, "hidden_size", None)
        if hidden is None:
            raise TypeError("encoder must follow the SequenceEncoder protocol (attribute hidden_size)")
        if int(hidden) != d:
            raise ValueError(f"encoder hidden_size={hidden} differs from the head's d={d}")

        table = None
        if semantic is not None:
            table, _ = as_semantic_matrix(semantic)
            if cfg.semantic_dim is not None and table.shape[1] != cfg.semantic_dim:
                raise ValueError(f"embedding width mismatch: the config expects semantic_dim="
                                 f"{cfg.semantic_dim}, the semantic table has width {table.shape[1]}")
            if num_items is not None and table.shape[0] != num_items:
                hint = " (it looks like it has a padding row 0; pass rows for items 1..N only)" \
                    if table.shape[0] == num_items + 1 else ""
                raise ValueError(f"semantic table has {table.shape[0]} rows but num_items={num_items}; it "
                                 f"must have one row per item 1..N in index order{hint}")
            num_items = table.shape[0]
            cfg.semantic_dim = int(table.shape[1])
            if table.shape[1] < 2:
                raise ValueError("semantic table width must be >= 2")
        else:
            if num_items is None:
                raise ValueError("num_items is required when no semantic table is given")
            if cfg.use_semantic:
                raise ValueError("use_semantic=True needs a semantic table; pass semantic=... or "
                                 "use_semantic=False")
            if cfg.use_collaborative and cfg.collab_init == "pca":
                raise ValueError("collab_init='pca' needs a semantic table; pass semantic=... or "
                                 "collab_init='random'")
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.config = cfg
        self._num_items = int(num_items)
        self._cache: tuple[Any, Tensor] | None = None
        self._pca_start_cache: tuple[Any, Tensor] | None = None
        gen = torch.Generator().manual_seed(cfg.seed)

        if table is not None:
            self.register_buffer("semantic_table", torch.cat([table.new_zeros(1, table.shape[1]), table]))
        else:
            self.semantic_table = None
        # validate() guarantees the semantic view, hence a table, when centring
        self.register_buffer("semantic_mean", table.mean(0) if cfg.center_semantic else None)
        self.adapter = None
        if cfg.use_semantic:
            d_llm = table.shape[1]
            act = {None: nn.Identity, "gelu": nn.GELU, "relu": nn.ReLU}[cfg.adapter_activation]()
            self.adapter = nn.Sequential(nn.Linear(d_llm, d_llm // 2), act, nn.Linear(d_llm // 2, d))
            if cfg.adapter_init == "pca" and not d <= d_llm // 2 <= table.shape[0]:
                raise ValueError(f"adapter_init='pca' needs d={d} <= d_llm/2={d_llm // 2} <= number of items "
                                 f"{table.shape[0]}")
        self.item_embedding = None
        self.pca = None
        self.register_buffer("collab_scale", torch.ones(()))
        if cfg.use_collaborative:
            self.item_embedding = nn.Embedding(self._num_items + 1, d, padding_idx=0)
            with torch.no_grad():
                std = cfg.collab_init_std if (cfg.collab_init == "random" and cfg.collab_init_std is not None) else 0.02
                self.item_embedding.weight.normal_(0.0, std, generator=gen)
                self.item_embedding.weight[0].zero_()
            if cfg.collab_init == "pca":
                if _init_weights:
                    if d > min(table.shape):
                        raise ValueError(f"PCA init needs d={d} <= min(N, d_llm)={min(table.shape)}")
                    self.pca = PCAProjection.fit(table, d, method=cfg.pca_method, seed=cfg.seed)
                    init = self.pca.transform(table)
                    if cfg.collab_init_std is not None:
                        self.collab_scale.fill_(cfg.collab_init_std / float(init.std().clamp_min(1e-12)))
                    with torch.no_grad():
                        self.item_embedding.weight[1:] = init * self.collab_scale
                else:
                    self.pca = PCAProjection(table.shape[1], d)
            if cfg.freeze_collaborative:
                self.item_embedding.weight.requires_grad_(False)
        if cfg.use_semantic and cfg.adapter_init == "pca" and _init_weights:
            self._init_adapter_from_pca(table)
        self.fallback_se = self.fallback_co = None
        if cfg.missing_item_policy == "fallback":
            if cfg.use_semantic:
                self.fallback_se = nn.Parameter(torch.randn(d, generator=gen) * 0.02)
            if cfg.use_collaborative:
                self.fallback_co = nn.Parameter(torch.randn(d, generator=gen) * 0.02)

        both = cfg.use_semantic and cfg.use_collaborative
        self.cross_to_se = self.cross_to_co = None
        if both and cfg.fusion == "cross":
            # paper: S^_co = softmax(S_se W_Q (S_co W_K)^T) S_co W_V, and symmetrically S^_se
            self.cross_to_co = CrossViewAttention(d, cfg.n_cross_heads, cfg.dropout, cfg.cross_residual)
            self.cross_to_se = CrossViewAttention(d, cfg.n_cross_heads, cfg.dropout, cfg.cross_residual)
        self.encoder = encoder
        self.encoder_co = copy.deepcopy(encoder) if (both and not cfg.shared_encoder) else None
        self.max_len: int | None = getattr(encoder, "max_len", None)

    @torch.no_grad()
    def _init_adapter_from_pca(self, table: Tensor) -> None:
        """``adapter_init="pca"``: the adapter starts as ``(e - mean) @ top-d principal directions``
        (times the collaborative scale), via W1 = top d_llm/2 directions, W2 = [I_d 0]."""
        first, last = self.adapter[0], self.adapter[2]
        hidden, d = first.out_features, self.config.d  # d <= hidden <= N was checked in __init__
        pca = PCAProjection.fit(table, hidden, method=self.config.pca_method, seed=self.config.seed)
        scale = 1.0
        if self.config.collab_init_std is not None:
            scale = self.config.collab_init_std / float(pca.transform(table)[:, :d].std().clamp_min(1e-12))
        first.weight.copy_(pca.components.T)
        offset = pca.mean if self.semantic_mean is None else pca.mean - self.semantic_mean  # input already centred
        first.bias.copy_(-(offset @ pca.components))
        last.weight.zero_()
        last.weight[:, :d] = torch.eye(d) * scale
        last.bias.zero_()

    # ------------------------------------------------------------------ properties
    @property
    def num_items(self) -> int:
        return self._num_items

    @property
    def output_dim(self) -> int:
        """Width D of states and item representations: 2d with both views, d with one."""
        return self.config.d * (int(self.config.use_semantic) + int(self.config.use_collaborative))

    # ------------------------------------------------------------------ item vectors
    def _check_ids(self, ids: Tensor, what: str, where: Tensor | None = None) -> Tensor:
        """Boolean mask of indices outside 0..N (0 is padding); raises under policy 'error'."""
        invalid = (ids < 0) | (ids > self._num_items)
        if where is not None:
            invalid = invalid & where
        if self.config.missing_item_policy == "error" and bool(invalid.any()):
            ex = torch.unique(ids[invalid])[:5].tolist()
            raise ValueError(f"{int(invalid.sum())} {what} item indices are outside 1..{self._num_items} "
                             f"(0 = padding), e.g. {ex}; the semantic/ID tables have no rows for them. "
                             "Map them to known items, or build the head with missing_item_policy='fallback' "
                             "to give them a learned fallback row.")
        return invalid

    def _rows(self, ids: Tensor, invalid: Tensor) -> Tensor:
        """Representations ``[..., D]`` of item indices (invalid ones -> fallback rows)."""
        if not torch.is_grad_enabled():
            table = self._table(with_fallback=True)
            return table[ids.masked_fill(invalid, self._num_items + 1)]
        safe = ids.masked_fill(invalid, 0)
        parts = []
        if self.config.use_semantic:
            uniq, inv = torch.unique(safe, return_inverse=True)
            se = self._adapt(self.semantic_table[uniq])[inv]
            se = se.masked_fill((safe == 0).unsqueeze(-1), 0.0)
            if self.fallback_se is not None:
                se = torch.where(invalid.unsqueeze(-1), self.fallback_se, se)
            parts.append(se)
        if self.config.use_collaborative:
            co = self.item_embedding(safe)
            if self.fallback_co is not None:
                co = torch.where(invalid.unsqueeze(-1), self.fallback_co, co)
            parts.append(co)
        return torch.cat(parts, dim=-1)

    def _adapt(self, rows: Tensor) -> Tensor:
        """The adapter ``W2 (W1 e + b1) + b2``. Without an activation it is computed as one
        ``[d, d_llm]`` map ``(W2 W1) e + (W2 b1 + b2)``: the same function and gradients for W1, W2,
        at about a third of the cost. With ``center_semantic`` the rows are ``e - semantic_mean``
        (folded into the bias on the linear path)."""
        if self.config.adapter_activation is not None:
            return self.adapter(rows if self.semantic_mean is None else rows - self.semantic_mean)
        first, last = self.adapter[0], self.adapter[2]
        weight = last.weight @ first.weight
        bias = last.weight @ first.bias + last.bias
        if self.semantic_mean is not None:
            bias = bias - weight @ self.semantic_mean
        return F.linear(rows, weight, bias)

    def _cache_key(self) -> tuple:
        ts = [t for t in (self.semantic_table, self.semantic_mean, self.fallback_se, self.fallback_co)
              if t is not None]
        if self.adapter is not None:
            ts += list(self.adapter.parameters())
        if self.item_embedding is not None:
            ts.append(self.item_embedding.weight)
        return tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in ts)

    def _table(self, with_fallback: bool = False) -> Tensor:
        """``[N+1 (+1), D]``: row 0 zeros, rows 1..N items, optional last row = fallback."""
        key = None
        if not torch.is_grad_enabled():
            key = self._cache_key()
            if self._cache is not None and self._cache[0] == key:
                full = self._cache[1]
                return full if with_fallback else full[: self._num_items + 1]
        parts = []
        d = self.config.d
        if self.config.use_semantic:
            se = self._adapt(self.semantic_table[1:])
            fb = self.fallback_se if self.fallback_se is not None else se.new_zeros(d)
            parts.append(torch.cat([se.new_zeros(1, d), se, fb.unsqueeze(0)]))
        if self.config.use_collaborative:
            w = self.item_embedding.weight
            fb = self.fallback_co if self.fallback_co is not None else w.new_zeros(d)
            parts.append(torch.cat([w.new_zeros(1, d), w[1:], fb.unsqueeze(0)]))
        full = torch.cat(parts, dim=-1)
        if key is not None:
            self._cache = (key, full)
        return full if with_fallback else full[: self._num_items + 1]

    def item_representations(self) -> Tensor:
        """``[N+1, D]`` = ``[e_se : e_co]`` for every item index (row 0, padding, is zero).
        Cached while gradients are off and no weight has changed."""
        return self._table(with_fallback=False)

    # ------------------------------------------------------------------ sequences
    def _prepare(self, item_seq: Tensor, padding_mask: Tensor | None,
                 *extras: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        if item_seq.ndim != 2:
            raise ValueError(f"item_seq must be [B, L], got shape {tuple(item_seq.shape)}")
        if item_seq.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"item_seq must hold integer item indices, got {item_seq.dtype}")
        item_seq = item_seq.long()
        if padding_mask is None:
            padding_mask = item_seq == 0
        elif padding_mask.shape != item_seq.shape or padding_mask.dtype != torch.bool:
            raise ValueError(f"padding_mask must be a bool tensor of shape {tuple(item_seq.shape)}, "
                             f"got {padding_mask.dtype} {tuple(padding_mask.shape)}")
        item_seq = item_seq.masked_fill(padding_mask, 0)  # ids under the padding mask are ignored
        if self.max_len is not None and item_seq.shape[1] > self.max_len:
            return truncate_sequences(item_seq, padding_mask, self.max_len, *extras)
        return item_seq, padding_mask, list(extras)

    def _encode(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        """Cross-attention (if on) and the encoder(s) over the view inputs ``x [B, L, D]``."""
        cfg, d = self.config, self.config.d
        x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        if not (cfg.use_semantic and cfg.use_collaborative):
            return self.encoder(x, padding_mask)
        se, co = x[..., :d], x[..., d:]
        if self.cross_to_co is not None:
            se, co = self.cross_to_se(co, se, padding_mask), self.cross_to_co(se, co, padding_mask)
        if self.encoder_co is None:
            B = x.shape[0]
            out = self.encoder(torch.cat([se, co]), torch.cat([padding_mask, padding_mask]))
            return torch.cat([out[:B], out[B:]], dim=-1)
        return torch.cat([self.encoder(se, padding_mask), self.encoder_co(co, padding_mask)], dim=-1)

    def forward(self, item_seq: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``[B, L, D]`` causal sequence states (``[B, max_len, D]`` when cut to max_len)."""
        item_seq, padding_mask, _ = self._prepare(item_seq, padding_mask)
        invalid = self._check_ids(item_seq, "sequence", where=~padding_mask)
        return self._encode(self._rows(item_seq, invalid), padding_mask)

    @staticmethod
    def last_positions(padding_mask: Tensor) -> Tensor:
        """Index of the last non-padding position per row (L-1 for all-padding rows)."""
        L = padding_mask.shape[1]
        return (L - 1) - (~padding_mask).flip(1).to(torch.int8).argmax(dim=1)

    def user_state(self, item_seq: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``[B, D]`` state at the last non-padding position (finite for all-padding rows)."""
        item_seq, padding_mask, _ = self._prepare(item_seq, padding_mask)
        invalid = self._check_ids(item_seq, "sequence", where=~padding_mask)
        out = self._encode(self._rows(item_seq, invalid), padding_mask)
        last = self.last_positions(padding_mask)
        return out[torch.arange(out.shape[0], device=out.device), last]

    # ------------------------------------------------------------------ scoring
    def _scored_states(self, states: Tensor) -> Tensor:
        """User states as they enter the score: unchanged (dot product) or, with
        ``score_temperature``, unit length divided by the temperature (cosine / tau)."""
        tau = self.config.score_temperature
        return states if tau is None else F.normalize(states, dim=-1) / tau

    def _scored_items(self, items: Tensor) -> Tensor:
        """Item vectors as they enter the score: unchanged or, with ``score_temperature``, unit
        length (the zero padding row stays zero)."""
        return items if self.config.score_temperature is None else F.normalize(items, dim=-1)

    def score(self, states: Tensor, candidates: Tensor) -> Tensor:
        """``states [B, D]``, ``candidates [B, C]`` (or ``[C]`` for all users) -> ``[B, C]``."""
        candidates = candidates.long()
        invalid = self._check_ids(candidates, "candidate")
        states, rows = self._scored_states(states), self._scored_items(self._rows(candidates, invalid))
        if candidates.ndim == 1:
            return states @ rows.T
        return torch.einsum("bd,bcd->bc", states, rows)

    def full_scores(self, states: Tensor) -> Tensor:
        """``[B, N+1]`` scores for every item index; column 0 (padding) is -inf."""
        scores = self._scored_states(states) @ self._scored_items(self.item_representations()).T
        scores[:, 0] = float("-inf")
        return scores

    def loss(self, item_seq: Tensor, pos: Tensor, neg: Tensor | None = None,
             padding_mask: Tensor | None = None, loss_type: str | None = None,
             logit_bias: Tensor | None = None, prior: Any = None) -> Tensor:
        """Mean loss over every non-padding position with a target (``pos > 0``).

        ``pos [B, L]``: next item per position. ``neg [B, L]`` or ``[B, L, n]``: negatives
        (sampled uniformly from 1..N, ``config.n_negatives`` per position, when None; unused by
        "ce"). Types: "bpr" (mean -log sigmoid(s_pos - s_neg)), "bce" (-log sigmoid(s_pos) -
        mean log sigmoid(-s_neg)), "ce" (full softmax over items 1..N), "sampled_softmax"
        (softmax over the positive and its negatives; negatives equal to the positive are masked).
        With ``config.view_loss_weight`` w > 0 the result is the loss of the fused score plus w times
        the loss of each view's own score; ``config.collab_anchor_weight`` a > 0 adds
        ``a * collab_anchor_penalty()``.

        ``logit_bias [N+1]`` (optional; index 0 and the fallback row get 0) is added to item i's
        training logit wherever it is scored, in every loss type and every view's loss: with
        ``tau * log(1 + count_i)`` this is the logit-adjusted loss (Menon et al., 2021), which
        ``TrainConfig.logit_adjustment`` sets up. Scoring at evaluation never sees it.

        ``prior`` (optional; a ``SemanticPrior`` around this model, which ``Trainer(..., prior=...)``
        passes) adds its ``training_bias`` to every training logit the same way: the score of item i
        after position t gets ``weight * prior`` of the profile up to t, so the model learns what the
        semantic prior does not already say, and is scored with the prior added (as the wrapper scores).
        """
        loss_type = loss_type or self.config.loss
        if loss_type not in LOSSES:
            raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {list(LOSSES)}")
        if logit_bias is not None:
            if logit_bias.ndim != 1 or logit_bias.shape[0] != self._num_items + 1:
                raise ValueError(f"logit_bias must be [num_items + 1] = [{self._num_items + 1}] "
                                 f"(index 0 is padding), got {tuple(logit_bias.shape)}")
            logit_bias = logit_bias.to(pos.device)
            logit_bias = torch.cat([logit_bias.new_zeros(1), logit_bias[1:], logit_bias.new_zeros(1)])
        if pos.shape != item_seq.shape:
            raise ValueError(f"pos must have the shape of item_seq {tuple(item_seq.shape)}, got {tuple(pos.shape)}")
        if neg is not None and tuple(neg.shape[:2]) != tuple(item_seq.shape):
            raise ValueError(f"neg must be [B, L] or [B, L, n] with [B, L]={tuple(item_seq.shape)}, "
                             f"got {tuple(neg.shape)}")
        item_seq, padding_mask, (pos, neg) = self._prepare(item_seq, padding_mask, pos.long(),
                                                           None if neg is None else neg.long())
        valid = (~padding_mask) & (pos != 0)
        seq_invalid = self._check_ids(item_seq, "sequence", where=~padding_mask)
        p = pos[valid]
        p_invalid = self._check_ids(p, "target (pos)")
        M = p.shape[0]
        if loss_type != "ce":
            if neg is None:
                neg_v = torch.randint(1, self._num_items + 1, (M, self.config.n_negatives), device=p.device)
            else:
                neg_v = neg[valid].reshape(M, -1)
            n_invalid = self._check_ids(neg_v, "negative")
            ids = torch.cat([item_seq.reshape(-1), p, neg_v.reshape(-1)])
            bad = torch.cat([seq_invalid.reshape(-1), p_invalid, n_invalid.reshape(-1)])
        else:
            ids, bad = torch.cat([item_seq.reshape(-1), p]), torch.cat([seq_invalid.reshape(-1), p_invalid])
        rows = self._rows(ids, bad)
        cold = self._cold_item_draw(pos.device) if self.training else None
        n_seq = item_seq.numel()
        cold_negatives = cold is not None and self.config.cold_items_as_negatives
        if cold is not None:  # the inputs and the targets, and the sampled negatives unless spared
            swap_ids = ids.masked_fill(bad, 0)  # index 0 is never dropped: those rows stay as they are
            if not cold_negatives:
                swap_ids[n_seq + M:] = 0
            rows = self._with_cold_rows(rows, swap_ids, *cold)
        # split (not slicing): its backward is one concatenation instead of zero-filled copies
        x, e_pos, e_neg = rows.split([n_seq, M, rows.shape[0] - n_seq - M])
        out = self._encode(x.view(*item_seq.shape, -1), padding_mask)
        if M == 0:
            return out.sum() * 0.0
        if loss_type == "ce":
            # candidates are the real items 1..N (and the fallback row when there is one): slicing
            # the padding row away, rather than masking its column with -inf, spares an in-place
            # write and its zero-filled gradient copy over the [M, N] logits
            table = self._table(with_fallback=True)
            if cold_negatives:  # every row but the fallback, which no item index reaches
                every_item = torch.arange(self._num_items + 1, device=table.device)
                table = torch.cat([self._with_cold_rows(table[:-1], every_item, *cold), table[-1:]])
            has_fallback = self.fallback_se is not None or self.fallback_co is not None
            logit_sets = self._logit_sets(out[valid], table[1:] if has_fallback else table[1:-1])
            target = p.masked_fill(p_invalid, self._num_items + 1) - 1  # row i of the slice is item i+1
            if cold is not None and not cold_negatives:  # a dropped target's column scores its cold row
                logit_sets = self._with_cold_targets(logit_sets, out[valid], e_pos, target,
                                                     cold[0][p.masked_fill(p_invalid, 0)])
            if logit_bias is not None:  # [N] or, with the fallback row, [N+1] (the fallback's bias 0)
                bias = logit_bias[1: self._num_items + 1 + int(has_fallback)]
                logit_sets = [logits + bias.to(logits.dtype) for logits in logit_sets]
            if prior is not None:  # [M, N+1] over index 0..N: drop padding, the fallback column gets 0
                bias = prior.training_bias(item_seq, padding_mask, valid)[:, 1:]
                if has_fallback:
                    bias = torch.cat([bias, bias.new_zeros(M, 1)], 1)
                logit_sets = [logits + bias.to(logits.dtype) for logits in logit_sets]
        else:
            candidates = torch.cat([e_pos.unsqueeze(1), e_neg.view(M, -1, rows.shape[-1])], 1)
            logit_sets = self._logit_sets(out[valid], candidates)  # each [M, 1+n], the positive first
            if logit_bias is not None or prior is not None:  # invalid ids (fallback rows) take index 0's bias, 0
                cand_ids = torch.cat([p.masked_fill(p_invalid, 0).unsqueeze(1), neg_v.masked_fill(n_invalid, 0)], 1)
                bias = 0.0 if logit_bias is None else logit_bias[cand_ids]
                if prior is not None:
                    bias = bias + prior.training_bias(item_seq, padding_mask, valid, cand_ids)
                logit_sets = [logits + bias.to(logits.dtype) for logits in logit_sets]

        def one_loss(logits: Tensor) -> Tensor:
            if loss_type == "ce":
                return F.cross_entropy(logits, target)
            s_pos, s_neg = logits[:, 0], logits[:, 1:]
            if loss_type == "bpr":
                return -F.logsigmoid(s_pos.unsqueeze(1) - s_neg).mean()
            if loss_type == "bce":
                return F.softplus(-s_pos).mean() + F.softplus(s_neg).mean()
            masked = torch.cat([s_pos.unsqueeze(1), s_neg.masked_fill(neg_v == p.unsqueeze(1), float("-inf"))], 1)
            return F.cross_entropy(masked, torch.zeros(M, dtype=torch.long, device=masked.device))

        fused, *per_view = [one_loss(logits) for logits in logit_sets]
        total = fused + self.config.view_loss_weight * sum(per_view) if per_view else fused
        if self.config.collab_anchor_weight > 0:
            total = total + self.config.collab_anchor_weight * self.collab_anchor_penalty()
        return total

    def _cold_item_draw(self, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """``(dropped [N+1] bool, cold rows [N+1, d])`` for one training step, or None when
        ``cold_item_dropout`` is 0. The cold rows are those ``add_items`` gives by default."""
        q = self.config.cold_item_dropout
        if q <= 0 or self.item_embedding is None:
            return None
        dropped = torch.rand(self._num_items + 1, device=device) < q
        dropped[0] = False
        if self.pca is not None:
            return dropped, self._pca_start()
        return dropped, self.item_embedding.weight.new_zeros(self.item_embedding.weight.shape)

    def _with_cold_targets(self, logit_sets: list[Tensor], states: Tensor, e_pos: Tensor, target: Tensor,
                           dropped: Tensor) -> list[Tensor]:
        """Full-catalogue logits ``[M, C]`` with the target column ``target [M]`` of the rows whose
        target was dropped (``dropped [M]``) scored against the target's cold row (in ``e_pos``);
        every other column keeps the trained rows."""
        cold_sets = self._logit_sets(states, e_pos.unsqueeze(1))  # each [M, 1]
        column = target.unsqueeze(1)
        return [logits.scatter(1, column, torch.where(dropped.unsqueeze(1), cold_logit, logits.gather(1, column)))
                for logits, cold_logit in zip(logit_sets, cold_sets)]

    def _with_cold_rows(self, rows: Tensor, ids: Tensor, dropped: Tensor, cold: Tensor) -> Tensor:
        """``rows [n, D]`` of item indices ``ids [n]`` with the collaborative part (the last d
        columns) of the dropped items replaced by their cold rows."""
        d = cold.shape[1]
        co = torch.where(dropped[ids].unsqueeze(-1), cold[ids], rows[:, -d:])
        return torch.cat([rows[:, :-d], co], -1)

    def collab_anchor_penalty(self) -> Tensor:
        """``mean_i ||E_co[i] - E_co0[i]||^2`` over items 1..N, ``E_co0`` the ID table's PCA
        initialisation (recomputed from the stored projection, so it also covers rows added by
        ``add_items``); the term ``config.collab_anchor_weight`` scales in ``loss``."""
        if self.item_embedding is None or self.pca is None:
            raise ValueError("collab_anchor_penalty needs a PCA-initialised collaborative view")
        w = self.item_embedding.weight[1: self._num_items + 1]
        return (w - self._pca_start()[1:]).pow(2).sum(-1).mean()

    def _pca_rows(self, semantic_rows: Tensor) -> Tensor:
        """The ID-table rows PCA initialisation gives ``semantic_rows``: their stored projection
        times the stored init scale."""
        return self.pca.transform(semantic_rows) * self.collab_scale

    def _pca_start(self) -> Tensor:
        """``[N + 1, d]``: the ID table's PCA initialisation for every item index (row 0, padding,
        zero), in the table's dtype; cached while the semantic table and projection are unchanged.
        The anchor of ``collab_anchor_weight`` and the cold rows of ``cold_item_dropout``."""
        w = self.item_embedding.weight
        bufs = (self.semantic_table, self.pca.mean, self.pca.components, self.collab_scale)
        key = tuple((t.data_ptr(), t._version, t.shape, t.device, t.dtype) for t in bufs) + (w.dtype,)
        if self._pca_start_cache is None or self._pca_start_cache[0] != key:
            with torch.no_grad():
                rows = self._pca_rows(self.semantic_table[1: self._num_items + 1]).to(w.dtype)
                self._pca_start_cache = (key, torch.cat([rows.new_zeros(1, rows.shape[1]), rows]))
        return self._pca_start_cache[1]

    def _logit_sets(self, states: Tensor, items: Tensor) -> list[Tensor]:
        """Scores of ``states [M, D]`` against ``items``: ``[C, D]`` (the same candidates for every
        state) or ``[M, C, D]`` (candidates per state), as ``score`` computes them. With
        ``view_loss_weight`` > 0, followed by each view's own scores (semantic, collaborative; the
        cosine taken within the view)."""
        def dots(a: Tensor, b: Tensor) -> Tensor:
            return a @ b.T if b.ndim == 2 else torch.einsum("md,mcd->mc", a, b)

        pairs = [(states, items)]
        if self.config.view_loss_weight > 0:
            d = self.config.d
            pairs += [(states[:, :d], items[..., :d]), (states[:, d:], items[..., d:])]
        return [dots(self._scored_states(s), self._scored_items(e)) for s, e in pairs]

    # ------------------------------------------------------------------ warm start
    @torch.no_grad()
    def init_collaborative_from(self, table: Any) -> None:
        """Start the ID table from a trained one, e.g. the item embeddings of the SASRec whose
        encoder this head wraps, so that the head builds on what that model learned (beyond the
        paper, which starts it from PCA of the semantic table).

        ``table``: ``[N, d]`` rows for items 1..N in this head's index order, or ``[N + 1, d]`` with
        the padding row 0 first (as ``nn.Embedding`` tables are stored); a tensor or an array. Needs
        ``collab_init="random"``: the PCA start is what ``collab_anchor_weight`` pulls towards and
        what ``add_items`` extends. Items added later get zero rows, as with a random table.

        Measured (``benchmarks/bench_warm_start.py``), this warm start keeps less of the semantic
        view's gain than a fresh head of the same architecture: +6% full-ranking N@10 over the
        SASRec it starts from on Amazon Beauty and +10% on MovieLens-100K, against +25% and +14%."""
        if self.item_embedding is None:
            raise ValueError("init_collaborative_from needs the collaborative view (use_collaborative=True)")
        if self.config.collab_init != "random":
            raise ValueError("init_collaborative_from needs collab_init='random' (a PCA-initialised table is "
                             "the anchor and the cold-start projection; build the head with collab_init='random')")
        rows, _ = as_semantic_matrix(table, "collaborative table")
        n, d = self._num_items, self.item_embedding.weight.shape[1]
        if rows.shape == (n + 1, d):
            rows = rows[1:]
        if rows.shape != (n, d):
            raise ValueError(f"collaborative table has shape {tuple(rows.shape)}; this head needs [{n}, {d}] "
                             f"(items 1..N) or [{n + 1}, {d}] (with the padding row 0)")
        w = self.item_embedding.weight
        w[1: n + 1] = rows.to(w.device, w.dtype)
        w[0].zero_()

    # ------------------------------------------------------------------ cold start
    @torch.no_grad()
    def add_items(self, new_semantic_rows: Any, *, collaborative: ColdStartRows | None = None,
                  n_neighbours: int = 10, ridge: float = 1.0) -> Tensor:
        """Append items (cold start) without retraining; returns their indices ``N+1..N+M``.

        The semantic buffer is extended. ``collaborative`` says where each new item's ID-table
        row comes from:

        - ``"projection"``: the stored PCA projection of its semantic row (times the stored init
          scale), i.e. where PCA initialisation would have put it before training;
        - ``"mapping"`` (beyond the paper): a ridge regression (penalty ``ridge``, with intercept)
          from the existing items' semantic rows to their trained ID-table rows, applied to the
          new item's semantic row: the PCA start corrected for how training moved the table;
        - ``"neighbours"`` (beyond the paper): the mean trained row of its ``n_neighbours``
          nearest existing items by cosine similarity of the semantic rows, so that it lands among
          the trained rows of the items its text resembles;
        - ``"zeros"``: a zero row (the new item is then scored by its semantic part alone);
        - ``None`` (default): ``"projection"`` for a PCA-initialised table, else ``"zeros"``; the
          only value a head without an ID table takes.

        Measured (``benchmarks/bench_cold_start.py``, 10% of the items withheld): ``"projection"``
        reaches new items most often on Amazon Beauty, ``"mapping"`` keeps known items highest and
        scores best over all users; ``"zeros"`` is the worst. Extend the raw-id mapping with
        ``ItemIndex.extended``. The ID table becomes a new Parameter: rebuild optimizers afterwards."""
        if self.semantic_table is None:
            raise ValueError("add_items needs a head built with a semantic table")
        rows, _ = as_semantic_matrix(new_semantic_rows, "new semantic rows")
        if rows.shape[1] != self.semantic_table.shape[1]:
            raise ValueError(f"embedding width mismatch: new rows have width {rows.shape[1]}, the head's "
                             f"semantic table has width {self.semantic_table.shape[1]}")
        if collaborative is not None and self.item_embedding is None:
            raise ValueError(f"collaborative={collaborative!r} chooses ID-table rows, and this head has no ID "
                             "table (use_collaborative=False); leave it out")
        if collaborative is None:
            collaborative = "projection" if self.pca is not None else "zeros"
        if collaborative not in COLD_START_ROWS:
            raise ValueError(f"collaborative must be one of {COLD_START_ROWS} or None, got {collaborative!r}")
        if collaborative == "projection" and self.item_embedding is not None and self.pca is None:
            raise ValueError("collaborative='projection' needs a PCA-initialised ID table (collab_init='pca'); "
                             "use 'neighbours' or 'zeros'")
        if collaborative == "neighbours" and n_neighbours < 1:
            raise ValueError(f"n_neighbours must be >= 1, got {n_neighbours}")
        if collaborative == "mapping" and not ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        M, N = rows.shape[0], self._num_items
        rows = rows.to(self.semantic_table.device, self.semantic_table.dtype)
        if self.item_embedding is not None:
            w = self.item_embedding.weight
            if collaborative == "projection":
                new = self._pca_rows(rows).to(w.dtype)
            elif collaborative == "mapping":
                new = self._mapped_rows(rows, ridge)
            elif collaborative == "neighbours":
                new = self._neighbour_rows(rows, n_neighbours)
            else:
                new = w.new_zeros(M, w.shape[1])
            emb = nn.Embedding(N + M + 1, w.shape[1], padding_idx=0, device=w.device, dtype=w.dtype)
            emb.weight.copy_(torch.cat([w, new]))
            emb.weight.requires_grad_(w.requires_grad)
            self.item_embedding = emb
        self.semantic_table = torch.cat([self.semantic_table, rows])
        self._num_items = N + M
        self._cache = None
        return torch.arange(N + 1, N + M + 1, device=self.semantic_table.device)

    def _mapped_rows(self, rows: Tensor, ridge: float) -> Tensor:
        """Ridge regression (with intercept) from the existing semantic rows to the trained ID rows."""
        w = self.item_embedding.weight
        x = self.semantic_table[1: self._num_items + 1].double()
        y = w[1: self._num_items + 1].double()
        x_mean, y_mean = x.mean(0), y.mean(0)
        xc = x - x_mean
        gram = xc.T @ xc + ridge * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        coef = torch.linalg.lstsq(gram, xc.T @ (y - y_mean)).solution
        return ((rows.double() - x_mean) @ coef + y_mean).to(w.dtype)

    def _neighbour_rows(self, rows: Tensor, k: int, chunk: int = 1024) -> Tensor:
        """Mean ID-table row of each new semantic row's ``k`` nearest existing items (cosine)."""
        w = self.item_embedding.weight
        known = F.normalize(self.semantic_table[1: self._num_items + 1].float(), dim=-1)
        k = min(k, known.shape[0])
        out = []
        for start in range(0, rows.shape[0], chunk):
            sims = F.normalize(rows[start: start + chunk].float(), dim=-1) @ known.T
            nearest = sims.topk(k, dim=-1).indices + 1                       # table rows are 1-based
            out.append(w[nearest].mean(1))
        return torch.cat(out).to(w.dtype) if out else w.new_zeros(0, w.shape[1])

    # ------------------------------------------------------------------ save / load
    def _encoder_spec(self) -> dict[str, Any]:
        fn = getattr(self.encoder, "encoder_config", None)
        return fn() if callable(fn) else {"type": type(self.encoder).__name__, "args": None}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``model.safetensors`` (every weight and buffer) and ``config.json`` atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in self.state_dict().items()}
        atomic_save_safetensors(directory / WEIGHTS_NAME, state, metadata={"format": FORMAT})
        atomic_write_json(directory / CONFIG_NAME, {
            "format": FORMAT, "format_version": 1, "config": self.config.to_dict(),
            "num_items": self._num_items, "encoder": self._encoder_spec(),
        })

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool = False,
                    commit_message: str | None = None, item_index: ItemIndex | None = None) -> str:
        """Upload the head (``save_pretrained``'s files) and a generated model card to a Hub model
        repo; returns its URL. Pass the ``ItemIndex`` the head was trained with as ``item_index``
        to publish the raw id -> index mapping beside it (``item_index.json``)."""
        from .hub import push_folder

        with tempfile.TemporaryDirectory(prefix="dual-view-head-") as tmp:
            self.save_pretrained(tmp)
            if item_index is not None:
                item_index.save(Path(tmp) / "item_index.json")
            return push_folder(tmp, repo_id, token=token, private=private, commit_message=commit_message)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, encoder: nn.Module | None = None,
                        map_location: str | torch.device = "cpu", *, revision: str | None = None,
                        token: str | None = None, cache_dir: str | os.PathLike | None = None) -> "DualViewHead":
        """Rebuild a head written by ``save_pretrained``, from a local folder or a Hub model repo
        (``push_to_hub``; offline, from the local Hugging Face cache). Built-in encoders (SASRec,
        GRU4Rec) are rebuilt from the config; pass ``encoder=`` for your own (e.g. an
        adapter-wrapped model)."""
        from .hub import resolve_model_dir

        directory = resolve_model_dir(path_or_repo_id, revision=revision, token=token, cache_dir=cache_dir)
        meta = read_json(directory / CONFIG_NAME)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory / CONFIG_NAME} is not a DualViewHead config (format={meta.get('format')!r})")
        cfg = DualViewConfig.from_dict(meta["config"])
        tensors, _ = load_safetensors(directory / WEIGHTS_NAME)
        if encoder is None:
            encoder = build_encoder(meta["encoder"])
        semantic = tensors.get("semantic_table")
        if semantic is not None:
            if cfg.semantic_dim is not None and semantic.shape[1] != cfg.semantic_dim:
                raise ValueError(f"embedding width mismatch: {directory / CONFIG_NAME} expects semantic_dim="
                                 f"{cfg.semantic_dim}, {directory / WEIGHTS_NAME} holds width {semantic.shape[1]}")
            semantic = semantic[1:]
        head = cls(encoder, semantic=semantic, num_items=int(meta["num_items"]), config=cfg, _init_weights=False)
        missing, unexpected = head.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"{directory / WEIGHTS_NAME} does not match the model built from its config: "
                             f"missing {missing[:10]}, unexpected {unexpected[:10]} (wrong encoder=?)")
        return head.to(map_location)
