"""Prefect flows and the ``isup`` command (installed as ``integral_superposition.flows``).

- ``config``: ``FlowExperimentConfig``, the library's experiment config plus the
  orchestration settings (retries, result storage, secret block, GPU limit, fan-out)
- ``experiment``: ``experiment_flow(cfg)``, dump -> train -> analyse / merge / steer -> report
- ``steps``: one flow per step (``dump_flow``, ``train_flow``, ``analyze_flow``, ...) and
  the fan-out parts (``dump_partition_flow``, ``train_part_flow``)
- ``cli``: the ``isup`` console script
"""
