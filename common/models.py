"""Loading the Stable Diffusion 3 pipeline, and building a tiny offline one.

Production loads SD3.5 Medium by hub id or local directory. Tests and CPU runs use
a tiny pipeline of the *same classes* (SD3Transformer2DModel with dual attention
and RMS qk-norm, a 16-channel AutoencoderKL with SD3's factor-8 downsampling, the
flow-matching Euler scheduler with shift 3, two CLIP text encoders with projection
and a T5 encoder), with random weights and tokenizers trained locally, saved with
`save_pretrained` and read back by the very loader production uses. Its VAE decoder's
weights are set to a per-pixel latent-to-RGB map rather than left random, so that
image rewards respond to the latents and GRPO's progress shows on the CPU.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

# Words the tiny tokenizers are trained on: enough that prompts of the shipped
# prompt sets split into a handful of pieces rather than single bytes.
_TOKENIZER_CORPUS = """
a an the of and with on in under over above below left right next to photo picture image
sign that says text reads written neon board poster label cover book shirt wall street
red orange yellow green blue purple pink brown black white gray colorful bright dark
one two three four five six seven eight nine ten many some
person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop
parking meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack
umbrella handbag tie suitcase frisbee skis snowboard sports ball kite baseball bat glove
skateboard surfboard tennis racket bottle wine glass cup fork knife spoon bowl banana apple
sandwich broccoli carrot hot pizza donut cake chair couch potted plant bed dining table
toilet tv laptop mouse remote keyboard cell phone microwave oven toaster sink refrigerator
clock vase scissors teddy hair drier toothbrush close-up high detailed realistic painting
""".split()


TINY_MARKER = "flowgrpo_tiny.json"
TINY_BUILDER = 2  # bump when build_tiny_pipeline changes what it builds


@dataclass(frozen=True)
class TinyPreset:
    """Sizes of a tiny SD3.5-architecture pipeline (ENVIRONMENT.md's shape rules:
    joint_attention_dim = T5 d_model = 2 x CLIP hidden; caption_projection_dim =
    heads x head_dim; pooled_projection_dim = 2 x CLIP projection)."""
    layers: int
    heads: int
    head_dim: int
    clip_hidden: int
    vae_channels: int
    # CLIP context in tokens (SD3: 77). The transformer attends jointly over the image
    # tokens, both CLIP contexts and T5's max_sequence_length tokens; at tiny sizes the
    # 77 padded CLIP tokens would be most of that sequence and of each iteration's time.
    clip_tokens: int = 16


TINY_PRESETS = {
    "s": TinyPreset(layers=2, heads=4, head_dim=8, clip_hidden=16, vae_channels=8),
    "m": TinyPreset(layers=4, heads=4, head_dim=16, clip_hidden=32, vae_channels=16),
}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class Precision:
    """How each part of the pipeline computes (`model.precision`).

    `transformer` is the dtype of the transformer's weights and of the latents it
    consumes (what rollouts store); `autocast`, when set, is the dtype its forward
    runs in under torch.autocast (accelerate's mixed precision, as the paper's
    script); `text` is the text encoders' dtype. The VAE always decodes in float32.
    """
    transformer: torch.dtype
    text: torch.dtype
    autocast: torch.dtype | None = None

    @staticmethod
    def resolve(name: str, device: torch.device) -> "Precision":
        if name == "auto":
            name = "fp16-mixed" if device.type == "cuda" else "fp32"
        if name == "fp16-mixed":
            return Precision(torch.float32, torch.float16, autocast=torch.float16)
        if name == "bf16":
            return Precision(torch.bfloat16, torch.bfloat16)
        if name == "fp32":
            return Precision(torch.float32, torch.float32)
        raise ValueError(f"model.precision: unknown precision {name!r}; choose auto, fp16-mixed, bf16 or fp32")


def quiet_libraries() -> None:
    """Workers load once and then sample for hours: no per-file progress bars, no
    per-call truncation warnings (max_sequence_length is a deliberate setting), and not
    the import-time note that transformers falls back to PIL image processors without
    torchvision (torchvision is left out on purpose). Call it before importing diffusers."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def is_hub_id(path: str) -> bool:
    """`org/name`, as on the model hub (a local path that exists takes precedence)."""
    return bool(_HUB_ID.fullmatch(path))


def load_pipeline(path: str, precision: Precision = Precision(torch.float32, torch.float32),
                  device: str | torch.device = "cpu", with_vae: bool = True, with_text_encoders: bool = True):
    """Load a StableDiffusion3Pipeline from a local directory or a hub id, frozen, in
    `precision` (the VAE in float32).

    `with_vae=False` skips the VAE and `with_text_encoders=False` the text encoders and
    tokenizers (the learner never decodes images, and reads the prompt embeddings the
    rollout computed)."""
    from diffusers import StableDiffusion3Pipeline

    quiet_libraries()
    extra = {} if with_vae else {"vae": None}
    if not with_text_encoders:
        extra.update({f"{part}{suffix}": None for part in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")})
    if not Path(path).is_dir() and not is_hub_id(path):
        raise FileNotFoundError(f"model.path: directory {path} does not exist "
                                "(build a tiny model there with `flowgrpo make-tiny-model DIR`)")
    try:
        dtypes = {"transformer": precision.transformer, "vae": torch.float32, "default": precision.text}
        pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=dtypes, **extra)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set and it is not in the local cache)" if offline else ""
        raise FileNotFoundError(f"model.path: cannot load a pipeline from {path!r}{hint}: {err}") from None
    pipe.to(device)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    if precision.autocast is not None:
        _autocast_forward(pipe.transformer, precision.autocast)
    return pipe


def _autocast_forward(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Run every forward of `module` under torch.autocast(dtype) and return float32, as
    accelerate's `prepare` does for mixed precision: the rollout, the learner's
    recomputation, its reference forward and evaluation then all compute alike."""
    forward = module.forward
    device_type = next(module.parameters()).device.type

    def autocast_forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            out = forward(*args, **kwargs)
        return tuple(o.float() if torch.is_tensor(o) else o for o in out) if isinstance(out, tuple) else out

    module.forward = autocast_forward


def build_tiny_pipeline(preset: "str | TinyPreset" = "s", seed: int = 0, workdir: str | Path | None = None,
                        tokenizers: tuple[Path, Path] | None = None):
    """A tiny SD3.5-architecture pipeline, built offline: random transformer and text
    encoders, and a VAE decoder set to a per-pixel latent-to-RGB map (see
    `_latent_preview_decoder`) so that image rewards can be learned on the CPU.

    Deterministic for (preset, seed). Tokenizers are trained on a small built-in
    corpus and written to `workdir` (a temporary directory when None), unless
    `tokenizers` names the directories of a CLIP and a T5 tokenizer to use instead."""
    import tempfile

    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                              T5EncoderModel, T5TokenizerFast)

    if not isinstance(preset, TinyPreset) and preset not in TINY_PRESETS:
        raise ValueError(f"model.tiny_preset: unknown preset {preset!r}; choose one of {sorted(TINY_PRESETS)}")
    p = preset if isinstance(preset, TinyPreset) else TINY_PRESETS[preset]
    workdir = Path(workdir or tempfile.mkdtemp(prefix="flowgrpo-tok-"))
    clip_dir, t5_dir = tokenizers or _train_tokenizers(workdir)
    clip_tok = CLIPTokenizer.from_pretrained(clip_dir, model_max_length=p.clip_tokens)
    t5_tok = T5TokenizerFast.from_pretrained(t5_dir, model_max_length=512)

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16,
        num_layers=p.layers, attention_head_dim=p.head_dim, num_attention_heads=p.heads,
        joint_attention_dim=2 * p.clip_hidden, caption_projection_dim=p.heads * p.head_dim,
        pooled_projection_dim=2 * p.clip_hidden, pos_embed_max_size=64,
        dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    c = p.vae_channels
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(c,) * 4, layers_per_block=1, norm_num_groups=1,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )
    _latent_preview_decoder(vae, torch.Generator().manual_seed(seed))

    def clip_encoder():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=p.clip_hidden, intermediate_size=2 * p.clip_hidden,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=p.clip_tokens,
            projection_dim=p.clip_hidden, bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))

    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=2 * p.clip_hidden, d_kv=8, d_ff=2 * p.clip_hidden,
        num_layers=1, num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1))
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=clip_encoder(), tokenizer=clip_tok, text_encoder_2=clip_encoder(), tokenizer_2=clip_tok,
        text_encoder_3=t5, tokenizer_3=t5_tok,
    )


def _latent_preview_decoder(vae, generator: torch.Generator, reference: float = 8.0, pixel_gain: float = 0.45,
                            silu_centre: float = 3.0) -> None:
    """Set the VAE decoder's weights, in place, so that it decodes each latent pixel to
    an 8 x 8 block of one colour, an affine function of the 16 latent channels: what
    SD3's latent previews do with a fixed 16 x 3 matrix. The classes and the config stay
    AutoencoderKL's; only the weights are chosen.

    Why: a randomly initialised decoder hardly depends on its latents. Its GroupNorms
    remove every shift of a channel's mean, so the brightness of decoded images varies
    by about 0.001 across random latents, and a policy cannot move image rewards
    (brightness, colour, compressibility) far enough to show learning.

    How, with `norm_num_groups=1` (GroupNorm over all channels at once):
      - every resnet's second convolution and the mid-block attention's output
        projection are zero, so those blocks are identities; the upsamplers' 3 x 3
        convolutions are identity kernels, so upsampling is nearest-neighbour;
      - conv_in (centre tap only) maps the 16 latent channels to c - 2 channels with a
        random matrix, and sets the last two channels to the constants +-`reference`;
      - the final GroupNorm then normalises by a spread that those two constant
        channels dominate, so it keeps each signal channel's mean and scale (to a few per cent)
        instead of removing them; its affine rescales them back and centres them at
        `silu_centre`, where SiLU is close to linear over +-2;
      - conv_out (centre tap) mixes the signal channels into RGB with a random matrix
        scaled so that pixels spread about as much as before (std ~0.15 of the range).
    The encoder is left random: Flow-GRPO never encodes images.
    """
    import math

    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    dec = vae.decoder
    channels, latent_channels = dec.conv_in.out_channels, dec.conv_in.in_channels
    signal = channels - 2
    if dec.conv_norm_out.num_groups != 1 or signal < 1:
        raise ValueError("the preview decoder needs norm_num_groups=1 and at least 3 decoder channels")
    with torch.no_grad():
        for module in dec.modules():
            if isinstance(module, ResnetBlock2D):
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
            elif isinstance(module, Attention):
                module.to_out[0].weight.zero_()
                module.to_out[0].bias.zero_()
            elif isinstance(module, Upsample2D):
                module.conv.weight.zero_()
                module.conv.bias.zero_()
                module.conv.weight[:, :, 1, 1] = torch.eye(channels)
        mix_in = torch.randn(signal, latent_channels, generator=generator) / math.sqrt(latent_channels)
        dec.conv_in.weight.zero_()
        dec.conv_in.bias.zero_()
        dec.conv_in.weight[:signal, :, 1, 1] = mix_in
        dec.conv_in.bias[signal], dec.conv_in.bias[signal + 1] = reference, -reference
        dec.conv_norm_out.weight.fill_(reference * math.sqrt(2 / channels))  # the spread the constants set
        dec.conv_norm_out.bias.fill_(silu_centre)
        mix_out = torch.randn(3, signal, generator=generator) * pixel_gain / math.sqrt(signal)
        dec.conv_out.weight.zero_()
        dec.conv_out.weight[:, :signal, 1, 1] = mix_out
        dec.conv_out.bias.copy_(-mix_out.sum(dim=1) * silu_centre / (1 + math.exp(-silu_centre)))


def make_tiny_model(directory: str | Path, preset: str = "s", seed: int = 0) -> Path:
    """Build the tiny pipeline and save it where `load_pipeline` reads it, with a
    `TINY_MARKER` file naming what was built (see `tiny_model_is_current`)."""
    import json
    import tempfile

    directory = Path(directory)
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="flowgrpo-tok-") as tmp:
        pipe = build_tiny_pipeline(preset, seed, workdir=tmp)
        pipe.save_pretrained(directory)
    (directory / TINY_MARKER).write_text(json.dumps({"preset": preset, "seed": seed, "builder": TINY_BUILDER}))
    return directory


def tiny_model_is_current(directory: str | Path, preset: str, seed: int = 0) -> bool:
    """Whether `directory` holds the tiny model this code builds for (preset, seed):
    a cached model from an older builder (say, before the preview decoder) is rebuilt."""
    import json

    marker = Path(directory) / TINY_MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()) == {"preset": preset, "seed": seed, "builder": TINY_BUILDER}


def _train_tokenizers(workdir: Path) -> tuple[Path, Path]:
    """Train a byte-level BPE (CLIP style, every byte in the vocabulary, `</w>` word
    ends) and a Unigram model (T5 style: <pad>=0, </s>=1, <unk>=2) on the corpus."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    clip_dir, t5_dir = workdir / "clip", workdir / "t5"
    clip_dir.mkdir(parents=True, exist_ok=True)
    t5_dir.mkdir(parents=True, exist_ok=True)
    corpus = [" ".join(_TOKENIZER_CORPUS)] * 4

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>",
        show_progress=False))
    bpe.model.save(str(clip_dir))

    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    unigram.train_from_iterator(corpus, trainers.UnigramTrainer(
        vocab_size=512, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    unigram.save(str(t5_dir / "tokenizer.json"))
    return clip_dir, t5_dir
