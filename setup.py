"""PROTEUS: Triton kernels for small-LM training under a budget, with the model around them.

Distribution ``proteus-kernels``; one import package, ``proteus``. The repository's top-level
``kernels/`` folder is installed as ``proteus.kernels`` (``package_dir``), so nothing here takes
an import name or a distribution name that another PyPI project owns (PyPI's ``kernels`` is
Hugging Face's, and the distribution ``proteus`` is a Tryton client).
"""

from setuptools import setup

setup(
    name="proteus-kernels",
    version="0.2.0",
    description="Fused Triton kernels with a thin PyTorch GPT, trainer and honest evaluator",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["proteus", "proteus.eval", "proteus.kernels", "proteus.tools"],
    package_dir={"proteus": "proteus", "proteus.kernels": "kernels"},
    package_data={"proteus": ["data/*.bin", "data/*.model", "data/*.vocab", "data/README.md",
                              "data/sp8192_caseops/*.bin", "data/sp8192_caseops/*.model"]},
    include_package_data=True,
    # torch is pinned by the install commands (pip install torch==2.13.0) before this
    # package; the open range here never asks for a different build once one is present.
    # matplotlib is a regular dependency: `proteus plot` and `proteus bench --plot` are
    # commands of the package, and must work after the README's first command (pip install
    # -e .); it is wheels only on every platform torch supports, small beside torch.
    install_requires=["torch>=2.4", "triton>=3.2", "numpy>=1.24", "sentencepiece>=0.2",
                      "matplotlib>=3.5"],
    # plot: kept (nothing beyond the requirements now) so that `pip install -e ".[plot]"` in
    # older instructions still works; mutation: tools/mutation.py, run before a release;
    # protobuf: the SentencePiece piece spans that tools/build_caseops_data.py and its test use
    extras_require={"test": ["pytest>=8", "pytest-benchmark>=4", "protobuf"],
                    "plot": ["matplotlib>=3.5"],
                    "mutation": ["cosmic-ray>=8.7"]},
    entry_points={"console_scripts": ["proteus=proteus.cli:main"]},
)
