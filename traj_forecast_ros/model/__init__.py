"""Torch modules of the forecasting model: trajectory VAE, latent denoiser, encoders, sampler, checkpoints."""
