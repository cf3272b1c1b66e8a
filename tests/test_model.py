"""model.py against independent references: transformers' MptForCausalLM, float64 math, closed forms."""
import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

from model import MPT, MPTConfig, alibi_slopes, check_attention, torch_attention

transformers = pytest.importorskip("transformers")
from transformers import MptConfig, MptForCausalLM  # noqa: E402
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor  # noqa: E402


def tiny(**kw):
    base = dict(vocab_size=97, d_model=48, n_heads=6, n_layers=2, max_seq_len=32, attn_impl='torch')
    return MPTConfig(**{**base, **kw})


def hf_model(n_heads, d_model=48, clip_qkv=None, softmax_scale=None, seed=0):
    torch.manual_seed(seed)
    config = MptConfig(d_model=d_model, n_heads=n_heads, n_layers=2, expansion_ratio=4, max_seq_len=32,
                       vocab_size=97, attn_config=dict(clip_qkv=clip_qkv, softmax_scale=softmax_scale))
    model = MptForCausalLM(config).eval()
    with torch.no_grad():  # HF's init (std 0.02) barely exercises clip_qkv and ALiBi; make weights larger
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    return model


def our_logits_and_loss(model, idx):
    targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -1)], dim=1)  # HF shifts labels itself
    with torch.no_grad():
        return model(idx, targets)


# ---- ALiBi slopes -----------------------------------------------------------

@pytest.mark.parametrize("n_heads", [1, 2, 4, 6, 12, 16, 20, 40, 56, 64])
def test_alibi_slopes_match_transformers(n_heads):
    # transformers' build_mpt_alibi_tensor is an independent copy of MPT's own formula
    hf = build_mpt_alibi_tensor(n_heads, 5)  # (H, 1, 5): slope * (j - 4)
    assert torch.allclose(alibi_slopes(n_heads), -hf[:, 0, 0] / 4, rtol=1e-6, atol=0)


def test_alibi_slopes_closed_form():
    # a power of two: 2^(-8k/n); otherwise the next power's slopes, odd positions first
    assert torch.equal(alibi_slopes(4), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]))
    expected6 = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]  # from n=8's 1/2, 1/4, ..., 1/256
    assert torch.equal(alibi_slopes(6), torch.tensor(expected6))
    assert torch.equal(alibi_slopes(4, alibi_bias_max=16), torch.tensor([2 ** -4, 2 ** -8, 2 ** -12, 2 ** -16]))


# ---- parity with transformers' MPT ------------------------------------------

@pytest.mark.parametrize("n_heads,clip_qkv,softmax_scale", [
    (4, None, None), (6, None, None), (6, 0.5, None), (4, 0.5, 0.7), (12, None, 0.3)])
def test_matches_transformers_both_ways(tmp_path, n_heads, clip_qkv, softmax_scale):
    hf = hf_model(n_heads, clip_qkv=clip_qkv, softmax_scale=softmax_scale)
    hf.save_pretrained(tmp_path / "hf")
    idx = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx, labels=idx)

    ours = MPT.from_hf(tmp_path / "hf")
    assert ours.config.n_heads == n_heads and ours.config.clip_qkv == clip_qkv
    logits, loss = our_logits_and_loss(ours, idx)
    assert (logits - ref.logits).abs().max() <= 1e-4
    assert abs(loss.item() - ref.loss.item()) <= 1e-4

    ours.save_hf(tmp_path / "ours")
    back = MptForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        again = back(idx, labels=idx)
    assert (again.logits - ref.logits).abs().max() <= 1e-4
    assert abs(again.loss.item() - ref.loss.item()) <= 1e-4


def test_parity_is_sensitive_to_the_options(tmp_path):
    # guards the test above: clip_qkv and softmax_scale must change the logits at these weights
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = hf_model(6)(idx).logits
        clipped = hf_model(6, clip_qkv=0.5)(idx).logits
        scaled = hf_model(6, softmax_scale=0.7)(idx).logits
    assert (base - clipped).abs().max() > 1e-2 and (base - scaled).abs().max() > 1e-2


@pytest.mark.parametrize("layout", ["bin", "sharded_bin", "sharded_safetensors"])
def test_from_hf_reads_bin_and_sharded_checkpoints(tmp_path, layout):
    hf = hf_model(4)
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(idx).logits
    out = tmp_path / "ckpt"
    if layout == "sharded_safetensors":
        hf.save_pretrained(out, max_shard_size="40KB")
        assert (out / "model.safetensors.index.json").is_file()
    else:  # the format of the released MPT-7B: pytorch_model*.bin, without lm_head (tied)
        hf.save_pretrained(out)
        (out / "model.safetensors").unlink()
        state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        if layout == "bin":
            torch.save(state, out / "pytorch_model.bin")
        else:
            names = sorted(state)
            shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                      "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
            for file, keys in shards.items():
                torch.save({k: state[k] for k in keys}, out / file)
            index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
            (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    logits, _ = our_logits_and_loss(MPT.from_hf(out), idx)
    assert (logits - ref).abs().max() <= 1e-4


def test_from_hf_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        MPT.from_hf(tmp_path)
    hf_model(4).save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["attn_config"]["alibi"] = False
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="learned positional embeddings"):
        MPT.from_hf(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({**cfg, "attn_config": {}}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        MPT.from_hf(tmp_path / "b")


def test_save_hf_refuses_what_transformers_cannot_compute(tmp_path):
    with pytest.raises(ValueError, match="kv_n_heads"):
        MPT(tiny(kv_n_heads=2)).save_hf(tmp_path)
    with pytest.raises(ValueError, match="qk_ln"):
        MPT(tiny(qk_ln=True)).save_hf(tmp_path)


# ---- the model's own behaviour ----------------------------------------------

def attention_float64(q, k, v, slopes, causal, scale):
    """Explicit float64 math: softmax(q k^T * scale + slope * (j - i)), queries = the last Tq keys."""
    q, k, v = q.double(), k.double(), v.double()
    H, Tq, Tk = q.size(1), q.size(2), k.size(2)
    k = k.repeat_interleave(H // k.size(1), dim=1)
    v = v.repeat_interleave(H // v.size(1), dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    i = torch.arange(Tk - Tq, Tk).view(-1, 1)
    j = torch.arange(Tk).view(1, -1)
    if slopes is not None:
        s = s + slopes.double().view(-1, 1, 1) * (j - i)
    if causal:
        s = s.masked_fill(j > i, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no key -> 0
    return p @ v


@pytest.mark.parametrize("Tq,Tk,H,Hkv,causal", [(9, 9, 4, 4, True), (3, 11, 4, 2, True), (1, 7, 6, 3, True),
                                              (8, 5, 2, 2, True), (6, 6, 4, 1, False)])
def test_torch_attention_matches_float64(Tq, Tk, H, Hkv, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, H, Tq, 8, generator=g, requires_grad=True)
    k = torch.randn(2, Hkv, Tk, 8, generator=g, requires_grad=True)
    v = torch.randn(2, Hkv, Tk, 8, generator=g, requires_grad=True)
    slopes = alibi_slopes(H)
    y = torch_attention(q, k, v, slopes, causal=causal, softmax_scale=0.4)
    ref = attention_float64(q, k, v, slopes, causal, 0.4)
    assert torch.allclose(y.double(), ref, atol=1e-5)
    y.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_causality():
    model = MPT(tiny()).eval()
    idx = torch.randint(0, 97, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 97
    with torch.no_grad():
        a, _ = model(idx, idx)
        b, _ = model(changed, changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_grouped_query_attention_equals_repeated_heads():
    # GQA with kv_n_heads=2 must equal MHA whose k and v heads are copies: query head h uses kv head
    # h // (n_heads // kv_n_heads)
    gqa = MPT(tiny(n_heads=6, kv_n_heads=2)).eval()
    mha = MPT(tiny(n_heads=6)).eval()
    hd = 8
    assert gqa.transformer.blocks[0].attn.Wqkv.weight.shape == (48 + 2 * 2 * hd, 48)
    state = gqa.state_dict()
    for n, block in enumerate(gqa.transformer.blocks):
        w = block.attn.Wqkv.weight
        q, k, v = w.split([48, 2 * hd, 2 * hd])
        expand = lambda t: t.view(2, hd, 48).repeat_interleave(3, dim=0).reshape(48, 48)
        state[f"transformer.blocks.{n}.attn.Wqkv.weight"] = torch.cat([q, expand(k), expand(v)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert torch.allclose(gqa(idx, idx)[0], mha(idx, idx)[0], atol=1e-5)


def test_loss_ignores_minus_one_and_inference_returns_last_position():
    model = MPT(tiny(logit_scale='inv_sqrt_d_model')).eval()
    idx = torch.randint(0, 97, (2, 10))
    targets = torch.randint(0, 97, (2, 10))
    targets[0, :4] = -1
    with torch.no_grad():
        logits, loss = model(idx, targets)
        last, none = model(idx)
    keep = targets != -1
    expected = F.cross_entropy(logits[keep].double(), targets[keep])
    assert abs(loss.item() - expected.item()) < 1e-5
    assert none is None and last.shape == (2, 1, 97)
    assert torch.allclose(last[:, 0], logits[:, -1], atol=1e-5)


def test_qk_ln_and_logit_scale_change_the_model():
    idx = torch.randint(0, 97, (1, 8))
    torch.manual_seed(0)
    plain = MPT(tiny())
    torch.manual_seed(0)
    scaled = MPT(tiny(logit_scale=0.5))
    with torch.no_grad():
        assert torch.allclose(plain(idx)[0] * 0.5, scaled(idx)[0], atol=1e-6)
    qk = MPT(tiny(qk_ln=True))
    assert qk.transformer.blocks[0].attn.q_ln.weight.shape == (48,)
    assert qk.transformer.blocks[0].attn.k_ln.weight.shape == (48,)


def test_init_is_mpt_kaiming_fan_in():
    torch.manual_seed(0)
    cfg = MPTConfig(vocab_size=512, d_model=256, n_heads=4, n_layers=8, attn_impl='torch')
    model = MPT(cfg)
    b = model.transformer.blocks[0]
    std = math.sqrt(2 / 256)
    assert abs(b.attn.Wqkv.weight.std().item() / std - 1) < 0.03
    assert abs(b.ffn.up_proj.weight.std().item() / std - 1) < 0.03
    assert abs(model.transformer.wte.weight.std().item() / std - 1) < 0.03
    assert abs(b.attn.out_proj.weight.std().item() / (std / 4) - 1) < 0.03  # sqrt(2 * 8 layers) = 4
    assert abs(b.ffn.down_proj.weight.std().item() / (math.sqrt(2 / 1024) / 4) - 1) < 0.03
    assert torch.equal(b.norm_1.weight, torch.ones(256))
    assert all(name.endswith("weight") for name, _ in model.named_parameters())  # no biases anywhere


def test_meta_init_then_init_weights():
    model = MPT(tiny(init_device='meta'))
    assert model.transformer.wte.weight.is_meta
    model.to_empty(device='cpu')
    model.init_weights()
    assert torch.equal(model.alibi(torch.device('cpu')), alibi_slopes(6))
    assert torch.isfinite(model(torch.randint(0, 97, (1, 5)))[0]).all()


def test_slopes_stay_float32_when_the_model_is_cast():
    # 64 heads have slopes 2^(-k/8), which bf16 would round; they must not follow model.to(bfloat16)
    model = MPT(tiny(d_model=128, n_heads=64, n_layers=1)).to(torch.bfloat16)
    slopes = model.alibi(torch.device('cpu'))
    assert slopes.dtype == torch.float32 and torch.equal(slopes, alibi_slopes(64))
    assert not torch.equal(slopes.bfloat16().float(), slopes)  # the rounding this avoids is real


def test_num_params_and_flops():
    cfg = tiny()
    model = MPT(cfg)
    d, V, L = 48, 97, 2
    per_block = 2 * d + 3 * d * d + d * d + 2 * 4 * d * d
    assert model.num_params() == V * d + L * per_block + d == 60_192
    # by hand: 6 x 60,192 parameters (matmul forward + backward) + 12 x 2 layers x 48 x 32 (attention)
    assert model.flops_per_token(32) == 361_152 + 36_864
    assert model.estimate_mfu(1000.0, 32, peak_flops=1e12) == pytest.approx(model.flops_per_token(32) * 1e3 / 1e12)


@pytest.mark.parametrize("kw,device,dtype,message", [
    (dict(attn_impl='triton'), 'cuda', torch.float32, "computes in bfloat16 or float16 on CUDA"),
    (dict(attn_impl='triton', d_model=320, n_heads=2), 'cuda', torch.bfloat16, "head dims up to 128"),
    (dict(attn_impl='flash'), 'cpu', torch.float32, "runs on CUDA only"),
    pytest.param(dict(attn_impl='flash'), 'cuda', torch.bfloat16, "needs the flash-attn package",
                 marks=pytest.mark.skipif(importlib.util.find_spec('flash_attn') is not None, reason='installed')),
])
def test_attention_settings_checked_before_any_work(kw, device, dtype, message):
    # no GPU is needed: the check reads the config, the device type and the dtype
    with pytest.raises(ValueError, match=message):
        check_attention(tiny(**kw), device, dtype)
    check_attention(tiny(attn_impl='triton'), 'cuda', torch.bfloat16)  # fine
    check_attention(tiny(attn_impl='triton', d_model=320, n_heads=2), 'cpu', torch.float32)  # falls back


@pytest.mark.parametrize("kw,message", [
    (dict(d_model=50, n_heads=6), "divisible by n_heads"),
    (dict(n_heads=6, kv_n_heads=4), "divisible by kv_n_heads"),
    (dict(attn_impl='cuda'), "unknown attn_impl"),
    (dict(logit_scale='big'), "logit_scale"),
])
def test_invalid_configs(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kw)


def test_token_outside_vocabulary():
    model = MPT(tiny())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 2, 97]]))


# ---- packed documents (attn_uses_sequence_id) ---------------------------------

@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_sequence_id_keeps_documents_apart(impl):
    # three documents packed in one row of 32 tokens (ids non-decreasing), grouped-query attention. With
    # attn_uses_sequence_id a document's logits do not depend on the other documents' tokens, and equal those
    # of the document run alone (ALiBi sees only distances, so its position in the pack does not matter).
    import model as model_module
    if impl == 'triton' and not model_module._INTERPRET and not torch.cuda.is_available():
        pytest.skip("the Triton kernel needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py)")
    device = 'cuda' if impl == 'triton' and not model_module._INTERPRET else 'cpu'
    dtype = torch.float32 if device == 'cpu' else torch.bfloat16
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.manual_seed(0)
    model = MPT(tiny(attn_impl=impl, attn_uses_sequence_id=True, kv_n_heads=3)).to(device, dtype).eval()
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 11, 16]
    starts = [0, 5, 16]
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)).view(1, 32).repeat(2, 1).to(device)
    idx = torch.randint(0, 97, (2, 32), generator=gen).to(device)
    targets = torch.zeros_like(idx)  # any: asks for every position's logits
    with torch.no_grad():
        logits, _ = model(idx, targets, sequence_id=ids)
        changed = idx.clone()
        changed[:, 5:16] = torch.randint(0, 97, (2, 11), generator=gen).to(device)
        logits_changed, _ = model(changed, targets, sequence_id=ids)
        alone = [model(idx[:, s:s + n].contiguous(), targets[:, s:s + n].contiguous())[0]
                 for s, n in zip(starts, lengths)]
    close = lambda a, b: (a.float() - b.float()).abs().max().item() <= tol * max(1.0, b.float().abs().max().item())
    assert close(logits_changed[:, :5], logits[:, :5]) and close(logits_changed[:, 16:], logits[:, 16:])
    assert not close(logits_changed[:, 5:16], logits[:, 5:16])  # the changed document itself does change
    for (s, n), a in zip(zip(starts, lengths), alone):
        assert close(logits[:, s:s + n], a)


def test_sequence_id_without_attn_uses_sequence_id_is_an_error():
    # attn_uses_sequence_id=False (the default): attention crosses documents, and a sequence_id given anyway is
    # one clear error rather than silently ignored
    torch.manual_seed(0)
    model = MPT(tiny()).eval()
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    ids = torch.repeat_interleave(torch.arange(2), torch.tensor([10, 22])).view(1, 32).repeat(2, 1)
    with pytest.raises(ValueError, match=r"sequence_id given, but .*attn_uses_sequence_id=False.*set attn_uses_sequence_id=True"):
        model(idx, idx, sequence_id=ids)
    with torch.no_grad():
        plain, _ = model(idx, idx)
        second_alone, _ = model(idx[:, 10:].contiguous(), idx[:, 10:].contiguous())
    assert not torch.allclose(plain[:, 10:], second_alone, atol=1e-4)  # the second document sees the first


def test_sliced_targets():
    # model(x[:, :-1], x[:, 1:]): targets a non-contiguous slice of a batch, as nanoGPT-style code writes it;
    # the loss is the same as with contiguous copies, and a mismatched shape is one clear error
    torch.manual_seed(0)
    model = MPT(tiny()).eval()
    x = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(2))
    assert not x[:, 1:].is_contiguous()
    with torch.no_grad():
        _, loss = model(x[:, :-1], x[:, 1:])
        _, ref = model(x[:, :-1].contiguous(), x[:, 1:].contiguous())
        logits, _ = model(x[:, :-1], x[:, 1:])
    expected = torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), x[:, 1:].flatten())
    assert loss.item() == ref.item() and abs(loss.item() - expected.item()) < 1e-5
    with pytest.raises(ValueError, match=r"targets must have idx's shape \(3, 16\), got \(3, 15\)"):
        model(x[:, :-1], x[:, 2:])


def test_sequence_id_torch_attention_matches_kernel_reference():
    # torch_attention's block-diagonal mask against explicit per-document attention (Tq < Tk, GQA)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 14, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2], [0] * 10 + [1] * 4])
    slopes = alibi_slopes(4).double()
    got = torch_attention(q, k, v, slopes, sequence_id=ids)
    for b in range(2):
        for i in range(6):  # query i is position 8 + i
            pos = 8 + i
            keys = [j for j in range(pos + 1) if ids[b, j] == ids[b, pos]]
            kk, vv = k[b].repeat_interleave(2, 0)[:, keys], v[b].repeat_interleave(2, 0)[:, keys]
            s = (q[b, :, i:i + 1] @ kk.transpose(1, 2)) / math.sqrt(8) + slopes.view(4, 1, 1) * (
                torch.tensor(keys, dtype=torch.float64) - pos)
            want = torch.softmax(s, dim=-1) @ vv
            assert torch.allclose(got[b, :, i:i + 1], want, atol=1e-12)


def test_sequence_id_with_flash_is_a_clear_error():
    with pytest.raises(ValueError, match="attn_uses_sequence_id=True needs attn_impl='triton' or 'torch'"):
        check_attention(tiny(attn_impl='flash', attn_uses_sequence_id=True), 'cuda', torch.bfloat16)
