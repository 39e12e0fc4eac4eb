"""Generator kinds: one module each, discovered by ``gptfl_hpc.gen.registry``.

A kind module defines ``KIND = GeneratorKind(...)`` (``gptfl_hpc.gen.base``): a name, the
gen.kind family it answers to, ``detect(spec)``, ``check(spec, task, gen_cfg)`` (descriptor files
only, one-line ModelError), ``load(spec, gen_cfg, task, device, dtype) -> Sampler`` and the default
rows per call on GPU. Adding a generator (e.g. text-to-audio) is adding one module here; the
synthesis engine stores whatever ``Task`` the caller asks for (sample shape and dtype).

Kind modules import from ``gptfl_hpc.gen.base``, ``.diffusion`` and ``.spec`` only, never from the
registry or the engine, so the package has no import cycles.
"""
