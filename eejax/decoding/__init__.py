"""Decoding for the exit-aware LM, on the engine: a per-row KV cache (prefill, ``extend`` of T tokens, rollback,
state propagation), sampling, per-token early exit (state-propagated or oracle K/V; one ``lax.cond`` per exit
decision, cheap gates), SkipDecode schedules, self-speculative decoding, cloud-edge split decoding with its traffic
counts (``split``, CE-CoLLM), and Learn-then-Test threshold calibration.

    tokens, lengths = kv.pad_prompts(prompts)                                   # right-padded, per-row lengths
    gen = per_token.generate(model, tokens, lengths, 64,
                             lambda m, t, s, i: per_token.exit_step(m, t, s, i, 0.9, kv="propagate"))
    gen = per_token.generate(model, tokens, lengths, 64, skipdecode.phases(schedule_G, model.cfg.depth))
    spec = speculative.self_speculative(model, tokens, lengths, 64, draft_exit=1, k=4)
"""
from eejax.decoding import calibration, kv, per_token, skipdecode, speculative, split
from eejax.decoding.kv import DecodeState, KVCache, extend, pad_prompts, prefill, rollback, sample
from eejax.decoding.per_token import (Generation, StepStats, decode, decode_fn, exit_step, forced_step,
                                      full_depth_step, generate)
from eejax.decoding.speculative import SpecOutputs, self_speculative

__all__ = ["calibration", "kv", "per_token", "skipdecode", "speculative", "split", "DecodeState", "KVCache", "extend",
           "pad_prompts", "prefill", "rollback", "sample", "Generation", "StepStats", "decode", "decode_fn",
           "exit_step", "forced_step", "full_depth_step", "generate", "SpecOutputs", "self_speculative"]
