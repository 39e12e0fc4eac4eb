"""Typed, validated configuration tree.

YAML is read with ``yaml.safe_load`` into frozen dataclasses; dotted overrides (``fl.rounds=50``)
from the command line are applied on top (precedence: CLI > YAML > defaults). Every unknown key,
wrong type or out-of-range value raises :class:`ConfigError` with a one-line message that names the
key and lists the valid choices, before any work starts.

Each component receives only its own section (``cfg.fl``, ``cfg.gen``...), never the root.
This module depends on the standard library and pyyaml only.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from gptfl_hpc.errors import ConfigError

# Kept here (not imported from gptfl_hpc.models) so validating a config never imports torch.
# tests/test_models.py asserts that this tuple equals the registry's keys.
MODEL_NAMES = ("digits_cnn", "lenet5", "convnet", "resnet20", "resnet18", "resnet50", "vgg19",
               "simple_cnn", "audio_crnn", "audio_cnn")
ALGORITHMS = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
"""The server algorithms DP-FedAvg can run with (fl.algorithm also takes scaffold)."""
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

frozen = dataclass(frozen=True, kw_only=True, slots=True)

EMBEDDED_SOURCES = ("digits", "speech_embedded", "mnist_embedded")
"""Sources that ship with the package (or are made from what packages ship): no data.root."""
MAX_INT = 2**31 - 1
"""Largest integer any config key accepts (the seed keys: 2**63 - 1)."""
SEED_KEYS = ("run.seed", "data.split_seed", "gen.train.seed")
MAX_BATCH = 2**20
"""Largest batch size or per-call sample count any config key accepts."""
MAX_NESTING = 16
"""Deepest mapping/list nesting a config file may have (the schema needs 4)."""


@frozen
class RunConfig:
    seed: int = 0
    """Base seed (0 <= seed < 2**63); every other seed derives from (seed, purpose, ids...)."""
    threads: int = 0
    """torch intra-op threads per rank; 0 = automatic (the rank's share of its CPUs, the
    sleeping server's share going to the client ranks; docs/slurm.md, "One rank per task").
    With cpu_kernels=invariant the results do not depend on it."""
    cpu_kernels: Literal["invariant", "fast"] = "invariant"
    """CPU kernels of FL client training and server pretraining. invariant: results do not
    depend on the thread count, so 1 and N ranks (1 and N nodes) train the same weights; fast:
    oneDNN/NNPACK convolutions (faster ResNets on CPU; results depend on the threads per rank).
    The embedded generator's training always runs on rank 0 alone with the fast kernels. See
    gptfl_hpc/numerics.py."""
    concurrent_clients: bool = True
    """With cpu_kernels=invariant on CPU, a client rank with T > 1 threads trains T of its
    clients at a time, one thread each, instead of one after another on T threads: the same
    bits (gptfl_hpc/fl/concurrent.py), faster for small models; one model copy per thread."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: a GPU when one is visible. The server ranks synthesise and pretrain there; FL
    workers train (and the server evaluates) on their node-local GPU."""
    methods: list[str] = field(default_factory=lambda: ["gptfl", "fedavg", "synthetic_only"])
    """Methods that ``gptfl-hpc run`` compares (subset of gptfl, fedavg, synthetic_only,
    local_only, centralised). gptfl: FL from the GPT-FL init (the model pretrained on
    synthetic data); fedavg: the same FL from random init (the scratch baseline);
    synthetic_only: the pretrained model alone; local_only: every client fine-tunes the
    pretrained model on its own data for fl.rounds x fl.local_epochs epochs, no federation
    (gptfl_hpc/fl/local.py); centralised: the upper-bound reference, not an FL method: rank 0
    alone pools every client's shard and trains the model from random init with the
    pretraining loop and pretrain.* settings (gptfl_hpc/train/centralised.py). With
    run.algorithms set, gptfl and fedavg select the two columns of that table."""
    algorithms: list[str] = field(default_factory=list)
    """FL algorithms `run` compares from scratch and from the GPT-FL init: for each entry X it
    writes <out>/X-scratch (methods: fedavg) and <out>/X-gptfl (methods: gptfl). Names:
    fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, scaffold, dp_fedavg (fl.algorithm=
    fedavg with dp.enabled); an entry may carry fl./dp. overrides for that algorithm only,
    space separated in parentheses: "fedadam(fl.server_lr=0.01)". Empty: the single
    fl.algorithm into <out>/gptfl and <out>/fedavg."""
    store: str | None = None
    """A shared stage store: the server stages (prepare, generator, synthesize, pretrain) write
    into STORE/<stage>-<fingerprint>/ instead of --out, so runs whose requests match reuse them
    (the cells of a grid that share a synthetic set or a pretrained model) and runs that differ
    never do. null: everything inside --out (data.dir still wins for prepare)."""
    rendezvous: str | None = None
    """Multi-host server phase only: the address or network interface (e.g. ib0) rank 0 listens
    on for the server processes' torch.distributed rendezvous; null: the interface of the
    default route (GPTFL_RENDEZVOUS overrides). One host: always loopback."""
    server_processes: int = 0
    """Ranks that synthesise and pretrain (accelerate/DDP). 0 = one per visible GPU on the
    node (1 on CPU). The other ranks wait (sleeping) until the FL stage."""

    def __post_init__(self) -> None:
        _check(0 <= self.seed < 2**63, "run.seed", self.seed, "0 <= seed < 2**63")
        _check(0 <= self.threads <= 4096, "run.threads", self.threads, "0 (auto) .. 4096")
        _check(self.server_processes >= 0, "run.server_processes", self.server_processes, ">= 0")
        methods = ("gptfl", "fedavg", "synthetic_only", "local_only", "centralised")
        bad = [m for m in self.methods if m not in methods]
        _check(not bad and bool(self.methods), "run.methods", self.methods,
               "a non-empty list of: " + ", ".join(methods))
        names = [RunConfig.parse_algorithm(a)[0] for a in self.algorithms]
        dup = sorted({n for n in names if names.count(n) > 1})
        _check(not dup, "run.algorithms", self.algorithms, f"each name once (repeated: {dup})")

    ALGORITHM_NAMES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                       "scaffold", "dp_fedavg")

    @staticmethod
    def parse_algorithm(entry: str) -> tuple[str, list[str]]:
        """'fedadam(fl.server_lr=0.01 dp.x=1)' -> ('fedadam', ['fl.server_lr=0.01', ...])."""
        import re

        valid = ("NAME or NAME(fl.KEY=VALUE dp.KEY=VALUE ...) with NAME one of "
                 + ", ".join(RunConfig.ALGORITHM_NAMES))
        m = re.fullmatch(r"\s*([a-z_]+)\s*(?:\((.*)\))?\s*", entry)
        _check(m is not None and m.group(1) in RunConfig.ALGORITHM_NAMES, "run.algorithms",
               entry, valid)
        assert m is not None
        overrides = (m.group(2) or "").split()
        for o in overrides:
            key = o.partition("=")[0]
            _check("=" in o and key.startswith(("fl.", "dp.")) and key not in (
                "fl.algorithm", "fl.init", "dp.enabled"), "run.algorithms", entry,
                "overrides KEY=VALUE of fl.* and dp.* keys other than fl.algorithm, fl.init "
                "and dp.enabled (the name sets those)")
        return m.group(1), overrides


@frozen
class DataConfig:
    source: Literal["digits", "cifar10", "cifar100", "arrays", "image_folder", "flowers102",
                    "food101", "eurosat", "covid19", "caltech101", "speech_commands", "esc50",
                    "audio_folder", "speech_embedded", "mnist_embedded"] = "digits"
    """digits: scikit-learn's bundled digits (no download); cifar10/cifar100: the python-pickle
    batches in `root`; arrays: an .npz or .h5 file in `root`; image_folder and the named image
    datasets: their on-disk layouts in `root` (gptfl_hpc/data/images.py); speech_commands,
    esc50, audio_folder: audio layouts in `root`; speech_embedded, mnist_embedded: the
    embedded defaults that need no download (gptfl_hpc/data/audio.py, data/sources.py)."""
    root: str | None = None
    """cifar*: directory holding data_batch_* / test_batch (or train / test); arrays: the file."""
    dir: str | None = None
    """Where prepared shards live. None: <out>/data of the command that needs them."""
    public_fraction: float = 0.3
    """digits only: stratified share reserved for the generator (no client ever holds it)."""
    test_size: float = 360
    """digits/arrays without a test split: test images (>= 1) or fraction (< 1)."""
    num_clients: int = 20
    partition: Literal["iid", "dirichlet", "natural"] = "dirichlet"
    alpha: float = 0.1
    """Dirichlet concentration (label skew); smaller is more skewed."""
    min_client_size: int = 10
    """Dirichlet: resample until every client holds at least this many samples."""
    train_fraction: float = 1.0
    """Share of the private pool the clients split: a seeded, class-stratified subset (the
    normalisation stays that of the whole pool). `gptfl-hpc scale --mode weak` sets it so that
    every client holds the same amount of data at every rank count."""
    natural_key: str | None = None
    """natural partition: array in the arrays file whose values name each sample's client."""
    images_key: str = "images"
    labels_key: str = "labels"
    label_names: list[str] | None = None
    """Override of the source's label names (also the prompts' class names)."""
    image_size: int = 0
    """Image-folder sources (image_folder, flowers102, food101, eurosat, covid19, caltech101):
    side of the square uint8 images `prepare` decodes once into the shards; 0 = 224. Other
    sources keep their native size and accept only 0."""
    resize: Literal["center_crop", "stretch"] = "center_crop"
    """Image-folder sources: center_crop resizes the shorter side to image_size (antialiased
    bilinear) and keeps the central square; stretch resizes to image_size x image_size."""
    split_file: str = ""
    """image_folder only: a CSV file inside data.root with lines `relative/path.jpg,train` (or
    test) that assigns the files of <root>/<class>/ to the splits; empty: none."""
    workers: int = 0
    """Image-folder and audio sources: decode processes of `prepare` (0 = one per CPU this
    process may use). The shards are byte-identical for any count."""
    sample_rate: int = 16000
    """Audio sources: every clip is resampled to this rate (Hz) and mixed down to mono. The
    log-mel front end (train/audio.py, FedAudio's features) is defined at 16000."""
    clip_seconds: float = 0.0
    """Audio sources: every clip is cut or zero-padded to this length (seconds); 0 = the source's
    default (speech_commands, speech_embedded, audio_folder: 1.0; esc50: 5.0)."""
    test_fold: int = 0
    """esc50 only: the fold (1..5) held out as the test set (the clients get a Dirichlet
    partition of the other four); 0 = fold 5."""
    split_seed: int | None = None
    """Seed of the source's own splits (the generator's public split, the test split where
    the source has none of its own); null: run.seed. Pin it to keep the public split, the test
    set and hence the embedded generator fixed while run.seed (the client partition, sampling,
    synthesis, pretraining and FL) varies over a study's seeds. The partition always uses
    run.seed."""

    def __post_init__(self) -> None:
        _check(0 <= self.image_size <= 4096, "data.image_size", self.image_size,
               "0 (the source's default) .. 4096")
        _check(1000 <= self.sample_rate <= 192000, "data.sample_rate", self.sample_rate,
               "1000 .. 192000 (Hz; the log-mel front end expects 16000)")
        _check(0.0 <= self.clip_seconds <= 600.0, "data.clip_seconds", self.clip_seconds,
               "0 (the source's default) .. 600")
        _check(0 <= self.test_fold <= 5, "data.test_fold", self.test_fold,
               "0 (fold 5) or a fold 1..5 (esc50)")
        _check(0 <= self.workers <= 4096, "data.workers", self.workers, "0 (auto) .. 4096")
        _check(self.split_seed is None or 0 <= self.split_seed < 2**63, "data.split_seed",
               self.split_seed, "null (run.seed) or 0 <= seed < 2**63")
        _check(0.0 <= self.public_fraction < 1.0, "data.public_fraction", self.public_fraction,
               "0 <= x < 1")
        _check(self.test_size > 0, "data.test_size", self.test_size, "> 0")
        _check(self.num_clients >= 1, "data.num_clients", self.num_clients, ">= 1")
        _check(self.alpha > 0, "data.alpha", self.alpha, "> 0")
        _check(self.min_client_size >= 1, "data.min_client_size", self.min_client_size, ">= 1")
        _check(0.0 < self.train_fraction <= 1.0, "data.train_fraction", self.train_fraction,
               "0 < x <= 1")
        if self.partition == "natural" and self.source not in ("speech_commands",
                                                               "speech_embedded"):
            _check(self.source == "arrays" and bool(self.natural_key), "data.natural_key",
                   self.natural_key, "the name of a key array in an 'arrays' source (or "
                   "data.source=speech_commands / speech_embedded: one client per speaker)")
        if self.source not in EMBEDDED_SOURCES:
            _check(bool(self.root), "data.root", self.root,
                   f"a local path (required for data.source={self.source})")


@frozen
class ModelConfig:
    name: str = "digits_cnn"
    """One of MODEL_NAMES."""
    width: int = 128
    """convnet only: channels per layer."""
    depth: int = 3
    """convnet only: conv blocks."""

    def __post_init__(self) -> None:
        _check(self.name in MODEL_NAMES, "model.name", self.name, ", ".join(MODEL_NAMES))
        _check(self.width >= 1 and self.depth >= 1, "model.width/depth", (self.width, self.depth),
               ">= 1")


@frozen
class FLConfig:
    algorithm: Literal["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                       "scaffold"] = "fedavg"
    """Server algorithm (gptfl_hpc/fl/fedavg.py). scaffold: SCAFFOLD (Karimireddy et al.
    2020) with client control variates kept on the rank that owns the client, so it runs with
    fl.placement=static (balanced is switched to static with a log line); the round's one
    Allreduce carries the model update and the control-variate change together
    (gptfl_hpc/fl/scaffold.py). Central DP is the orthogonal `dp` section."""
    rounds: int = 30
    clients_per_round: int = 5
    local_epochs: int = 1
    batch_size: int = 32
    client_optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    client_lr: float = 0.05
    client_lr_schedule: Literal["constant", "cosine"] = "constant"
    """cosine: the client lr of round r is client_lr * (1 + cos(pi (r-1) / rounds)) / 2, which
    damps the round-to-round oscillation of strongly non-IID FL towards the end."""
    client_momentum: float = 0.0
    client_weight_decay: float = 0.0
    body_lr_scale: float = 1.0
    """Fine-tuning: the clients' local optimiser uses client_lr x body_lr_scale for every
    parameter except the final classifier layer (the model's last nn.Linear), which keeps
    client_lr. 1.0: one lr for all (the plain optimiser, bitwise as without the option); 0:
    the body is frozen and only the head trains (BatchNorm running statistics still adapt)."""
    prox_mu: float = 0.01
    """FedProx proximal term weight (used by algorithm=fedprox only)."""
    server_lr: float = 1.0
    """FedAvg/FedProx/FedAvgM: step on the averaged update (1.0 = plain averaging).
    FedAdam/FedYogi/FedAdagrad: Reddi et al.'s eta (try 1e-2 .. 1e-1; never 1e-6)."""
    server_momentum: float = 0.9
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    init: str = "random"
    """'random' or a .safetensors checkpoint (GPT-FL passes the pretrained model here)."""
    augment: bool = True
    """Training augmentation; the same transform is used by server pretraining."""
    eval_every: int = 1
    eval_batch_size: int = 512
    checkpoint_every: int = 5
    keep_checkpoints: int = 2
    target_accuracy: float = 0.9
    """summary.json reports the first round whose test accuracy reaches this."""
    select: Literal["last", "synthetic_val", "client_val"] = "last"
    """Which global model a GPT-FL run (FL from the pretrained model) returns. last: the last
    round's. synthetic_val: the FL round's with the best accuracy on the server's validation
    split of the synthetic set (``pretrain.val_fraction`` of it, never trained on), measured
    every ``eval_every`` rounds; ties go to the earlier round. Round 0 (the pretrained model)
    is measured and reported, not chosen: on a split of its own training distribution it
    mostly wins regardless of the private data (fl/engine.py Selection). The server never
    looks at private data, and the test split plays no part in the choice.
    ``final.safetensors`` holds the selected weights; summary.json's ``selection`` names the
    round, its validation and test accuracy. FL from random init (FedAvg from scratch) has no
    synthetic data and always returns the last round, unless it selects with client_val.
    client_val: the round (round 0, the pretrained model, included) with the best accuracy on
    the clients' held-out rows (``fl.client_val_fraction``), scored by the clients themselves
    (federated evaluation: only per-client counts reach the server; fl/clientval.py)."""
    patience: int = 0
    """With select=synthetic_val or client_val: stop FL once this many evaluations in a row
    have not improved the best validation accuracy (0: run all fl.rounds)."""
    client_val_fraction: float = 0.0
    """Federated validation: every client holds out floor(x n_k) of its n_k rows (at least one
    row still trains), drawn from run.seed; at every evaluation round the client ranks score
    the global model on them and only per-client counts (rows, correct, summed loss) cross MPI.
    metrics.jsonl gets client_val_accuracy (sample-weighted), the mean and the worst client's
    accuracy, and summary.json round 0's. The held-out rows never train (FedAvg's weights use
    the training rows), so GPT-FL's and FedAvg's FL stages see the same, smaller training set
    (the centralised reference and the local-only control still use every row).
    Not with central DP (the counts are not privatised). 0: off (bitwise as without it)."""
    aggregation: Literal["exact", "float32"] = "exact"
    """exact: the round's weighted updates are summed in int64 fixed point (grid 2**-40), so
    the new global model is bit-identical for any rank count, placement and reduction order;
    float32: the plain float32 sum (half the bytes; last-bit differences across rank counts).
    See gptfl_hpc/fl/aggregate.py."""
    placement: Literal["balanced", "static"] = "balanced"
    """balanced: each round's sampled clients are spread over the client ranks by expected cost
    (samples x local epochs), so no rank waits for a busier one; a client rank then reads the
    shards of the clients it trains that round (never the server). static: clients are pinned
    to ranks once and each rank only ever opens its own clients' shards. fl.algorithm=scaffold
    always runs static (its client state stays on the client's rank)."""
    client_cache_mb: int = 2048
    """balanced placement: client shards a rank keeps in memory between rounds (LRU, MiB)."""
    sync: Literal["replicated", "bcast"] = "replicated"
    """replicated: every rank applies the (deterministic) server step to the Allreduce result,
    so a round exchanges exactly ONE collective; rank 0 re-broadcasts its weights at every
    checkpoint as a guard against drift. bcast: only rank 0 steps and Bcasts the new weights
    each round (one more collective; use it on heterogeneous nodes)."""
    vmap_clients: int = 0
    """0: a rank trains its clients of a round one after another. N >= 1: up to N of them at
    once with torch.func (vmap over per-client parameters and optimiser states), the same
    per-client maths up to float reassociation in batched kernels (gptfl_hpc/fl/cohort.py);
    for many small clients, above all on a GPU (on a CPU only small models gain; measured in
    docs/algorithms.md). Models it cannot match (BatchNorm, recurrent layers) and central DP
    fall back to the sequential loop with a log line."""

    def __post_init__(self) -> None:
        for key in ("rounds", "clients_per_round", "local_epochs", "batch_size", "eval_every",
                    "eval_batch_size", "checkpoint_every", "keep_checkpoints"):
            _check(getattr(self, key) >= 1, f"fl.{key}", getattr(self, key), ">= 1")
        for key in ("batch_size", "eval_batch_size"):
            _check(getattr(self, key) <= MAX_BATCH, f"fl.{key}", getattr(self, key),
                   f"1 .. {MAX_BATCH}")
        _check(self.client_lr > 0, "fl.client_lr", self.client_lr, "> 0")
        _check(self.server_lr > 0, "fl.server_lr", self.server_lr, "> 0")
        _check(0 <= self.client_momentum < 1, "fl.client_momentum", self.client_momentum, "[0, 1)")
        _check(0 <= self.server_momentum < 1, "fl.server_momentum", self.server_momentum, "[0, 1)")
        _check(0 <= self.server_beta1 < 1, "fl.server_beta1", self.server_beta1, "[0, 1)")
        _check(0 <= self.server_beta2 < 1, "fl.server_beta2", self.server_beta2, "[0, 1)")
        _check(self.server_tau > 0, "fl.server_tau", self.server_tau, "> 0")
        _check(self.prox_mu >= 0, "fl.prox_mu", self.prox_mu, ">= 0")
        _check(self.client_cache_mb >= 0, "fl.client_cache_mb", self.client_cache_mb, ">= 0")
        _check(0 <= self.vmap_clients <= 65536, "fl.vmap_clients", self.vmap_clients,
               "0 (off: one client after another) or 1 .. 65536 clients at once")
        _check(self.client_weight_decay >= 0, "fl.client_weight_decay", self.client_weight_decay,
               ">= 0")
        _check(0.0 <= self.body_lr_scale <= 1.0, "fl.body_lr_scale", self.body_lr_scale,
               "0 <= x <= 1 (0 freezes all but the classifier layer)")
        _check(0 < self.target_accuracy <= 1, "fl.target_accuracy", self.target_accuracy,
               "0 < x <= 1 (a fraction, not a percentage)")
        _check(self.init == "random" or self.init.endswith(".safetensors"), "fl.init", self.init,
               "'random' or a path ending in .safetensors")
        _check(0 <= self.patience <= 1_000_000, "fl.patience", self.patience,
               "0 (off) or a number of evaluations >= 1")
        _check(self.patience == 0 or self.select != "last", "fl.patience", self.patience,
               "0 unless fl.select is synthetic_val or client_val (it stops on that validation)")
        _check(0.0 <= self.client_val_fraction <= 0.5, "fl.client_val_fraction",
               self.client_val_fraction, "0 (off) or 0 < x <= 0.5")
        _check(self.select != "client_val" or self.client_val_fraction > 0, "fl.select",
               self.select, "'last', 'synthetic_val', or 'client_val' with "
               "fl.client_val_fraction > 0 (the held-out rows it chooses on)")


@frozen
class DPConfig:
    """Central differential privacy for FL: DP-FedAvg (McMahan et al. 2018) with optional
    adaptive clipping (Andrew et al. 2021); gptfl_hpc/fl/dp.py.

    With ``enabled``, every client update (the whole float model vector) is clipped to L2 norm
    ``clip_norm`` on its rank before it is encoded, each client counts once (uniform weights,
    no sample weighting), and after the round's one Allreduce every rank adds the same Gaussian
    noise of standard deviation noise_multiplier x clip_norm to the summed update (drawn from
    (run.seed, round)) and divides by the fixed denominator fl.clients_per_round. Epsilon at
    ``delta`` after every round is in metrics.jsonl, summary.json and the report."""

    enabled: bool = False
    clip_norm: float = 1.0
    """L2 clip norm C of one client's update (the initial C with adaptive clipping)."""
    noise_multiplier: float = 1.0
    """z: noise std on the summed update = z x C (the accounted multiplier; with adaptive
    clipping the update noise is raised so that update + clipped count together cost z).
    0: no noise (epsilon = inf; for tests)."""
    target_epsilon: float | None = None
    """Set: the noise multiplier is computed before round 1 so that epsilon after fl.rounds
    rounds is this (dp.noise_multiplier is then ignored; fl.rounds becomes part of the run's
    identity)."""
    delta: float = 1e-5
    """Target delta of the (epsilon, delta) guarantee; keep it below 1 / data.num_clients."""
    accountant: Literal["rdp", "pld"] = "rdp"
    """dp-accounting's Renyi-DP accountant, or the (tighter) privacy-loss-distribution one.
    Each round is a Poisson-subsampled Gaussian with rate fl.clients_per_round /
    data.num_clients."""
    adaptive_clipping: bool = False
    """Andrew et al. 2021: C <- C exp(-clip_learning_rate (b - target_quantile)), b = the noised
    fraction of clients whose update norm was <= C."""
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None
    """Noise std of the count of unclipped clients; null: fl.clients_per_round / 20 (Andrew et
    al.). Must exceed noise_multiplier / 2."""

    def __post_init__(self) -> None:
        _check(self.clip_norm > 0, "dp.clip_norm", self.clip_norm, "> 0")
        _check(self.noise_multiplier >= 0, "dp.noise_multiplier", self.noise_multiplier, ">= 0")
        _check(self.target_epsilon is None or self.target_epsilon > 0, "dp.target_epsilon",
               self.target_epsilon, "null or > 0")
        _check(0 < self.delta < 1, "dp.delta", self.delta, "0 < delta < 1")
        _check(0 < self.target_quantile < 1, "dp.target_quantile", self.target_quantile,
               "0 < x < 1")
        _check(self.clip_learning_rate >= 0, "dp.clip_learning_rate", self.clip_learning_rate,
               ">= 0")
        _check(self.clipped_count_stddev is None or self.clipped_count_stddev > 0,
               "dp.clipped_count_stddev", self.clipped_count_stddev, "null or > 0")


@frozen
class GenTrainConfig:
    """Training of the embedded class-conditional generator (public split only)."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    checkpoint_every: int = 500
    """Save a resumable training checkpoint every this many steps (0: only when preempted)."""
    seed: int | None = None
    """Seed of the generator's training; null: run.seed. With data.split_seed pinned as well,
    one generator serves every run.seed of a study (its request names the resolved seed, so
    null and the same number are the same request)."""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "gen.train.steps", self.steps, ">= 1")
        _check(self.checkpoint_every >= 0, "gen.train.checkpoint_every", self.checkpoint_every,
               ">= 0")
        _check(bool(self.block_out_channels) and all(c >= 1 for c in self.block_out_channels),
               "gen.train.block_out_channels", self.block_out_channels,
               "a non-empty list of positive ints, e.g. [32, 64]")
        _check(1 <= self.batch_size <= MAX_BATCH, "gen.train.batch_size", self.batch_size,
               f"1 .. {MAX_BATCH}")
        _check(self.lr > 0, "gen.train.lr", self.lr, "> 0")
        _check(0 <= self.ema_decay < 1, "gen.train.ema_decay", self.ema_decay, "[0, 1)")
        _check(0 <= self.cond_dropout < 1, "gen.train.cond_dropout", self.cond_dropout, "[0, 1)")
        _check(self.seed is None or 0 <= self.seed < 2**63, "gen.train.seed", self.seed,
               "null (run.seed) or 0 <= seed < 2**63")


@frozen
class GenConfig:
    generator: str = "embedded"
    """'embedded' (train-generator's output in <out>/generator) or a local diffusers directory
    saved with save_pretrained (download hub models beforehand; nothing is fetched at run time)."""
    kind: Literal["auto", "class_conditional", "text2image", "text2audio",
                  "text2speech"] = "auto"
    """auto: detected from the directory (gen/registry.py): AudioLDM / AudioLDM2 pipelines ->
    text2audio; SpeechT5 (speecht5_tts + speecht5_hifigan) or an eSpeak NG voice table ->
    text2speech; model_index.json with a text encoder -> text2image; else class_conditional."""
    prompt_mode: Literal["class_prompt", "multi_domain", "multi_speaker"] = "class_prompt"
    """class_prompt: the templates; multi_domain: label x domains; multi_speaker (text2speech):
    the templates, each sample spoken by a speaker drawn from the generator's whole speaker
    table (class_prompt speaks with gen.speaker only)."""
    templates: list[str] = field(default_factory=lambda: ["a photo of a {label}"])
    domains: list[str] = field(default_factory=lambda: [
        "photo", "drawing", "painting", "sketch", "collage", "poster", "digital art",
        "3D rendering"])
    guidance: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """[lo, hi]: each sample draws its classifier-free guidance scale uniformly in this range
    (the paper's 'ucg' mode is [1, 5]); [g, g] for a fixed scale; 1.0 disables guidance."""
    expand_prompts: str | None = None
    """Local transformers text-generation model directory used to expand prompts (off: None)."""
    volume: float = 3.0
    """Synthetic set size as a multiple of the real private training-set size (1x/2x/3x)."""
    count: int | None = None
    """Absolute number of synthetic samples; overrides volume."""
    steps: int = 25
    scheduler: Literal["default", "ddim", "dpm"] = "ddim"
    batch_size: int = 256
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """auto: fp16 on GPU, fp32 on CPU."""
    compile: bool = False
    channels_last: bool = True
    micro_batch: int | None = None
    """Samples per generator call. The sample indices are cut into aligned blocks of this size
    and every call has exactly this shape (the last block is padded), so a sample's arithmetic
    does not depend on batch_size or the process count: byte-identical sets on CPU. None: 64 on
    CPU, batch_size on GPU. batch_size is rounded up to a multiple of it."""
    speakers: str = ""
    """text2speech (SpeechT5): a local file of speaker x-vectors, float (S, 512), as
    .safetensors (one tensor) or .npy (never pickle); empty: the generator directory's
    speakers.safetensors or speakers.npy. Row s is speaker s."""
    speaker: int = 0
    """text2speech, prompt_mode=class_prompt: the row of the speaker table that speaks every
    sample (multi_speaker draws one per sample)."""
    train: GenTrainConfig = field(default_factory=GenTrainConfig)

    def __post_init__(self) -> None:
        _check(len(self.guidance) == 2 and 0 < self.guidance[0] <= self.guidance[1],
               "gen.guidance", self.guidance, "[lo, hi] with 0 < lo <= hi")
        _check(self.volume > 0, "gen.volume", self.volume, "> 0")
        _check(self.count is None or self.count >= 1, "gen.count", self.count, ">= 1 or null")
        _check(self.steps >= 1, "gen.steps", self.steps, ">= 1")
        _check(1 <= self.batch_size <= MAX_BATCH, "gen.batch_size", self.batch_size,
               f"1 .. {MAX_BATCH}")
        _check(bool(self.templates) and all("{label}" in t for t in self.templates),
               "gen.templates", self.templates, "a non-empty list of strings containing {label}")
        _check(self.prompt_mode == "multi_domain" or not any("{domain}" in t
                                                             for t in self.templates),
               "gen.templates", self.templates,
               "{domain} placeholders only with gen.prompt_mode=multi_domain")
        _check(self.prompt_mode != "multi_domain" or bool(self.domains), "gen.domains",
               self.domains, "a non-empty list of strings with gen.prompt_mode=multi_domain")
        _check(self.micro_batch is None or 1 <= self.micro_batch <= MAX_BATCH,
               "gen.micro_batch", self.micro_batch, f"1 .. {MAX_BATCH} or null")
        _check(self.speaker >= 0, "gen.speaker", self.speaker, ">= 0 (a row of the speaker "
               "table)")


@frozen
class PretrainConfig:
    """Server pretraining on the synthetic set (train/pretrain.py)."""

    epochs: int = 20
    batch_size: int = 128
    """Global batch, the same at any process count: split over the processes as evenly as
    possible (a count that does not divide it is fine; the loss is weighted to match)."""
    lr: float = 1e-3
    """Base learning rate (peak of the cosine schedule)."""
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    """sgd (with `momentum`), adam (L2 weight decay) or adamw (decoupled weight decay)."""
    weight_decay: float = 1e-4
    momentum: float = 0.9
    """sgd only."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """cosine: lr decays from `lr` to 0 over all optimiser steps; constant: `lr` throughout."""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """auto: bf16 on GPU, no on CPU."""
    channels_last: bool = True
    """GPU only: train in channels_last memory format (faster convolutions); ignored on CPU."""
    data_path: Literal["auto", "device", "stream"] = "auto"
    """Where the uint8 synthetic set lives while training. device: on each GPU (one gather per
    step on the device); stream: one copy in host memory per node (an MPI shared-memory window)
    from which a background thread gathers each step's rows into pinned memory and copies them
    to the GPU two steps ahead; auto: device when it fits in the GPU's free memory next to the
    model, optimizer and activations (measured, with a margin), else stream. On CPU the set is
    the host copy itself, one per node. Same batches, permutation and augmentation either way:
    the weights do not depend on it (bitwise on CPU)."""
    init: str | None = None
    """A local .safetensors backbone (e.g. ImageNet weights exported from torchvision) loaded
    before pretraining; a head of another class count is skipped and reported. null: random
    init. The paper's VGG-19 silently started from ImageNet weights: here it is explicit, in
    pretrained.json and the report."""
    val_fraction: float = 0.0
    """Hold out this fraction of every class of the synthetic set as the server's validation
    split (drawn from run.seed; never trained on). Pretraining reports its accuracy per epoch;
    ``fl.select=synthetic_val`` chooses GPT-FL's returned model and ``fl.patience`` stops FL on
    it. 0: train on the whole set."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.val_fraction <= 0.5, "pretrain.val_fraction", self.val_fraction,
               "0 (off) .. 0.5")
        for key in ("epochs", "batch_size"):
            _check(getattr(self, key) >= 1, f"pretrain.{key}", getattr(self, key), ">= 1")
        _check(self.batch_size <= MAX_BATCH, "pretrain.batch_size", self.batch_size,
               f"1 .. {MAX_BATCH}")
        _check(self.init is None or self.init.endswith(".safetensors"), "pretrain.init",
               self.init, "null or a path ending in .safetensors")
        _check(self.lr > 0, "pretrain.lr", self.lr, "> 0")
        _check(self.weight_decay >= 0, "pretrain.weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.momentum < 1, "pretrain.momentum", self.momentum, "[0, 1)")


@frozen
class SlurmConfig:
    """Slurm job shape and launch (gptfl_hpc/launch: render-slurm, submit, scale)."""

    partition: str | None = None
    """sbatch --partition; None: the cluster's default partition."""
    account: str | None = None
    qos: str | None = None
    time: str = "01:00:00"
    """Wall-time limit in a Slurm format: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    nodes: int = 1
    tasks_per_node: int = 4
    """MPI ranks per node (one FL rank per Slurm task; rank 0 is the server)."""
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    gpus_per_task: int = 0
    """srun --gpus-per-task (0: no per-task binding; ranks pick a GPU by node-local rank)."""
    mem: str | None = None
    """sbatch --mem, e.g. 32G; None: the cluster's default."""
    mpi: str = "pmix"
    """srun --mpi type (pmix, pmi2, ...); must match the MPI library mpi4py loads. 'default'
    passes no --mpi (the cluster's MpiDefault or $SLURM_MPI_TYPE)."""
    launcher: Literal["srun", "mpiexec"] = "srun"
    """How a batch script starts the ranks: srun (direct launch, needs `mpi`) or the MPI
    library's own mpiexec inside the allocation."""
    python: str = "python"
    """Python interpreter the job runs (GPTFL_PYTHON in the scripts)."""
    signal_seconds: int = 120
    """Slurm sends SIGUSR1 this many seconds before the time limit (--signal=B:USR1@N)."""
    requeue: bool = True
    """On the warning signal (or exit code 124) the job saves, requeues itself and resumes."""
    max_restarts: int = 20
    """Stop requeueing once SLURM_RESTART_COUNT reaches this (guards against a loop)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job (module loads, venv activation)."""
    extra: list[str] = field(default_factory=list)
    """More sbatch options written as #SBATCH lines, e.g. ['--constraint=a100', '--exclusive']."""

    def __post_init__(self) -> None:
        import re

        for key in ("nodes", "tasks_per_node", "cpus_per_task"):
            _check(getattr(self, key) >= 1, f"slurm.{key}", getattr(self, key), ">= 1")
        for key in ("gpus_per_node", "gpus_per_task", "signal_seconds", "max_restarts"):
            _check(getattr(self, key) >= 0, f"slurm.{key}", getattr(self, key), ">= 0")
        _check(re.fullmatch(r"(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2})", self.time) is not None,
               "slurm.time", self.time, "M, M:S, H:M:S, D-H, D-H:M or D-H:M:S")
        _check(self.launcher in ("srun", "mpiexec"), "slurm.launcher", self.launcher,
               "srun, mpiexec")
        _check(re.fullmatch(r"pmix(_v\d+)?|pmi2|cray_shasta|none|default", self.mpi)
               is not None, "slurm.mpi", self.mpi,
               "pmix, pmix_vN, pmi2, cray_shasta, none, default")
        _check(self.gpus_per_node == 0 or self.gpus_per_task * self.tasks_per_node
               <= self.gpus_per_node, "slurm.gpus_per_task", self.gpus_per_task,
               f"<= gpus_per_node / tasks_per_node ({self.gpus_per_node}/{self.tasks_per_node})")
        _check(bool(self.python.strip()), "slurm.python", self.python, "a non-empty command")
        for opt in self.extra:
            _check(re.fullmatch(r"--[a-z][a-z0-9-]*(=\S.*)?", opt) is not None, "slurm.extra",
                   opt, "long sbatch options such as --constraint=a100 or --exclusive")

@frozen
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fl: FLConfig = field(default_factory=FLConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


# --------------------------------------------------------------------------------------------
# loading


SECTIONS = ("run", "data", "model", "fl", "gen", "pretrain", "slurm")
"""The top-level sections of a config file (the fields of Config)."""


def _check(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key}: invalid value {value!r}; valid: {valid}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"config key {key}: invalid value {value!r}; valid: "
                          + ", ".join(str(a) for a in get_args(tp)))
    if origin in (Union, types.UnionType):
        specific = None
        for arg in get_args(tp):
            try:
                return _convert(value, arg, key)
            except ConfigError as e:  # the right type, a bad value: that error, not the type's
                if specific is None and ": invalid value " in str(e):
                    specific = e
        if specific is not None:
            raise specific
        raise ConfigError(f"config key {key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key}: expected {_type_name(tp)}, got {value!r}")
        return [_convert(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}: expected a mapping of "
                              f"{', '.join(f.name for f in dataclasses.fields(tp))}, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            limit = 2**63 - 1 if key in SEED_KEYS else MAX_INT
            if abs(value) > limit:
                raise ConfigError(f"config key {key}: invalid value {value!r}; valid: an "
                                  f"integer of magnitude <= {limit}")
            return value
    elif tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"config key {key}: invalid value {value!r}; valid: a finite "
                                  "number")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key {key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: Any, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in names:
            where = prefix[:-1] or "top level"
            raise ConfigError(f"config key {prefix}{k}: unknown key in {where}; valid: "
                              + ", ".join(names))
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


def _parse_scalar(text: str, key: str) -> Any:
    import yaml

    too_deep = ConfigError(f"override {key}: value nested too deeply; valid: a scalar or a list")
    try:
        value = yaml.load(text, Loader=_strict_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError:
        return text
    except RecursionError:
        raise too_deep from None
    if _depth(value, MAX_NESTING) > MAX_NESTING:
        raise too_deep
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars/lists) to a raw dict."""
    seen: set[str] = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, "
                              "e.g. fl.rounds=50")
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, "
                              "e.g. fl.rounds=50")
        if key.strip() in seen:
            raise ConfigError(f"override {key.strip()}: given twice; valid: each key once")
        seen.add(key.strip())
        node = raw
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
            node = nxt
        node[parts[-1]] = _parse_scalar(text, key.strip())
    return raw


def _strict_loader() -> Any:
    """yaml.SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"config key {key}: defined twice (lines {seen[key]} and "
                                  f"{line}); valid: each key once per section")
            seen[key] = line
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 construct_mapping)
    return StrictLoader


def _depth(obj: Any, limit: int) -> int:
    stack, deepest = [(obj, 1)], 0
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def load_raw(path: str | os.PathLike | None) -> dict:
    """Read a YAML config strictly: UTF-8, no duplicate keys, bounded nesting, a mapping."""
    import yaml

    if path is None:
        return {}
    p = os.fspath(path)
    if os.path.isdir(p):
        raise ConfigError(f"config file {p}: is a directory; valid: a YAML file such as "
                          "configs/digits.yaml")
    try:
        with open(p, "rb") as f:
            data = f.read((1 << 20) + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {p}: not found") from None
    except OSError as e:
        raise ConfigError(f"config file {p}: cannot read ({e.strerror})") from None
    if len(data) > 1 << 20:
        raise ConfigError(f"config file {p}: larger than 1 MiB; valid: a YAML config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p}: not UTF-8 text (byte {e.start}); valid: a UTF-8 "
                          "YAML file") from None
    try:
        raw = yaml.load(text, Loader=_strict_loader())  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as e:
        raise ConfigError(f"config file {p}: {e}") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"config file {p}:{where} is not valid YAML") from None
    except RecursionError:
        raise ConfigError(f"config file {p}: nested too deeply; valid: at most {MAX_NESTING} "
                          "levels") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping of sections "
                          + ", ".join(SECTIONS))
    if _depth(raw, MAX_NESTING) > MAX_NESTING:
        raise ConfigError(f"config file {p}: nested more than {MAX_NESTING} levels deep; "
                          "valid: sections of key: value pairs")
    return raw


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple = ()) -> Config:
    """Read, override and validate a config. Raises ConfigError (one line) on any problem."""
    raw = apply_overrides(load_raw(path), list(overrides))
    cfg = _build(Config, raw)
    _cross_checks(cfg)
    return cfg


def _cross_checks(cfg: Config) -> None:
    fl, data = cfg.fl, cfg.data
    _check(fl.clients_per_round <= data.num_clients, "fl.clients_per_round",
           fl.clients_per_round, f"<= data.num_clients ({data.num_clients})")
    check_dp_algorithm(cfg.dp, fl)
    _check(fl.select != "synthetic_val" or cfg.pretrain.val_fraction > 0, "fl.select",
           fl.select, "'last', or 'synthetic_val' with pretrain.val_fraction > 0 (the split it "
           "chooses on)")


def check_dp_algorithm(dp: Any, fl: Any) -> None:
    """DP-FedAvg runs with every server algorithm but SCAFFOLD, and without the clients'
    validation (its per-client counts are not privatised); else a one-line error."""
    _check(not (dp is not None and dp.enabled and fl.client_val_fraction > 0),
           "fl.client_val_fraction", fl.client_val_fraction, "0 with dp.enabled (the clients' "
           "validation counts are not privatised)")
    if dp is not None and dp.enabled and fl.algorithm == "scaffold":
        raise ConfigError("config key dp.enabled: SCAFFOLD's control-variate changes are not "
                          "clipped or noised, so DP cannot cover them; valid: dp.enabled=false "
                          "with fl.algorithm=scaffold, or fl.algorithm "
                          + ", ".join(ALGORITHMS))


def to_dict(cfg: Any) -> dict:
    """Plain dict (JSON/YAML-safe) of a config tree."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(section: Any, **changes: Any) -> Any:
    """dataclasses.replace that re-runs validation."""
    return dataclasses.replace(section, **changes)
