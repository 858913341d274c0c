"""Symmetric in-batch InfoNCE with a trainable temperature, duplicate-prompt masking, cross-process
negatives (gathered with gradients) and GradCache.

Definitions (``ContrastiveLoss``)
--------------------------------
Views ``E`` of shape ``[K, B, d]`` (``K >= 2`` augmented views of ``B`` items). For an ordered pair
of views ``(a, b)`` and anchor ``i``::

    logits[i, k] = s(e_i^a, e_k^b) * exp(log_scale)          # s = inner product (default) or cosine
    L(a->b)      = -1/B  sum_i log softmax_k(logits[i, :])[i]

* **Denominator**: the standard InfoNCE denominator ``sum_k exp(logits[i, k])`` *includes* the
  positive ``k = i`` (the paper's printed indicator ``[i != k]`` would exclude it; we follow the
  standard form, as CLIP, LLMEmb and sentence-transformers do: it is a proper cross-entropy, bounded
  below by 0, and numerically stable).
* **Negatives**: the candidates of anchor ``e_i^a`` are the ``B`` embeddings of view ``b``
  (CLIP style, exactly the paper's formula); same-view embeddings are not used as negatives.
* **K = 2**: ``L = L(1->2) + L(2->1)``, exactly METHOD.md's ``L_CFT = L_CL^1 + L_CL^2``.
  **K > 2**: ``L = 2 * mean over the K(K-1) ordered pairs (a != b) of L(a->b)``, which equals the
  K = 2 formula when ``K = 2`` and keeps the same scale for any ``K``.
* **Duplicate prompts**: ``group_ids[B]``; if ``group_ids[i] == group_ids[k]`` and ``k != i`` the
  logit ``[i, k]`` is set to ``-inf`` (an identical prompt is not a negative; the positive itself is
  always kept).
* **Known positives** (``known_positives``): a bool ``[B, B]`` or ``[K, B, B]`` tensor over the
  *global* batch; ``True`` at ``[b, i, k]`` (or ``[i, k]`` for every view) removes candidate ``k`` of
  view ``b`` from anchor ``i``'s denominator, exactly like a duplicate prompt (e.g. an item that
  users consume together with ``i``, when collaborative pairs are positives; the positive ``k = i``
  is always kept). Each process passes the rows of its own anchors: ``[..., B_local, B]``.
* **Temperature**: ``tau = exp(-log_scale)``. The parameter ``log_scale`` is trainable and clamped
  to ``[log(1/max_temperature), log(1/min_temperature)]`` (in the forward pass and, via
  ``clamp_()``, after each optimizer step). Defaults: cosine ``tau = 0.05`` (logit scale 20, as
  sentence-transformers' MultipleNegativesRankingLoss); inner product ``tau = 1.0`` (logits are the
  raw inner products, i.e. ``sim / tau`` with ``tau = 1``: mean-pooled hidden states already give
  inner products of order 1-100, so any larger logit scale saturates the softmax at step 0; LLMEmb's
  "3" is a CLIP-style logit scale for a different pooling). Range ``[0.01, 100]`` by default.
  Logits are always computed in float32 (fp16 inner products of LLM states overflow).
* **Several processes**: when ``torch.distributed`` is initialised with ``world_size > 1``, the
  embeddings (and group ids) of all processes are gathered **with gradients**
  (``torch.distributed.nn.functional.all_gather``); each process uses its own ``B_local`` rows as
  anchors against all ``B = P * B_local`` candidates, labels offset by ``rank * B_local``, and
  returns the mean over its own anchors. The mean of the per-process losses is the single-process
  loss on the global batch, and because the gather's backward sums the gradients of all processes,
  DDP's gradient *averaging* gives exactly the single-process gradients.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ContrastiveLoss", "TargetAlignmentLoss", "AlignedContrastiveLoss", "check_alignment_weights",
           "gather_with_grad", "grad_cache_backward", "RandContext"]

_DEFAULT_TEMPERATURE = {"dot": 1.0, "cosine": 0.05}


def _dist_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor, dim: int = 0) -> Tensor:
    """Concatenate ``x`` from every process along ``dim``, keeping gradients flowing back to the
    owner of each slice (``torch.distributed.nn.functional.all_gather``; accelerate's ``gather``
    drops them). Identity when not distributed. Every process must pass the same shape."""
    rank, world = _dist_world()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    torch.distributed.all_gather(sizes, torch.tensor([x.shape[dim]], dtype=torch.long, device=x.device))
    sizes_l = [int(s.item()) for s in sizes]
    if len(set(sizes_l)) != 1:
        raise ValueError(
            f"gather_with_grad needs the same local batch size on every process, got {sizes_l}; "
            "make the global batch size divisible by the number of processes"
        )
    parts = list(all_gather(x.contiguous()))
    parts[rank] = x  # keep the local autograd path direct (same values)
    return torch.cat(parts, dim=dim)


def _gather_no_grad(x: Tensor) -> Tensor:
    rank, world = _dist_world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class ContrastiveLoss(nn.Module):
    """Symmetric in-batch InfoNCE over ``K >= 2`` views with a trainable, clamped log-temperature.

    Args:
        similarity: ``"dot"`` (inner product, the paper's choice) or ``"cosine"``.
        temperature: initial ``tau``; ``None`` picks 1.0 for ``"dot"`` and 0.05 for ``"cosine"``.
        learnable_temperature: train ``log_scale`` (default) or keep it fixed.
        min_temperature, max_temperature: clamp range of ``tau``.
        gather_across_processes: use the negatives of every process when distributed.

    Call: ``loss(views [K, B, d], group_ids [B] | None, known_positives [(K,) B, B_global] | None) -> scalar``.
    """

    def __init__(
        self,
        similarity: str = "dot",
        temperature: float | None = None,
        learnable_temperature: bool = True,
        min_temperature: float = 0.01,
        max_temperature: float = 100.0,
        gather_across_processes: bool = True,
    ) -> None:
        super().__init__()
        if similarity not in _DEFAULT_TEMPERATURE:
            raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")
        if not 0 < min_temperature <= max_temperature:
            raise ValueError(
                f"need 0 < min_temperature <= max_temperature, got {min_temperature}, {max_temperature}"
            )
        tau = _DEFAULT_TEMPERATURE[similarity] if temperature is None else float(temperature)
        if not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        if not min_temperature <= tau <= max_temperature:
            raise ValueError(f"temperature {tau} is outside [{min_temperature}, {max_temperature}]")
        self.similarity = similarity
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        self.gather_across_processes = gather_across_processes
        self.log_scale = nn.Parameter(
            torch.tensor(-math.log(tau), dtype=torch.float32), requires_grad=learnable_temperature
        )

    # -- temperature -----------------------------------------------------------------------
    @property
    def _log_scale_bounds(self) -> tuple[float, float]:
        return -math.log(self.max_temperature), -math.log(self.min_temperature)

    def logit_scale(self) -> Tensor:
        """``1 / tau`` after clamping (a float32 scalar tensor carrying the gradient)."""
        lo, hi = self._log_scale_bounds
        return self.log_scale.float().clamp(lo, hi).exp()

    @property
    def temperature(self) -> float:
        """Current (clamped) temperature ``tau`` as a Python float."""
        return float(1.0 / self.logit_scale().detach())

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the stored parameter into range (call after each optimizer step)."""
        lo, hi = self._log_scale_bounds
        self.log_scale.clamp_(lo, hi)

    def extra_repr(self) -> str:
        return (f"similarity={self.similarity!r}, temperature={self.temperature:.4g}, "
                f"range=[{self.min_temperature}, {self.max_temperature}]")

    # -- loss ------------------------------------------------------------------------------
    def forward(self, views: Tensor, group_ids: Tensor | None = None, known_positives: Tensor | None = None) -> Tensor:
        if views.dim() != 3:
            raise ValueError(f"views must have shape [K, B, d], got {tuple(views.shape)}")
        k_views, b_local, _ = views.shape
        if k_views < 2:
            raise ValueError(f"need at least 2 views, got K={k_views}")
        if b_local < 1:
            raise ValueError("empty batch")
        if group_ids is not None:
            group_ids = torch.as_tensor(group_ids, device=views.device).long()
            if group_ids.shape != (b_local,):
                raise ValueError(f"group_ids must have shape [{b_local}], got {tuple(group_ids.shape)}")

        x = views.float()
        if self.similarity == "cosine":
            x = F.normalize(x, dim=-1)

        rank, world = _dist_world() if self.gather_across_processes else (0, 1)
        if world > 1:
            candidates = gather_with_grad(x, dim=1)  # [K, P*b, d]
            all_groups = _gather_no_grad(group_ids) if group_ids is not None else None
        else:
            candidates, all_groups = x, group_ids
        n_cand = candidates.shape[1]
        if n_cand < 2:
            raise ValueError("in-batch InfoNCE needs at least 2 items in the (global) batch")
        offset = rank * b_local
        labels = torch.arange(b_local, device=x.device) + offset

        mask = None  # [b, n_cand] or [K, b, n_cand]: True = not a negative
        if group_ids is not None:
            mask = group_ids[:, None] == all_groups[None, :]
        if known_positives is not None:
            known = torch.as_tensor(known_positives, device=x.device).bool()
            if known.shape not in ((b_local, n_cand), (k_views, b_local, n_cand)):
                raise ValueError(f"known_positives must have shape [{b_local}, {n_cand}] or "
                                 f"[{k_views}, {b_local}, {n_cand}] (anchors x global candidates), "
                                 f"got {tuple(known.shape)}")
            mask = known if mask is None else (mask | known)
        if mask is not None:
            mask = mask.clone()
            mask[..., torch.arange(b_local, device=x.device), labels] = False  # the positive stays
            if not mask.any():
                mask = None

        scale = self.logit_scale()
        total = x.new_zeros(())
        n_pairs = 0
        for a in range(k_views):
            for b in range(k_views):
                if a == b:
                    continue
                logits = (x[a] @ candidates[b].T) * scale  # [b_local, n_cand]
                if mask is not None:
                    logits = logits.masked_fill(mask if mask.dim() == 2 else mask[b], float("-inf"))
                total = total + F.cross_entropy(logits, labels)
                n_pairs += 1
        return total * (2.0 / n_pairs)


class TargetAlignmentLoss(nn.Module):
    """Symmetric in-batch InfoNCE between projected views and the items' target vectors (beyond the paper).

    For each view ``a`` and anchor ``i``: ``z_i = normalize(W e_i^a + b)``, ``t_k = normalize(target_k)``,
    ``logits[i, k] = z_i . t_k / temperature``; the loss of the view is the mean of the text->target
    cross-entropy (row ``i`` against every target of the batch) and the target->text one (column), and
    the loss is the mean over views. Rows with ``target_mask`` False (items without a target) are
    neither anchors nor candidates; with fewer than two targeted rows in the (global) batch the loss is
    0. Under several processes the projected views are gathered with gradients, as in
    :class:`ContrastiveLoss`.

    Args:
        embed_dim: width of the pooled text embeddings.
        target_dim: width of the targets.
        temperature: fixed softmax temperature of the cosine logits.
        gather_across_processes: use the candidates of every process when distributed.

    Call: ``loss(views [K, B, d], targets [B, t], target_mask [B] | None) -> scalar``.
    """

    def __init__(self, embed_dim: int, target_dim: int, temperature: float = 0.05,
                 gather_across_processes: bool = True) -> None:
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        self.projection = nn.Linear(int(embed_dim), int(target_dim))
        self.temperature = float(temperature)
        self.gather_across_processes = gather_across_processes

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.4g}"

    def forward(self, views: Tensor, targets: Tensor, target_mask: Tensor | None = None) -> Tensor:
        if views.dim() != 3:
            raise ValueError(f"views must have shape [K, B, d], got {tuple(views.shape)}")
        k_views, b_local, _ = views.shape
        targets = torch.as_tensor(targets, device=views.device, dtype=torch.float32)
        if targets.shape != (b_local, self.projection.out_features):
            raise ValueError(f"targets must have shape [{b_local}, {self.projection.out_features}], "
                             f"got {tuple(targets.shape)}")
        mask = (torch.ones(b_local, dtype=torch.bool, device=views.device) if target_mask is None
                else torch.as_tensor(target_mask, device=views.device).bool())
        rank, world = _dist_world() if self.gather_across_processes else (0, 1)
        t = F.normalize(targets, dim=-1)
        if world > 1:
            all_t, all_mask = _gather_no_grad(t), _gather_no_grad(mask.to(torch.uint8)).bool()
        else:
            all_t, all_mask = t, mask
        n_targeted = int(all_mask.sum())
        if n_targeted < 2:
            return views.sum() * 0.0  # nothing to contrast; keeps the graph (DDP expects every gradient)
        rows = mask.nonzero().squeeze(1)  # this process's anchors that have a target
        labels = rows + rank * b_local
        blocked = ~all_mask  # candidates without a target
        total = views.sum() * 0.0
        for view in views:
            z = F.normalize(self.projection(view.float()), dim=-1)
            all_z = gather_with_grad(z, dim=0) if world > 1 else z
            to_target = ((z[rows] @ all_t.T) / self.temperature).masked_fill(blocked[None, :], float("-inf"))
            to_text = ((t[rows] @ all_z.T) / self.temperature).masked_fill(blocked[None, :], float("-inf"))
            total = total + (F.cross_entropy(to_target, labels, reduction="sum")
                             + F.cross_entropy(to_text, labels, reduction="sum")) / 2
        # the sum over this process's anchors, scaled so that the mean over processes is the mean over
        # every targeted anchor of the global batch (= the single-process loss), as ContrastiveLoss's
        return total * world / (n_targeted * k_views)


def check_alignment_weights(view_weight: float, target_weight: float) -> None:
    """Raise ``ValueError`` unless both weights of :class:`AlignedContrastiveLoss` are >= 0 and not both 0."""
    if view_weight < 0 or target_weight < 0 or view_weight + target_weight == 0:
        raise ValueError(f"need view_weight, target_weight >= 0 and not both 0, got {view_weight}, {target_weight}")


class AlignedContrastiveLoss(nn.Module):
    """``view_weight * ContrastiveLoss(views) + target_weight * TargetAlignmentLoss(views, targets)``.

    The paper's masked-view InfoNCE and the alignment of every view to its item's target (e.g. a
    collaborative embedding, :func:`llm_item_embed.pairs.cooccurrence_embeddings`); ``view_weight = 0``
    trains the alignment alone. ``temperature`` and ``clamp_`` are the contrastive part's, so the
    trainer treats it like a :class:`ContrastiveLoss`.

    Call: ``loss(views, group_ids, known_positives, targets=[B, t], target_mask=[B]) -> scalar``.
    """

    def __init__(self, contrastive: ContrastiveLoss, alignment: TargetAlignmentLoss, view_weight: float = 1.0,
                 target_weight: float = 1.0) -> None:
        super().__init__()
        check_alignment_weights(view_weight, target_weight)
        self.contrastive = contrastive
        self.alignment = alignment
        self.view_weight = float(view_weight)
        self.target_weight = float(target_weight)

    @property
    def temperature(self) -> float:
        return self.contrastive.temperature

    def clamp_(self) -> None:
        self.contrastive.clamp_()

    def extra_repr(self) -> str:
        return f"view_weight={self.view_weight:g}, target_weight={self.target_weight:g}"

    def forward(self, views: Tensor, group_ids: Tensor | None = None, known_positives: Tensor | None = None,
                targets: Tensor | None = None, target_mask: Tensor | None = None) -> Tensor:
        if targets is None:
            raise ValueError("AlignedContrastiveLoss needs the batch's targets (fit(..., targets=...))")
        total = self.target_weight * self.alignment(views, targets, target_mask)
        if self.view_weight > 0:
            total = total + self.view_weight * self.contrastive(views, group_ids, known_positives)
        return total


# ---------------------------------------------------------------------------------------------
# GradCache
# ---------------------------------------------------------------------------------------------
class RandContext:
    """Capture the CPU and device RNG states now; ``with ctx:`` replays them inside a forked RNG
    (so a re-run of a chunk draws the same dropout masks; the outer RNG stream is untouched)."""

    def __init__(self, *tensors: Tensor) -> None:
        from torch.utils.checkpoint import get_device_states

        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)
        self._fork: Any = None

    def __enter__(self) -> None:
        from torch.utils.checkpoint import set_device_states

        self._fork = torch.random.fork_rng(devices=self.devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        set_device_states(self.devices, self.device_states)

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)
        self._fork = None


def _split_inputs(inputs: Mapping[str, Tensor], size: int) -> list[dict[str, Tensor]]:
    n = next(iter(inputs.values())).shape[0]
    return [{k: v[i:i + size] for k, v in inputs.items()} for i in range(0, n, size)]


def grad_cache_backward(
    encode: Callable[..., Tensor],
    inputs: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
    loss_fn: Callable[[Tensor], Tensor],
    mini_batch_size: int | None = None,
    *,
    backward: Callable[[Tensor], None] | None = None,
    no_sync: Callable[[], ContextManager] | None = None,
    keep_first_graph: bool = True,
) -> tuple[Tensor, Tensor]:
    """GradCache (Gao et al., 2021): the gradients of ``loss_fn(encode(all inputs))`` in bounded memory.

    1. encode each chunk without grad (saving its RNG states), concatenate -> ``reps [N, d]``
       (the first chunk, with ``keep_first_graph``, is encoded with grad and its graph kept, so it
       needs no second forward: the extra work is ``(n-1)/n`` of a forward pass, not a whole one);
    2. ``loss = loss_fn(reps)`` on a leaf copy of ``reps``; ``backward(loss)`` fills ``reps.grad``
       (and the gradients of the loss's own parameters, e.g. the temperature);
    3. re-encode each chunk with grad under the saved RNG states and back-propagate the cached
       ``reps.grad`` slice into the encoder's parameters.

    Args:
        encode: ``encode(**chunk) -> [n, d]`` (e.g. a ``TextEncoder`` or the accelerate-prepared model).
        inputs: a dict of tensors with a common first dimension ``N`` (split into chunks of
            ``mini_batch_size``), or a list of already-made chunks (e.g. tokenised separately).
        loss_fn: ``reps [N, d] -> scalar`` (reshape to ``[K, B, d]`` inside).
        backward: how to back-propagate the scalar loss (default ``loss.backward()``; pass
            ``accelerator.backward`` so fp16 loss scaling applies to both phases consistently).
        no_sync: context-manager factory used for every chunk but the last (e.g.
            ``lambda: accelerator.no_sync(model)``) so DDP all-reduces once per step.
        keep_first_graph: keep the first chunk's autograd graph from step 1 instead of re-running
            it (peak memory: one chunk's activations plus a no-grad forward of another chunk).

    Returns ``(loss.detach(), reps.detach())``. Gradients are accumulated into ``.grad`` exactly as
    ``backward(loss_fn(cat([encode(c) for c in chunks])))`` would (same dropout masks).
    """
    if isinstance(inputs, Mapping):
        if mini_batch_size is None or mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be a positive int, got {mini_batch_size!r}")
        chunks = _split_inputs(inputs, mini_batch_size)
    else:
        chunks = [dict(c) for c in inputs]
    if not chunks:
        raise ValueError("no inputs")
    backward = backward or (lambda t: t.backward())
    n_chunks = len(chunks)

    # 1. encode every chunk; the first keeps its graph (it is not re-run: saves 1/n of the extra
    #    forward work), the others run without grad and remember their RNG state
    rand_states: list[RandContext | None] = []
    outs: list[Tensor] = []
    kept: Tensor | None = None
    for j, chunk in enumerate(chunks):
        if j == 0 and keep_first_graph:
            # its backward must not trigger DDP's all-reduce unless it is the only chunk
            ctx = no_sync() if (no_sync is not None and n_chunks > 1) else nullcontext()
            with ctx:
                kept = encode(**chunk)
            outs.append(kept.detach())
            rand_states.append(None)
        else:
            rand_states.append(RandContext(*chunk.values()))
            with torch.no_grad():
                outs.append(encode(**chunk))
    reps = torch.cat(outs, dim=0).detach().requires_grad_(True)

    # 2. loss and gradient w.r.t. the embeddings (and the loss's own parameters)
    loss = loss_fn(reps)
    backward(loss)
    if reps.grad is None:
        raise RuntimeError("the loss does not depend on the embeddings")
    cached = reps.grad.detach()

    # 3. push the cached gradient through the kept graph, then re-run the other chunks with grad
    #    (same RNG states, so the same dropout masks) and push their slices through them
    start = 0
    for j, (chunk, rand) in enumerate(zip(chunks, rand_states)):
        last = j == n_chunks - 1
        ctx = nullcontext() if (last or no_sync is None) else no_sync()
        with ctx:
            if rand is None:
                out = kept
                kept = None
            else:
                with rand:
                    out = encode(**chunk)
            n = out.shape[0]
            g = cached[start:start + n].to(out.dtype)
            # surrogate scalar: d/d(out) of sum(out * g) is g (g already carries any loss scale)
            (out * g).sum().backward()
            start += n
    if start != cached.shape[0]:
        raise RuntimeError(f"re-encoding produced {start} rows, expected {cached.shape[0]}")
    return loss.detach(), reps.detach()
