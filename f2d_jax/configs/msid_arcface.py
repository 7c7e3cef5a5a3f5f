"""MSID pretraining at paper scale: msid_base_patch8_112 trained with ArcFace on MS1MV3.

    f2d-train --config msid_arcface --workdir runs/msid \\
        --config.data.dir=/data/ms1m-retinaface-t1 \\
        --config.data.verification="('/data/ms1m-retinaface-t1/lfw.bin', '/data/ms1m-retinaface-t1/cfp_fp.bin')"
    f2d-convert export runs/msid --out weights/   # -> weights/msid.pt (config weights.msid)

The official sizes of Face2Diffusion's MSID (configs/f2d_sd14.py); the recipe is insightface's
arcface_torch ViT one (AdamW lr 1e-3, weight decay 0.1, 10% linear warm-up then polynomial decay,
gradient clipping at 5, ArcFace s=64 m=0.5). The classifier is split by identity over every device.
"""
import ml_collections

from f2d_jax.configs import f2d_sd14


def get_config():
    config = ml_collections.ConfigDict()
    config.task = "msid_arcface"  # train.py dispatches on this (Face2Diffusion configs have none)
    config.seed = 0
    model = f2d_sd14.get_config().model
    config.model = ml_collections.ConfigDict(dict(msid=model.msid.to_dict(), attention=model.attention))

    config.arcface = ml_collections.ConfigDict(dict(
        num_identities=0,              # classifier rows; 0 = the data's count (MS1MV3: 93431), padded up to a
                                       # multiple of the devices (extra rows are negatives only)
        margins=(1.0, 0.5, 0.0),       # insightface margin_list: ArcFace (CosFace: (1.0, 0.0, 0.4))
        scale=64.0,
        sample_rate=1.0,               # Partial FC: score this fraction of each device's classes
        init_std=0.01,                 # classifier init (insightface: normal(0, 0.01))
    ))
    config.data = ml_collections.ConfigDict(dict(
        dir="",                        # an f2d_identities dataset (python -m f2d_jax.data.identities) or an
                                       # insightface RecordIO pack (train.rec/.idx); "" = synthetic identities
        verification=(),               # insightface .bin pair sets (lfw.bin, cfp_fp.bin, agedb_30.bin, ...)
        flip=True,                     # random horizontal flips
        workers=0,                     # threads loading (decoding) batches; 0 = one per CPU core, at most 16
        synthetic_identities=1000, synthetic_examples=100_000, synthetic_pairs=600,  # synthetic data only
    ))
    config.train = ml_collections.ConfigDict(dict(
        steps=200_000,                 # ~40 epochs of MS1MV3 (5.2M images) at batch 1024
        batch_size=1024,               # global
        compute_dtype="auto",          # bfloat16 on accelerators, float32 on CPU
    ))
    config.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=20_000, schedule="polynomial", power=2.0,  # 10% warm-up, PolyScheduler
        b1=0.9, b2=0.999, weight_decay=0.1, grad_clip=5.0,
    ))
    config.mesh = ml_collections.ConfigDict(dict(
        data=-1, fsdp=1,
        params="replicate",            # MSID params: "replicate" or "fsdp" (the classifier is always split)
    ))
    config.checkpoint = ml_collections.ConfigDict(dict(every=2000, keep=3))
    config.log = ml_collections.ConfigDict(dict(
        every=50,                      # loss, accuracy, grad norm, lr, examples/s, step time, MFU
        verify_every=2000,             # verification accuracy on data.verification; 0 disables
        verify_batch_size=512,
    ))
    return config
