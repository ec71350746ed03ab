"""onegen: one-pass unified generation and retrieval (OneGen) — data prep, ZeRO-3 training, evaluation.

Install for CPU development:   pip install -e ".[cpu,dev]"    (``scripts/bootstrap.sh`` does it into .venv)
Install on a GPU machine:      bash scripts/install_gpu.sh    (docs/gpu.md), which runs, in this order:

    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128   # CUDA build first
    pip install -e ".[gpu,dev]"                                # faiss-gpu, pytest + everything else
    pip install ninja packaging psutil wheel setuptools        # flash-attn's build needs them installed
    pip install "flash-attn>=2.6" --no-build-isolation         # builds against the torch above
    python bench/gpu_smoke.py stack                            # prints the stack; fails if flash-attn is broken

flash-attn cannot come with the other extras in one ``pip install -e ".[gpu,flash]"``: its setup.py
imports torch, so pip's isolated build (an empty environment without torch) fails, and a wheel built
for another torch/CUDA fails at import with an undefined symbol. The ``flash`` extra is only for
``pip install --no-build-isolation -e ".[flash]"`` once the CUDA torch is installed. A flash-attn that
is installed but does not load is an error at run time (``onegen/devices.py``), never a silent fall
back to sdpa.
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
        # English stemming for BM25 mining (mining.stem, data_prep/mining.py); without it BM25 runs
        # unstemmed, with a warning.
        "PyStemmer>=2.2",
        # 3.18.0 is broken on the registry (design §3).
        "mlflow==3.17.2",
        "pyyaml>=6",
        "tqdm>=4.66",
        "filelock>=3.12",
        "rich>=13",
        "matplotlib>=3.8",
        "gguf>=0.10",
        # LoRA adapters (model.lora); the special tokens' rows are our own small layer (pipeline/lora.py).
        "peft>=0.15",
        "sentencepiece>=0.2",
    ],
    extras_require={
        # faiss-cpu and faiss-gpu both provide the `faiss` module: install exactly one. faiss-gpu is
        # the faiss project's own CUDA 12 wheel (abi3, Python >= 3.10; >= 1.14.3: older faiss-gpu
        # wheels stop at Python 3.10), pulling nvidia-cuda-runtime-cu12/cublas-cu12; it needs a CUDA 12
        # driver, like torch's cu12x builds.
        "cpu": ["faiss-cpu>=1.8"],
        "gpu": ["faiss-gpu>=1.14.3"],
        # Only with --no-build-isolation, after the CUDA torch (see the docstring): scripts/install_gpu.sh.
        "flash": ["flash-attn>=2.6"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3"],
    },
    # Each stage's own CLI (the same as ``python -m data_prep`` / ``deepspeed pipeline/train.py`` (one
    # process) / ``python -m evaluation`` / scripts/quickstart.sh / scripts/benchmark.sh), on PATH.
    entry_points={"console_scripts": [
        "onegen-prep=data_prep.__main__:main",
        "onegen-train=pipeline.train:main",
        "onegen-eval=evaluation.cli:main",
        "onegen-quickstart=onegen.quickstart:main",
        "onegen-benchmark=onegen.benchmark:main",
    ]},
)
