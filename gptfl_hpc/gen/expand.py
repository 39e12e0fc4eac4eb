"""Optional prompt expansion with a local text-generation model (off unless gen.expand_prompts).

GPT-FL makes its prompts more diverse by letting a language model continue/paraphrase them
("airplane" -> "Large commercial airplane in the blue sky"). Here each prompt is continued by a
local causal language model (any transformers text-generation directory, e.g. GPT-2): the
expanded prompt is the original prompt followed by the first line of the sampled continuation,
so the label name the template put in always stays in the prompt.

Deterministic: element i is sampled with its own seed derived from (seed, i), inside
``torch.random.fork_rng`` (the caller's global RNG state is untouched), so the result depends on
(seed, i, prompts[i]) only. Prompts are expanded one at a time; expand the distinct prompts you
need (e.g. N variants per class), not one per synthetic image.
"""

from __future__ import annotations

import os
import re

from gptfl_hpc.errors import ModelError
from gptfl_hpc.seeding import derive

_MAX_CHARS = 300  # CLIP reads 77 tokens; longer text is cut by the tokenizer anyway


def _clean(prompt: str, continuation: str) -> str:
    text = continuation.split("\n", 1)[0]
    text = re.sub(r"[\x00-\x1f\x7f]", " ", text)  # control characters
    text = re.sub(r"\s+", " ", text).rstrip()
    if not text.strip():
        return prompt
    return (prompt.rstrip() + (text if text[0] in " ,.;:!?" else " " + text))[:_MAX_CHARS]


def load_text_generator(model_dir: str | os.PathLike, device: str = "cpu"):
    """transformers text-generation pipeline from a local directory (never the network)."""
    d = os.fspath(model_dir)
    if not os.path.isdir(d) or not os.path.isfile(os.path.join(d, "config.json")):
        what = "not found" if not os.path.isdir(d) else "has no config.json"
        raise ModelError(f"prompt-expansion model directory {d}: {what}; download a causal language"
                         f" model on a machine with internet access (e.g. `hf download gpt2 "
                         f"--local-dir {d}`) and set gen.expand_prompts to that directory, or "
                         f"set gen.expand_prompts=null")
    import transformers.utils.logging as tlog
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    bars_on = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()  # "Loading weights" bars flood batch logs
    try:
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"prompt-expansion model directory {d}: cannot be loaded as a "
                         f"transformers causal LM ({type(e).__name__}: {first[:200]}); set "
                         f"gen.expand_prompts to a local text-generation model or null") from e
    finally:
        if bars_on:
            tlog.enable_progress_bar()
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return pipeline("text-generation", model=model, tokenizer=tok, device=device)


def expand_prompts(prompts: list[str], model_dir: str | os.PathLike, seed: int, *,
                   device: str = "cpu", max_new_tokens: int = 20, top_p: float = 0.9,
                   temperature: float = 0.8) -> list[str]:
    """Return one expanded prompt per input prompt (same order and length); deterministic."""
    import torch

    prompts = list(prompts)
    if not all(isinstance(p, str) and p for p in prompts):
        raise ModelError("expand_prompts: prompts must be non-empty strings")
    gen = load_text_generator(model_dir, device=device)
    out: list[str] = []
    devices = [torch.device(device).index or 0] if str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        for i, p in enumerate(prompts):
            torch.manual_seed(derive(seed, "prompt-expansion", i))
            res = gen(p, do_sample=True, top_p=top_p, temperature=temperature,
                      max_new_tokens=max_new_tokens, return_full_text=False,
                      pad_token_id=gen.tokenizer.pad_token_id, num_return_sequences=1)
            out.append(_clean(p, res[0]["generated_text"]))
    return out
