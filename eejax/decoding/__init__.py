"""Decoding for the exit-aware LM: KV cache and prefill, sampling, per-token early exit (state-propagated or
oracle K/V), SkipDecode schedules, and Learn-then-Test threshold calibration.

    logits, state = kv.prefill(model, prompt_BxP, lengths_B, cache_len)          # left-padded prompts
    gen = per_token.generate(model, prompt_BxP, lengths_B, 64,
                             lambda m, t, s, i: per_token.exit_step(m, t, s, i, 0.9, kv="propagate"))
"""
from eejax.decoding import calibration, kv, per_token, skipdecode
from eejax.decoding.kv import DecodeState, KVCache, left_pad, prefill, sample
from eejax.decoding.per_token import Generation, StepStats, decode_fn, exit_step, full_depth_step, generate

__all__ = ["calibration", "kv", "per_token", "skipdecode", "DecodeState", "KVCache", "left_pad", "prefill", "sample",
           "Generation", "StepStats", "decode_fn", "exit_step", "full_depth_step", "generate"]
