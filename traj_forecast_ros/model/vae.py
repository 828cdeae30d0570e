"""Trajectory VAE (``LatteVAE`` of the official code, spec section 3): dense tracks <-> per-frame latent tokens.

The encoder embeds every track point with learned Fourier features, patchifies the (rows x cols) query grid into
tokens and runs a factorised spatial/temporal transformer conditioned on DINOv2 patch tokens by cross-attention.
Time is not compressed: a trajectory of T frames becomes T frames of L latent tokens with C channels each.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from traj_forecast_ros.model.config import VAEConfig, as_pair
from traj_forecast_ros.model.layers import (
    Attention,
    Mlp,
    PatchEmbed,
    RMSNorm,
    TrackPosEncoder,
    init_latte_weights,
    latte_sincos_tables,
    run_factorised_blocks,
    token_grid,
    unpatchify,
)
from traj_forecast_ros.model.ops import KV, TORCH_OPS, TorchOps, one_row_if_shared

BLOCK_NORM_EPS = 1e-6
# Submodules only the decoder uses. Everything else (the track embedding, the encoder blocks, ``to_latents`` and the
# image-context projection the encoder shares with the decoder) fixes the latent space.
DECODER_MODULES = ("from_latents", "decoder_blocks", "final_layer")


class VAEBlock(nn.Module):
    """Pre-norm transformer block (affine RMSNorm) with zero-initialised per-channel gates; no timestep."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(hidden_size, eps=BLOCK_NORM_EPS, elementwise_affine=True)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = RMSNorm(hidden_size, eps=BLOCK_NORM_EPS, elementwise_affine=True)
        self.xattn = Attention(hidden_size, num_heads)
        self.norm3 = RMSNorm(hidden_size, eps=BLOCK_NORM_EPS, elementwise_affine=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.gate_msa = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.gate_mxa = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.gate_mlp = nn.Parameter(torch.zeros(1, 1, hidden_size))

    def forward(self, x: torch.Tensor, context: Union[torch.Tensor, KV], ops: TorchOps = TORCH_OPS) -> torch.Tensor:
        """x [N, L, C] with context [N or N/G, M, C] (see ``Attention``; or its prepared ``xattn.context_kv``)
        -> [N, L, C]."""
        heads = self.attn.heads(x, None, ops, norm=self.norm1)  # (N, L, C)
        x = ops.linear(heads, self.attn.proj, gate=self.gate_msa, residual=x)  # (N, L, C)
        heads = self.xattn.heads(x, context, ops, norm=self.norm2)  # (N, L, C)
        x = ops.linear(heads, self.xattn.proj, gate=self.gate_mxa, residual=x)  # (N, L, C)
        hidden = ops.linear(x, self.mlp.fc1, norm=self.norm3, gelu=True)  # (N, L, 4C)
        return ops.linear(hidden, self.mlp.fc2, gate=self.gate_mlp, residual=x)  # (N, L, C)


class VAEFinalLayer(nn.Module):
    """Bare linear head: token -> p*p*c outputs ordered (p_row, p_col, c). No norm, no modulation."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, ops: TorchOps = TORCH_OPS) -> torch.Tensor:
        """x [N, L, C] -> [N, L, p*p*c]."""
        return ops.linear(x, self.linear)


class TrajectoryVAE(nn.Module):
    """Spatio-temporal transformer VAE over normalised track grids (square or rectangular).

    ``encode(tracks [B, T, 2, H, W], frame_features [B, N, D]) -> (mean, std)`` each ``[B, T, L, C]``;
    ``decode(z [B, T, L, C], frame_features) -> tracks [B, T, 2, H, W]``. Tracks are absolute positions normalised
    to [-1, 1] (``2 p / size - 1``), channels (x, y).
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        if cfg.encoder_depth % 2 or cfg.decoder_depth % 2:
            raise ValueError("VAE encoder/decoder depths must be even (spatial/temporal block pairs)")
        if cfg.in_channels != 2:
            raise ValueError(f"the trajectory VAE encodes (x, y) tracks: in_channels must be 2, got {cfg.in_channels}")
        self.cfg = cfg
        self.input_size = as_pair(cfg.input_size)
        self.patch_size = cfg.patch_size
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.in_channels
        self.latent_channels = cfg.latent_channels
        self.num_frames = cfg.num_frames
        self.frame_token_grid = token_grid(cfg.num_frame_tokens)
        self.num_frame_tokens = self.frame_token_grid[0] * self.frame_token_grid[1]
        self.frame_features_dim = cfg.frame_features_dim
        hidden = cfg.hidden_size

        self.x_encoder = TrackPosEncoder(hidden, cfg.pos_embed_dim, raw=False)
        self.x_embedder = PatchEmbed(self.input_size, cfg.patch_size, 2 + cfg.pos_embed_dim, hidden)
        self.frame_proj = nn.Linear(cfg.frame_features_dim, hidden)
        self.to_latents = nn.Linear(hidden, 2 * cfg.latent_channels)  # [mean | logvar]
        self.from_latents = nn.Linear(cfg.latent_channels, hidden)
        self.latent_grid = self.x_embedder.grid_size  # (h, w) latent tokens per frame
        self.num_latent_tokens = self.x_embedder.num_patches

        # Fixed sin-cos tables: Parameters with requires_grad=False, as in the official checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_latent_tokens, hidden), requires_grad=False)
        self.temp_embed = nn.Parameter(torch.zeros(1, cfg.num_frames, hidden), requires_grad=False)
        self.frame_embed = nn.Parameter(torch.zeros(1, self.num_frame_tokens, hidden), requires_grad=False)

        self.encoder_blocks = nn.ModuleList(
            [VAEBlock(hidden, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.encoder_depth)]
        )
        self.decoder_blocks = nn.ModuleList(
            [VAEBlock(hidden, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)]
        )
        self.final_layer = VAEFinalLayer(hidden, cfg.patch_size, self.out_channels)
        self.initialize_weights()

    # ------------------------------------------------------------------------------------------ init
    def sincos_tables(self) -> Dict[str, torch.Tensor]:
        """The fixed tables this architecture defines, by state-dict name (each [1, n, hidden])."""
        return latte_sincos_tables(self.cfg.hidden_size, self.latent_grid, self.num_frames, self.frame_token_grid)

    def initialize_weights(self) -> None:
        """Xavier linears and patch conv, fixed sin-cos tables, zero output head (gates are zero already)."""
        init_latte_weights(self, self.sincos_tables(), self.x_embedder)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights; ``encode``/``decode`` cast their inputs to it."""
        return self.frame_proj.weight.dtype

    # ------------------------------------------------------------------------------------------ checks
    def _check_frame_features(self, frame_features: torch.Tensor) -> None:
        expected = (self.num_frame_tokens, self.frame_features_dim)
        if frame_features.dim() != 3 or tuple(frame_features.shape[1:]) != expected:
            raise ValueError(
                f"VAE expects frame_features [B, {expected[0]}, {expected[1]}], got {tuple(frame_features.shape)}"
            )

    def _check_tracks(self, tracks: torch.Tensor) -> None:
        expected = (self.num_frames, self.in_channels, *self.input_size)
        if tracks.dim() != 5 or tuple(tracks.shape[1:]) != expected:
            raise ValueError(f"VAE expects tracks [B, {', '.join(map(str, expected))}], got {tuple(tracks.shape)}")

    def _check_latents(self, z: torch.Tensor) -> None:
        expected = (self.num_frames, self.num_latent_tokens, self.latent_channels)
        if z.dim() != 4 or tuple(z.shape[1:]) != expected:
            raise ValueError(f"VAE expects latents [B, {', '.join(map(str, expected))}], got {tuple(z.shape)}")

    # ------------------------------------------------------------------------------------------ forward
    def _context_kv(self, blocks: nn.ModuleList, frame_features: torch.Tensor, ops: TorchOps) -> List[KV]:
        """DINO tokens [B, N, D] (one row, or a batch expanded from one: shared by all samples) -> the
        cross-attention keys/values of every block, each [B, N, C], shared by all sequences of a sample."""
        self._check_frame_features(frame_features)
        frame_features = one_row_if_shared(frame_features).to(self.dtype)
        context = ops.linear(frame_features, self.frame_proj, residual=ops.param(self.frame_embed))  # (B, N, C)
        return [block.xattn.context_kv(context, ops) for block in blocks]

    def _blocks(self, x: torch.Tensor, blocks: nn.ModuleList, context_kv: List[KV], ops: TorchOps,
                temp_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The factorised transformer of the encoder or the decoder over x [B*T, L, C]."""
        return run_factorised_blocks(x, len(blocks), self.num_frames, self.num_latent_tokens,
                                     lambda i, h: blocks[i](h, context_kv[i], ops), temp_embed=temp_embed)

    def encode(self, tracks_norm: torch.Tensor, frame_features: torch.Tensor,
               ops: TorchOps = TORCH_OPS) -> Tuple[torch.Tensor, torch.Tensor]:
        """Posterior of normalised tracks [B, T, 2, H, W]: (mean, std) each [B, T, L, C], std = softplus(logvar/2).

        Inputs are cast to the dtype of the weights. Same as ``encode_tokens(embed_tracks(tracks), features)``.
        ``ops``: the kernels of the layers (``model.kernels.FastCPUOps`` for CPU inference).
        """
        self._check_tracks(tracks_norm)
        return self.encode_tokens(self.embed_tracks(tracks_norm, ops), frame_features, ops)

    def embed_tracks(self, tracks_norm: torch.Tensor, ops: TorchOps = TORCH_OPS) -> torch.Tensor:
        """Image-independent first stage of ``encode``: tracks [B, T, 2, H, W] -> tokens [B, T, L, C].

        Fourier features, patch embedding and ``pos_embed``. A fixed query grid's tokens can be computed once and
        reused with every image (:meth:`encode_tokens`).
        """
        self._check_tracks(tracks_norm)
        batch = tracks_norm.shape[0]
        x = self.x_encoder(tracks_norm.to(self.dtype), ops)  # (B, T, 2+F, H, W)
        x = rearrange(x, "b f c h w -> (b f) c h w")  # (B*T, 2+F, H, W)
        x = self.x_embedder(x, ops) + ops.param(self.pos_embed)  # (B*T, L, C)
        return rearrange(x, "(b f) l c -> b f l c", b=batch)  # (B, T, L, C)

    def encode_tokens(self, tokens: torch.Tensor, frame_features: torch.Tensor,
                      ops: TorchOps = TORCH_OPS) -> Tuple[torch.Tensor, torch.Tensor]:
        """Second stage of ``encode``: embedded tracks [B, T, L, C] (:meth:`embed_tracks`) -> (mean, std)
        each [B, T, L, Z]."""
        expected = (self.num_frames, self.num_latent_tokens, self.cfg.hidden_size)
        if tokens.dim() != 4 or tuple(tokens.shape[1:]) != expected:
            raise ValueError(f"VAE expects embedded tracks [B, {', '.join(map(str, expected))}], "
                             f"got {tuple(tokens.shape)}")
        batch = tokens.shape[0]
        context_kv = self._context_kv(self.encoder_blocks, frame_features, ops)
        x = rearrange(tokens.to(self.dtype), "b f l c -> (b f) l c")  # (B*T, L, C)
        x = self._blocks(x, self.encoder_blocks, context_kv, ops, ops.param(self.temp_embed))  # (B*T, L, C)
        x = rearrange(x, "(b f) l c -> b f l c", b=batch)  # (B, T, L, C)
        mean, logvar = ops.linear(x, self.to_latents).chunk(2, dim=-1)  # (B, T, L, Z) each
        std = F.softplus(0.5 * logvar)  # (B, T, L, Z)
        return mean, std

    def decode(self, z: torch.Tensor, frame_features: torch.Tensor, ops: TorchOps = TORCH_OPS) -> torch.Tensor:
        """Latents z [B, T, L, C] -> normalised tracks [B, T, 2, H, W]; frame_features [B or 1, N, D] (one row:
        shared). No positional embedding in the decoder."""
        self._check_latents(z)
        context_kv = self._context_kv(self.decoder_blocks, frame_features, ops)
        batch = z.shape[0]
        x = ops.linear(z.to(self.dtype), self.from_latents)  # (B, T, L, C)
        x = rearrange(x, "b f l c -> (b f) l c")  # (B*T, L, C)
        x = self._blocks(x, self.decoder_blocks, context_kv, ops)  # (B*T, L, C), no temporal embedding
        x = self.final_layer(x, ops)  # (B*T, L, p*p*2)
        return unpatchify(x, batch, self.latent_grid, self.patch_size)  # (B, T, 2, H, W)

    def still_tokens(self, moving_points: torch.Tensor) -> torch.Tensor:
        """moving_points [B, H, W] bool -> [B, L] bool: True for the latent tokens whose patch holds no moving
        point (row-major, the order of the patch embedding)."""
        moving = F.max_pool2d(moving_points[:, None].float(), self.patch_size)  # (B, 1, h, w)
        return rearrange(moving, "b 1 h w -> b (h w)") == 0

    @staticmethod
    def sample_posterior(
        mean: torch.Tensor, std: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Reparameterised draw ``mean + std * eps`` (eps from ``generator`` when given)."""
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * eps

    def freeze_all_but_decoder(self) -> None:
        """Make only :data:`DECODER_MODULES` trainable, so training cannot move the latent space.

        A decoder fine-tuned this way decodes the same posteriors, so a latent denoiser trained on this VAE's
        latents stays valid (the decoder-only fine-tune of Stable Diffusion's VAE, "ft-MSE").
        """
        for name, parameter in self.named_parameters():
            if name.split(".", 1)[0] not in DECODER_MODULES:
                parameter.requires_grad_(False)

    def loss(
        self, tracks_norm: torch.Tensor, frame_features: torch.Tensor, beta: Optional[float] = None,
        generator: Optional[torch.Generator] = None, recon_delta: float = 1.0,
        latent_noise: Optional[torch.Tensor] = None, moving_weight: float = 0.0, moving_threshold: float = 0.0,
        noise_still_tokens_only: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """beta-VAE objective: Huber reconstruction + beta * KL(q || N(0, I)), each a batch mean.

        ``recon`` is Huber(``recon_delta``) averaged over all track elements (delta 1 in normalised units, the
        official recipe, is the squared error for every realistic error; a small delta is close to L1, whose
        minimiser is the conditional median and so keeps points that do not move exactly still). ``kl`` is averaged
        over [T, L, C]; ``beta`` defaults to ``cfg.beta``. ``latent_noise`` [C]: the std of extra Gaussian noise added
        to the posterior draw per latent channel before decoding (robustness to a generator's latent errors); with
        ``noise_still_tokens_only`` it goes only to the latent tokens whose patch holds no moving point, so the
        decoder learns to keep noisy still regions still without learning to shrink the motion of moving ones.
        ``moving_weight`` w: the reconstruction error of a point whose true track moves more than
        ``moving_threshold`` (normalised units, peak distance from frame 0) weighs 1 + w, normalised by the batch's
        mean weight (w = 0: the plain mean). Moving points are a small share of a scene, and an unweighted mean lets a
        small VAE shrink their motion to fit the still background.
        Returns ``dict(loss, recon, kl, mse)`` of scalars; ``mse`` is the (detached) mean squared error.
        """
        beta = self.cfg.beta if beta is None else beta
        mean, std = self.encode(tracks_norm, frame_features)  # (B, T, L, Z) each
        z = self.sample_posterior(mean, std, generator)  # (B, T, L, Z)
        moving = None
        if moving_weight or (latent_noise is not None and noise_still_tokens_only):
            peak = (tracks_norm - tracks_norm[:, :1]).norm(dim=2).amax(dim=1)  # (B, H, W)
            moving = peak > moving_threshold  # (B, H, W) points whose true track moves
        if latent_noise is not None:
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            if noise_still_tokens_only:
                noise = noise * self.still_tokens(moving)[:, None, :, None].to(noise)
            z = z + noise * latent_noise.to(z)
        recon_tracks = self.decode(z, frame_features)  # (B, T, 2, H, W)
        if moving_weight:
            weight = 1.0 + moving_weight * moving.to(recon_tracks.dtype)  # (B, H, W)
            error = F.huber_loss(recon_tracks, tracks_norm, delta=recon_delta, reduction="none")  # (B, T, 2, H, W)
            recon = (error * weight[:, None, None]).mean() / weight.mean()
        else:
            recon = F.huber_loss(recon_tracks, tracks_norm, delta=recon_delta)
        # KL(N(mean, std) || N(0, 1)) per element, averaged over [T, L, Z] then over the batch.
        # std = softplus(logvar / 2) underflows to 0 for very negative logvar: floor it so log(std) stays finite.
        log_std = torch.log(std.clamp_min(torch.finfo(std.dtype).tiny))
        kl = (0.5 * (mean.square() + std.square() - 1.0) - log_std).mean()
        mse = (recon_tracks.detach() - tracks_norm).square().mean()
        return {"loss": recon + beta * kl, "recon": recon, "kl": kl, "mse": mse}
