"""Writes the CLIP text encoders of this folder: tiny random PyTorch CLIPTextModel and
CLIPTextModelWithProjection weights (model.safetensors) and the same weights converted by transformers'
own PyTorch -> Flax conversion into Hugging Face's Flax layout (flax_model.msgpack), which f2d_jax still
loads. Needs transformers 4.57 (the last release with Flax models) and torch:

    pip install "transformers==4.57.6" torch flax && python tests/data/hf_flax_clip/make.py
"""
from pathlib import Path

import torch
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, FlaxCLIPTextModel,
                          FlaxCLIPTextModelWithProjection)

HERE = Path(__file__).resolve().parent
SMALL = dict(vocab_size=1000, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=998, eos_token_id=999)
MODELS = {
    "plain": (CLIPTextModel, FlaxCLIPTextModel,
              dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   hidden_act="quick_gelu", pad_token_id=999)),
    "projection": (CLIPTextModelWithProjection, FlaxCLIPTextModelWithProjection,
                   dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
                        hidden_act="gelu", projection_dim=48, pad_token_id=0)),
}

for name, (torch_class, flax_class, sizes) in MODELS.items():
    torch.manual_seed(0)
    model = torch_class(CLIPTextConfig(**SMALL, **sizes))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))   # non-zero biases, non-unit norms
    model.save_pretrained(HERE / name)
    flax_class.from_pretrained(HERE / name, from_pt=True).save_pretrained(HERE / name)
