"""Launching on clusters: Slurm batch scripts, submitit jobs, scaling experiments.

``gptfl_hpc.launch.submit(...)`` is resolved lazily so that importing this package never imports
submitit (only submitting does).
"""


def __getattr__(name: str):
    if name == "submit":
        from gptfl_hpc.launch.jobs import submit

        return submit
    raise AttributeError(f"module 'gptfl_hpc.launch' has no attribute {name!r}")
