"""Every error the project raises on purpose derives from GptflError.

The CLI turns a GptflError into one line on stderr and a non-zero exit (MPI_Abort under MPI), so
messages must be complete on one line: name the key or file and the valid choices.
"""


class GptflError(Exception):
    """Base class: a user-facing error with a one-line message."""

    exit_code = 2


class ConfigError(GptflError):
    """Bad configuration: unknown key, wrong type, out-of-range value, bad override."""


class DataError(GptflError):
    """Missing, corrupt or inconsistent data (shards, manifests, synthetic sets, model inputs)."""


class CommError(GptflError):
    """MPI world does not match what the job needs (size, SLURM_NTASKS, ranks vs clients)."""


class ModelError(GptflError):
    """Unknown model name, missing generator directory, shape that does not fit the model."""


class StaleOutputError(GptflError):
    """An output (or partial state) in --out was made for another request, or cannot be proven
    to match this one: it is never reused, mixed or overwritten silently."""


class Preempted(GptflError):
    """Raised at a safe boundary after SIGUSR1/SIGTERM; progress has been saved."""

    exit_code = 124
