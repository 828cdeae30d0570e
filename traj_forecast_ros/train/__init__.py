"""Training and evaluation: VAE (stage 1), latent rectified flow (stage 2), the regressor baseline, shared loop.

``common``: settings, loop, checkpoint/resume, EMA, autocast, DDP. ``data``: dataset -> model inputs, feature cache.
``presets``: configs for training from scratch. ``vae``, ``flow``, ``regressor``: the stages. ``evaluate``: run
models over a dataset and compute :mod:`traj_forecast_ros.metrics`.
"""
