"""SpecEE (Xu et al., ISCA 2025, arXiv:2504.08850): speculative early exiting on the pretrained SmolLM2-135M-Instruct
(frozen), with a Kangaroo drafter (experiments/kangaroo.py) as the draft head in place of the paper's EAGLE head.

Runbook
-------
Command (args: smollm2 (default) | smoke):
    nice -n 10 ./launch.sh specee:smollm2 --outdir experiments/results/specee-smollm2
    ./launch.sh specee:smoke          # a tiny random LM with a byte tokenizer: the plumbing only
Needs: as configs/kangaroo.py. The drafter is read from `drafter.workdir` (a finished Kangaroo run's
    adapter_l{l}.npz); when absent, a drafter is trained here with Kangaroo's recipe (`drafter.steps` steps).
Protocol:
  1. Offline features (once, in the workdir): the frozen model over `data.train_windows` Gutenberg train windows and
     `data.val_windows` windows of the validation book: per position the drafter's top-`k` candidates, at every
     layer the normed hidden state projected on the k candidate rows of the LM head, and every layer's full argmax
     (for the labels only: "this layer's argmax equals the final token").
  2. Schedules: "all" (a predictor after every layer but the last) and "static" (the `static_layers` layers where
     tokens most often first become exitable, from the TRAIN histogram; the paper's dynamic +-2 neighbourhood of
     the last exits is not implemented). One predictor set per schedule (2-layer MLPs, width `predictor.hidden`,
     features: k logits, k softmax, the softmax's change since the previous scheduled layer), BCE, Adam.
  3. Offline check on the validation book: per-layer predictor accuracy and the simulated policy.
  4. Decoding on WikiText-2 TEST prompts (eejax.decoding.specee: the policy on the engine, state-propagated K/V
     for exited tokens), against plain full-depth greedy decoding of the same batch: exit-layer distribution,
     token agreement with full depth, average layers, predictor evaluations, CPU wall-clock (batch `decode.batch`
     and batch 1 on `decode.latency_prompts` prompts) and the parameter-read cost-model speed-up; plus the run
     with the predictor forced to 0 (must equal full depth; its time is the drafter + predictor overhead).
Scale: 8 x 128 training tokens of features, 16 test prompts x 64 new tokens. Hardware / wall-clock: 2 CPU cores
    shared by several jobs (load 25-35): 52 minutes.
Expected shape (arXiv:2504.08850; PAPERS.md): near-lossless (high agreement, not 100%) with fewer average layers;
    predictor cost far below a layer's because the features are k-dimensional; fewer scheduled layers give more
    speed-up at about the same agreement. Paper: 2.25x (cloud) and 2.43x (PC) on Llama2-7B.
"""
import ml_collections

from _base_smollm2 import validate_run

NOT_IN_CHECKPOINTS = ("decode",)


def get_config(arg=None):
    arg = arg or "smollm2"
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"specee-{arg}"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(name="smollm2-135m", depth=0))
    c.data = ml_collections.ConfigDict(dict(context=128, train_windows=8, val_windows=4, cache_batch=2))
    c.drafter = ml_collections.ConfigDict(dict(exit_layer=2, k=4, workdir="runs/kangaroo-smollm2", steps=100,
                                               batch=2, lr=1e-3, topk=32))
    c.predictor = ml_collections.ConfigDict(dict(hidden=32, steps=400, lr=3e-3, static_layers=6, threshold=0.5))
    # head_check: when the full head runs at a scheduled layer (eejax.decoding.specee): "cond" (the paper's rule and
    # the committed run's: only when some predictor passes; two host stops per decision point on a GPU), "always"
    # (every scheduled layer; one stop), "auto" (the library default: the H200 cost model picks at the batch).
    c.decode = ml_collections.ConfigDict(dict(test_prompts=16, prompt_len=32, new_tokens=64, latency_prompts=4,
                                              head_check="cond"))
    if arg == "smoke":
        c.model.name = "random"
        c.data.update(context=16, train_windows=2, val_windows=1, cache_batch=1)
        c.drafter.update(exit_layer=1, k=3, workdir="", steps=2, topk=8)
        c.predictor.update(hidden=8, steps=5, static_layers=2)
        c.decode.update(test_prompts=2, prompt_len=6, new_tokens=5, latency_prompts=0, head_check="auto")
    elif arg != "smollm2":
        raise ValueError(f"configs/specee.py: unknown arg {arg!r}; use smollm2 or smoke")
    return c


def validate(c):
    """Every value checked when the config is loaded (called by eejax.harness.config)."""
    v = validate_run(c, random_name="random", dtype=False, depth=True)
    for key in ("data.context", "data.train_windows", "data.val_windows", "data.cache_batch", "drafter.exit_layer",
                "drafter.k", "drafter.steps", "drafter.batch", "drafter.topk", "predictor.hidden", "predictor.steps",
                "predictor.static_layers", "decode.test_prompts", "decode.prompt_len", "decode.new_tokens"):
        v.int(key, lo=1)
    v.int("decode.latency_prompts", lo=0)
    v.str("drafter.workdir", nonempty=False)
    v.choice("decode.head_check", ("auto", "cond", "always"))
    v.float("drafter.lr", 0.0, 1.0, lo_open=True)
    v.float("predictor.lr", 0.0, 1.0, lo_open=True)
    v.float("predictor.threshold", 0.0, 1.0)
    if c.decode.latency_prompts > c.decode.test_prompts:
        v.fail("decode.latency_prompts", f"must be <= decode.test_prompts ({c.decode.test_prompts})")
