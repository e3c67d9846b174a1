"""attn_implementation="flashlab" in Hugging Face transformers: tiny random Llama and GPT-2 models
built here (no downloads). Logits and a training step's gradients are held to ANCHORS.md's rule: the
flashlab fp16 model against the fp64 model, allowed 2× (3× for gradients) the error of the fp16
model on transformers' ``sdpa`` implementation."""

from __future__ import annotations

import pytest
import torch
from attn_checks import check_against_reference

from flashlab.reference import accuracy_check

transformers = pytest.importorskip("transformers", minversion="5.0")
fl_hf = pytest.importorskip("flashlab.integrations.transformers")

VOCAB, SEQLEN = 64, 16


def _config(family: str, implementation: str, width: int = 32, layers: int = 2):
    if family == "llama":  # GQA 4:2, rotary, head dim width / 4
        return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=4096, attn_implementation=implementation)
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=width, n_layer=layers, n_head=2, n_positions=4096,
                                   attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation=implementation)


def _models(family: str, device: str = "cpu", dtype: torch.dtype = torch.float16, **size) -> dict[str, torch.nn.Module]:
    """fp64 reference, sdpa and flashlab models (in ``dtype``) with the same random weights."""
    fl_hf.register()
    torch.manual_seed(0)
    model_cls = transformers.LlamaForCausalLM if family == "llama" else transformers.GPT2LMHeadModel
    ref = model_cls(_config(family, "sdpa", **size)).to(device, torch.float64)
    state = ref.state_dict()
    models = {"fp64": ref}
    for name, impl in (("sdpa", "sdpa"), ("flashlab", "flashlab")):
        m = model_cls(_config(family, impl, **size)).to(device, dtype)
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


def test_model_compiles_fullgraph(device):
    """A batch without padding traces whole (a padded batch unpads with data-dependent shapes): the
    traced graph computes exactly what eager does; on a GPU, Inductor's build (which fuses the
    model's other ops, so rounds differently) passes the accuracy rule against the fp64 model."""
    models = _models("llama", device)
    model = models["flashlab"].eval()
    ids, _ = _batch(padded=False)
    ids = ids.to(device)
    torch._dynamo.reset()
    logits = torch.compile(lambda ids: model(input_ids=ids).logits, fullgraph=True, backend="aot_eager")(ids)
    torch.testing.assert_close(logits, model(input_ids=ids).logits, rtol=0, atol=0)
    if device == "cuda":
        torch._dynamo.reset()
        logits = torch.compile(lambda ids: model(input_ids=ids).logits, fullgraph=True)(ids)
        check = accuracy_check(logits, models["fp64"](input_ids=ids).logits, models["sdpa"](input_ids=ids).logits)
        assert check.ok, str(check)


class _Layer(torch.nn.Module):
    is_causal = True


def test_attention_forward_4d_mask_and_sliding_window(device):
    """The two paths the tiny models do not take: an explicit 4-D mask (SDPA path) and a sliding
    window (transformers' rule: query i sees keys i - window < j <= i)."""
    torch.manual_seed(3)
    q = torch.randn(2, 4, 10, 16, dtype=torch.float16, device=device, requires_grad=True)
    k, v = (torch.randn(2, 2, 10, 16, dtype=torch.float16, device=device, requires_grad=True) for _ in range(2))
    mask = torch.rand(2, 1, 10, 10, device=device) > 0.4
    mask[..., 0] = True  # every row sees a key
    out, weights = fl_hf.attention_forward(_Layer(), q, k, v, mask, scaling=0.3)
    assert weights is None and out.shape == (2, 10, 4, 16)
    check_against_reference(out.transpose(1, 2), q, k, v, layout="bhsd", attn_mask=mask, softmax_scale=0.3)
    out, _ = fl_hf.attention_forward(_Layer(), q, k, v, None, sliding_window=4)
    check_against_reference(out.transpose(1, 2), q, k, v, layout="bhsd", causal=True, window_size=(3, 0))


def test_register_rejects_bad_name():
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        fl_hf.register("")


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gpu_padded_training_step_real_size(family):
    """bf16 on CUDA, width 512 (head dim 128 for Llama), 4 layers, seqlen 1024, padded batch: logits
    and every parameter gradient by the accuracy rule against sdpa."""
    models = _models(family, device="cuda", dtype=torch.bfloat16, width=512, layers=4)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 1024), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :300] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    logits, grads = {}, {}
    for name, m in models.items():
        m.train()
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        logits[name] = out.logits.detach()[mask.bool()]
        grads[name] = {p_name: p.grad for p_name, p in m.named_parameters() if p.grad is not None}
    check = accuracy_check(logits["flashlab"], logits["fp64"], logits["sdpa"])
    assert check.ok, f"logits: {check}"
    for p_name, got in grads["flashlab"].items():
        check = accuracy_check(got, grads["fp64"][p_name], grads["sdpa"][p_name], factor=3.0)
        assert check.ok, f"{p_name}: {check}"
