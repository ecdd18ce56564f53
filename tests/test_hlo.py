"""The HLO reader that holds the host-stop and dot-dtype budgets (eejax.exits.hlo) counts what it should."""
import jax
import jax.numpy as jnp

from eejax.exits import hlo


def _program(x, n):
    a = jax.lax.fori_loop(0, 5, lambda i, c: c * 1.1, x)           # known trip count: free
    b = jax.lax.fori_loop(0, n, lambda i, c: c * 1.1, a)           # traced bound: a stop per iteration (+1)
    c = jax.lax.cond(n > 2, lambda v: v + 1, lambda v: v - 1, b)   # one stop
    d = jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] * 2), (0, c))   # data-dependent

    def body(c, _):
        return jax.lax.cond(c.sum() > 0, lambda v: v + 1, lambda v: v * 2, c), None   # 7 stops under the scan

    s = jax.lax.scan(body, d[1], None, length=7)[0]
    return s.astype(jnp.bfloat16) @ jnp.ones((4, 4), jnp.bfloat16)


def test_counts_loops_conditionals_and_dots():
    prof = hlo.profile(_program, jnp.ones((4, 4)), 3)
    assert prof.unknown_whiles == 2
    assert prof.known_whiles >= 1
    assert prof.conditionals == 2
    # 2 data-dependent loops of 3 trips: 4 predicate stops each; 1 cond; 7 conds under the scan.
    assert prof.host_stops(trips=3) == 2 * 4 + 1 + 7
    assert prof.host_stops(trips=3, per=16) == 1.0
    assert prof.dot_dtypes == {("bf16", "bf16", "bf16"): 1}
    assert prof.f32_dots() == 0
    assert prof.summary(trips=3)["host_stops"] == 16


def test_nested_trips_by_level_and_static_programs():
    def nested(x, n):
        def outer(c):
            i, v = c
            v = jax.lax.fori_loop(0, n - i, lambda j, w: w + 1.0, v)   # inner data-dependent loop
            return i + 1, v
        return jax.lax.while_loop(lambda c: c[0] < n, outer, (0, x))[1]

    prof = hlo.profile(nested, jnp.ones((2,)), 4)
    # outer: 4 trips -> 5 stops; inner: 1 trip -> 2 stops, 4 times.
    assert prof.host_stops(trips=(4, 1)) == 5 + 4 * 2
    static = hlo.profile(lambda x: jax.lax.fori_loop(0, 3, lambda i, c: c @ c, x), jnp.ones((3, 3)))
    assert static.host_stops(trips=100) == 0 and static.unknown_whiles == 0
    assert static.f32_dots() == 1
