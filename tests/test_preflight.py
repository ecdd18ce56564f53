"""eejax.eval.preflight: the two gates of a depth-allocation comparison, on synthetic numbers."""
import math

import pytest

from eejax.eval import preflight as P


def test_both_gates_pass():
    pf = P.depth_preflight(0.95, 10.0, 13.0)
    assert pf.acc_ok and pf.depth_ok and pf.passed
    assert pf.cfid_ratio == pytest.approx(1.3)
    assert pf.line.startswith("preflight passed:")
    assert P.gated_verdict(pf, "reproduced: x") == "reproduced: x"


@pytest.mark.parametrize("acc,full,trunc,acc_ok,depth_ok", [
    (0.242, 192.8, 193.3, False, False),   # the first MNIST run: neither gate
    (0.95, 192.8, 193.3, True, False),     # a working model that depth does not limit
    (0.50, 10.0, 20.0, False, True),       # depth matters, but the full model does not work
])
def test_a_failed_gate_makes_the_verdict_inconclusive(acc, full, trunc, acc_ok, depth_ok):
    pf = P.depth_preflight(acc, full, trunc)
    assert (pf.acc_ok, pf.depth_ok, pf.passed) == (acc_ok, depth_ok, False)
    assert pf.line.startswith("preflight failed:") and pf.line.endswith("the policy comparison below is not evidence.")
    assert "\n" not in pf.line
    assert pf.line.removeprefix("preflight failed: ").startswith("(b)" if acc_ok else "(a)")   # failed gate first
    for verdict in ("reproduced: better", "not reproduced: worse"):
        assert P.gated_verdict(pf, verdict) == P.INCONCLUSIVE


def test_thresholds_are_inclusive_and_configurable():
    assert P.depth_preflight(0.9, 10.0, 12.0).passed                       # exactly at both thresholds
    assert not P.depth_preflight(0.8999, 10.0, 12.0).passed
    assert not P.depth_preflight(0.9, 10.0, 11.99).passed
    pf = P.depth_preflight(0.7, 10.0, 11.0, min_acc=0.6, min_cfid_ratio=1.05, truncated_ratio=0.5)
    assert pf.passed and "uniform @0.5" in pf.line


def test_zero_full_cfid_and_bad_input():
    assert math.isinf(P.depth_preflight(0.99, 0.0, 1.0).cfid_ratio)
    assert not P.depth_preflight(0.99, 0.0, 0.0).depth_ok                # both perfect: depth does not matter
    for kw, arg in ((dict(full_class_acc=95.0), "full_class_acc"), (dict(cfid_full=float("nan")), "cfid_full"),
                    (dict(cfid_truncated=-1.0), "cfid_truncated"), (dict(min_cfid_ratio=0.5), "min_cfid_ratio"),
                    (dict(truncated_ratio=1.0), "truncated_ratio")):
        args = {"full_class_acc": 0.95, "cfid_full": 10.0, "cfid_truncated": 13.0, **kw}
        with pytest.raises(ValueError, match=arg):
            P.depth_preflight(args.pop("full_class_acc"), args.pop("cfid_full"), args.pop("cfid_truncated"), **args)


def test_deediff_verdict_is_computed_and_gated():
    """experiments/deediff.py's verdict: per seed DeeDiff per-sample vs uniform, and a failed preflight wins."""
    from experiments.deediff import policy_verdict   # noqa: PLC0415

    def results(dee, uni):
        out = {}
        for k, (d, u) in enumerate(zip(dee, uni)):
            tag = f"@{0.4 + 0.2 * k:g}"
            out[f"DeeDiff per-sample {tag}"] = {"cfid_per_seed": d, "layers/step": 3.0}
            out[f"uniform {tag}"] = {"cfid_per_seed": u, "layers/step": 3.0}
        return out

    ok, bad = P.depth_preflight(0.95, 10.0, 13.0), P.depth_preflight(0.24, 10.0, 10.1)
    targets = (0.4, 0.6)
    better = results([[10.0, 11.0], [9.0, 9.5]], [[12.0, 12.5], [10.0, 10.0]])
    verdict, cmp = policy_verdict(better, targets, 2, ok)
    assert verdict.startswith("reproduced") and [c["deediff_vs_uniform"] for c in cmp] == ["better", "better"]
    assert cmp[0]["cfid_uniform_minus_deediff_per_seed"] == [2.0, 1.5]
    assert policy_verdict(better, targets, 2, bad)[0] == P.INCONCLUSIVE
    mixed = results([[10.0, 11.0], [9.0, 11.0]], [[12.0, 12.5], [10.0, 10.0]])   # seeds disagree at 0.6
    verdict, cmp = policy_verdict(mixed, targets, 2, ok)
    assert verdict.startswith("partly") and cmp[1]["deediff_vs_uniform"] == "tied"
    worse = results([[13.0, 14.0], [12.0, 12.0]], [[12.0, 12.5], [10.0, 10.0]])
    assert policy_verdict(worse, targets, 2, ok)[0].startswith("not reproduced")
    one_seed = results([[10.0], [9.0]], [[12.0], [10.0]])
    assert policy_verdict(one_seed, targets, 1, ok)[0].startswith(P.INCONCLUSIVE)
