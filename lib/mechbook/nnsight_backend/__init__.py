"""The ``nnsight`` and ``ndif`` backends: the core's forward passes run by nnsight, here or on NDIF.

Optional: it needs nnsight (the ``[ndif]`` extra, which the lock holds), and the core never
imports it; :func:`mechbook.backends.use_backend` does, when a model is put on one of these
backends.

- :mod:`~mechbook.nnsight_backend.runner`: :class:`~mechbook.nnsight_backend.runner.NnsightRunner`,
  the runner behind both backends;
- :mod:`~mechbook.nnsight_backend.ndif`: what a run on NDIF needs and what its refusals mean;
- :mod:`~mechbook.nnsight_backend.weightless`: a model NDIF serves, built here without weights.
"""
