"""Prefect flows and the ``isup`` command (installed as ``integral_superposition.flows``).

- ``experiment``: ``experiment_flow(cfg)``, dump -> train -> analyse / merge / steer -> report
- ``steps``: one flow per step (``dump_flow``, ``train_flow``, ``analyze_flow``, ...)
- ``cli``: the ``isup`` console script
"""
