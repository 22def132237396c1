"""The benchmark's model served by MLServer 1.7.1 (copied by tests/bench/serving_peers.py into
the MLServer model repository it builds, and imported by MLServer inside its own virtualenv).

MLServer 1.7.1 ships no ONNX runtime (its runtimes are sklearn, xgboost, lightgbm, mlflow,
huggingface, alibi, catboost), so this is a custom runtime as MLServer documents them: an
`mlserver.MLModel` whose predict runs an onnxruntime session (CPU, one intra-op and one inter-op
thread). MLServer's gRPC servicer unpacks raw_input_contents into the request's data, NumpyCodec
decodes it, and since the request came raw the response's outputs go back as
raw_output_contents.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):
    async def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(await get_model_uri(self._settings), opts,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        values = self.session.run(None, {self.input_name: x})
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=[
            NumpyCodec.encode_output(name, value) for name, value in zip(self.output_names, values, strict=True)])
