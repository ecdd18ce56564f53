"""Recorded once, before the engine refactor (issue 10), with the pre-refactor API: golden outputs of every
inference path on fixed models and inputs. ``tests/test_golden.py`` re-runs the same computations through the new
engine and compares. Kept for provenance; it does not run against the current API.

    python tests/golden/record_pre_engine.py   # wrote engine_golden.npz at commit a8db7d3
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.decoding import kv as kv_lib
from eejax.decoding import per_token, skipdecode
from eejax.exits import confidence, continuous, engine, paths
from eejax.models import diffusion, lm
from eejax.models.vit import ViT, ViTConfig

out = {}
# ---------------------------------------------------------------- ViT
CFG = ViTConfig(image_size=16, channels=1, patch_size=4, d_model=32, depth=5, num_heads=4, mlp_dim=64,
                num_classes=6, exits="all", head_types=("local", "global", "vitee", "linear", "linear"),
                local_hidden=16, global_pool=2)
model = ViT(CFG, rngs=nnx.Rngs(0))
for i, head in enumerate(model.heads):
    head.cls.fc.kernel[...] = head.cls.fc.kernel[...] * (2.0 + 2 * i)
x = jax.random.normal(jax.random.key(1), (24, 16, 16, 1))
outs = model.all_exits(x)
out["vit_scan_logits"] = outs.logits_ExBxC
for m in sorted(confidence.MEASURES):
    s = engine.scores_from_outputs(outs, confidence.get_measure(m))
    for q in (0.3, 0.6):
        thr = float(np.quantile(np.asarray(s[:-1]), q))
        d = model.dynamic(x, thr, m)
        out[f"vit_while_{m}_{q}_thr"] = np.float32(thr)
        out[f"vit_while_{m}_{q}_exit"] = d.exit_B
        out[f"vit_while_{m}_{q}_logits"] = d.logits_BxC
        c = paths.compacted_exits(model.layers, list(model.heads), model.embed(x), CFG.exit_layers, thr,
                                  measure=confidence.get_measure(m), buckets=(8, 16))
        out[f"vit_compact_{m}_{q}_exit"] = c.exit_B
        out[f"vit_compact_{m}_{q}_logits"] = c.logits_BxC
CFG2 = ViTConfig(image_size=16, channels=1, patch_size=4, d_model=32, depth=5, num_heads=4, mlp_dim=64,
                 num_classes=6, exits="all", head_types="linear")
m2 = ViT(CFG2, rngs=nnx.Rngs(3))
for i, head in enumerate(m2.heads):
    head.cls.fc.kernel[...] = head.cls.fc.kernel[...] * (2.0 + 2 * i)
cont = continuous.vit_continuous_exits(m2, x, 0.5, num_slots=8)
out["vit_cont_exit"], out["vit_cont_logits"] = cont.exit_B, cont.logits_BxC

# ---------------------------------------------------------------- LM decoding
LCFG = lm.LMConfig(vocab_size=23, d_model=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=48)
gd, params = lm.build(LCFG, 0)
lmodel = nnx.merge(gd, params)
lmodel.embed.embedding[...] = lmodel.embed.embedding[...] * 5
rng = np.random.default_rng(0)
prompt = jnp.asarray(rng.integers(0, 23, (4, 6)), jnp.int32)
lengths = jnp.full((4,), 6, jnp.int32)
G = 6
gen = per_token.generate(lmodel, prompt, lengths, G, per_token.full_depth_step)
out["lm_full_tokens"], out["lm_full_logp"] = gen.tokens_BxG, gen.logprob_BxG
for kvm in ("propagate", "oracle"):
    for thr in (0.2, 0.5):
        g = per_token.generate(lmodel, prompt, lengths, G,
                               lambda m, t, s, i: per_token.exit_step(m, t, s, i, thr, kv=kvm))
        out[f"lm_exit_{kvm}_{thr}_tokens"] = g.tokens_BxG
        out[f"lm_exit_{kvm}_{thr}_logp"] = g.logprob_BxG
        out[f"lm_exit_{kvm}_{thr}_exit"] = g.exit_layer_BxG
sched = skipdecode.linear_schedule(G, 4, 4, 2)
g = per_token.generate(lmodel, prompt, lengths, G, lambda m, t, s, i: skipdecode.skip_step(m, t, s, i, sched))
out["lm_skip_tokens"], out["lm_skip_logp"] = g.tokens_BxG, g.logprob_BxG
out["lm_skip_sched"] = sched

# ---------------------------------------------------------------- diffusion
DCFG = diffusion.UViTConfig(image_size=8, channels=1, patch_size=4, d_model=32, depth=5, num_heads=4, mlp_dim=64,
                            num_classes=3)
dgd, dparams = diffusion.build(DCFG, 0)
dmodel = nnx.merge(dgd, dparams)
dsched = diffusion.make_schedule("linear", 100)
y = jnp.asarray([0, 1, 2, 0, 1, 2], jnp.int32)
thr = diffusion.constant_thresholds(0.5, 4, DCFG.depth)
for meas in ("per_sample", "batch_mean"):
    s = diffusion.ddim_sample(dmodel, dsched, jax.random.key(0), y, thr, measure=meas, parameterization="v")
    out[f"diff_{meas}_x0"], out[f"diff_{meas}_exit"] = s.x0_BxHxWxC, s.exit_layer_SxB

np.savez(pathlib.Path(__file__).with_name("engine_golden.npz"), **{k: np.asarray(v) for k, v in out.items()})
print({k: np.asarray(v).shape for k, v in out.items()})
