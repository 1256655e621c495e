"""A BERT encoder as an ONNX graph, written node by node from the safetensors weights: no torch.

Why: the packaged all-MiniLM-L6-v2 ships only ``model.safetensors``, and no trustworthy package ships
its ``.onnx`` file, so exporting with ``torch.onnx.export`` made the ONNX backend need torch (a
~1 GB install) once per machine. The model is plain BERT (``BertModel``, absolute positions,
exact GELU, post-LayerNorm), small enough to write out with ``onnx.helper``; the result matches
the torch model to float32 rounding (cosine >= 0.99999 on the samples' chunks, tests/test_local_embedder.py).

The graph: word + position + token-type embeddings, LayerNorm, then per layer multi-head
self-attention (scores scaled by 1/sqrt(head dim), plus an additive mask of the float32 minimum on
padded keys, softmax), output dense + residual + LayerNorm, intermediate dense + GELU
(0.5·x·(1 + erf(x/√2))) + output dense + residual + LayerNorm. Inputs ``input_ids``,
``attention_mask``, ``token_type_ids`` (int64, [batch, sequence]); output ``last_hidden_state``
([batch, sequence, hidden]). Pooling stays outside (numpy, :mod:`rag_assets.embedders.local_onnx`).
The pooler weights are not used (sentence-transformers mean-pools the last hidden state).

Deterministic: the same weights and config give the same bytes (nodes and initializers in a fixed
order, a fixed producer and IR version, no timestamps), whatever the onnx version, as long as its
protobuf serialisation is unchanged; the manifest records the onnx version that built the file.
Sizes come from ``config.json``, not constants.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OPSET = 17  # the first opset with LayerNormalization
IR_VERSION = 8  # the IR version of opset 17; fixed so a newer onnx does not change the bytes
PRODUCER = "rag_assets.bert_graph"
GRAPH_VERSION = "1"  # bump on any change to the graph below (part of the cache folder's recipe)

_DTYPES = {"F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4"}


@dataclass(frozen=True)
class BertConfig:
    """The sizes the graph needs, from the model's ``config.json``."""

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    intermediate_size: int
    layer_norm_eps: float
    max_position_embeddings: int

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        raw = json.loads(Path(path).read_text())
        if raw.get("model_type", "bert") != "bert":
            raise ValueError(f"{path}: model_type {raw.get('model_type')!r}, only 'bert' is supported")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: position_embedding_type {raw['position_embedding_type']!r} is not supported")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (only exact 'gelu')")
        cfg = cls(
            hidden_size=int(raw["hidden_size"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            intermediate_size=int(raw["intermediate_size"]),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            max_position_embeddings=int(raw["max_position_embeddings"]),
        )
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"{path}: hidden_size {cfg.hidden_size} is not a multiple of {cfg.num_attention_heads} heads")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` file as numpy arrays (copies, native byte order).

    The format is an 8-byte little-endian header length, a JSON header of ``{name: {dtype, shape,
    data_offsets}}`` and the raw little-endian data; reading it directly needs no ``safetensors``
    package (tests check the result against it where it is installed)."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {meta['dtype']}, not supported")
        start, end = meta["data_offsets"]
        arr = np.frombuffer(data, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize, offset=base + start)
        out[name] = arr.reshape(meta["shape"]).astype(dtype[1:], copy=True)
    return out


class _Graph:
    """Collects nodes and initializers in creation order, with readable unique names."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper = helper
        self.numpy_helper = numpy_helper
        self.nodes = []
        self.inits = []
        self._n = 0

    def const(self, name: str, value) -> str:
        arr = np.asarray(value)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        self.inits.append(self.numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        self._n += 1
        out = f"{name}"
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=f"n{self._n}_{name}", **attrs))
        return out


def build_bert_onnx(model_dir: Path) -> bytes:
    """The serialised ONNX model (opset 17) of the BERT encoder in ``model_dir`` (``config.json`` and
    ``model.safetensors``), computing ``last_hidden_state``. Same input, same bytes."""
    from onnx import TensorProto, helper

    model_dir = Path(model_dir)
    cfg = BertConfig.from_file(model_dir / "config.json")
    w = read_safetensors(model_dir / "model.safetensors")
    w = {k.removeprefix("bert."): v for k, v in w.items()}  # BertModel (no prefix) or a BertFor* checkpoint

    def t(name: str) -> np.ndarray:
        try:
            return w[name].astype(np.float32)
        except KeyError:
            raise ValueError(f"{model_dir / 'model.safetensors'} has no tensor {name}") from None

    g = _Graph()
    H, heads, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim

    def dense(x: str, prefix: str, name: str) -> str:
        weight = g.const(f"{prefix}.weight_t", t(f"{prefix}.weight").T)  # [in, out] for MatMul
        bias = g.const(f"{prefix}.bias", t(f"{prefix}.bias"))
        return g.op("Add", [g.op("MatMul", [x, weight], f"{name}/matmul"), bias], f"{name}/out")

    def layer_norm(x: str, prefix: str, name: str) -> str:
        scale = g.const(f"{prefix}.weight", t(f"{prefix}.weight"))
        bias = g.const(f"{prefix}.bias", t(f"{prefix}.bias"))
        return g.op("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=cfg.layer_norm_eps)

    # embeddings
    word = g.op("Gather", [g.const("embeddings.word_embeddings.weight", t("embeddings.word_embeddings.weight")),
                           "input_ids"], "emb/word")  # fmt: skip
    seq = g.op("Shape", ["input_ids"], "emb/seq", start=1, end=2)  # [sequence], 1-D
    pos_table = g.const("embeddings.position_embeddings.weight", t("embeddings.position_embeddings.weight"))
    zero = g.const("zero_1d_i64", np.array([0], dtype=np.int64))
    pos = g.op("Slice", [pos_table, zero, seq, zero], "emb/position")  # rows 0..sequence-1 = positions
    types = g.op("Gather", [g.const("embeddings.token_type_embeddings.weight",
                                    t("embeddings.token_type_embeddings.weight")), "token_type_ids"], "emb/type")  # fmt: skip
    summed = g.op("Add", [g.op("Add", [word, pos], "emb/word+pos"), types], "emb/sum")
    x = layer_norm(summed, "embeddings.LayerNorm", "emb/layernorm")

    # additive mask [batch, 1, 1, sequence]: 0 where attended, float32 min where padded (as transformers)
    maskf = g.op("Cast", ["attention_mask"], "mask/float", to=TensorProto.FLOAT)
    inverted = g.op("Sub", [g.const("one_f32", np.array(1.0, dtype=np.float32)), maskf], "mask/inverted")
    additive = g.op("Mul", [inverted, g.const("mask_min", np.array(np.finfo(np.float32).min, dtype=np.float32))],
                    "mask/additive")  # fmt: skip
    mask = g.op("Unsqueeze", [additive, g.const("mask_axes", np.array([1, 2], dtype=np.int64))], "mask/4d")

    split_heads = g.const("shape_split_heads", np.array([0, 0, heads, hd], dtype=np.int64))
    merge_heads = g.const("shape_merge_heads", np.array([0, 0, H], dtype=np.int64))
    scale = g.const("attention_scale", np.array(1.0 / math.sqrt(hd), dtype=np.float32))
    half = g.const("half_f32", np.array(0.5, dtype=np.float32))
    inv_sqrt2 = g.const("inv_sqrt2_f32", np.array(1.0 / math.sqrt(2.0), dtype=np.float32))

    for i in range(cfg.num_hidden_layers):
        p, n = f"encoder.layer.{i}", f"layer{i}"

        def heads_of(kind: str, perm: list[int], x=x, p=p, n=n) -> str:
            proj = dense(x, f"{p}.attention.self.{kind}", f"{n}/{kind}")
            return g.op("Transpose", [g.op("Reshape", [proj, split_heads], f"{n}/{kind}/split")],
                        f"{n}/{kind}/heads", perm=perm)  # fmt: skip

        q = heads_of("query", [0, 2, 1, 3])  # [batch, heads, seq, hd]
        k = heads_of("key", [0, 2, 3, 1])  # [batch, heads, hd, seq]
        v = heads_of("value", [0, 2, 1, 3])
        scores = g.op("Mul", [g.op("MatMul", [q, k], f"{n}/qk"), scale], f"{n}/scores")
        probs = g.op("Softmax", [g.op("Add", [scores, mask], f"{n}/masked")], f"{n}/probs", axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, v], f"{n}/context")], f"{n}/context/t", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, merge_heads], f"{n}/context/merged")
        attn = dense(ctx, f"{p}.attention.output.dense", f"{n}/attention_output")
        x = layer_norm(g.op("Add", [attn, x], f"{n}/attention_residual"), f"{p}.attention.output.LayerNorm",
                       f"{n}/attention_layernorm")  # fmt: skip
        inter = dense(x, f"{p}.intermediate.dense", f"{n}/intermediate")
        erf = g.op("Erf", [g.op("Mul", [inter, inv_sqrt2], f"{n}/gelu/scaled")], f"{n}/gelu/erf")
        plus1 = g.op("Add", [erf, "one_f32"], f"{n}/gelu/plus1")
        gelu = g.op("Mul", [g.op("Mul", [inter, half], f"{n}/gelu/half"), plus1], f"{n}/gelu")
        out = dense(gelu, f"{p}.output.dense", f"{n}/output")
        x = layer_norm(g.op("Add", [out, x], f"{n}/output_residual"), f"{p}.output.LayerNorm", f"{n}/output_layernorm")

    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))
    ints = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
            for name in ("input_ids", "attention_mask", "token_type_ids")]  # fmt: skip
    outs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", H])]
    graph = helper.make_graph(g.nodes, "bert_encoder", ints, outs, initializer=g.inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=PRODUCER,
        producer_version=GRAPH_VERSION, ir_version=IR_VERSION,
    )  # fmt: skip
    return model.SerializeToString(deterministic=True)
