"""gRPC plumbing shared by the reward service and its client: Python code generated
from flowgrpo_reward.proto, message limits, and PNG coding of images.

The *_pb2 modules are generated with grpc_tools.protoc at first use, into a cache
directory keyed by the proto's content and the installed grpcio-tools and protobuf
versions ($FLOWGRPO_CACHE, else $XDG_CACHE_HOME or ~/.cache, under flowgrpo/grpc/), so
the generated code always matches the runtime that imports it (generated code refuses
a grpcio older than the grpcio-tools that made it) and never goes into git.

Limits: gRPC's default cap of 4 MB is below one batch of 512 px PNGs (8 noisy images
are about 6 MB). Requests up to MAX_MESSAGE_BYTES are served; the handler answers
INVALID_ARGUMENT above that; the transport refuses (RESOURCE_EXHAUSTED) anything above
twice that, so no client can make the service buffer gigabytes.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import os
import shutil
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

PROTO = Path(__file__).with_name("flowgrpo_reward.proto")
MAX_MESSAGE_BYTES = 256 * 2**20


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Send/receive caps for a channel or server (transport limit: twice the served size)."""
    limit = 2 * max_message_bytes
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def encode_png(image: np.ndarray) -> bytes:
    """Lossless; compression level 1 because level 6 costs several times the encode
    time for a few percent fewer bytes on loopback or a cluster network."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """uint8 RGB [H, W, 3]; raises (PIL's errors) on anything that is not a readable PNG."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        return np.asarray(image.convert("RGB"))


def _cache_root() -> Path:
    base = os.environ.get("FLOWGRPO_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    root = Path(base) / "flowgrpo" / "grpc"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = Path(tempfile.gettempdir()) / f"flowgrpo-grpc-{os.getuid()}"
        root.mkdir(parents=True, exist_ok=True)
    return root


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # the _grpc module imports the _pb2 one by this name
    spec.loader.exec_module(module)
    return module


@functools.cache
def generated() -> tuple[ModuleType, ModuleType]:
    """(flowgrpo_reward_pb2, flowgrpo_reward_pb2_grpc), generating them if needed."""
    from grpc_tools import protoc

    versions = f"grpcio-tools {version('grpcio-tools')}, protobuf {version('protobuf')}"
    key = hashlib.sha256(PROTO.read_bytes() + versions.encode()).hexdigest()[:16]
    target = _cache_root() / key
    stem = PROTO.stem
    if not (target / f"{stem}_pb2_grpc.py").exists():
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{key}.tmp"))
        status = protoc.main(["grpc_tools.protoc", f"-I{PROTO.parent}", f"--python_out={staging}",
                              f"--grpc_python_out={staging}", str(PROTO)])
        if status != 0:
            raise RuntimeError(f"grpc_tools.protoc failed ({status}) on {PROTO}; see the message above")
        try:
            staging.rename(target)  # atomic: a concurrent process either wins or finds it done
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not (target / f"{stem}_pb2_grpc.py").exists():
                raise
    return _import(target / f"{stem}_pb2.py"), _import(target / f"{stem}_pb2_grpc.py")
