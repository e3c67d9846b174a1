"""attn_implementation="flashlab" in Hugging Face transformers: tiny random Llama and GPT-2 models
built here (no downloads). Logits and a training step's gradients are held to ANCHORS.md's rule: the
flashlab fp16 model against the fp64 model, allowed 2× (3× for gradients) the error of the fp16
model on transformers' ``sdpa`` implementation."""

from __future__ import annotations

import pytest
import torch

from flashlab.reference import accuracy_check

transformers = pytest.importorskip("transformers", minversion="5.0")
fl_hf = pytest.importorskip("flashlab.integrations.transformers")

VOCAB, SEQLEN = 64, 16


def _config(family: str, implementation: str):
    if family == "llama":  # GQA 4:2, rotary, head dim 8
        return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        attn_implementation=implementation)
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, attn_pdrop=0.0,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation=implementation)


def _models(family: str) -> dict[str, torch.nn.Module]:
    """fp64 reference, fp16 sdpa and fp16 flashlab models with the same random weights."""
    fl_hf.register()
    torch.manual_seed(0)
    model_cls = transformers.LlamaForCausalLM if family == "llama" else transformers.GPT2LMHeadModel
    ref = model_cls(_config(family, "sdpa")).double()
    state = ref.state_dict()
    models = {"fp64": ref}
    for name, impl in (("sdpa", "sdpa"), ("flashlab", "flashlab")):
        m = model_cls(_config(family, impl)).half()
        m.load_state_dict(state)
        models[name] = m
    assert models["flashlab"].config._attn_implementation == "flashlab"
    return models


def _batch(padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, SEQLEN))
    if not padded:
        return ids, None
    mask = torch.ones(3, SEQLEN, dtype=torch.long)
    mask[1, 11:] = 0  # right padding
    mask[2, :6] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logits_match_sdpa(family, padded):
    models = _models(family)
    ids, mask = _batch(padded)
    logits = {name: m.eval()(input_ids=ids, attention_mask=mask).logits for name, m in models.items()}
    keep = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)  # padding rows differ
    got, high, low = (logits[n][keep] for n in ("flashlab", "fp64", "sdpa"))
    assert got.dtype == torch.float16 and not got.isnan().any()
    check = accuracy_check(got, high, low)
    assert check.ok, str(check)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_step_gradients_match_sdpa(family):
    models = _models(family)
    ids, mask = _batch(padded=True)
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for name, m in models.items():
        m.train()
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads[name] = {p_name: p.grad for p_name, p in m.named_parameters() if p.grad is not None}
    assert grads["flashlab"].keys() == grads["fp64"].keys() and grads["flashlab"]
    for p_name, got in grads["flashlab"].items():
        check = accuracy_check(got, grads["fp64"][p_name], grads["sdpa"][p_name], factor=3.0)
        assert check.ok, f"{p_name}: {check}"


def test_generation_with_kv_cache_matches_sdpa():
    """Prefill + 3 decoding steps (q_len 1 against a growing cache, left-padded batch): same tokens."""
    models = _models("llama")
    ids, mask = _batch(padded=True)
    ids, mask = ids[[0, 2]], mask[[0, 2]]  # full and left-padded rows (generation needs left padding)
    out = {name: models[name].eval().generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                              pad_token_id=0)
           for name in ("flashlab", "sdpa")}
    assert torch.equal(out["flashlab"], out["sdpa"])


def test_register_rejects_bad_name():
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        fl_hf.register("")
