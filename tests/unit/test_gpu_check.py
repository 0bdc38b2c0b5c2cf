"""`flowgrpo gpu-check --size small`: the GPU check's code, on a tiny transformer on the
CPU, prints and writes every figure, finite; the SD3.5 Medium size builds the
published architecture (checked on the meta device, no memory)."""
import json
import math

import torch

from services.controller import cli
from services.controller.gpu_check import SD35_MEDIUM, Shapes, build_transformer

FIGURES = ["rollout_images_per_second", "rollout_peak_gib", "first_step_ratio_dev",
           "learner_samples_per_second", "learner_peak_gib", "learner_kl_samples_per_second", "learner_kl_peak_gib",
           "learner_checkpointing_samples_per_second", "learner_checkpointing_peak_gib",
           "learner_kl_checkpointing_samples_per_second", "learner_kl_checkpointing_peak_gib",
           "lora_megabytes", "lora_serialize_seconds", "lora_load_seconds", "broadcast_peak_gib"]


def test_small_gpu_check_prints_and_writes_every_figure(tmp_path, capsys):
    path = tmp_path / "gpu.json"
    assert cli.main(["gpu-check", "--size", "small", "--repeats", "1", "--json", str(path),
                     "--set", "run.num_torch_threads=1", "--set", "sample.train_steps=4"]) == 0
    out = capsys.readouterr().out
    figures = json.loads(path.read_text())
    for name in FIGURES:
        assert math.isfinite(figures[name]) and figures[name] >= 0, name
    assert figures["rollout_images_per_second"] > 0 and figures["learner_kl_samples_per_second"] > 0
    assert figures["first_step_ratio_dev"] < 1e-5  # fp32 on the CPU: the learner recomputes the rollout exactly
    for line in ("rollout", "first-step ratio deviation", "learner without KL, without gradient checkpointing",
                 "learner with KL, with gradient checkpointing", "loaded into 4 transformers"):
        assert line in out, line
    assert cli.main(["plan", "--from-gpu-check", str(path), "--gpus", "4"]) == 0
    assert "recommended:" in capsys.readouterr().out


def test_sd35_medium_is_the_published_architecture():
    """SD3.5 Medium's transformer: 2.24 B parameters, MMDiT-X (13 blocks with a second
    image self-attention), 24 heads of 64, 333 text tokens with diffusers' default T5 length."""
    from common.config import load_config
    from common.models import Precision

    shapes = Shapes.of("sd35-medium", load_config(None, ["model.max_sequence_length=256"]))
    assert shapes.tokens == 333 and shapes.resolution == 512 and shapes.transformer is SD35_MEDIUM
    transformer = build_transformer(shapes, Precision(torch.float32, torch.float32), torch.device("meta"))
    assert sum(p.numel() for p in transformer.parameters()) == 2_243_171_520
    assert sum(block.attn2 is not None for block in transformer.transformer_blocks) == 13
