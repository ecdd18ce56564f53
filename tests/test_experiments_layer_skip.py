"""Smoke runs of the layer-skipping experiments (ULS, FiRST) on a tiny random LM, and a slow check on SmolLM2."""
import json
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _argv(name, tmp_path, shared_data):
    return [f"--config={ROOT / 'configs' / name}.py:smoke", f"--workdir={tmp_path / 'run'}",
            f"--outdir={tmp_path / 'results'}", f"--data_dir={shared_data}"]


def test_uls_smoke(tmp_path, shared_data):
    from experiments import uls

    uls.main(_argv("uls", tmp_path, shared_data))
    data = json.loads((tmp_path / "results" / "uls.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["full model"]["agreement"] == 1.0 and rows["full model"]["avg_layers"] == 6
    for fam in ("ULS", "early exit"):
        assert rows[f"{fam} 1.5x"]["avg_layers"] == 4 and rows[f"{fam} 1.5x"]["b2_tok_s"] > 0
    assert 3 <= rows["SkipDecode 1.5x"]["avg_layers"] <= 6
    assert data["uls_keep"]["1.5"][0] == 0 and data["uls_keep"]["1.5"][-1] == 5
    assert (tmp_path / "results" / "uls_quality_vs_layers.png").exists()


def test_first_smoke(tmp_path, shared_data):
    from experiments import first

    first.main(_argv("first", tmp_path, shared_data))
    data = json.loads((tmp_path / "results" / "first.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["full model"]["ppl"] > 0 and len(data["train_log"]) == 3
    for k in (1, 2):
        assert rows[f"FiRST top-{k}"]["avg_layers"] == 6 - k == rows[f"ULS skip {k}"]["avg_layers"]
    keep = np.asarray(data["eval_keep_NxW"])
    assert keep.shape == (6, 4) and keep[0].all() and keep[-1].all()
    # The random control is a distribution: 3 draws per k (smoke), the method ranked among them.
    for rc in data["random_control"]:
        draws = [r["ppl"] for r in data["rows"] if r["method"].startswith(f"random skip {rc['k']} #")]
        assert rc["draws"] == len(draws) == 3 and rc["random_ppl_median"] == pytest.approx(np.median(draws))
        assert rc["random_ppl_min"] == min(draws) and rc["method_rank"] == 1 + sum(p < rc["method_ppl"] for p in draws)
        assert rc["ci95_lo"] <= rc["diff_vs_median_draw"] <= rc["ci95_hi"]
    windows = len(data["nll_per_window"]["full model"])
    assert windows == 4 and all(len(v) == windows for v in data["nll_per_window"].values())
    assert np.exp(np.mean(data["nll_per_window"]["full model"])) == pytest.approx(rows["full model"]["ppl"])
    assert (tmp_path / "run" / "features.npz").exists()
    (routers,) = (tmp_path / "run").glob("routers-*.npz")
    b_N = np.load(routers)["b"]
    assert b_N[1:-1].std() > 0 or (b_N[1:-1] != 2.0).any()     # the straight-through gradient reached the routers


@pytest.mark.slow
def test_smollm2_skip_programs_match_references():
    """On the real SmolLM2 weights: ULS's table with every layer equals plain greedy; a per-row FiRST decode with
    full-depth prefill equals the gated one-pass twin (hard gates)."""
    import jax
    import jax.numpy as jnp

    from eejax.decoding import layer_skip as ls
    from eejax.decoding import per_token
    from eejax.models import pretrained

    pre_m = pretrained.load("smollm2-135m")
    model, tok, n = pre_m.model, pre_m.tokenizer, pre_m.cfg.depth
    prompts = jnp.asarray(np.stack([tok.encode("The capital of France is Paris, and the capital of")[:8],
                                    tok.encode("Once upon a time, there was a little girl who")[:8]]), jnp.int32)
    pre = ls.prefill_pooled(model, prompts, jnp.full((2,), 8, jnp.int32), 16)
    table, count = ls.layer_table(np.arange(n), n)
    full = per_token.decode(model, pre.logits_BxV, pre.state, 8, per_token.full_depth_step)
    tab = per_token.decode(model, pre.logits_BxV, pre.state, 8,
                           lambda m, t, s, i: ls.table_step(m, t, s, i, table, count))
    np.testing.assert_array_equal(full.tokens_BxG, tab.tokens_BxG)
    keep = np.ones((n, 2), bool)
    keep[ls.uls_layers(n, 1.5)[1:3], 0] = False
    keep[[5, 17, 23], 1] = False
    forced = full.tokens_BxG
    dec = per_token.decode(model, pre.logits_BxV, pre.state, 8,
                    lambda m, t, s, i: ls.row_step(m, t, s, i, jnp.asarray(keep)), force_BxG=forced)
    pre8 = ls.prefill_pooled(model, prompts, jnp.full((2,), 8, jnp.int32), 8)
    logits = ls.gated_continuation_logits(model, pre8.state.cache.k_NxBxJxSxK, pre8.state.cache.v_NxBxJxSxK,
                                          forced[:, :-1], jnp.asarray(keep, jnp.float32))
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), forced[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(logp, np.asarray(dec.logprob_BxG[:, 1:]), atol=2e-3)
