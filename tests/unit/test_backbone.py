"""Backbone loading, LoRA targets, bidirectional switch, tokenization and clear loading errors."""
from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import pytest
import torch

from llm_item_embed.backbone import (BackboneSettings, LoraSettings, ModelNotFoundError, default_model_path,
                                     load_text_encoder, resolve_lora_targets)


def _lora_modules(enc) -> list[str]:
    return [n for n, _ in enc.model.named_modules() if n.endswith(".lora_A")]


def test_default_model_path_is_the_bundled_minilm():
    path = Path(default_model_path())
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_settings_validation():
    with pytest.raises(ValueError, match="pooling"):
        BackboneSettings(pooling="max")
    with pytest.raises(ValueError, match="max_length"):
        BackboneSettings(max_length=0)
    with pytest.raises(ValueError, match="padding_side"):
        BackboneSettings(padding_side="middle")
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(r=0)
    s = BackboneSettings("x", bidirectional=True)
    assert BackboneSettings.from_dict(s.to_dict()) == s
    assert BackboneSettings().trust_remote_code is False


def test_bert_lora_targets_attention_and_mlp_not_pooler(tiny_bert_dir):
    enc = load_text_encoder(BackboneSettings(tiny_bert_dir), lora=LoraSettings())
    names = _lora_modules(enc)
    suffixes = {n.split("encoder.layer.0.")[-1] for n in names if ".layer.0." in n}
    assert suffixes == {"attention.self.query.lora_A", "attention.self.key.lora_A", "attention.self.value.lora_A",
                        "attention.output.dense.lora_A", "intermediate.dense.lora_A", "output.dense.lora_A"}
    assert not any("pooler" in n for n in names)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_llama_lora_targets_all_projections(tiny_llama_dir):
    enc = load_text_encoder(BackboneSettings(tiny_llama_dir), lora=LoraSettings(r=4))
    layer0 = sorted(n.split("layers.0.")[-1] for n in _lora_modules(enc) if "layers.0." in n)
    assert layer0 == sorted(f"{p}.lora_A" for p in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                     "mlp.down_proj"])
    explicit = load_text_encoder(BackboneSettings(tiny_llama_dir), lora=LoraSettings(target_modules=["q_proj", "v_proj"]))
    assert {n.rsplit(".", 2)[-2] for n in _lora_modules(explicit)} == {"q_proj", "v_proj"}


def test_unknown_lora_target_is_a_clear_error(tiny_bert_dir):
    with pytest.raises(ValueError, match=r"\['wq'\] match no Linear"):
        load_text_encoder(BackboneSettings(tiny_bert_dir), lora=LoraSettings(target_modules=["wq"]))


def test_fresh_lora_starts_at_the_base_model(tiny_bert_dir):
    from transformers import AutoModel

    plain = AutoModel.from_pretrained(tiny_bert_dir).eval()
    enc = load_text_encoder(BackboneSettings(tiny_bert_dir), lora=LoraSettings()).eval()
    feats = enc.tokenize(["red lipstick by opi", "a much longer text about blue shampoo for dry hair"])
    with torch.no_grad():
        hidden = plain(**feats).last_hidden_state
        m = feats["attention_mask"].unsqueeze(-1).float()
        expected = (hidden * m).sum(1) / m.sum(1)
        got = enc(**feats)
    assert got.shape == (2, enc.dim) == (2, 32)
    torch.testing.assert_close(got, expected)


def test_lora_wrap_and_adapter_load_raise_no_deprecation_warning(tiny_bert_dir, tmp_path):
    """peft 0.21 under transformers 5 warns on every wrap; the library hides that one warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        enc = load_text_encoder(BackboneSettings(tiny_bert_dir), lora=LoraSettings())
        enc.model.save_pretrained(tmp_path / "adapter")
        load_text_encoder(BackboneSettings(tiny_bert_dir), adapter_path=tmp_path / "adapter")


def test_tokenize_truncates_and_counts(tiny_bert_dir):
    enc = load_text_encoder(BackboneSettings(tiny_bert_dir, max_length=8))
    feats = enc.tokenize(["short", "one two three four five six seven eight nine ten", "also short"])
    assert feats["input_ids"].shape == (3, 8)
    assert enc.last_truncated == 1
    enc.tokenize(["short", "tiny"])
    assert enc.last_truncated == 0


def test_decoder_gets_a_pad_token_and_right_padding(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    src = tmp_path / "nopad"
    shutil.copytree(tiny_llama_dir, src)
    tok = AutoTokenizer.from_pretrained(src)
    tok.pad_token = None
    tok.save_pretrained(src)
    assert AutoTokenizer.from_pretrained(src).pad_token is None
    enc = load_text_encoder(BackboneSettings(str(src)))
    assert enc.tokenizer.pad_token == "</s>"
    assert enc.tokenizer.padding_side == "right"
    assert enc.is_decoder
    feats = enc.tokenize(["a b c d e f", "a"])
    assert feats["attention_mask"][1, 0] == 1 and feats["attention_mask"][1, -1] == 0


def test_left_and_right_padding_give_the_same_embeddings(tiny_llama_dir):
    texts = ["name is OPI Nail Lacquer; brand is OPI", "price is 9.99", "brand is Stanley"]
    out = {}
    for side in ("left", "right"):
        enc = load_text_encoder(BackboneSettings(tiny_llama_dir, padding_side=side)).eval()
        feats = enc.tokenize(texts)
        assert feats["attention_mask"][1, 0 if side == "right" else -1] == 1
        with torch.no_grad():
            out[side] = enc(**feats)
        single = torch.cat([enc(**enc.tokenize([t])) for t in texts]).detach()
        torch.testing.assert_close(out[side], single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["left"], out["right"], atol=1e-5, rtol=1e-5)


def _first_position_sees_future(enc) -> bool:
    a = torch.tensor([[10, 11, 12, 13]])
    b = torch.tensor([[10, 11, 12, 14]])
    with torch.no_grad():
        ha = enc.base_model(input_ids=a, attention_mask=torch.ones_like(a)).last_hidden_state[0, 0]
        hb = enc.base_model(input_ids=b, attention_mask=torch.ones_like(b)).last_hidden_state[0, 0]
    return not torch.allclose(ha, hb)


def test_bidirectional_switch_for_decoders(tiny_llama_dir, tiny_bert_dir):
    causal = load_text_encoder(BackboneSettings(tiny_llama_dir)).eval()
    assert not _first_position_sees_future(causal)
    bi = load_text_encoder(BackboneSettings(tiny_llama_dir, bidirectional=True), lora=LoraSettings()).eval()
    assert bi.config.is_causal is False
    assert _first_position_sees_future(bi)
    bert = load_text_encoder(BackboneSettings(tiny_bert_dir, bidirectional=True)).eval()
    assert _first_position_sees_future(bert)
    with pytest.raises(ValueError, match="encoder"):
        load_text_encoder(BackboneSettings(tiny_bert_dir, bidirectional=False))


def test_unknown_local_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        load_text_encoder(BackboneSettings(str(missing)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_text_encoder(BackboneSettings(str(empty)))
    with pytest.raises(ModelNotFoundError, match="GGUF file 'm.gguf'"):
        load_text_encoder(BackboneSettings(str(empty), gguf_file="m.gguf"))


def test_hub_id_while_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"'acme/not-cached-model'.*offline \(HF_HUB_OFFLINE=1\)"):
        load_text_encoder(BackboneSettings("acme/not-cached-model"))


def test_gradient_checkpointing_same_gradients(tiny_llama_dir):
    texts = ["name is OPI Nail Lacquer", "brand is Stanley; price is 9.99"]
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        enc = load_text_encoder(BackboneSettings(tiny_llama_dir), lora=LoraSettings(dropout=0.0))
        for n, p in enc.named_parameters():  # non-zero LoRA B so every LoRA weight gets a gradient
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(zlib.crc32(n.encode())))
        if ckpt:
            enc.gradient_checkpointing_enable()
            assert any(getattr(m, "gradient_checkpointing", False) for m in enc.base_model.modules())
        enc.train()
        enc(**enc.tokenize(texts)).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in enc.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_resolve_targets_unknown_architecture_uses_linear_leaves():
    from torch import nn

    class Cfg:
        model_type = "mystery"

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Cfg()
            self.block = nn.ModuleDict({"wq": nn.Linear(2, 2), "wo": nn.Linear(2, 2)})
            self.lm_head = nn.Linear(2, 3)

    targets, exclude = resolve_lora_targets(M(), "auto")
    assert targets == ["wo", "wq"] and exclude == []
