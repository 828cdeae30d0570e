"""Latte-style velocity model (``Latte`` of the official code, spec section 4).

Input: a video of latent (or raw track) grids x [B, T, C, h, w], the flow time t [B] in [0, 1], DINOv2 patch tokens
[B, N, D] and optionally a pooled instruction embedding [B, E]. Output: the flow velocity, same shape as x.
Blocks alternate spatial attention (the tokens of one frame) and temporal attention (the frames of one token); every
block cross-attends to the image tokens and is modulated by adaLN-Zero from the time (+ text) embedding. With
``text_context`` (not in the paper) the instruction embedding is also one more cross-attention context token, and
with ``text_grounding`` (not in the paper either) a map of where the instruction points in the image is added to every
frame's latent tokens (:class:`TextGrounding`).
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from traj_forecast_ros.model.config import DenoiserConfig, Size2, as_pair
from traj_forecast_ros.model.layers import (
    Attention,
    Mlp,
    PatchEmbed,
    RMSNorm,
    TimestepEmbedder,
    TrackPosEncoder,
    init_latte_weights,
    latte_sincos_tables,
    run_factorised_blocks,
    token_grid,
    unpatchify,
)
from traj_forecast_ros.model.ops import KV, TORCH_OPS, TorchOps, one_row_if_shared

BLOCK_NORM_EPS = 1e-6
ADALN_CHUNKS = 7  # shift_msa, scale_msa, gate_msa, gate_mxa, shift_mlp, scale_mlp, gate_mlp


class DenoiserBlock(nn.Module):
    """adaLN-Zero block: modulated self-attention, plain gated cross-attention, modulated MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(hidden_size, eps=BLOCK_NORM_EPS, elementwise_affine=False)
        self.attn = Attention(hidden_size, num_heads)
        self.xattn = Attention(hidden_size, num_heads)
        self.norm2 = RMSNorm(hidden_size, eps=BLOCK_NORM_EPS, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, ADALN_CHUNKS * hidden_size))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, context: Union[torch.Tensor, KV],
                ops: TorchOps = TORCH_OPS) -> torch.Tensor:
        """x [N, L, C] with conditioning vectors cond [B, C] and image context [B, M, C] (or its prepared
        ``xattn.context_kv``) -> [N, L, C].

        N = B * G: groups of G consecutive sequences share one conditioning vector and context (batch-major), so
        the modulation and the context keys/values are computed once per sample.
        """
        (shift_msa, scale_msa, gate_msa, gate_mxa,
         shift_mlp, scale_mlp, gate_mlp) = ops.linear(F.silu(cond), self.adaLN_modulation[1]).chunk(
             ADALN_CHUNKS, dim=1)  # (B, C) each
        heads = self.attn.heads(x, None, ops, norm=self.norm1, shift=shift_msa, scale=scale_msa)  # (N, L, C)
        x = ops.linear(heads, self.attn.proj, gate=gate_msa, residual=x)  # (N, L, C)
        heads = self.xattn.heads(x, context, ops)  # (N, L, C), query neither normed nor modulated
        x = ops.linear(heads, self.xattn.proj, gate=gate_mxa, residual=x)  # (N, L, C)
        hidden = ops.linear(x, self.mlp.fc1, norm=self.norm2, shift=shift_mlp, scale=scale_mlp,
                            gelu=True)  # (N, L, 4C)
        return ops.linear(hidden, self.mlp.fc2, gate=gate_mlp, residual=x)  # (N, L, C)


class DenoiserFinalLayer(nn.Module):
    """adaLN (shift, scale), non-affine RMSNorm, linear to p*p*c outputs ordered (p_row, p_col, c)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = RMSNorm(hidden_size, eps=BLOCK_NORM_EPS, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, ops: TorchOps = TORCH_OPS) -> torch.Tensor:
        """x [N, L, C], cond [B, C] shared by groups of N/B sequences -> [N, L, p*p*c]."""
        shift, scale = ops.linear(F.silu(cond), self.adaLN_modulation[1]).chunk(2, dim=1)  # (B, C) each
        return ops.linear(x, self.linear, norm=self.norm_final, shift=shift, scale=scale)  # (N, L, p*p*c)


class TextGrounding(nn.Module):
    """Where the instruction points in the image, on the latent token grid.

    Per image token, the product of its (normed, projected) features with the projected instruction embedding: one
    multiplicative layer, so an image token scores high when it shows what the instruction names. The products are
    averaged onto the latent token grid and projected to the denoiser's width, one vector per latent token, which
    the denoiser adds to that token in every frame. The output projection starts at zero, so a model that gains
    this module (a fine-tune) starts from the old model's exact outputs.
    """

    def __init__(self, frame_features_dim: int, text_embed_dim: int, hidden_size: int,
                 frame_token_grid: Size2, latent_token_grid: Size2) -> None:
        super().__init__()
        self.frame_token_grid, self.latent_token_grid = frame_token_grid, latent_token_grid
        self.image_norm = nn.LayerNorm(frame_features_dim)
        self.image_proj = nn.Linear(frame_features_dim, hidden_size)
        self.text_proj = nn.Linear(text_embed_dim, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def zero_output(self) -> None:
        """Zero the output projection: the module then adds nothing until it is trained."""
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, frame_features: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """frame_features [B_f, N, D_f] and text_embeds [B_t, E] (B_f and B_t equal, or one of them 1) ->
        [max(B_f, B_t), L, hidden]: one vector per latent token."""
        image = self.image_proj(self.image_norm(frame_features))  # (B_f, N, H)
        joint = F.gelu(image * self.text_proj(text_embeds)[:, None])  # (B, N, H)
        rows, cols = self.frame_token_grid
        joint = rearrange(joint, "b (r c) h -> b h r c", r=rows, c=cols)
        pooled = F.adaptive_avg_pool2d(joint, self.latent_token_grid)  # (B, H, h_tok, w_tok)
        return self.out_proj(rearrange(pooled, "b h r c -> b (r c) h"))  # (B, L, H)


class LatteDenoiser(nn.Module):
    """Velocity field v(x_t, t | image, text) over [B, T, C, h, w] (latent) or raw normalised tracks [B, T, 2, H, W].

    ``cfg.latent=False`` builds the raw variant: a trainable track position encoder (``x_encoder``) in front of the
    patch embedding, and 2 output channels per point.
    """

    def __init__(self, cfg: DenoiserConfig) -> None:
        super().__init__()
        if cfg.depth % 2:
            raise ValueError(f"denoiser depth must be even (spatial/temporal pairs), got {cfg.depth}")
        if not cfg.latent and cfg.in_channels != 2:
            raise ValueError(f"raw denoiser (latent=False) works on (x, y) tracks: in_channels must be 2, "
                             f"got {cfg.in_channels}")
        self.cfg = cfg
        hidden = cfg.hidden_size
        self.input_size = as_pair(cfg.input_size)
        self.patch_size = cfg.patch_size
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.in_channels
        self.num_frames = cfg.num_frames
        self.frame_token_grid = token_grid(cfg.num_frame_tokens)
        self.num_frame_tokens = self.frame_token_grid[0] * self.frame_token_grid[1]
        self.frame_features_dim = cfg.frame_features_dim
        self.text_embed_dim = cfg.text_embed_dim

        if cfg.latent:
            self.x_encoder: Optional[TrackPosEncoder] = None
            embed_in = cfg.in_channels
        else:
            self.x_encoder = TrackPosEncoder(hidden, cfg.pos_embed_dim, raw=True)
            embed_in = 2 + cfg.pos_embed_dim
        self.x_embedder = PatchEmbed(self.input_size, cfg.patch_size, embed_in, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.frame_proj = nn.Linear(cfg.frame_features_dim, hidden)
        self.text_embeds_proj: Optional[Mlp] = None
        if cfg.text_embed_dim is not None:
            self.text_embeds_proj = Mlp(cfg.text_embed_dim, int(hidden * cfg.mlp_ratio), hidden)
        self.text_context_proj: Optional[nn.Sequential] = None
        if cfg.text_context:
            if cfg.text_embed_dim is None:
                raise ValueError("text_context needs language conditioning (text_embed_dim)")
            self.text_context_proj = nn.Sequential(nn.LayerNorm(cfg.text_embed_dim),
                                                   nn.Linear(cfg.text_embed_dim, hidden))
        self.token_grid = self.x_embedder.grid_size
        self.num_tokens = self.x_embedder.num_patches
        self.text_grounding: Optional[TextGrounding] = None
        if cfg.text_grounding:
            if cfg.text_embed_dim is None:
                raise ValueError("text_grounding needs language conditioning (text_embed_dim)")
            self.text_grounding = TextGrounding(cfg.frame_features_dim, cfg.text_embed_dim, hidden,
                                                self.frame_token_grid, self.token_grid)

        # Fixed sin-cos tables: persistent buffers (they are in the official state dicts).
        self.register_buffer("pos_embed", torch.zeros(1, self.num_tokens, hidden))
        self.register_buffer("temp_embed", torch.zeros(1, cfg.num_frames, hidden))
        self.register_buffer("frame_embed", torch.zeros(1, self.num_frame_tokens, hidden))

        self.blocks = nn.ModuleList([DenoiserBlock(hidden, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = DenoiserFinalLayer(hidden, cfg.patch_size, self.out_channels)
        self.initialize_weights()

    # ------------------------------------------------------------------------------------------ init
    def sincos_tables(self) -> Dict[str, torch.Tensor]:
        """The fixed tables this architecture defines, by state-dict name (each [1, n, hidden])."""
        return latte_sincos_tables(self.cfg.hidden_size, self.token_grid, self.num_frames, self.frame_token_grid)

    def initialize_weights(self) -> None:
        """DiT init: Xavier linears and patch conv, N(0, 0.02) time MLP, zero adaLN and output layers."""
        init_latte_weights(self, self.sincos_tables(), self.x_embedder)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.text_grounding is not None:
            self.text_grounding.zero_output()

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        t: Union[torch.Tensor, float],
        frame_features: torch.Tensor,
        text_embeds: Optional[torch.Tensor] = None,
        ops: TorchOps = TORCH_OPS,
    ) -> torch.Tensor:
        """Velocity [B, T, C, h, w] of x [B, T, C, h, w] at flow time t [B] or scalar (t=0 noise, t=1 data).

        frame_features [B, N, D] and text_embeds [B, E]; one row (or a batch expanded from one) is shared by all
        samples. Inputs are cast to the dtype of the weights (so a bf16 model accepts fp32 features); t stays
        float32. ``ops``: the kernels of the layers (``model.kernels.FastCPUOps`` for CPU inference).
        """
        return self.prepare_image(frame_features, text_embeds, ops)(x, t)

    def with_ops(self, ops: TorchOps) -> "DenoiserWithOps":
        """This denoiser run with ``ops`` (``model.kernels.FastCPUOps``): what the sampler evaluates."""
        return DenoiserWithOps(self, ops)

    def prepare_image(self, frame_features: torch.Tensor, text_embeds: Optional[torch.Tensor] = None,
                      ops: TorchOps = TORCH_OPS) -> Callable[[torch.Tensor, Union[torch.Tensor, float]], torch.Tensor]:
        """The per-image part of :meth:`forward` (image context keys/values of every block, the text
        conditioning) done once: returns ``step(x, t) -> velocity`` for the sampler's Euler steps. Not named
        ``bind``: the sampler calls a module (hooks, ``torch.compile``, CUDA graphs) through ``forward``."""
        frame_features, text_embeds = one_row_if_shared(frame_features), one_row_if_shared(text_embeds)
        self._check_conditioning(frame_features, text_embeds)
        dtype = self.frame_proj.weight.dtype
        context = ops.linear(frame_features.to(dtype), self.frame_proj,
                             residual=ops.param(self.frame_embed))  # (B, N, D)
        if self.text_context_proj is not None:  # the instruction as one more context token
            words = self.text_context_proj(text_embeds.to(dtype))[:, None]  # (B_text, 1, D)
            rows = max(context.shape[0], words.shape[0])
            context = torch.cat([context.expand(rows, -1, -1), words.expand(rows, -1, -1)], dim=1)  # (B, N + 1, D)
        context_kv = [block.xattn.context_kv(context, ops) for block in self.blocks]  # per block (B, M, D) x 2
        text_cond = None
        if self.text_embeds_proj is not None:
            text_cond = self.text_embeds_proj(text_embeds.to(dtype), ops)  # (B, D)
        grounding = None
        if self.text_grounding is not None:
            grounding = self.text_grounding(frame_features.to(dtype), text_embeds.to(dtype))  # (B, L, D)
        return functools.partial(self._velocity, context_kv=context_kv, text_cond=text_cond, grounding=grounding,
                                 ops=ops)

    def _velocity(self, x: torch.Tensor, t: Union[torch.Tensor, float], context_kv: List[KV],
                  text_cond: Optional[torch.Tensor], ops: TorchOps,
                  grounding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The per-step part of :meth:`forward` with the prepared context and text conditioning."""
        batch = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.dim() == 0:
            t = t.expand(batch)
        self._check_step(x, t, context_kv[0][0].shape[0], text_cond)
        if context_kv[0][0].shape[0] == 1 and (text_cond is None or text_cond.shape[0] == 1):
            t = ops.shared_time(t)  # (1,) when all samples share t: one conditioning vector for all
        x = x.to(self.frame_proj.weight.dtype)
        if self.x_encoder is not None:
            x = self.x_encoder(x, ops)  # (B, T, 2+F, H, W)
        x = rearrange(x, "b f c h w -> (b f) c h w")  # (B*T, C_in, h, w)
        x = self.x_embedder(x, ops) + ops.param(self.pos_embed)  # (B*T, L, D)
        if grounding is not None:  # the same map in every frame of a sample
            x = (x.reshape(batch, self.num_frames, *x.shape[1:]) + grounding[:, None]).flatten(0, 1)

        cond = self.t_embedder(t, ops)  # (B or 1, D)
        if text_cond is not None:
            cond = cond + text_cond  # (B, D)
        # cond and context are shared by the T spatial / L temporal sequences of a sample. The official code repeats
        # them batch-major before the blocks; the blocks here expand per-sample results instead (same values,
        # about a quarter fewer FLOPs).
        x = run_factorised_blocks(x, len(self.blocks), self.num_frames, self.num_tokens,
                                  lambda i, h: self.blocks[i](h, cond, context_kv[i], ops),
                                  temp_embed=ops.param(self.temp_embed))  # (B*T, L, D)
        x = self.final_layer(x, cond, ops)  # (B*T, L, p*p*C)
        return unpatchify(x, batch, self.token_grid, self.patch_size)  # (B, T, C, h, w)

    # ------------------------------------------------------------------------------------------ checks
    def _check_conditioning(self, frame_features: torch.Tensor, text_embeds: Optional[torch.Tensor]) -> None:
        expected_f = (self.num_frame_tokens, self.frame_features_dim)
        if frame_features.dim() != 3 or tuple(frame_features.shape[1:]) != expected_f:
            raise ValueError(f"denoiser expects frame_features [B, {expected_f[0]}, {expected_f[1]}], got "
                             f"{tuple(frame_features.shape)}")
        if self.text_embed_dim is None:
            if text_embeds is not None:
                raise ValueError("this denoiser has no language conditioning (text_embed_dim=None) but text_embeds "
                                 "were given")
        elif text_embeds is None:
            raise ValueError(f"this denoiser is language-conditioned: text_embeds [B, {self.text_embed_dim}] required")
        elif text_embeds.dim() != 2 or text_embeds.shape[1] != self.text_embed_dim:
            raise ValueError(f"denoiser expects text_embeds [B, {self.text_embed_dim}], got "
                             f"{tuple(text_embeds.shape)}")

    def _check_step(self, x: torch.Tensor, t: torch.Tensor, contexts: int, text_cond: Optional[torch.Tensor]) -> None:
        expected_x = (self.num_frames, self.in_channels, *self.input_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected_x:
            raise ValueError(f"denoiser expects x [B, {', '.join(map(str, expected_x))}], got {tuple(x.shape)}")
        batch = x.shape[0]
        if t.shape != (batch,):
            raise ValueError(f"denoiser expects t [B={batch}] (or a scalar), got {tuple(t.shape)}")
        texts = batch if text_cond is None else text_cond.shape[0]
        if contexts not in (1, batch) or texts not in (1, batch):
            raise ValueError(f"x has {batch} samples but the image context has {contexts} and the text {texts}")


class DenoiserWithOps:
    """A denoiser run with given ops: called like the module, and :meth:`bind` (the per-image work once per image,
    not once per Euler step) for ``flow.euler_sample``."""

    def __init__(self, denoiser: LatteDenoiser, ops: TorchOps) -> None:
        self.denoiser = denoiser
        self.ops = ops

    def __call__(self, x: torch.Tensor, t: Union[torch.Tensor, float], frame_features: torch.Tensor,
                 text_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Velocity [B, T, C, h, w], as ``LatteDenoiser.forward``."""
        return self.denoiser(x, t, frame_features, text_embeds, self.ops)

    def bind(self, frame_features: torch.Tensor,
             text_embeds: Optional[torch.Tensor] = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``step(x, t) -> velocity`` for one image (see ``LatteDenoiser.prepare_image``)."""
        return self.denoiser.prepare_image(frame_features, text_embeds, self.ops)
