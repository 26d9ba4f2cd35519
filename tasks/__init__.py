"""Prefect tasks: thin wrappers around the library's steps, with the project's caching,
retries, GPU slots, artifacts and events (installed as ``integral_superposition.tasks``).

- ``dump``: ``resolve_dataset``, ``dump_activations`` (whole or one partition), ``combine_partitions``
- ``fanout``: ``dump_partitions_remote`` (one deployment run per partition) and
  ``train_saes_remote`` (one deployment run per group of SAEs)
- ``train``: ``train_saes``; ``analyze``: ``analyze_sae``; ``merge``: ``merge_sae``;
  ``steer``: ``evaluate_steering``; ``report``: ``build_experiment_report``
- ``policy``: the cache policy, the retry condition and the ``gpu`` slot
- ``refs``: the references tasks pass (``OutputRef``, ``RunLocation``, ...)
"""
