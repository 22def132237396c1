"""ONNX validation at registration: the checker runs on the committed bytes and the
signature (names, dtypes, shapes) is read from the graph, so serving never trusts a
client-supplied signature for ONNX models (only `allow_nan`, which no graph states, is kept as
the registrant declared it)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import onnx

from services.common.errors import InvalidArgument

# ONNX TensorProto element types -> strata.common.v1.DataType names.
_DTYPES = {
    onnx.TensorProto.FLOAT: "FLOAT32", onnx.TensorProto.DOUBLE: "FLOAT64", onnx.TensorProto.FLOAT16: "FLOAT16",
    onnx.TensorProto.BFLOAT16: "BFLOAT16", onnx.TensorProto.INT8: "INT8", onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.UINT16: "UINT16", onnx.TensorProto.UINT32: "UINT32", onnx.TensorProto.UINT64: "UINT64",
    onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.STRING: "STRING",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # DataType name without prefix, e.g. "FLOAT32"; "UNSPECIFIED" when unknown
    shape: tuple[int, ...]  # -1 = dynamic


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...] = field(default_factory=tuple)
    outputs: tuple[TensorSpec, ...] = field(default_factory=tuple)
    #: The model takes NaN and infinities in float inputs. Declared by the registrant (the graph
    #: cannot say); False: inference refuses such inputs (strata.common.v1.ModelSignature).
    allow_nan: bool = False

    def to_json(self) -> dict:
        def spec(t: TensorSpec) -> dict:
            return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
        return {"inputs": [spec(t) for t in self.inputs], "outputs": [spec(t) for t in self.outputs],
                "allow_nan": self.allow_nan}

    @classmethod
    def from_json(cls, d: dict) -> Signature:
        def spec(x: dict) -> TensorSpec:
            return TensorSpec(x["name"], x["dtype"], tuple(x["shape"]))
        return cls(tuple(spec(x) for x in d.get("inputs", [])), tuple(spec(x) for x in d.get("outputs", [])),
                   bool(d.get("allow_nan", False)))

    def declared_by(self, registrant: Signature) -> Signature:
        """This signature (read from the graph) with what only the registrant can declare."""
        return replace(self, allow_nan=registrant.allow_nan)


def _specs(values: list[onnx.ValueInfoProto], skip: set[str]) -> tuple[TensorSpec, ...]:
    out = []
    for v in values:
        if v.name in skip:  # old exporters list initializers among the graph inputs
            continue
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        out.append(TensorSpec(v.name, _DTYPES.get(t.elem_type, "UNSPECIFIED"), dims))
    return tuple(out)


def validate_onnx(data: bytes) -> Signature:
    """Check the model and return its signature; InvalidArgument("artifact", ...) if invalid."""
    try:
        model = onnx.load_model_from_string(data)
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises DecodeError, ValidationError, ...
        raise InvalidArgument("artifact", f"not a valid ONNX model: {str(e).splitlines()[0][:300]}") from None
    initializers = {i.name for i in model.graph.initializer}
    return Signature(_specs(list(model.graph.input), initializers), _specs(list(model.graph.output), set()))
