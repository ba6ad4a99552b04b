"""Runnable training recipes on real data: compare gradchain optimizers side by side.

``python -m recipes.compare --task {digits,vae,charlm} --optimizers adamw,sgd,...`` trains one model
per optimizer recipe (looked up by name in :mod:`gradchain.recipes`) with the same seed, the same
initial weights and the same data order, and writes a results table (markdown and CSV), loss-curve
plots and gradient diagnostics to ``runs/<task>/``.

Tasks (all data ships with scikit-learn or with Python itself; nothing is downloaded):

- ``digits``: a small CNN classifier on scikit-learn's 8x8 digits (:mod:`recipes.digits`);
- ``vae``: the article's convolutional VAE with a 2-d latent on the same digits (:mod:`recipes.vae`);
- ``charlm``: a tiny byte-level transformer language model on the standard library's own ``.py``
  files (:mod:`recipes.charlm`).

Optional dependencies: ``pip install -e ".[recipes]"`` (scikit-learn, matplotlib, tqdm), and
``".[tensorboard]"`` for TensorBoard logs.
"""
