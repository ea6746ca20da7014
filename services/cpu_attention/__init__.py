"""NEO CPU attention: the native paged decode-attention kernel and the process that serves it.

Modules (none imports torch except ``reference``, which only tests and benchmarks use):
- ``kernel``: ``attend(...)`` over numpy arrays, thread-pool control, ISA introspection.
- ``segment``: the shared-memory segment (KV pool, staging slots, doorbells) both workers map.
- ``main``: the ``neo cpu-attention`` process; ``membw``: ``neo probe-bandwidth``.
- ``cpus``: CPUs this process may use (affinity and cgroup quota).
"""
