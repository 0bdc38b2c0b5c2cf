"""The tiny SD3.5-architecture pipeline: offline, saved and loaded by the production loader."""
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from common.models import build_tiny_pipeline, load_pipeline, make_tiny_model


def _images(pipe, seed):
    return pipe("a red cat", num_inference_steps=3, height=32, width=32, max_sequence_length=16,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


def test_tiny_model_has_the_sd35_architecture(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert pipe.transformer.config.dual_attention_layers == [0] or pipe.transformer.config.dual_attention_layers == (0,)
    assert pipe.transformer.config.qk_norm == "rms_norm"
    assert pipe.vae_scale_factor == 8
    assert pipe.scheduler.config.shift == 3.0
    assert pipe.text_encoder_3 is not None and pipe.tokenizer_3 is not None
    assert not any(p.requires_grad for p in pipe.transformer.parameters())


def test_saved_model_reloads_to_bitwise_equal_images(tiny_model_dir):
    first, second = load_pipeline(tiny_model_dir), load_pipeline(tiny_model_dir)
    a, b = _images(first, seed=3), _images(second, seed=3)
    assert a.shape == (1, 32, 32, 3)
    assert (a == b).all()
    assert not (a == _images(first, seed=4)).all()


def test_build_is_deterministic_for_a_seed(tmp_path):
    a = build_tiny_pipeline("s", seed=1, workdir=tmp_path / "a").transformer.state_dict()
    b = build_tiny_pipeline("s", seed=1, workdir=tmp_path / "b").transformer.state_dict()
    c = build_tiny_pipeline("s", seed=2, workdir=tmp_path / "c").transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_without_vae_for_the_learner(tiny_model_dir):
    assert load_pipeline(tiny_model_dir, with_vae=False).vae is None


def test_missing_paths_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path: directory .* does not exist"):
        load_pipeline(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        load_pipeline("some-org/some-model")
    with pytest.raises(ValueError, match="tiny_preset"):
        make_tiny_model(tmp_path / "x", preset="xl")


def test_cached_tiny_model_is_rebuilt_when_stale(tmp_path):
    from common.models import TINY_MARKER, tiny_model_is_current

    directory = make_tiny_model(tmp_path / "tiny", preset="s", seed=0)
    assert tiny_model_is_current(directory, "s", 0)
    assert not tiny_model_is_current(directory, "m", 0)
    (directory / TINY_MARKER).write_text('{"preset": "s", "seed": 0, "builder": 1}')
    assert not tiny_model_is_current(directory, "s", 0)
