"""fairseq_ext: a fairseq plugin (--user-dir) for training and decoding beyond teacher forcing.

fairseq itself is deliberately not listed in install_requires: pip resolving fairseq-fixed's
requirements pulls a CUDA torchaudio and may replace torch. scripts/install.sh installs it.
"""
from setuptools import find_packages, setup

setup(
    name="fairseq_ext",
    version="0.1.0",
    description="fairseq plugin: scheduled sampling and other fixes for teacher-forced MLE",
    packages=find_packages(include=["fairseq_ext", "fairseq_ext.*"]),
    python_requires=">=3.9",
    install_requires=["editdistance"],  # the "edit" task loss; fairseq itself is installed by scripts/install.sh
    # optional: the benchmarks' figures (pip install .[plot]); the package and its tests never import it
    extras_require={"plot": ["matplotlib"]},
    entry_points={"console_scripts": ["fairseq-ext-demo=fairseq_ext.demo:main"]},
)
