"""Writes the CLIP model of this folder: a tiny random PyTorch CLIPModel (both towers, model.safetensors)
and the same weights converted by transformers' own PyTorch -> Flax conversion into Hugging Face's Flax
layout (flax_model.msgpack), which f2d_jax's CLIP score still loads. Needs transformers 4.57 (the last
release with Flax models) and torch:

    pip install "transformers==4.57.6" torch flax && python tests/data/hf_flax_clip_model/make.py
"""
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, FlaxCLIPModel

HERE = Path(__file__).resolve().parent
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

torch.manual_seed(0)
config = CLIPConfig(text_config=dict(SMALL, vocab_size=1000, bos_token_id=998, eos_token_id=999, pad_token_id=999),
                    vision_config=dict(SMALL, image_size=32, patch_size=16, hidden_act="gelu"), projection_dim=16)
model = CLIPModel(config)
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.02 * torch.randn_like(p))   # non-zero biases, non-unit norms
model.save_pretrained(HERE)
FlaxCLIPModel.from_pretrained(HERE, from_pt=True).save_pretrained(HERE)
