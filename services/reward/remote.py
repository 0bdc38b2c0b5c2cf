"""A scorer served by `flowgrpo serve-reward`, used exactly like an in-process one.

reward.endpoints maps a scorer name to "grpc://host:port"; `build_scorer` then returns
a RemoteScorer, which sends each batch as PNGs (lossless, so the service scores the
same pixels), prompts and JSON metadata, with reward.timeout_s as the call's deadline.
Failures raise RewardServiceError saying which service, where, and what to check; the
reward worker retries them (reward.retries) before failing the groups.
The channel is plaintext (no TLS): keep the service on loopback or a private network.
"""
from __future__ import annotations

import json

import grpc
import numpy as np

from common.config import RewardConfig
from services.reward.base import ScoreOutput, Scorer
from services.reward.rpc import channel_options, encode_png, generated

SCHEME = "grpc://"


class RewardServiceError(RuntimeError):
    """A remote scorer's call failed; the message names the service and the fix."""


def grpc_target(address: str) -> str:
    """'host:port' from 'grpc://host:port' (config validation checks the format)."""
    return address.removeprefix(SCHEME)


class RemoteScorer(Scorer):
    def __init__(self, name: str, address: str, config: RewardConfig):
        self.name = name
        self.address = address
        self.timeout_s = config.timeout_s
        self.engine = f"remote:{address}"
        pb2, pb2_grpc = generated()
        self._pb2 = pb2
        self._channel = grpc.insecure_channel(grpc_target(address), options=channel_options())
        self._stub = pb2_grpc.RewardStub(self._channel)

    def _score(self, images, prompts, metadata):
        request = self._pb2.ScoreRequest(scorer=self.name, images=[encode_png(im) for im in images],
                                         prompts=prompts, metadata=[json.dumps(m) for m in metadata])
        try:
            response = self._stub.Score(request, timeout=self.timeout_s)
        except grpc.RpcError as err:
            raise RewardServiceError(self._explain(err)) from None
        self.engine = f"remote:{self.address}:{response.engine}"
        return ScoreOutput(scores=np.asarray(response.scores, dtype=np.float64),
                           details=[json.loads(d) for d in response.details], counts=dict(response.counts))

    def _explain(self, err: grpc.RpcError) -> str:
        where = f"reward service for {self.name!r} at {self.address}"
        code, details = err.code(), err.details()
        if code == grpc.StatusCode.UNAVAILABLE:
            port = self.address.rsplit(":", 1)[-1]
            return (f"{where} is unavailable ({details}); start it with `flowgrpo serve-reward --scorer "
                    f"{self.name} --port {port}` or fix reward.endpoints.{self.name}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"{where} did not answer within reward.timeout_s={self.timeout_s} s"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return f"{where} rejected the request: {details}"
        return f"{where} failed with {code.name}: {details}"

    def close(self) -> None:
        self._channel.close()
