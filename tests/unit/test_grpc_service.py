"""The gRPC reward service on 127.0.0.1 with an ephemeral port: same scores as in
process, INVALID_ARGUMENT for each kind of bad request, a clear error once stopped, a
busy port refused, and `flowgrpo serve-reward`'s errors as one plain line."""
import io
import json
import os
import signal
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from common.config import RewardConfig
from common.wire import make_rollout_batch
from services.reward import worker as worker_module
from services.controller import cli
from services.reward import grpc_service
from services.reward.grpc_service import PortInUseError, serve
from services.reward.image_rewards import JpegCompressibility
from services.reward.remote import RemoteScorer, RewardServiceError
from services.reward.rpc import encode_png, generated
from services.reward.scorers import build_scorer
from services.reward.worker import RewardWorker

SCORER = "jpeg_compressibility"
RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
PROMPTS = ["a", "b", "c", "d"]
METADATA = [{"i": i} for i in range(4)]


@pytest.fixture(scope="module")
def service():
    server, port = serve(SCORER, RewardConfig(weights={SCORER: 1.0}), host="127.0.0.1", port=0,
                         max_message_bytes=8 * 2**20)
    yield port
    server.stop(grace=None)


def remote_config(port, **kwargs):
    return RewardConfig(weights={SCORER: 1.0}, endpoints={SCORER: f"grpc://127.0.0.1:{port}"}, **kwargs)


@pytest.fixture(scope="module")
def raw_client(service):
    pb2, pb2_grpc = generated()
    channel = grpc.insecure_channel(f"127.0.0.1:{service}")
    yield pb2, pb2_grpc.RewardStub(channel)
    channel.close()


def test_remote_scores_equal_in_process_scores(service):
    remote = build_scorer(SCORER, remote_config(service))
    assert isinstance(remote, RemoteScorer)
    local = JpegCompressibility(RewardConfig())
    got, want = remote.score(IMAGES, PROMPTS, METADATA), local.score(IMAGES, PROMPTS, METADATA)
    np.testing.assert_array_equal(got.scores, want.scores)
    assert got.details == want.details
    assert remote.engine == f"remote:grpc://127.0.0.1:{service}:{local.engine}"
    remote.close()


def test_worker_with_an_endpoint_matches_the_local_worker(service):
    n = 4
    batch = make_rollout_batch(prompts=PROMPTS, prompt_index=[0, 0, 1, 1], metadata=METADATA, images=IMAGES,
                               latents=np.zeros((n, 2, 1, 1, 1), np.float32), timesteps=np.ones((n, 1)),
                               log_probs=np.zeros((n, 1)), policy_version=0, rollout_worker="w")
    remote, _ = RewardWorker(remote_config(service)).score(batch)
    local, _ = RewardWorker(RewardConfig(weights={SCORER: 1.0})).score(batch)
    assert remote.equals(local)


def test_a_batch_of_512px_images_fits_the_message_limits(service):
    images = RNG.integers(0, 256, (8, 512, 512, 3), dtype=np.uint8)
    assert sum(len(encode_png(im)) for im in images) > 4 * 2**20  # gRPC's default cap
    out = build_scorer(SCORER, remote_config(service)).score(images, [""] * 8, [{}] * 8)
    assert out.scores.shape == (8,)


def test_info(raw_client):
    pb2, client = raw_client
    info = client.Info(pb2.InfoRequest())
    assert (info.scorer, info.engine) == (SCORER, JpegCompressibility(RewardConfig()).engine)


def jpeg_bytes(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")
    return buffer.getvalue()


PNG = encode_png(IMAGES[0])


@pytest.mark.parametrize("request_fields, words", [
    (dict(scorer=SCORER, images=[PNG, PNG], prompts=["a"], metadata=["{}", "{}"]), "2 images, 1 prompts"),
    (dict(scorer=SCORER, images=[PNG], prompts=["a"], metadata=[]), "1 images, 1 prompts and 0 metadata"),
    (dict(scorer=SCORER, images=[b"not an image"], prompts=["a"], metadata=["{}"]), "image 0 is not a decodable PNG"),
    (dict(scorer=SCORER, images=[jpeg_bytes(IMAGES[0])], prompts=["a"], metadata=["{}"]), "not a decodable PNG"),
    (dict(scorer=SCORER, images=[PNG], prompts=["a"], metadata=["{bad"]), "metadata 0 is not valid JSON"),
    (dict(scorer=SCORER, images=[PNG], prompts=["a"], metadata=["[1]"]), "not a JSON object"),
    (dict(scorer=SCORER, images=[b"x" * (9 * 2**20)], prompts=["a"], metadata=["{}"]), "exceeds the service's limit"),
    (dict(scorer="ocr", images=[PNG], prompts=["a"], metadata=["{}"]), "unknown scorer 'ocr'"),
])
def test_bad_requests_are_invalid_argument(raw_client, request_fields, words):
    pb2, client = raw_client
    with pytest.raises(grpc.RpcError) as err:
        client.Score(pb2.ScoreRequest(**request_fields), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()


def test_a_stopped_service_gives_a_clear_error_after_the_retries(monkeypatch):
    monkeypatch.setattr(worker_module, "RETRY_BACKOFF_S", 0.0)
    server, port = serve(SCORER, RewardConfig(weights={SCORER: 1.0}))
    remote = build_scorer(SCORER, remote_config(port))
    assert remote.score(IMAGES[:1], ["a"], [{}]).scores.shape == (1,)
    server.stop(grace=None).wait()
    with pytest.raises(RewardServiceError, match=rf"grpc://127.0.0.1:{port} is unavailable .*serve-reward --scorer {SCORER}"):
        remote.score(IMAGES[:1], ["a"], [{}])
    worker = RewardWorker(remote_config(port, retries=1))
    batch = make_rollout_batch(prompts=["a"], prompt_index=[7], metadata=[{}], images=IMAGES[:1],
                               latents=np.zeros((1, 2, 1, 1, 1), np.float32), timesteps=np.ones((1, 1)),
                               log_probs=np.zeros((1, 1)), policy_version=0, rollout_worker="w")
    scored, failures = worker.score(batch)
    assert scored.num_rows == 0
    assert failures[0].prompt_index == 7 and "failed 2 time(s)" in failures[0].reason
    assert "is unavailable" in failures[0].reason


def test_run_server_serves_until_sigterm():
    code = ("from common.config import RewardConfig\n"
            "from services.reward.grpc_service import run_server\n"
            "run_server('brightness', RewardConfig(weights={'brightness': 1.0}))\n")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        line = process.stdout.readline()
        assert line.startswith("reward service brightness: serving on grpc://127.0.0.1:")
        address = line.split()[-1]
        out = build_scorer("brightness", RewardConfig(weights={"brightness": 1.0}, endpoints={"brightness": address}))
        assert out.score(np.zeros((1, 8, 8, 3), np.uint8), ["a"], [json.loads("{}")]).scores.tolist() == [0.0]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_a_busy_port_is_refused_before_the_scorer_loads(service, monkeypatch):
    monkeypatch.setattr(grpc_service, "local_scorer", lambda *a: pytest.fail("the scorer was built"))
    with pytest.raises(PortInUseError, match=rf"cannot listen on 127.0.0.1:{service} .*choose another --port"):
        serve(SCORER, RewardConfig(weights={SCORER: 1.0}), port=service)


def test_a_port_shared_by_gRPC_reuseport_is_refused_too(monkeypatch):
    """gRPC servers set SO_REUSEPORT by default, so a second one could bind a served port;
    ours turns it off, so even past the socket check the bind fails."""
    other = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        monkeypatch.setattr(grpc_service, "_check_port_free", lambda host, port: None)
        with pytest.raises(PortInUseError, match=rf"127.0.0.1:{port}; is the port in use"):
            serve(SCORER, RewardConfig(weights={SCORER: 1.0}), port=port)
    finally:
        other.stop(grace=None)


def test_serve_reward_errors_are_one_plain_line(service, capsys):
    assert cli.main(["serve-reward", "--scorer", "nope"]) == 2
    err = capsys.readouterr().err
    assert err == ("flowgrpo: error: --scorer: unknown scorer 'nope'; known scorers: ocr, geneval, pickscore, "
                   "aesthetic, jpeg_compressibility, brightness\n")
    assert cli.main(["serve-reward", "--scorer", SCORER, "--port", str(service)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"flowgrpo: error: serve-reward: cannot listen on 127.0.0.1:{service}") and err.count("\n") == 1
