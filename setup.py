"""f2d-jax: Face2Diffusion in JAX/Flax."""
from setuptools import find_packages, setup

# Pinned to the versions the test suite runs against. diffusers 0.39.x is the last release
# with Flax models and transformers 4.57.x the last with Flax CLIP; see README.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "diffusers==0.39.0",
    "transformers==4.57.6",
    "tensorflow-datasets==4.9.10",
    "numpy==2.4.6",
    "ml_collections==1.1.0",
    "safetensors==0.8.0",
    "huggingface_hub==0.36.2",
    "pillow==13.0.0",
    "opencv-python-headless==5.0.0.93",
    "scikit-image==0.26.0",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "tensorboardX==2.6.5",
]

EXTRAS = {
    # Offline face detection and 68 landmarks (dlib's HOG detector + shape predictor).
    "faces": ["dlib-bin==20.0.1.post1", "face_recognition_models==0.3.0"],
    # .pt conversion, the PyTorch/diffusers path and the parity tests. 2.13.0 has a CPU wheel.
    "torch": ["torch==2.13.0"],
    # Building tfds datasets with image features.
    "data": ["tensorflow-cpu==2.21.0"],
}
EXTRAS["dev"] = ["pytest==9.2.0", "pytest-xdist==3.8.0", *EXTRAS["faces"], *EXTRAS["torch"], *EXTRAS["data"]]

setup(
    name="f2d-jax",
    version="0.1.0",
    description="Face2Diffusion (CVPR 2024) in JAX/Flax: training, sampling and weight interop",
    packages=find_packages(include=["f2d_jax", "f2d_jax.*"]),
    package_data={"f2d_jax": ["assets/*"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
