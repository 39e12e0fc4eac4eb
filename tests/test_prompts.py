"""The synthesis plan: balanced, deterministic, independent of n_total (prefix property)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from gptfl_hpc.config import GenConfig
from gptfl_hpc.errors import ConfigError, ModelError
from gptfl_hpc.gen.prompts import Plan, build_plan

LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
          "aquarium_fish"]
ARRAYS = ("labels", "prompt_index", "guidance", "seeds")


def _eq(a: Plan, b: Plan, n: int | None = None) -> None:
    for k in ARRAYS:
        x, y = getattr(a, k), getattr(b, k)
        n_ = len(x) if n is None else n
        assert x[:n_].dtype == y[:n_].dtype and x[:n_].tobytes() == y[:n_].tobytes(), k
    assert a.prompts == b.prompts


def test_dtypes_and_determinism():
    cfg = GenConfig(guidance=[1.0, 5.0], templates=["a photo of a {label}", "a {label}"])
    p = build_plan(cfg, LABELS, 53, seed=3)
    assert len(p) == 53
    assert (p.labels.dtype, p.prompt_index.dtype, p.guidance.dtype, p.seeds.dtype) == (
        np.int64, np.int32, np.float32, np.int64)
    _eq(p, build_plan(cfg, LABELS, 53, seed=3))
    q = build_plan(cfg, LABELS, 53, seed=4)
    assert not np.array_equal(p.seeds, q.seeds)
    assert (p.seeds >= 0).all() and len(set(p.seeds.tolist())) == 53


def test_prefix_property_independent_of_n_total():
    cfg = GenConfig(prompt_mode="multi_domain", guidance=[1.0, 4.0])
    small, big = build_plan(cfg, LABELS, 37, 0), build_plan(cfg, LABELS, 1000, 0)
    _eq(small, big, n=37)


def test_balance_and_order():
    p = build_plan(GenConfig(), LABELS, 37, 0)
    g = np.arange(37)
    assert np.array_equal(p.labels, g % 10)
    counts = np.bincount(p.labels, minlength=10)
    assert counts.tolist() == [4] * 7 + [3] * 3  # remainder to the first classes
    assert np.bincount(build_plan(GenConfig(), LABELS, 3000, 0).labels).tolist() == [300] * 10


def test_guidance_range():
    p = build_plan(GenConfig(guidance=[1.0, 5.0]), LABELS, 2000, 0)
    assert p.guidance.min() >= 1.0 and p.guidance.max() <= 5.0
    assert p.guidance.std() > 0.9  # uniform on [1, 5]: std 1.15
    fixed = build_plan(GenConfig(guidance=[2.5, 2.5]), LABELS, 100, 0)
    assert (fixed.guidance == np.float32(2.5)).all()


def test_class_prompt_templates():
    cfg = GenConfig(templates=["a photo of a {label}", "a blurry photo of the {label}"])
    p = build_plan(cfg, LABELS, 400, 0)
    assert len(p.prompts) == 20  # the whole table, whatever n_total is
    texts = p.prompt_texts()
    for lab, t in zip(p.labels, texts):
        name = LABELS[lab].replace("_", " ")
        assert t in (f"a photo of a {name}", f"a blurry photo of the {name}")
    assert "a photo of a aquarium fish" in p.prompts
    assert len(set(texts)) == 20  # both templates used for every class


def test_multi_domain_content():
    cfg = GenConfig(prompt_mode="multi_domain", domains=["sketch", "painting", "photo"])
    p = build_plan(cfg, LABELS, 600, 1)
    assert len(p.prompts) == 30
    assert "a sketch of a cat" in p.prompts and "a painting of a horse" in p.prompts
    for lab, t in zip(p.labels, p.prompt_texts()):
        assert t.endswith(LABELS[lab].replace("_", " "))
    per_class = {}
    for lab, t in zip(p.labels, p.prompt_texts()):
        per_class.setdefault(int(lab), set()).add(t.split(" of ")[0])
    assert all(v == {"a sketch", "a painting", "a photo"} for v in per_class.values())
    custom = GenConfig(prompt_mode="multi_domain", domains=["oil painting"],
                       templates=["{label}, {domain}", "a photo of a {label}"])
    assert build_plan(custom, ["cat"], 3, 0).prompts == ["cat, oil painting"]


def test_errors():
    with pytest.raises(ConfigError, match="n_total"):
        build_plan(GenConfig(), LABELS, 0, 0)
    with pytest.raises(ConfigError, match="label names"):
        build_plan(GenConfig(), [], 10, 0)
    with pytest.raises(ConfigError, match="gen.templates"):
        GenConfig(templates=["a {domain} of {label}"])
    with pytest.raises(ConfigError, match="gen.micro_batch"):
        GenConfig(micro_batch=0)


def test_expand_prompts_is_called_lazily(monkeypatch):
    calls = []

    def fake_expand(prompts, model_dir, seed):
        calls.append((list(prompts), model_dir, seed))
        return [p + ", high quality" for p in prompts]

    fake = types.ModuleType("gptfl_hpc.gen.expand")
    fake.expand_prompts = fake_expand
    monkeypatch.setitem(sys.modules, "gptfl_hpc.gen.expand", fake)
    cfg = GenConfig(expand_prompts="/models/tiny-llm")
    p = build_plan(cfg, LABELS, 20, 7)
    assert calls == [([f"a photo of a {n.replace('_', ' ')}" for n in LABELS],
                      "/models/tiny-llm", 7)]
    assert p.prompts[3] == "a photo of a cat, high quality"
    base = build_plan(GenConfig(), LABELS, 20, 7)
    assert np.array_equal(p.prompt_index, base.prompt_index)

    fake.expand_prompts = lambda prompts, model_dir, seed: prompts[:-1]
    with pytest.raises(ModelError, match="one non-empty string per prompt"):
        build_plan(cfg, LABELS, 20, 7)
