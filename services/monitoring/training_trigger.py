"""The training service, as the alert evaluator sees it: TriggerSchedule over gRPC (an
`alerts.TrainingTrigger`). Idempotent by request id, so a trigger retried after a lost answer
submits one job."""

from __future__ import annotations

import threading

import grpc
from strata.training.v1 import training_pb2 as tpb
from strata.training.v1 import training_pb2_grpc

from services.common.client import open_channel
from services.common.peer import peer_error

TIMEOUT = 30.0


class TrainingScheduleTrigger:
    def __init__(self, addr: str, token: str | None) -> None:
        self.addr = addr
        self.token = token
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: training_pb2_grpc.TrainingServiceStub | None = None

    def _connect(self) -> training_pb2_grpc.TrainingServiceStub:
        with self._lock:
            if self._stub is None:
                self._channel, channel = open_channel(self.addr, self.token)
                self._stub = training_pb2_grpc.TrainingServiceStub(channel)
            return self._stub

    def trigger(self, schedule_id: str, reason: str, request_id: str) -> str:
        try:
            answer = self._connect().TriggerSchedule(tpb.TriggerScheduleRequest(
                schedule_id=schedule_id, reason=reason, request_id=request_id), timeout=TIMEOUT)
        except grpc.RpcError as e:
            raise peer_error(e, "the training service", f"training/schedules/{schedule_id}") from None
        return answer.job.job_id

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = self._stub = None
