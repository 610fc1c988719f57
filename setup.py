"""orpo-megatron: ORPO alignment training for Mixtral-class MoE models on Megatron-Core."""
from setuptools import find_packages, setup

setup(
    name="orpo-megatron",
    version="0.1.0",
    description="ORPO (odds ratio preference optimization) for Mixtral-class MoE models on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["orpo_megatron", "orpo_megatron.*"]),
    python_requires=">=3.11",
    install_requires=[
        # torch is installed first by the README's set-up command (torch==2.13.0 is the CPU build here); on GPU
        # clusters any release megatron-core 0.16.1 accepts (2.6+) with the matching CUDA build.
        "torch>=2.6.0",
        "megatron-core==0.16.1",
        "sentencepiece>=0.2",
        # tokenizer.json folders (byte-level BPE of Llama-3, Qwen, ...): the library transformers itself runs.
        "tokenizers>=0.21",
        "datasets>=3.0",
        "wandb>=0.19",
        "tensorboard>=2.14",  # --tensorboard-dir: torch.utils.tensorboard writes through it
        "safetensors>=0.4",
        "jinja2>=3.1",
        "numpy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # transformers and trl are test references only: parity against real peers.
        "test": ["pytest>=8", "pytest-xdist>=3", "transformers>=5.0", "trl>=0.26", "mpmath"],
        # Transformer Engine: the GPU layers (FP8, grouped experts, fused kernels, the precision-aware optimizer),
        # in the range megatron-core 0.16.1 supports (its own `dev` extra); orpo_megatron.model checks it too.
        "te": ["transformer-engine[pytorch]>=2.9.0a0,<2.12.0"],
    },
    entry_points={
        "console_scripts": [
            "orpo-megatron-train=orpo_megatron.train:cli",
        ],
    },
)
