"""The synthesis plan: which class, prompt, guidance scale and seed every synthetic sample gets.

Sample ``g`` (0-based, global) has class ``g % K`` and within-class index ``g // K``, so any
prefix of the plan is class-balanced (the first ``n_total % K`` classes get one extra sample).
Everything random about sample (class c, index i) comes from
``gptfl_hpc.seeding.state_words(seed, PLAN_TAG, c, i)`` (the project's one seed scheme);
nothing depends on ``n_total``, the batch size or the process count, so a plan for N samples is a
prefix of the plan for N' > N.

Prompt modes (GPT-FL, Zhang et al. 2023):

* ``class_prompt``: one of ``gen.templates`` with ``{label}`` filled in ("a photo of a cat").
* ``multi_domain``: label x domain, from the templates that contain ``{domain}`` (or
  ``"a {domain} of a {label}"`` when none do): "a sketch of a cat", "a poster of a cat"...
  For sound (AudioLDM, the paper's ESC-50 runs): ``"a sound of {label} {domain}"`` with the
  recording places of :data:`AUDIO_DOMAINS` ("a sound of dog bark in a studio", ...).
* ``multi_speaker`` (text-to-speech kinds): the templates (for speech ``"{label}"``: the word
  itself), each sample spoken by a speaker drawn uniformly from the generator's whole speaker
  table. With ``class_prompt`` a text-to-speech generator speaks every sample with
  ``gen.speaker``. The speaker of sample (c, i) comes from the same per-sample words as its
  seed, so it does not depend on n_total, the batch size or the process count either.

The reference code's audio prompt loops dropped a class and a domain (``range(1, n)``-style
off-by-one errors); here every class gets ``n_total // K`` or one more samples and every
template / domain / speaker is reachable (tests/test_prompts.py, tests/test_audio_gen.py).

The prompt table lists every (class, choice) string once, in class order, whatever ``n_total`` is;
``prompt_index`` points into it. Underscores in label names become spaces in prompts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gptfl_hpc.errors import ConfigError, ModelError
from gptfl_hpc.seeding import state_words

log = logging.getLogger(__name__)

PLAN_TAG = 0x67706C6E
"""Purpose tag of the synthesis plan's seeds (ASCII 'gpln')."""
DEFAULT_DOMAIN_TEMPLATE = "a {domain} of a {label}"
AUDIO_TEMPLATE = "a sound of {label}"
"""The paper's class prompt for text-to-audio (ESC-50 with AudioLDM)."""
AUDIO_DOMAIN_TEMPLATE = "a sound of {label} {domain}"
AUDIO_DOMAINS = ("in a studio", "in the field", "at home", "in an office")
"""The paper's multi-domain recording places for text-to-audio prompts."""
SPEECH_TEMPLATE = "{label}"
"""Text-to-speech: the label word itself is spoken."""


@dataclass
class Plan:
    """Per-sample synthesis plan (all arrays have length n)."""

    labels: np.ndarray
    """int64[n] class of each sample."""
    prompt_index: np.ndarray
    """int32[n] index into ``prompts``."""
    prompts: list[str]
    """Unique prompt strings (the whole table, independent of n)."""
    guidance: np.ndarray
    """float32[n] classifier-free guidance scale (1.0 = none)."""
    seeds: np.ndarray
    """int64[n] per-sample seed (>= 0) for the sample's torch.Generator."""
    speakers: np.ndarray | None = None
    """int32[n] row of the generator's speaker table that speaks each sample (text-to-speech
    kinds); None for generators without speakers."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: np.ndarray | slice) -> Plan:
        """The plan rows at ``index`` (the prompt table is shared)."""
        return Plan(labels=self.labels[index], prompt_index=self.prompt_index[index],
                    prompts=self.prompts, guidance=self.guidance[index], seeds=self.seeds[index],
                    speakers=None if self.speakers is None else self.speakers[index])

    def prompt_texts(self) -> list[str]:
        return [self.prompts[int(i)] for i in self.prompt_index]


def _label_text(name: str) -> str:
    return " ".join(name.replace("_", " ").split())


def prompt_choices(gen_cfg, label: str) -> list[str]:
    """Every prompt a sample of class ``label`` may get, in a fixed order."""
    text = _label_text(label)
    if gen_cfg.prompt_mode in ("class_prompt", "multi_speaker"):
        return [t.replace("{label}", text) for t in gen_cfg.templates]
    if gen_cfg.prompt_mode == "multi_domain":
        templates = [t for t in gen_cfg.templates if "{domain}" in t] or [DEFAULT_DOMAIN_TEMPLATE]
        return [t.replace("{domain}", d).replace("{label}", text)
                for t in templates for d in gen_cfg.domains]
    raise ConfigError(f"config key gen.prompt_mode: invalid value {gen_cfg.prompt_mode!r}; "
                      "valid: class_prompt, multi_domain, multi_speaker")


def sample_words(seed: int, cls: int, index: np.ndarray) -> np.ndarray:
    """uint64[len(index), 4]: the random words of samples (cls, index[j])."""
    out = np.empty((len(index), 4), dtype=np.uint64)
    for j, i in enumerate(index.tolist()):
        out[j] = state_words(seed, PLAN_TAG, cls, i, n=4)
    return out


def build_plan(gen_cfg, label_names: Sequence[str], n_total: int, seed: int,
               speakers: int = 0) -> Plan:
    """The plan for samples 0..n_total-1 (see the module docstring for the layout).

    `speakers`: rows of the generator's speaker table (0: the generator has none)."""
    names = list(label_names)
    if not names:
        raise ConfigError("synthesis: no label names; valid: a non-empty list (data.label_names "
                          "or the dataset's own names)")
    if n_total < 1:
        raise ConfigError(f"synthesis: n_total={n_total}; valid: >= 1 (gen.count, or gen.volume "
                          "x the private training-set size)")
    if seed < 0:
        raise ConfigError(f"config key run.seed: invalid value {seed}; valid: >= 0")
    mode = gen_cfg.prompt_mode
    if mode == "multi_speaker" and speakers < 1:
        raise ConfigError("config key gen.prompt_mode: multi_speaker needs a generator with a "
                          "speaker table (a text2speech kind); valid for this generator: "
                          "class_prompt, multi_domain")
    if speakers and mode != "multi_speaker" and not 0 <= gen_cfg.speaker < speakers:
        raise ConfigError(f"config key gen.speaker: invalid value {gen_cfg.speaker}; the "
                          f"generator's speaker table has {speakers} rows, so valid: 0.."
                          f"{speakers - 1}")
    k = len(names)
    choices = [prompt_choices(gen_cfg, n) for n in names]
    n_choice = len(choices[0])

    # prompt table: every (class, choice) once, deduplicated, in class order
    table: list[str] = []
    where: dict[str, int] = {}
    remap = np.empty((k, n_choice), dtype=np.int32)
    for c in range(k):
        for j, text in enumerate(choices[c]):
            remap[c, j] = where.setdefault(text, len(table))
            if remap[c, j] == len(table):
                table.append(text)

    g = np.arange(n_total, dtype=np.int64)
    labels = g % k
    within = g // k
    words = np.empty((n_total, 4), dtype=np.uint64)
    for c in range(min(k, n_total)):
        sel = labels == c
        words[sel] = sample_words(seed, c, within[sel])

    seeds = (words[:, 0] >> np.uint64(1)).astype(np.int64)
    choice = (words[:, 1] % np.uint64(n_choice)).astype(np.int64)
    lo, hi = float(gen_cfg.guidance[0]), float(gen_cfg.guidance[1])
    u = (words[:, 2] >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    guidance = (lo + (hi - lo) * u).astype(np.float32) if hi > lo else \
        np.full(n_total, lo, dtype=np.float32)
    speaker = None
    if speakers:
        speaker = ((words[:, 3] % np.uint64(speakers)).astype(np.int32)
                   if mode == "multi_speaker"
                   else np.full(n_total, int(gen_cfg.speaker), dtype=np.int32))
    plan = Plan(labels=labels, prompt_index=remap[labels, choice].astype(np.int32),
                prompts=table, guidance=guidance, seeds=seeds, speakers=speaker)

    if gen_cfg.expand_prompts:
        plan.prompts = expand(plan.prompts, gen_cfg.expand_prompts, seed)
    return plan


def expand(prompts: list[str], model_dir: str, seed: int) -> list[str]:
    """Rewrite the prompt table with a local language model (one output per input prompt)."""
    from gptfl_hpc.gen.expand import expand_prompts

    out = list(expand_prompts(list(prompts), model_dir, seed))
    if len(out) != len(prompts) or not all(isinstance(p, str) and p for p in out):
        raise ModelError(f"prompt expansion with {model_dir} returned {len(out)} prompts for "
                         f"{len(prompts)} inputs; expected one non-empty string per prompt")
    return out
