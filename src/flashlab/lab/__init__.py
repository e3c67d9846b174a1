"""The lab: benchmark attention implementations (``flashlab study | bench | report | env | providers``).

Modules, one concern each: ``cases`` (what is measured; the seed study), ``suites`` (sweeps as
files), ``providers`` (registry of implementations), ``workload`` (inputs and the op / layer),
``measure`` (timing, CUDA peak memory, failure classes), ``memprobe`` (CPU peak memory in a fresh
process), ``accuracy``, ``flops``, ``env`` (header and ceilings), ``results`` (tidy rows, resume),
``runner``, ``report`` / ``reading`` / ``plots`` / ``doc`` (the report), ``cli``. See docs/lab.md.
"""
