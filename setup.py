"""onegen: one-pass unified generation and retrieval (OneGen) — data prep, ZeRO-3 training, evaluation.

Install for CPU development:   pip install -e ".[cpu,dev]"
Install on a GPU cluster:      pip install -e ".[gpu,flash]"   (torch's CUDA build comes from PyPI)
``scripts/bootstrap.sh`` does the CPU install into ``.venv`` (used by the README's two commands).
"""

from setuptools import find_packages, setup

setup(
    name="onegen",
    version="0.1.0",
    description="One causal LM that both generates and retrieves, in one pass (OneGen, EMNLP 2024)",
    python_requires=">=3.10",
    packages=find_packages(include=["onegen", "onegen.*", "data_prep", "data_prep.*", "pipeline",
                                    "pipeline.*", "evaluation", "evaluation.*"]),
    include_package_data=True,
    install_requires=[
        # Pinned exactly: on the CPU machines pip takes the local CPU wheel of this version; a
        # looser bound would let pip fetch a multi-GB CUDA build of a newer release.
        "torch==2.13.0",
        "deepspeed==0.19.8",
        "transformers>=4.57,<6",
        "accelerate>=1.0",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "datasets>=3.0",
        "pyarrow>=15",
        "numpy>=1.26",
        "bm25s>=0.2",
        # 3.18.0 is broken on the registry (design §3).
        "mlflow==3.17.2",
        "pyyaml>=6",
        "tqdm>=4.66",
        "filelock>=3.12",
        "rich>=13",
        "matplotlib>=3.8",
        "gguf>=0.10",
        "sentencepiece>=0.2",
    ],
    extras_require={
        # faiss-cpu and faiss-gpu both provide the `faiss` module: install exactly one.
        "cpu": ["faiss-cpu>=1.8"],
        "gpu": ["faiss-gpu>=1.8"],
        "flash": ["flash-attn>=2.5"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3"],
    },
    entry_points={"console_scripts": ["onegen-prep=data_prep.__main__:main"]},
)
