"""Tiny random reward models of the production classes, built offline (test helpers).

`make_tiny_clip(dir)` writes a CLIPModel with a CLIPProcessor (a byte-level BPE
tokenizer trained here, CLIP-style, every byte in the vocabulary),
`make_tiny_mask2former(dir)` a Mask2FormerForUniversalSegmentation with a Swin backbone
and its image processor, labelled with COCO's 80 class names, and
`make_tiny_aesthetic_head(file)` the aesthetic predictor's MLP for the tiny CLIP's
embedding width. They are read back by the production loaders (GenevalScorer,
PickScoreScorer, AestheticScorer) given the paths in place of hub ids and released
files: the whole loading and inference path runs on the CPU without a model hub.
Random weights: the numbers mean nothing, the machinery is real.
"""
from __future__ import annotations

from pathlib import Path

from services.reward.aesthetic import aesthetic_head
from services.reward.geneval import COCO_TO_GENEVAL, COLOR_TEMPLATES
from services.reward.geneval_rules import COLORS, OBJECT_NAMES

GENEVAL_TO_COCO = {v: k for k, v in COCO_TO_GENEVAL.items()}
COCO_NAMES = tuple(GENEVAL_TO_COCO.get(name, name) for name in OBJECT_NAMES)


def make_tiny_clip(directory: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A CLIPModel (2 layers, width 32, projection 16) and CLIPProcessor in `directory`."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = " ".join(list(COLORS) + list(OBJECT_NAMES) + [t.format(c="", cls="") for t in COLOR_TEMPLATES])
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([words] * 4, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>", show_progress=False))
    bpe.model.save(str(directory))
    tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=77)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16)
    CLIPModel(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def make_tiny_mask2former(directory: str | Path, seed: int = 0, image_size: int = 64, num_queries: int = 20) -> Path:
    """A Mask2Former (Swin backbone, 1 block a stage, width 32) for COCO's 80 classes,
    with an image processor resizing to `image_size`, in `directory`."""
    import torch
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation,
                              Mask2FormerImageProcessor, SwinConfig)

    directory = Path(directory)
    torch.manual_seed(seed)
    backbone = SwinConfig(image_size=image_size, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                          num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone, num_labels=len(COCO_NAMES), id2label=dict(enumerate(COCO_NAMES)),
        label2id={name: i for i, name in enumerate(COCO_NAMES)}, hidden_dim=32, mask_feature_size=32,
        feature_size=32, encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
        num_attention_heads=2, num_queries=num_queries, use_pretrained_backbone=False)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(directory)
    Mask2FormerImageProcessor(size={"shortest_edge": image_size, "longest_edge": image_size}).save_pretrained(directory)
    return directory


def make_tiny_aesthetic_head(path: str | Path, embed_dim: int = 16, seed: int = 0) -> Path:
    """The aesthetic predictor's MLP for `embed_dim`-wide embeddings (the tiny CLIP's
    projection), random, saved as a state dict file like the released one."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(aesthetic_head(embed_dim).state_dict(), path)
    return path
