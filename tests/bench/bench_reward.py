"""Throughput of scorers on this machine, in process and through the gRPC service.

    python -m tests.bench.bench_reward [--scorers ocr pickscore ...] [--config run.yaml]
                                       [--set KEY=VALUE ...] [--tiny] [--batch 8] [--size 512]

(from the repository root, which holds the tests.helpers it imports)

Scores batches of `--batch` images of `--size` px (black words rendered in DejaVuSans on
white, with an OCR-style quoted prompt and GenEval metadata, so every scorer does its
real work) through a RewardWorker, as training does, after one warm-up batch, and
prints images/s per scorer. With --grpc it also serves each scorer on 127.0.0.1 and
reports the round trip of one batch through the service (PNG encoding, transfer,
decoding) against the in-process call.
--tiny points geneval, pickscore and aesthetic at tiny random models built in a
temporary directory: their throughput is then the tiny models', not the production ones'. A
scorer whose model cannot be loaded here is reported as not measured.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from common.config import RewardConfig, load_config
from common.models import quiet_libraries
from common.wire import make_rollout_batch
from services.reward.grpc_service import serve
from services.reward.worker import RewardWorker
from tests.helpers.tiny_rewards import make_tiny_aesthetic_head, make_tiny_clip, make_tiny_mask2former

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
WORDS = ("Hello World", "Forever Yours", "NASA 2049", "Open Late")
METADATA = {"tag": "colors", "include": [{"class": "bowl", "count": 1, "color": "red"}]}


def sample_batch(n: int, size: int) -> pa.RecordBatch:
    try:
        font = ImageFont.truetype(FONT, size // 12)
    except OSError:
        font = ImageFont.load_default()
    images, prompts = [], []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        image = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(image).text((size // 16, size // 2), word, fill="black", font=font)
        images.append(np.asarray(image))
        prompts.append(f'a photo of a sign that says "{word}"')
    return make_rollout_batch(prompts=prompts, prompt_index=list(range(n)), metadata=[METADATA] * n,
                              images=np.stack(images), latents=np.zeros((n, 2, 1, 1, 1), np.float32),
                              timesteps=np.ones((n, 1)), log_probs=np.zeros((n, 1)), policy_version=0,
                              rollout_worker="bench")


def timed(worker: RewardWorker, batch: pa.RecordBatch, repeats: int) -> float:
    """Mean seconds per batch after one warm-up call."""
    worker.score(batch)
    started = time.perf_counter()
    for _ in range(repeats):
        _, failures = worker.score(batch)
        if failures:
            raise RuntimeError(f"bench: {failures[0].scorer} failed: {failures[0].reason}")
    return (time.perf_counter() - started) / repeats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scorers", nargs="+", default=list(RewardConfig.SCORER_NAMES))
    parser.add_argument("--config", help="YAML config whose reward section configures the scorers")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tiny", action="store_true", help="tiny random geneval, pickscore and aesthetic models (offline)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grpc", action="store_true", help="also time each scorer through a local gRPC service")
    args = parser.parse_args(argv)
    quiet_libraries()

    reward = load_config(args.config, args.overrides).reward
    with tempfile.TemporaryDirectory(prefix="flowgrpo-bench-") as root:
        if args.tiny:
            clip, detector = str(make_tiny_clip(f"{root}/clip")), str(make_tiny_mask2former(f"{root}/detector"))
            head = str(make_tiny_aesthetic_head(f"{root}/aesthetic.pth"))
            reward = replace(reward, geneval=replace(reward.geneval, detector=detector, clip=clip),
                             pickscore=replace(reward.pickscore, processor=clip, model=clip),
                             aesthetic=replace(reward.aesthetic, clip=clip, head=head))
        batch = sample_batch(args.batch, args.size)
        for name in args.scorers:
            try:
                line = bench_one(name, reward, batch, args.repeats, args.grpc)
            except Exception as err:  # a model that is not on this machine: say so, go on with the others
                line = f"{name:22s} not measured: {type(err).__name__}: {str(err).splitlines()[0]}"
            print(line, flush=True)


def bench_one(name: str, reward, batch: pa.RecordBatch, repeats: int, grpc: bool) -> str:
    alone = replace(reward, weights={name: 1.0}, endpoints={}, batch_size=batch.num_rows)
    worker = RewardWorker(alone)
    seconds = timed(worker, batch, repeats)
    line = f"{name:22s} {batch.num_rows / seconds:8.2f} images/s  {seconds * 1000:8.1f} ms/batch  [{worker.engines()[name]}]"
    if grpc:
        server, port = serve(name, alone)
        remote = RewardWorker(replace(alone, endpoints={name: f"grpc://127.0.0.1:{port}"}))
        remote_seconds = timed(remote, batch, repeats)
        line += f"  gRPC {remote_seconds * 1000:8.1f} ms/batch (+{(remote_seconds - seconds) * 1000:.1f} ms)"
        remote.scorers[name].close()
        server.stop(grace=None)
    return line

if __name__ == "__main__":
    main()
