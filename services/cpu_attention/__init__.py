"""NEO CPU attention: the process that serves decode attention for host-resident requests.

Modules:
- ``main``: the ``neo cpu-attention`` process (one per tensor-parallel rank); ``server``: its loop
  over the gateway's plans and the GPU worker's doorbells.
- ``membw``: ``neo probe-bandwidth``, the host read-bandwidth probe.

The kernel it runs (``neo_common.host_kernel``) and the shared-memory segment it serves from
(``neo_common.segment``) are contracts it shares with the GPU worker, so they live in
``neo_common``.
"""
