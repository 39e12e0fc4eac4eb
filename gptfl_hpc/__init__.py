"""gptfl-hpc: GPT-FL (generative-pretrained federated learning) on HPC clusters.

Importing the package is cheap: it never imports torch, diffusers, accelerate, submitit or mpi4py.
Each heavy library lives in one module and is imported there, lazily.
"""

__version__ = "0.1.0"
