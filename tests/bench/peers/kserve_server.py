"""The benchmark's model served by KServe (run by tests/bench/serving_peers.py inside KServe's own
virtualenv, never by the project's):

    python kserve_server.py --model_path model.onnx --model_name mlp --grpc_port P --http_port Q \
        --enable_latency_logging false

A `kserve.Model` whose predict runs an onnxruntime session (CPU, one intra-op and one inter-op
thread), written as a KServe user writes a custom predictor: the V2 gRPC servicer decodes
ModelInferRequest into an `InferRequest` (raw_input_contents become the inputs' raw data, so
`as_numpy()` is a frombuffer + reshape), and the `InferResponse` is encoded back with the outputs'
raw bytes (`set_data_from_numpy(binary_data=True)` -> raw_output_contents). predict is a plain
function: KServe calls it on its event loop, which for a sub-millisecond model costs less than a
hop to a thread. KServe's gRPC server is one process whatever `--workers` says (`--workers`
multiplies the REST server only), so the process serves every gRPC connection.
"""

from __future__ import annotations

import argparse

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, ModelServer, model_server

DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.float64): "FP64"}


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.session: ort.InferenceSession | None = None
        self.load()

    def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        x = payload.inputs[0].as_numpy()
        outputs = []
        for name, value in zip(self.output_names, self.session.run(None, {self.input_name: x}), strict=True):
            out = InferOutput(name=name, shape=list(value.shape), datatype=DATATYPES[value.dtype])
            out.set_data_from_numpy(value, binary_data=True)
            outputs.append(out)
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=outputs)


if __name__ == "__main__":
    # KServe parses its own flags (--grpc_port, --http_port, --model_name, ...) at import.
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_path", required=True)
    ours, _ = parser.parse_known_args()
    args = model_server.args
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=1,
                enable_latency_logging=args.enable_latency_logging).start([OnnxModel(args.model_name, ours.model_path)])
