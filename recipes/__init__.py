"""Runnable training recipes on real data: which optimizer trains well untuned?

``python -m recipes.compare --task {digits,vae,charlm} --optimizers adamw,sgd,...`` trains one model
per (optimizer, setting, seed) with the same initial weights, data order and budget, and writes
results tables (markdown and CSV), loss-curve plots and gradient diagnostics to ``runs/<task>/``.
``--defaults`` runs every optimizer at its own defaults, ``--sweep`` and ``--seeds`` tune and
repeat, ``--resume`` continues stopped runs, ``--jobs`` runs in parallel, ``--fsdp`` under torchrun
shards one run over processes. ``python -m recipes.summary`` puts several tasks side by side.
Guide: ``docs/main-job/README.md``.

Modules: :mod:`~recipes.compare` (the command), :mod:`~recipes.optimizers` (names and settings),
:mod:`~recipes.runner` (one run, checkpoints), :mod:`~recipes.parallel` (many runs, progress,
stopping), :mod:`~recipes.results` and :mod:`~recipes.plots` (tables and figures),
:mod:`~recipes.distributed` (FSDP2 and DCP), :mod:`~recipes.summary` (across tasks).

Tasks (all data ships with scikit-learn or with Python itself; nothing is downloaded):

- ``digits``: a small CNN classifier on scikit-learn's 8x8 digits (:mod:`recipes.digits`);
- ``vae``: the article's convolutional VAE with a 2-d latent on the same digits (:mod:`recipes.vae`);
- ``charlm``: a tiny byte-level transformer language model on the standard library's own ``.py``
  files (:mod:`recipes.charlm`).

Optional dependencies: ``pip install -e ".[recipes]"`` (scikit-learn, matplotlib, tqdm),
``".[bench]"`` for the peer optimizers, ``".[tensorboard]"`` for TensorBoard logs.
"""
