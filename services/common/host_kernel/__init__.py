"""The native host (CPU) paged decode-attention kernel and the CPU placement it runs with.

Shared by the cpu_attention process (which serves with it), the GPU worker (which profiles it for
the cost tables and runs it on the CPU device) and the benchmarks, so it is a library of
``neo_common`` rather than part of one service. None of its modules imports torch except
``reference``, which only tests and benchmarks use.

- ``kernel``: ``attend(...)`` over numpy arrays, thread-pool control, ISA introspection.
- ``cpus``: CPUs this process may use (affinity and cgroup quota), their split between ranks.
- ``_native``: the C++ extension (``csrc/``), compiled once per instruction set, picked at run time.
"""
