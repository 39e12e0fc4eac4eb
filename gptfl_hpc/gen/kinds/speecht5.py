"""SpeechT5 text-to-speech (the paper's Speech Commands generator): kind ``speecht5``.

Directory layout (all local; compute nodes are offline)::

    DIR/                       hf download microsoft/speecht5_tts --local-dir DIR
      config.json              model_type "speecht5" (SpeechT5ForTextToSpeech)
      model.safetensors        weights (safetensors only: a pickled .bin is refused)
      spm_char.model, ...      the SpeechT5 tokenizer (sentencepiece)
    DIR/hifigan/               hf download microsoft/speecht5_hifigan --local-dir DIR/hifigan
    DIR/speakers.safetensors   the speaker table: float (S, 512) x-vectors (or speakers.npy, or
                               any file named by gen.speakers); e.g. the 7,931 CMU ARCTIC
                               x-vectors of Matthijs/cmu-arctic-xvectors, saved as one tensor

The speaker table is read without pickle (safetensors: exactly one 2-d tensor; .npy:
``allow_pickle=False``); its width must equal the model's ``speaker_embedding_dim``.
``gen.prompt_mode=class_prompt`` speaks every sample with row ``gen.speaker``;
``multi_speaker`` draws a row per sample from the whole table (gen/prompts.py). The text is the
prompt (``gen.templates: ["{label}"]``: the label word).

**Batched, one generator per sample.** SpeechT5 decodes autoregressively and its decoder prenet
applies dropout *also at inference* (Shen et al. 2018, §2.2; transformers'
``SpeechT5SpeechDecoderPrenet._consistent_dropout``), drawing ONE mask per step from the global
torch generator and sharing it across the batch, so transformers' batched ``generate_speech``
makes every sample depend on its batch neighbours and on the global RNG. :func:`generate` is the
same decoding loop (``_generate_speech`` of transformers 5: encoder, prenet on the whole output
so far, one decoder step with the cache, postnet, stop token at ``threshold`` 0.5, ``maxlenratio``
20) with two differences: the prenet's dropout masks come from one ``torch.Generator`` per sample
(seeded with the sample's seed; with one sample the masks and the output equal
``generate_speech`` under ``torch.manual_seed(seed)``, tested bitwise), and each sample's maximum
length comes from its own text length. The HiFi-GAN vocoder then runs on each sample's own
spectrogram (no padding across samples). The waveform (16 kHz for the released vocoder) is
resampled to the task rate if it differs, centred in the clip (cut in the middle when longer)
and stored as int16. No guidance (gen.guidance must be [1, 1]); gen.steps and gen.scheduler do
not apply.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from gptfl_hpc.errors import ConfigError, ModelError
from gptfl_hpc.gen.base import (
    CallShape,
    GeneratorKind,
    NonFiniteOutput,
    Task,
    batch_arrays,
    require_audio,
    to_int16,
    torch_dtype,
)
from gptfl_hpc.gen.diffusion import quiet_loading
from gptfl_hpc.gen.spec import GeneratorSpec

log = logging.getLogger(__name__)

VOCODER_DIR = "hifigan"
SPEAKER_FILES = ("speakers.safetensors", "speakers.npy")
GPU_CALL_ROWS = 32
HINT = ("download microsoft/speecht5_tts into the directory and microsoft/speecht5_hifigan into "
        "its hifigan/ subfolder (`hf download ... --local-dir`), with the speaker x-vectors as "
        "speakers.safetensors or speakers.npy")


def _model_config(spec: GeneratorSpec) -> dict | None:
    return spec.component_config(".", "config.json")


def detect(spec: GeneratorSpec) -> bool:
    if not ((spec.path / VOCODER_DIR).is_dir() or (spec.path / "spm_char.model").is_file()):
        return False  # cheap first: other kinds' directories cost no JSON read
    cfg = _model_config(spec)
    return bool(cfg) and (cfg.get("model_type") == "speecht5"
                          or "SpeechT5ForTextToSpeech" in (cfg.get("architectures") or []))


def speakers_path(spec: GeneratorSpec, gen_cfg: Any) -> Path:
    """The speaker table: gen.speakers, else DIR/speakers.safetensors or DIR/speakers.npy."""
    if getattr(gen_cfg, "speakers", ""):
        p = Path(gen_cfg.speakers).expanduser()
        if p.suffix not in (".safetensors", ".npy"):
            raise ConfigError(f"config key gen.speakers: {p}; valid: a .safetensors or .npy file "
                              "of float (S, 512) x-vectors (never a pickle)")
        if not p.is_file():
            raise ConfigError(f"config key gen.speakers: {p} not found; valid: a local "
                              ".safetensors or .npy file of speaker x-vectors")
        return p
    for name in SPEAKER_FILES:
        if (spec.path / name).is_file():
            return spec.path / name
    raise ModelError(f"generator directory {spec.path}: no speaker table "
                     f"({' or '.join(SPEAKER_FILES)}) and gen.speakers is empty; valid: a float "
                     "(S, 512) x-vector file there, or gen.speakers=FILE")


def speaker_shape(path: Path) -> tuple[int, int]:
    """(rows, width) of a speaker table, from its header only."""
    try:
        if path.suffix == ".npy":
            a = np.load(path, mmap_mode="r", allow_pickle=False)
            shape, kind = a.shape, a.dtype.kind
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                keys = list(f.keys())
                if len(keys) != 1:
                    raise ValueError(f"{len(keys)} tensors; valid: exactly one")
                sl = f.get_slice(keys[0])
                shape, kind = tuple(sl.get_shape()), "f" if sl.get_dtype().startswith(
                    ("F", "BF")) else "?"
    except (OSError, ValueError) as e:
        raise ModelError(f"speaker table {path}: not readable without pickle "
                         f"({' '.join(str(e).split())[:160]}); valid: a float (S, 512) array as "
                         ".safetensors (one tensor) or .npy") from None
    if len(shape) != 2 or kind != "f" or shape[0] < 1:
        raise ModelError(f"speaker table {path}: shape {tuple(shape)}; valid: a float (S, 512) "
                         "array, one x-vector per row")
    return int(shape[0]), int(shape[1])


def read_speakers(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float32)
    from safetensors.numpy import load_file

    return next(iter(load_file(str(path)).values())).astype(np.float32)


def check(spec: GeneratorSpec, task: Task, gen_cfg: Any) -> None:
    """Descriptor files, the speaker table's shape and the config (no weights)."""
    from gptfl_hpc.gen.kinds.espeak import check_tts_config

    require_audio(task, KIND.name)
    d = spec.path
    cfg = _model_config(spec)
    if not cfg or cfg.get("model_type") != "speecht5":
        raise ModelError(f"generator directory {d}: no SpeechT5 config.json (model_type "
                         f"speecht5); {HINT}")
    if not ((d / VOCODER_DIR).is_dir() and (d / VOCODER_DIR / "config.json").is_file()):
        raise ModelError(f"generator directory {d}: no {VOCODER_DIR}/config.json (the HiFi-GAN "
                         f"vocoder); {HINT}")
    for where in (d, d / VOCODER_DIR):
        if not list(where.glob("*.safetensors")):
            raise ModelError(f"{where}: no .safetensors weights (a pickled pytorch_model.bin is "
                             "not loaded); convert it once on a trusted machine with "
                             "`model.save_pretrained(dir, safe_serialization=True)`")
    rows, width = speaker_shape(speakers_path(spec, gen_cfg))
    want = int(cfg.get("speaker_embedding_dim", 512))
    if width != want:
        raise ModelError(f"speaker table {speakers_path(spec, gen_cfg)}: {width}-d rows; the "
                         f"model takes {want}-d x-vectors")
    check_tts_config(gen_cfg, KIND.name)


def speaker_rows(spec: GeneratorSpec, gen_cfg: Any) -> int:
    return speaker_shape(speakers_path(spec, gen_cfg))[0]


# --------------------------------------------------------------------------------------------
# generation


def prenet(model: Any, output_sequence: Any, speaker_embeddings: Any, generators: list) -> Any:
    """``SpeechT5SpeechDecoderPrenet.forward`` with one dropout mask per row, each drawn from
    that row's generator (transformers draws one mask for the batch from the global RNG)."""
    import torch
    import torch.nn.functional as F

    pre = model.speecht5.decoder.prenet
    p = float(pre.config.speech_decoder_prenet_dropout)
    x = output_sequence
    for layer in pre.layers:
        x = F.relu(layer(x))
        masks = torch.stack([torch.bernoulli(x[i], p=p, generator=g)
                             for i, g in enumerate(generators)])
        x = torch.where(masks == 1, x, 0) * 1 / (1 - p)
    x = pre.final_layer(x)
    x = pre.encode_positions(x)
    spk = F.normalize(speaker_embeddings).unsqueeze(1).expand(-1, x.size(1), -1)
    return F.relu(pre.speaker_embeds_layer(torch.cat([x, spk], dim=-1)))


def generate(model: Any, input_ids: Any, attention_mask: Any, speaker_embeddings: Any,
             generators: list, *, threshold: float = 0.5, maxlenratio: float = 20.0
             ) -> list[Any]:
    """Per-sample spectrograms (n_frames_i, num_mel_bins): the module docstring's loop."""
    import torch

    bsz = input_ids.size(0)
    enc = model.speecht5.encoder(input_values=input_ids, attention_mask=attention_mask,
                                 return_dict=True).last_hidden_state
    r = int(model.config.reduction_factor)
    lengths = attention_mask.sum(dim=1).tolist()
    maxlen = [int(n * maxlenratio / r) for n in lengths]
    out_seq = enc.new_zeros(bsz, 1, model.config.num_mel_bins)
    spectrum_steps: list[Any] = []
    done: dict[int, Any] = {}
    cache = None
    idx = 0
    while len(done) < bsz:
        idx += 1
        hidden = prenet(model, out_seq, speaker_embeddings, generators)
        dec = model.speecht5.decoder.wrapped_decoder(
            hidden_states=hidden[:, -1:], attention_mask=None, encoder_hidden_states=enc,
            encoder_attention_mask=attention_mask, cache=cache, use_cache=True,
            return_dict=True)
        last = dec.last_hidden_state.squeeze(1)
        cache = dec.cache
        spectrum = model.speech_decoder_postnet.feat_out(last).view(
            bsz, r, model.config.num_mel_bins)
        spectrum_steps.append(spectrum)
        out_seq = torch.cat((out_seq, spectrum[:, -1:, :]), dim=1)
        prob = torch.sigmoid(model.speech_decoder_postnet.prob_out(last))
        stop = (torch.sum(prob, dim=-1) >= threshold).tolist()
        meet = [i for i in range(bsz) if i not in done and (stop[i] or idx >= maxlen[i])]
        if meet:
            spec = torch.stack(spectrum_steps).transpose(0, 1).flatten(1, 2)
            spec = model.speech_decoder_postnet.postnet(spec)
            for i in meet:
                done[i] = spec[i]
    return [done[i] for i in range(bsz)]


class SpeechT5Sampler:
    """``(labels, prompts, guidance, seeds, speakers) -> int16 (B, L)`` (module docstring)."""

    kind = "speecht5"

    def __init__(self, model: Any, vocoder: Any, tokenizer: Any, speakers: np.ndarray, *,
                 task: Task, device: str, max_batch: int) -> None:
        import torch

        self.model, self.vocoder, self.tokenizer = model, vocoder, tokenizer
        self.length, self.rate = require_audio(task, KIND.name)
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.table = torch.as_tensor(speakers)
        self.vocoder_rate = int(getattr(vocoder.config, "sampling_rate", 16000))
        self.shape = CallShape(int(max_batch), what="speecht5", pad=False)

    def __call__(self, labels: np.ndarray, prompts: list[str], guidance: np.ndarray,
                 seeds: np.ndarray, speakers: np.ndarray | None = None) -> np.ndarray:
        prompts = list(prompts)
        labels, guidance, seeds = batch_arrays("speecht5", labels, guidance, seeds,
                                               rows=len(prompts))
        spk = np.zeros(len(prompts), np.int64) if speakers is None else \
            np.asarray(speakers, np.int64).reshape(-1)
        if len(spk) != len(prompts) or spk.min(initial=0) < 0 or \
                spk.max(initial=0) >= len(self.table):
            raise ModelError(f"speecht5 batch: speakers {spk.tolist()[:8]}; valid: "
                             f"{len(prompts)} rows of 0..{len(self.table) - 1}")

        def call(idx: np.ndarray) -> np.ndarray:
            return self._call([prompts[i] for i in idx], seeds[idx], spk[idx])

        return self.shape.run(call, len(prompts))

    def _call(self, texts: list[str], seeds: np.ndarray, spk: np.ndarray) -> np.ndarray:
        import torch

        from gptfl_hpc.data.audio import resample

        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device)
        emb = self.table[torch.as_tensor(spk)].to(self.device, self.dtype)
        gens = [torch.Generator(device="cpu" if self.device.startswith("mps") else self.device
                                ).manual_seed(int(s)) for s in seeds]
        with torch.inference_mode():
            specs = generate(self.model, ids, mask, emb, gens)
            waves = [self.vocoder(s.unsqueeze(0)).reshape(-1).float().cpu().numpy()
                     for s in specs]
        bad = sum(int(not np.isfinite(w).all()) for w in waves)
        if bad:
            raise NonFiniteOutput(bad, len(waves))
        if self.vocoder_rate != self.rate:
            waves = [resample(w, self.vocoder_rate, self.rate) for w in waves]
        return to_int16(waves, self.length, align="center")


def load(spec: GeneratorSpec, gen_cfg: Any, task: Task, device: Any, dtype: str, *,
         max_batch: int | None = None) -> SpeechT5Sampler:
    check(spec, task, gen_cfg)
    from transformers import SpeechT5ForTextToSpeech, SpeechT5HifiGan, SpeechT5Tokenizer

    d = str(spec.path)
    kw = {"local_files_only": True, "use_safetensors": True}
    try:
        with quiet_loading():
            tokenizer = SpeechT5Tokenizer.from_pretrained(d, local_files_only=True)
            model = SpeechT5ForTextToSpeech.from_pretrained(d, dtype=torch_dtype(dtype), **kw)
            vocoder = SpeechT5HifiGan.from_pretrained(str(spec.path / VOCODER_DIR),
                                                      dtype=torch_dtype(dtype), **kw)
    except Exception as e:  # noqa: BLE001 (transformers raises many types)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"generator directory {d}: cannot be loaded as SpeechT5 + HiFi-GAN "
                         f"({type(e).__name__}: {first[:200]}); {HINT}") from e
    model.eval().to(str(device))
    vocoder.eval().to(str(device))
    table = read_speakers(speakers_path(spec, gen_cfg))
    rows = max_batch or gen_cfg.micro_batch or GPU_CALL_ROWS
    sampler = SpeechT5Sampler(model, vocoder, tokenizer, table, task=task, device=str(device),
                              max_batch=rows)
    log.info("speecht5: %s, %d speakers, %d-sample clips at %d Hz (%s)", d, len(table),
             sampler.length, sampler.rate, dtype)
    return sampler


KIND = GeneratorKind(
    name="speecht5", family="text2speech",
    describe="a SpeechT5 text-to-speech directory (config.json model_type speecht5, hifigan/, "
             "a speaker table)",
    detect=detect, check=check, load=load, call_rows=lambda spec: GPU_CALL_ROWS, priority=6,
    speakers=speaker_rows)
