"""Benchmarks that ship with the package: ``python -m red_kernels bench`` runs them on whatever the
machine has (the CPU, or the GPU when one is visible), from an installed package, without pytest.

- :mod:`~red_kernels.bench.ops`: every op against eager PyTorch, ``torch.compile`` of that eager
  code, each backend that runs natively here, and a memory-bandwidth floor.
- :mod:`~red_kernels.bench.models`: a training step (frozen base, RED, RED+, PARA, PEFT IA3, PEFT
  LoRA r=8) and KV-cached decoding (base, RED, PARA, mixed tenants) of a random-weight LLaMA.
- :mod:`~red_kernels.bench.timing`: cases and variants, interleaved rounds, medians, memory.
- :mod:`~red_kernels.bench.report`: ratios, markdown tables, JSON (machine, versions, date), chart.
- :mod:`~red_kernels.bench.runner`: the command: selection, progress, output files.

A source checkout's ``benchmarks/`` (``make bench``, pytest-benchmark) wraps the same cases.
"""
