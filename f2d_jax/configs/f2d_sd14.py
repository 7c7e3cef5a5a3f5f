"""Face2Diffusion as in the paper: SD v1.4, the official MSID and mapping sizes, CGDR training.

Values the paper states or the official code fixes are marked (paper) / (official); the rest
are our defaults for what the paper leaves open (marked "default") and can be
overridden on the command line: --config.train.batch_size=64.
"""
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict(dict(
        # msid_base_patch8_112 (official src/msid.py): taps after blocks 2, 5, 8, 11.
        msid=dict(image_size=112, patch_size=8, width=384, depth=12, num_heads=12, mlp_ratio=4.0,
                  tap_layers=(2, 5, 8, 11)),
        # IMG2TEXTwithEXP(1536, 1536, 768), exp_dim 64 (official src/modules.py).
        mapping=dict(identity_dim=1536, expression_dim=64, hidden_dim=1536, token_dim=768, num_layers=2,
                     dropout=0.1),
        # Deep3DFaceRecon's ReconNetWrapper('resnet50').
        expression=dict(layers=(3, 4, 6, 3), width=64),
        # Empty: read from the Stable Diffusion checkpoint's text_encoder/config.json.
        text_encoder=dict(),
        # Attention in every model (f2d_jax.models.attention): "auto" picks per platform (cpu: "cpu",
        # GPU: "cudnn", TPU: "pallas"); or "reference", "xla", "cudnn", "pallas", "cpu".
        attention="auto",
    ))
    config.weights = ml_collections.ConfigDict(dict(
        sd="CompVis/stable-diffusion-v1-4",  # local diffusers directory or hub id (official)
        msid="",                              # msid.pt / .safetensors / .msgpack (required to train)
        mapping="",                           # start the mapping network from these weights ("" = random init)
        expression="",                        # Deep3DFaceRecon epoch_20.pth (its net_recon)
    ))

    config.data = ml_collections.ConfigDict(dict(
        dir="",                  # prepared dataset (python -m f2d_jax.data.prepare); "" = synthetic data
        resolution=512,          # training images (default: FFHQ resized to 512)
        mask_source="landmarks",  # head mask: "landmarks" (68-point hull + forehead/hair + neck) or "files"
        mask_dir="",             # with mask_source="files": <mask_dir>/<image path relative to --images>.png
        holdout=8,               # faces kept out of training for the periodic sample images
        flip=True,               # also store each photo mirrored (default augmentation)
        workers=0,               # threads loading (decoding) batches; 0 = one per CPU core, at most 16
        synthetic_identities=16,  # synthetic data only: number of identities
        synthetic_examples=1024,  # synthetic data only: number of training examples
        synthetic_shuffle_identity=False,  # synthetic data only: random identity features (a control run)
    ))

    config.train = ml_collections.ConfigDict(dict(
        steps=50_000,            # default
        batch_size=32,           # global batch (default)
        prompts=("a photo of f l",),            # training captions, one drawn per sample (paper)
        class_prompt="a photo of a person",     # CGDR's class prompt (paper, Fig. 3)
        cgdr_lambda=1.0,         # weight of the background (class-guided) term (default)
        p_uncond=0.5,            # probability of swapping the expression for null_exp (default)
        trainable=r"^mapping/",  # regex over parameter paths: only the mapping network and null_exp (official)
        compute_dtype="auto",    # "auto": bfloat16 on accelerators, float32 on CPU
        remat_unet=True,         # recompute UNet activations in the backward pass
    ))
    config.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, warmup_steps=1000, schedule="constant",  # or "cosine" (default)
        b1=0.9, b2=0.999, weight_decay=1e-2,              # AdamW (default)
        grad_clip=1.0,                                   # global-norm clipping; 0 disables
    ))
    config.mesh = ml_collections.ConfigDict(dict(
        data=-1, fsdp=1,          # device mesh; one -1 is filled with the remaining devices
        frozen="replicate",       # frozen params: "replicate" or "fsdp" (shard the largest divisible axis)
    ))
    config.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3))
    config.log = ml_collections.ConfigDict(dict(
        every=50,                # metrics (loss parts, grad norm, lr, examples/s, step time, MFU)
        sample_every=2000,       # sample images of held-out faces; 0 disables
        sample_steps=30, sample_guidance=7.0, sample_faces=4,
        sample_prompts=("f l eating bread in front of the Eiffel Tower", "a photo of f l smiling"),
    ))
    return config
