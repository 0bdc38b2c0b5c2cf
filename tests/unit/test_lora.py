"""LoRA export/load: round trip, digest check, and adapters that do not fit."""
import dataclasses
import os

import pytest
import torch

from common.config import LoraConfig
from common.lora import LoraLoadError, adapter_disabled, attach_lora, export_lora, load_lora, save_diffusers_lora
from common.models import load_pipeline


def _forward(transformer):
    g = torch.Generator().manual_seed(0)
    cfg = transformer.config
    x = torch.randn(2, 16, 4, 4, generator=g)
    tokens = torch.randn(2, 5, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([500.0, 300.0]), encoder_hidden_states=tokens,
                           pooled_projections=pooled, return_dict=False)[0]


@pytest.fixture()
def pair(tiny_model_dir):
    cfg = LoraConfig(rank=4, alpha=8)
    source, target = (load_pipeline(tiny_model_dir).transformer for _ in range(2))
    params = attach_lora(source, cfg)
    attach_lora(target, cfg)
    with torch.no_grad():  # Gaussian init leaves B at zero: perturb so the adapter matters
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    return source, target


def test_round_trip_gives_equal_outputs(pair):
    source, target = pair
    assert not torch.equal(_forward(source), _forward(target))
    weights = export_lora(source, version=7)
    load_lora(target, weights)
    assert weights.version == 7
    assert torch.equal(_forward(source), _forward(target))


def test_disabled_adapter_is_the_base_model(pair, tiny_model_dir):
    source, _ = pair
    base = load_pipeline(tiny_model_dir).transformer
    with adapter_disabled(source):
        assert torch.equal(_forward(source), _forward(base))
    assert not torch.equal(_forward(source), _forward(base))


def test_corrupted_digest_fails(pair):
    source, target = pair
    weights = export_lora(source, 1)
    corrupt = dataclasses.replace(weights, data=weights.data[:-1] + bytes([weights.data[-1] ^ 1]))
    with pytest.raises(LoraLoadError, match="sha256 mismatch"):
        load_lora(target, corrupt)


@pytest.mark.parametrize("lora, message", [
    (LoraConfig(rank=4, alpha=8, target_modules=["attn.to_q"]), "missing|unexpected"),
    (LoraConfig(rank=4, alpha=8, target_modules=["ff.net.2"]), "binds to no module"),
    (LoraConfig(rank=2, alpha=4), "lora.rank"),
], ids=["other-modules", "binds-to-nothing", "wrong-rank"])
def test_adapter_that_does_not_fit_fails(tiny_model_dir, pair, lora, message):
    source, _ = pair
    other = load_pipeline(tiny_model_dir).transformer
    attach_lora(other, lora)
    with pytest.raises(LoraLoadError, match=message):
        load_lora(other, export_lora(source, 1))


def test_target_modules_that_match_nothing_fail(tiny_model_dir):
    transformer = load_pipeline(tiny_model_dir).transformer
    with pytest.raises(LoraLoadError, match=r"^lora.target_modules: \['no_such_layer'\] does not fit "
                                            r"SD3Transformer2DModel: .*not found"):
        attach_lora(transformer, LoraConfig(target_modules=["no_such_layer"]))


def test_diffusers_format_loads_into_the_stock_pipeline(pair, tiny_model_dir, tmp_path):
    source, _ = pair
    umask = os.umask(0o022)
    try:
        directory = save_diffusers_lora(export_lora(source, 3), LoraConfig(rank=4, alpha=8), tmp_path / "lora")
    finally:
        os.umask(umask)
    assert os.stat(directory / "pytorch_lora_weights.safetensors").st_mode & 0o777 == 0o644  # like any other file
    pipe = load_pipeline(tiny_model_dir)
    pipe.load_lora_weights(str(directory))
    assert torch.equal(_forward(pipe.transformer), _forward(source))
