"""CE-CoLLM (Jin, Wu 2025, arXiv:2411.02829) at small scale: a multi-exit char LM split after layer k into an edge
part (layers 1..k and the exit at k) and a cloud part (layers k+1..N and the final exit); a token whose edge-exit
top-1 probability reaches the threshold is emitted on the edge, every other token's hidden state goes to the cloud.

Runbook
-------
Command (args: shakespeare (default) | smoke):
    EEJAX_PYTHON=/work/main/.venv/bin/python nice -n 10 ./launch.sh cecollm:shakespeare \
        --data_dir /work/shared/data --outdir experiments/results/cecollm-tiny_shakespeare
    ./launch.sh cecollm:smoke --data_dir /work/shared/data        # tiny model, a few steps: seconds
Data: Tiny Shakespeare, character-level (65 symbols; first 90% train, last 10% validation). Windows of
    `eval.prompt_len` prompt + `eval.new_tokens` generated characters from the validation split.
Model (`eejax.models.lm`, the recipe of configs/_base_lm.py): 6 pre-LN layers, width 128, 4 query / 2 KV heads,
    exits after every layer sharing the tied head through per-exit RMSNorms (multi-exit CE, LayerSkip dropout),
    `train.steps` steps of batch 32 x 128 characters. The exit after layer k (each of `split.ks`) is the edge exit; no exit head is
    trained on evaluation data.
Split decoding (`eejax.decoding.split`): prefill of the prompt runs on the edge (layers 1..k) and the cloud
    (layers k+1..N, from the uploaded prompt hidden states); each generated token runs layers 1..k on the edge,
    exits there when its edge top-1 probability >= threshold, else uploads its fp16 hidden state (plus the
    pending hidden states of the edge-finished tokens since its last upload: the cloud context manager), and the
    cloud builds its deeper K/V from them and finishes the token. Bytes are counted per row; the latency is a cost
    model (`split.*` link and device speeds), never CPU wall-clock.
Hardware / wall-clock: 2-core shared CPU: base model 9 min for 600 steps (shared with other runs), the table (3 cuts
    x 2 cloud K/V rules x 3 thresholds) about 5 min.
Expected shape (PAPERS-WAVE4.md [inf]): raising the threshold raises the cloud share and the agreement with the
    full model; at 1.0 every token goes to the cloud (the control: equals full-depth greedy); edge-only quality is
    below full; naive collaboration (the whole context re-sent each cloud call) is dominated by bytes, the context
    manager cuts them. Paper: up to 13.81% less inference time and 84.55% less cloud computation than cloud-only
    deployment (abstract, seeds/001).
"""
import ml_collections

from configs._base_lm import base_config, validate_base

ARGS = ("shakespeare", "smoke")
CLOUD_KV = ("deferred", "propagate")   # eejax.decoding.split.CLOUD_KV (kept here: configs import no jax)


def get_config(arg=None):
    arg = arg or "shakespeare"
    if arg not in ARGS:
        raise ValueError(f"configs/cecollm.py: unknown arg {arg!r}; use one of {ARGS}")
    c = base_config(arg)
    c.runbook = __doc__
    c.name = f"cecollm-{arg}"
    if arg == "shakespeare":
        c.train.steps = c.train.optim.total_steps = 600
        c.ckpt_every = 200
    c.split = ml_collections.ConfigDict(dict(
        ks=(3, 4, 5),                          # edge layers (1-based count): the cut after layer k, each k a run
        thresholds=(0.8, 0.9, 1.0),           # the paper's thresholds
        cloud_kv=("deferred", "propagate"),    # the cloud's K/V of edge-finished tokens (eejax.decoding.split)
        bytes_per_value=2,                     # fp16 transfers
        token_id_bytes=4,                      # a token id sent down (int32)
        uplink_mbps=(10.0, 100.0),             # link speeds of the cost model (Mbit/s, edge -> cloud)
        downlink_mbps=100.0,
        rtt_ms=20.0,                           # one round trip per cloud call
        edge_tflops=1.0,                       # edge device speed (effective TFLOP/s)
        cloud_tflops=100.0))                   # cloud device speed (effective TFLOP/s)
    c.eval.update(batch=32, prompt_len=64, new_tokens=64, eval_batches=4)
    if arg == "smoke":
        c.split.ks = (2,)
        c.split.thresholds = (0.0, 0.9, 1.0)   # the two ends are checked (tests/test_experiments.py)
        c.split.uplink_mbps = (10.0,)
        c.eval.update(batch=4, prompt_len=16, new_tokens=8, eval_batches=1)
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.harness.config)."""
    v = validate_base(c)
    v.ints("split.ks", lo=1, hi=c.model.depth - 1, unique=True)
    v.floats("split.thresholds", 0.0, 1.0)
    v.choices("split.cloud_kv", CLOUD_KV)
    v.int("split.bytes_per_value", lo=1)
    v.int("split.token_id_bytes", lo=1)
    v.floats("split.uplink_mbps", 0.0, None, lo_open=True)
    for key in ("split.downlink_mbps", "split.edge_tflops", "split.cloud_tflops"):
        v.float(key, lo=0.0, lo_open=True)
    v.float("split.rtt_ms", lo=0.0)
    if c.model.exits != "all":
        v.fail("model.exits", "must be 'all' (the edge exit is the exit after layer k of split.ks)")
