"""The published component configs of the Stable Diffusion bases the named configs use, by hub id: what
their config.json files hold. Programs build from them with no download (`stable_diffusion.bundle_configs`),
e.g. to compile for an accelerator on a host without the weights or the network.
"""
from __future__ import annotations

# Stable Diffusion v1.4's scheduler/scheduler_config.json: PNDM with the DDPM training values and no
# timestep_spacing key, so each sampler takes its diffusers default.
SD14_SCHEDULER = {
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "trained_betas": None, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
}
SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=768, flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32,
    norm_eps=1e-5, act_fn="silu")
SD14_VAE = dict(
    sample_size=512, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", scaling_factor=0.18215)
SD14_CLIP = dict(  # CLIP ViT-L/14's text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
SD14 = dict(unet=SD14_UNET, vae=SD14_VAE, text_encoder=SD14_CLIP, scheduler=SD14_SCHEDULER)

# SDXL 1.0 base: a 2.6B-parameter UNet (no attention at the first level; 1, 2 and 10 transformer layers per
# block), CLIP ViT-L beside OpenCLIP bigG (with its text projection, whose pooled output and the six time ids
# make the UNet's added embedding: 1280 + 6 x 256 = 2816), 1024 px images (128x128x4 latents), EulerDiscrete.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, norm_eps=1e-5, act_fn="silu")
SDXL_VAE = dict(SD14_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_CLIP_G = dict(  # OpenCLIP ViT-bigG/14's text tower, a CLIPTextModelWithProjection
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280,
    architectures=["CLIPTextModelWithProjection"])
SDXL_SCHEDULER = dict(
    _class_name="EulerDiscreteScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", trained_betas=None, prediction_type="epsilon", interpolation_type="linear",
    sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, timestep_spacing="leading",
    use_karras_sigmas=False, clip_sample=False)
SDXL = dict(unet=SDXL_UNET, vae=SDXL_VAE, text_encoder=SD14_CLIP, text_encoder_2=SDXL_CLIP_G, tokenizer={},
            tokenizer_2={"pad_token": "!"}, scheduler=SDXL_SCHEDULER)

PUBLISHED = {
    "CompVis/stable-diffusion-v1-4": SD14,
    "runwayml/stable-diffusion-v1-5": SD14,   # SD 1.5: SD 1.4's structure, trained further
    "stable-diffusion-v1-5/stable-diffusion-v1-5": SD14,
    "stabilityai/stable-diffusion-xl-base-1.0": SDXL,
}

# FLUX.1's schedulers (scheduler/scheduler_config.json): FLUX.1-dev shifts its flow-matching sigmas by the image's
# token count (`shift` unused then); FLUX.1-schnell does not shift at all.
FLUX_DEV_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
FLUX_SCHNELL_SCHEDULER = dict(FLUX_DEV_SCHEDULER, shift=1.0, use_dynamic_shifting=False)
