"""Tiny, randomly initialised audio generators, built fully offline (like tests/tiny_sd.py).

diffusers' and transformers' own tests fetch tiny tokenizers from the Hub
(hf-internal-testing/tiny-random-roberta, -T5Model, the SpeechT5 spm model); nothing here can:

* the RoBERTa tokenizer (CLAP's) is built from a byte-level vocabulary with no merges (every
  word tokenises to its bytes);
* the T5 tokenizer (AudioLDM 2's second encoder) is a Unigram model over single characters;
* the SpeechT5 tokenizer is a character-level sentencepiece model trained here on a few lines
  (sentencepiece, the ``audio`` extra, trains it in milliseconds).

Each builder saves a real pipeline / model directory with ``save_pretrained`` (safetensors), so
the tests load it through the production path (``from_pretrained(dir, local_files_only=True)``).
Component sizes follow diffusers' own dummy components (tests/pipelines/audioldm*), shrunk.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny_sd import byte_level_vocab

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def roberta_tokenizer(model_max_length: int = 77):
    from transformers import RobertaTokenizer

    special = ("<s>", "<pad>", "</s>", "<unk>")
    vocab = byte_level_vocab(special=special, end_of_word=False)
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = 77):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in LETTERS + LETTERS.upper() + "0123456789.,'-"]
    pieces += [("\u2581" + c, -1.5) for c in LETTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def hifigan(model_in_dim: int, upsample: tuple[int, ...] = (2, 2), sampling_rate: int = 16000):
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=model_in_dim, sampling_rate=sampling_rate, upsample_initial_channel=16,
        upsample_rates=list(upsample), upsample_kernel_sizes=[2 * u for u in upsample],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], normalize_before=False))
    _perturb(vocoder, scale=0.2)  # the random init outputs ~1e-6, which rounds to int16 zeros
    return vocoder


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 16], in_channels=1, out_channels=1,
                         down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4,
                         norm_num_groups=8)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False)


def _perturb(*modules, scale: float = 0.05) -> None:
    """Random init makes some blocks output ~0; a little noise makes outputs input-dependent."""
    import torch

    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.add_(scale * torch.randn_like(p))


def build_tiny_audioldm(path: str | Path, seed: int = 0) -> str:
    """Save a tiny random AudioLDMPipeline (16 kHz vocoder, 8 mel bins, hop 4) to `path`."""
    import torch
    from diffusers import AudioLDMPipeline, UNet2DConditionModel
    from transformers import ClapTextConfig, ClapTextModelWithProjection

    tok = roberta_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
            out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=(16, 32),
            class_embed_type="simple_projection", projection_class_embeddings_input_dim=16,
            class_embeddings_concat=True, norm_num_groups=8, attention_head_dim=8)
        text_encoder = ClapTextModelWithProjection(ClapTextConfig(
            bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=16, intermediate_size=32,
            layer_norm_eps=1e-5, num_attention_heads=2, num_hidden_layers=2,
            vocab_size=len(tok), projection_dim=16, max_position_embeddings=80))
        vae, vocoder = _vae(), hifigan(model_in_dim=4)
        _perturb(unet, vae)
    pipe = AudioLDMPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                            scheduler=_scheduler(), vocoder=vocoder)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def build_tiny_audioldm2(path: str | Path, seed: int = 0) -> str:
    """Save a tiny random AudioLDM2Pipeline to `path`."""
    import torch
    from diffusers import (
        AudioLDM2Pipeline,
        AudioLDM2ProjectionModel,
        AudioLDM2UNet2DConditionModel,
    )
    from transformers import (
        ClapAudioConfig,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapTextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        T5Config,
        T5EncoderModel,
    )

    tok, tok2 = roberta_tokenizer(), t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = AudioLDM2UNet2DConditionModel(
            block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
            out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=([None, 16, 32], [None, 16, 32]), norm_num_groups=8,
            attention_head_dim=8)
        text_cfg = ClapTextConfig(
            bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=16, intermediate_size=32,
            layer_norm_eps=1e-5, num_attention_heads=2, num_hidden_layers=2,
            vocab_size=len(tok), projection_dim=16, max_position_embeddings=80)
        audio_cfg = ClapAudioConfig(
            spec_size=64, window_size=4, num_mel_bins=64, intermediate_size=32,
            layer_norm_eps=1e-5, depths=[2, 2], num_attention_heads=[2, 2],
            num_hidden_layers=2, hidden_size=32, projection_dim=16, patch_size=2,
            patch_stride=2, patch_embed_input_channels=4)
        text_encoder = ClapModel(ClapConfig(text_config=text_cfg.to_dict(),
                                            audio_config=audio_cfg.to_dict(),
                                            projection_dim=16))
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=32, d_ff=37,
                                                 d_kv=8, num_heads=2, num_layers=2))
        language_model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_head=2, n_layer=2,
                                                    vocab_size=100, n_ctx=99, n_positions=99,
                                                    bos_token_id=0, eos_token_id=0))
        language_model.config.max_new_tokens = 4
        projection_model = AudioLDM2ProjectionModel(text_encoder_dim=16, text_encoder_1_dim=32,
                                                    langauge_model_dim=16)
        vae, vocoder = _vae(), hifigan(model_in_dim=4)
        _perturb(unet, vae)
    pipe = AudioLDM2Pipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        projection_model=projection_model, language_model=language_model, tokenizer=tok,
        tokenizer_2=tok2, feature_extractor=ClapFeatureExtractor(), unet=unet,
        scheduler=_scheduler(), vocoder=vocoder)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def speecht5_tokenizer(tmpdir: str | Path):
    """A character-level sentencepiece model (trained here) wrapped as SpeechT5Tokenizer."""
    import io

    import sentencepiece as spm
    from transformers import SpeechT5Tokenizer

    tmpdir = Path(tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    text = [LETTERS, LETTERS.upper(), "yes no up down left right on off stop go",
            "0123456789 .,'-"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, model_type="char",
        vocab_size=len(set("".join(text))) + 5, character_coverage=1.0, bos_id=0, pad_id=1,
        eos_id=2, unk_id=3, minloglevel=2)
    (tmpdir / "spm_char.model").write_bytes(model.getvalue())
    return SpeechT5Tokenizer(vocab_file=str(tmpdir / "spm_char.model"))


def build_tiny_speecht5(path: str | Path, seed: int = 0, speakers: int = 5,
                        speaker_file: str = "speakers.safetensors") -> str:
    """Save a tiny random SpeechT5 TTS (+ hifigan/ + a speaker table) to `path`.

    The stop-token bias is lowered so that generation runs a few dozen steps (random weights
    would stop at a random step), and the speaker table is random 512-d x-vectors."""
    import numpy as np
    import torch
    from transformers import SpeechT5Config, SpeechT5ForTextToSpeech

    path = Path(path)
    tok = speecht5_tokenizer(path.parent / f".{path.name}-spm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = SpeechT5Config(
            vocab_size=len(tok), hidden_size=16, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
            decoder_ffn_dim=32, speech_decoder_prenet_units=16, speech_decoder_postnet_units=16,
            speech_decoder_postnet_layers=2, speech_decoder_postnet_kernel=3, num_mel_bins=8,
            reduction_factor=2, max_text_positions=64, max_speech_positions=256,
            speaker_embedding_dim=512, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            decoder_start_token_id=2)
        model = SpeechT5ForTextToSpeech(cfg)
        with torch.no_grad():  # the stop probability rises slowly: ~10-60 decoder steps
            model.speech_decoder_postnet.prob_out.bias.fill_(-3.0)
            model.speech_decoder_postnet.prob_out.weight.mul_(0.3)
        vocoder = hifigan(model_in_dim=8, upsample=(4, 4))
        table = np.random.default_rng(seed).standard_normal((speakers, 512)).astype(np.float32)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    vocoder.save_pretrained(str(path / "hifigan"), safe_serialization=True)
    if speaker_file.endswith(".npy"):
        np.save(path / speaker_file, table)
    else:
        from safetensors.numpy import save_file

        save_file({"xvectors": table}, str(path / speaker_file))
    (path / "README.txt").write_text(json.dumps({"tiny": True, "seed": seed}))
    return str(path)
