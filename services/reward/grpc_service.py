"""The gRPC reward service: one scorer in its own process (or Python environment),
used by reward workers through reward.endpoints as if it were in process.

    flowgrpo serve-reward --scorer ocr --config deploy/configs/ocr.yaml --port 50051
    # then, in the training config:  reward.endpoints: {ocr: "grpc://127.0.0.1:50051"}

The service builds the scorer from the config's reward section (engine, model paths,
device), ignoring reward.endpoints. Requests carry PNG images, prompts and JSON
metadata (no pickle). Bad requests get INVALID_ARGUMENT saying what is wrong: an image
count that differs from the prompt or metadata count, an image that is not a decodable
PNG, metadata that is not a JSON object, a request over the size limit, a scorer name
the service does not run. A scorer error is INTERNAL with its message. Calls are
scored one at a time (models are not assumed thread-safe).

It binds 127.0.0.1 unless told otherwise; the channel has no TLS or authentication.
The port is bound before the scorer loads and never shared: gRPC's default SO_REUSEPORT
would let a second service bind a port that one already serves and split the calls
between them, so it is off, and a busy port fails at once (PortInUseError).
"""
from __future__ import annotations

import json
import logging
import signal
import socket
import threading
from concurrent import futures

import grpc

from common.config import RewardConfig
from services.reward.base import Scorer
from services.reward.rpc import MAX_MESSAGE_BYTES, channel_options, decode_png, generated
from services.reward.scorers import local_scorer

logger = logging.getLogger(__name__)


class PortInUseError(OSError):
    """The service's address is taken (another service, or any other program)."""


def _check_port_free(host: str, port: int) -> None:
    """Raise PortInUseError when host:port cannot be bound (checked with a plain socket
    first, so the user gets one line instead of gRPC's own error log)."""
    if port == 0:
        return
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as err:
            raise PortInUseError(f"serve-reward: cannot listen on {host}:{port} ({err.strerror}); another reward "
                                 f"service may be serving there: stop it or choose another --port") from None


def _servicer(scorer: Scorer, max_message_bytes: int):
    pb2, pb2_grpc = generated()
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    class RewardServicer(pb2_grpc.RewardServicer):
        lock = threading.Lock()

        def Info(self, request, context):
            return pb2.InfoResponse(scorer=scorer.name, engine=scorer.engine)

        def Score(self, request, context):
            if request.scorer != scorer.name:
                context.abort(invalid, f"unknown scorer {request.scorer!r}: this service runs {scorer.name!r}")
            size = request.ByteSize()
            if size > max_message_bytes:
                context.abort(invalid, f"request of {size} bytes exceeds the service's limit of {max_message_bytes} "
                                       f"bytes; send fewer images per call (reward.batch_size)")
            n = len(request.images)
            if len(request.prompts) != n or len(request.metadata) != n:
                context.abort(invalid, f"{n} images, {len(request.prompts)} prompts and {len(request.metadata)} "
                                       f"metadata: send one prompt and one metadata JSON per image")
            images, metadata = [], []
            for i, data in enumerate(request.images):
                try:
                    images.append(decode_png(data))
                except Exception as err:
                    context.abort(invalid, f"image {i} is not a decodable PNG: {err}")
            for i, text in enumerate(request.metadata):
                try:
                    metadata.append(json.loads(text))
                except ValueError as err:
                    context.abort(invalid, f"metadata {i} is not valid JSON: {err}")
                if not isinstance(metadata[-1], dict):
                    context.abort(invalid, f"metadata {i} is not a JSON object: {text[:80]!r}")
            try:
                with self.lock:
                    out = scorer.score(images, list(request.prompts), metadata)
            except Exception as err:
                logger.exception("scorer %s failed", scorer.name)
                context.abort(grpc.StatusCode.INTERNAL, f"scorer {scorer.name} failed: {type(err).__name__}: {err}")
            return pb2.ScoreResponse(scores=out.scores.tolist(), details=[json.dumps(d) for d in out.details],
                                     counts=out.counts, engine=scorer.engine)

    return RewardServicer(), pb2_grpc


def serve(scorer_name: str, config: RewardConfig, host: str = "127.0.0.1", port: int = 0,
          max_message_bytes: int = MAX_MESSAGE_BYTES) -> tuple[grpc.Server, int]:
    """Bind host:port (0: an ephemeral port), build the scorer, start serving it and
    return (server, bound port). Stop it with server.stop(grace)."""
    _check_port_free(host, port)
    options = channel_options(max_message_bytes) + [("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:  # taken between the check and here
        bound = 0
    if bound == 0:
        raise PortInUseError(f"serve-reward: cannot listen on {address}; is the port in use? choose another --port")
    scorer = local_scorer(scorer_name, config)
    servicer, pb2_grpc = _servicer(scorer, max_message_bytes)
    pb2_grpc.add_RewardServicer_to_server(servicer, server)
    server.start()
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("reward service listens on %s without TLS or authentication: anyone who can reach it "
                       "can use the scorer", host)
    return server, bound


def run_server(scorer_name: str, config: RewardConfig, host: str = "127.0.0.1", port: int = 0) -> None:
    """Serve until SIGINT or SIGTERM (the `flowgrpo serve-reward` command). Prints the
    address (one line, `grpc://host:port`) once the scorer is loaded and serving."""
    server, bound = serve(scorer_name, config, host, port)
    stopped = threading.Event()

    def stop(signum, frame):
        if not stopped.is_set():
            stopped.set()
            server.stop(grace=5)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"reward service {scorer_name}: serving on grpc://{host}:{bound}", flush=True)
    server.wait_for_termination()
