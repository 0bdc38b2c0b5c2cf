"""Pretraining the toy-world model (`flowgrpo pretrain-toy OUT_DIR`): a tiny pipeline of
the SD3.5 classes taught the toy world's scenes (common.toy_world) with SD3's
flow-matching objective, on the CPU, so that Flow-GRPO has a prompt-following but
imperfect base model to improve.

How it is imperfect: its captions. A tag's MISCAPTION_RATE of the scenes it learns from
misdescribe their caption in that tag's way (common.toy_world.miscaptioned: another
count, relation or colour, colours swapped), as web captions misstate the number,
places and colours of what a picture shows far more often than what it shows. The
model learns each tag's words and composition, and follows them only as often as its
captions did: errors of choice between scenes it can draw, which is what Flow-GRPO's
reward can correct. Two things made composition learnable at all (measured with
tests/bench/bench_toy_knowledge.py, docs/toy_world.md): text encoders trained as
CLIP is (common.toy_clip; random ones give a pooled embedding close to a bag of words,
and colour binding and relations stayed at chance), and a background far from every
colour with position scenes that read one relation only (common.toy_world; on mid grey a
relation's layout was never learned).

What it sees: scenes of every prompt of the world, test split included, as SD3.5's
pretraining saw the words and compositions of GenEval's prompts. The split is RL's:
Flow-GRPO trains on the training prompts and is evaluated on test prompts it never
trained on (a model that had never seen "three blocks" drew bars for it, so the test
split measured what pretraining missed, not what RL did).

The pipeline
  - text encoders: the tiny ones of common.models (two CLIP with projection and a T5);
    tokenizers in which each toy word is one token. Each CLIP is first trained with
    CLIP's contrastive objective against a small scene encoder (common.toy_clip,
    `clip_steps`), then frozen with the T5, which stays random.
  - transformer: SD3Transformer2DModel, 4 layers of 4 heads x 32, dual attention in the
    first and RMS qk-norm (SD3.5's), patch 2 on an 8 x 8 latent: 16 image tokens, one a
    cell of the world, each drawing its object's 2 x 2 sub-cell pattern alone.
  - VAE: AutoencoderKL with four blocks (factor 8: 64 px images from 8 x 8 latents) and
    4 latent channels (SD3.5's has 16; fewer dimensions of exploration noise, module doc
    of common.toy_world), whose decoder is the per-pixel latent-to-colour map of common.models, with a gain
    that makes saturated colours reachable, and a scaling_factor that gives the scenes'
    latents unit variance. A scene's latent puts at each sub-cell the
    latent that decodes to that sub-cell's colour (`palette_latents`, solved once by Newton
    steps on the real decoder), so rendered scenes are exactly decodable latents.

The objective (SD3, rectified flow): x_t = (1 - t) x_0 + t e with e ~ N(0, I) and
t = a u / (1 + (a - 1) u), u = sigmoid(n), n ~ N(0, 1): logit-normal, shifted by the
scheduler's shift a = 3 (SD3's timestep shift), so that training sees the noise levels
the sampler spends its steps on (with a = 1, t > 0.9 is drawn 1.4 % of the time, yet a
quarter of the sampler's steps lie there, where the layout of a scene is decided, and
the model drew scattered cells); the transformer, given t x 1000, predicts
v = e - x_0; loss = mean (v_pred - v)^2. A tenth of the captions are empty (for
classifier-free guidance). AdamW with linear warm-up and cosine decay; the weights saved
are an exponential moving average of the trained ones, with decay
min((1 + step) / (10 + step), EMA_DECAY) (the learner's EMA warm-up).

Deterministic for a seed at a fixed number of torch threads.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from common.denoising import encode_prompts
from common.models import TinyPreset
from common.prompts import GENEVAL_TAGS
from common.toy_clip import train_clip_encoder
from common.toy_world import (BACKGROUND, GRID, LATENT, MISCAPTION_RATE, PALETTE, SUB, all_prompts, cell_colors,
                              pretraining_scene_metadata, sample_scene)

MARKER = "flowgrpo_toy.json"
LATENT_CHANNELS = 4           # SD3.5's VAE has 16 (module doc)
MAX_SEQUENCE_LENGTH = 16      # T5 tokens: the longest toy prompt takes 11 (one a word, and </s>)
# The text side of the tiny pipeline (its transformer and VAE are replaced here): CLIP's
# context of 16 tokens holds the longest toy prompt (12 with its start and end).
TEXT_PRESET = TinyPreset(layers=4, heads=4, head_dim=32, clip_hidden=32, vae_channels=8, clip_tokens=16)
EMA_DECAY = 0.999
PIXEL_GAIN = 4.0       # decoder output gain: palette latents of norm 4 or less


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 3000
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup: int = 200
    empty_prompt_fraction: float = 0.1
    seed: int = 0
    save_every: int = 0    # also save the EMA weights every this many steps (0: only at the end)
    clip_steps: int = 3000  # contrastive steps of each CLIP text encoder first (common.toy_clip)


def toy_words() -> list[str]:
    """Every word of every toy prompt, for the tokenizers."""
    return sorted({w for p in all_prompts() for w in p["prompt"].split()})


def _bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges (CLIP style, `</w>` ends the word) until every word is one symbol:
    always the most frequent adjacent pair, ties broken by the pair's spelling, so the
    result is the same on every run (the tokenizers library breaks ties in hash order)."""
    symbols = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for word in symbols:
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for i, word in enumerate(symbols):
            out, j = [], 0
            while j < len(word):
                if j + 1 < len(word) and (word[j], word[j + 1]) == best:
                    out.append(word[j] + word[j + 1])
                    j += 2
                else:
                    out.append(word[j])
                    j += 1
            symbols[i] = out


def write_toy_tokenizers(workdir: Path) -> tuple[Path, Path]:
    """A CLIP tokenizer (byte-level BPE) and a T5 tokenizer (Unigram) in which every toy
    word is one token, built without training so that they are the same on every run."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import CLIPTokenizer, T5TokenizerFast

    words = toy_words()
    clip_dir, t5_dir = workdir / "clip", workdir / "t5"
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _bpe_merges(words)
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens + ["<|startoftext|>", "<|endoftext|>"]))}
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_PRESET.clip_tokens).save_pretrained(clip_dir)

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    pieces += [("\u2581" + w, -1.0) for w in words] + [(c, -10.0) for c in sorted(set("".join(words)))]
    unigram = Tokenizer(models.Unigram(pieces, unk_id=2))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    t5_dir.mkdir(parents=True, exist_ok=True)
    unigram.save(str(t5_dir / "tokenizer.json"))
    T5TokenizerFast.from_pretrained(t5_dir).save_pretrained(t5_dir)
    return clip_dir, t5_dir


def build_toy_pipeline(seed: int = 0):
    """The untrained toy pipeline (module doc), deterministic for `seed`."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    from common.models import _latent_preview_decoder, build_tiny_pipeline

    with tempfile.TemporaryDirectory(prefix="flowgrpo-toy-tok-") as tmp:
        pipe = build_tiny_pipeline(TEXT_PRESET, seed, workdir=tmp, tokenizers=write_toy_tokenizers(Path(tmp)))
    text_dim = 2 * TEXT_PRESET.clip_hidden
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT, patch_size=SUB, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=4, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=text_dim,
        caption_projection_dim=128, pooled_projection_dim=text_dim, pos_embed_max_size=GRID,
        dual_attention_layers=(0,), qk_norm="rms_norm")
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8,) * 4, layers_per_block=1, norm_num_groups=1,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    _latent_preview_decoder(vae, torch.Generator().manual_seed(seed), pixel_gain=PIXEL_GAIN)
    with torch.no_grad():  # signal channels summing to zero: GroupNorm's mean no longer depends on the image
        mix_in = vae.decoder.conv_in.weight[:-2, :, 1, 1]
        mix_in -= mix_in.mean(dim=0, keepdim=True)
    vae.register_to_config(scaling_factor=1.0)
    vae.register_to_config(scaling_factor=1.0 / float(_scene_latent_std(vae)))
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=pipe.scheduler,
        text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2,
        tokenizer_2=pipe.tokenizer_2, text_encoder_3=pipe.text_encoder_3, tokenizer_3=pipe.tokenizer_3)


def _decode_uniform(vae, latents: torch.Tensor) -> torch.Tensor:
    """RGB in [-1, 1] that each latent vector [N, C] decodes to, as a uniform 4 x 4 latent."""
    z = latents[:, :, None, None].expand(-1, -1, 4, 4) / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(z, return_dict=False)[0].mean(dim=(2, 3))


def palette_latents(vae, newton_steps: int = 8) -> torch.Tensor:
    """[1 + len(PALETTE), C] latents (pipeline scale) decoding to the background and each
    palette colour: the minimum-norm solution of decode(z) = colour, by Newton steps with
    the pseudo-inverse of the decoder's Jacobian at z."""
    targets = torch.tensor([BACKGROUND, *PALETTE.values()], dtype=torch.float32) / 127.5 - 1
    z = torch.zeros(len(targets), LATENT_CHANNELS)
    for _ in range(newton_steps):
        for i in range(len(targets)):
            jac = torch.autograd.functional.jacobian(lambda v: _decode_uniform(vae, v[None])[0], z[i])
            with torch.no_grad():
                z[i] += torch.linalg.pinv(jac) @ (targets[i] - _decode_uniform(vae, z[i][None])[0])
    with torch.no_grad():
        error = (_decode_uniform(vae, z) - targets).abs().max().item()
    if error > 0.02:
        raise RuntimeError(f"toy VAE: palette colours decode {error:.3f} off (in [-1, 1]); the decoder cannot reach them")
    return z


def _scene_latent_std(vae, n: int = 512) -> torch.Tensor:
    """The standard deviation of the latents of n scenes (fixed draws): the VAE's
    scaling_factor is its inverse, so that the model sees unit-variance latents as SD3's
    (a smaller signal left the data buried under the noise at most timesteps)."""
    rng = np.random.default_rng(0)
    prompts = all_prompts()
    scenes = [sample_scene(prompts[int(rng.integers(len(prompts)))], rng) for _ in range(n)]
    return scene_latents(scenes, palette_latents(vae)).std()


def scene_latents(scenes, palette: torch.Tensor) -> torch.Tensor:
    """[B, C, LATENT, LATENT] latents of scenes (lists of ToyObject)."""
    index = torch.from_numpy(np.stack([cell_colors(s) for s in scenes]))
    return palette[index].permute(0, 3, 1, 2).contiguous()


class SceneSampler:
    """Training batches: a tag uniformly, a training prompt of it uniformly, a random
    scene of it, or with the tag's MISCAPTION_RATE a scene it misdescribes
    (common.toy_world.pretraining_scene_metadata); a caption left empty with probability `empty`."""

    def __init__(self, records: list[dict], seed: int, empty: float):
        self.by_tag = [[r for r in records if r["tag"] == tag] for tag in GENEVAL_TAGS]
        self.by_tag = [group for group in self.by_tag if group]
        self.rng = np.random.default_rng(seed)
        self.empty = empty

    def batch(self, n: int) -> tuple[list, list[str]]:
        scenes, captions = [], []
        for _ in range(n):
            group = self.by_tag[int(self.rng.integers(len(self.by_tag)))]
            record = group[int(self.rng.integers(len(group)))]
            scenes.append(sample_scene(pretraining_scene_metadata(record, self.rng), self.rng))
            captions.append("" if self.rng.random() < self.empty else record["prompt"])
        return scenes, captions


def pretrain(out_dir: str | Path, config: PretrainConfig = PretrainConfig(), progress: bool = True) -> dict:
    """Train the toy pipeline on scenes of every prompt of the world and save it to `out_dir`
    (a diffusers pipeline folder, with MARKER recording how); returns that record."""
    from tqdm import tqdm

    started = time.time()
    torch.manual_seed(config.seed)
    pipe = build_toy_pipeline(config.seed)
    clip_accuracy = [train_clip_encoder(encoder, tokenizer, config.seed + k, steps=config.clip_steps,
                                        progress=f"text encoder {k + 1}/2" if progress else "")
                     for k, (encoder, tokenizer) in enumerate(((pipe.text_encoder, pipe.tokenizer),
                                                               (pipe.text_encoder_2, pipe.tokenizer_2)))]
    palette = palette_latents(pipe.vae)
    records = all_prompts()
    captions = sorted({r["prompt"] for r in records}) + [""]
    embeds = encode_prompts(pipe, captions, MAX_SEQUENCE_LENGTH)
    row = {c: i for i, c in enumerate(captions)}

    shift = pipe.scheduler.config.shift
    model = pipe.transformer
    model.train().requires_grad_(True)
    ema = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress_ = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    sampler = SceneSampler(records, config.seed, config.empty_prompt_fraction)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="pretrain-toy", disable=not progress, mininterval=2.0)
    for step in bar:
        scenes, batch_captions = sampler.batch(config.batch_size)
        x0 = scene_latents(scenes, palette)
        cond = embeds.select([row[c] for c in batch_captions])
        noise = torch.randn(x0.shape, generator=generator)
        u = torch.sigmoid(torch.randn(len(x0), generator=generator))
        t = shift * u / (1 + (shift - 1) * u)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        v = model(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=cond.tokens,
                  pooled_projections=cond.pooled, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        decay = min((1 + step) / (10 + step), EMA_DECAY)  # warm-up: no lasting weight on the random init
        with torch.no_grad():
            for average, p in zip(ema, model.parameters()):
                average.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            trained = [p.detach().clone() for p in model.parameters()]
            _save(pipe, ema, out_dir, config, step + 1, losses, started, clip_accuracy)
            with torch.no_grad():
                for p, value in zip(model.parameters(), trained):
                    p.copy_(value)
    return _save(pipe, ema, out_dir, config, config.steps, losses, started, clip_accuracy)


def _save(pipe, ema: list[torch.Tensor], out_dir: str | Path, config: PretrainConfig, steps: int,
          losses: list[float], started: float, clip_accuracy: list[dict[str, float]]) -> dict:
    """Save the pipeline with the EMA weights in the transformer, and MARKER."""
    with torch.no_grad():
        for average, p in zip(ema, pipe.transformer.parameters()):
            p.copy_(average)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir)
    record = {"config": asdict(config), "steps_done": steps, "first_loss": losses[0],
              "final_loss": float(np.mean(losses[-100:])),
              "seconds": round(time.time() - started, 1), "threads": torch.get_num_threads(),
              "max_sequence_length": MAX_SEQUENCE_LENGTH, "miscaption_rate": dict(MISCAPTION_RATE),
              "clip_accuracy": clip_accuracy}
    (out_dir / MARKER).write_text(json.dumps(record, indent=1) + "\n")
    return record
