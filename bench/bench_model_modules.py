"""Time the LIBERO-size torch modules (random weights): one denoiser evaluation, VAE encode, VAE decode.

Each is timed twice in the same run: our forward (``LatteDenoiser`` / ``TrajectoryVAE`` with the CPU inference
ops ``traj_forecast_ros.model.kernels.FastCPUOps``) and the official-style reference below (plain PyTorch ops, image
context and conditioning repeated per sequence before the blocks, as the official code does). Also prints FLOPs,
achieved GFLOP/s and the largest relative difference between the two.

The ``official_*`` functions are written straight from the parameters (spec sections 3-4), independent of the
modules' own forward code: the forecast benchmark times the official-style plan with them, and the tests use them
as the reference forward (``test/perf``).

    .venv/bin/python bench/bench_model_modules.py [--threads 2] [--repeats 3] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from einops import rearrange, repeat  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count  # noqa: E402

from traj_forecast_ros.model.presets import libero_config  # noqa: E402
from traj_forecast_ros.model.denoiser import LatteDenoiser  # noqa: E402
from traj_forecast_ros.model.kernels import FastCPUOps, KernelOptions  # noqa: E402
from traj_forecast_ros.model.layers import Attention, Mlp, timestep_frequencies  # noqa: E402
from traj_forecast_ros.model.vae import TrajectoryVAE  # noqa: E402


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU fused attention kernel (not in torch's FLOP registry)."""
    return sdpa_flop_count(query, key, value)


FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


# ---------------------------------------------------------------------------------------------- reference forward
def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def official_attention(attn: Attention, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Spec 4.3: q from x, k|v from context (one context per sequence), QK-RMSNorm over the full width."""
    width = x.shape[-1]
    q = F.rms_norm(_linear(x, attn.q), (width,), attn.q_norm.weight, attn.q_norm.eps)  # (N, L, C)
    k, v = _linear(context, attn.kv).chunk(2, dim=-1)  # (N, M, C) each
    k = F.rms_norm(k, (width,), attn.k_norm.weight, attn.k_norm.eps)
    q, k, v = (rearrange(a, "n l (h d) -> n h l d", h=attn.num_heads) for a in (q, k, v))
    out = rearrange(F.scaled_dot_product_attention(q, k, v), "n h l d -> n l (h d)")  # (N, L, C)
    return _linear(out, attn.proj)


def official_mlp(mlp: Mlp, x: torch.Tensor) -> torch.Tensor:
    """timm Mlp: fc2(GELU_tanh(fc1(x)))."""
    return _linear(F.gelu(_linear(x, mlp.fc1), approximate="tanh"), mlp.fc2)


def official_denoiser_forward(model: LatteDenoiser, x: torch.Tensor, t: torch.Tensor, features: torch.Tensor,
                              text: Optional[torch.Tensor]) -> torch.Tensor:
    """The Latte forward as the official code runs it: cond/context repeated per sequence, plain ops (latent models).

    x [B, T, C, h, w], t [B], features [B, N, D], text [B, E] or None -> velocity [B, T, C, h, w].
    """
    batch, frames, tokens = x.shape[0], model.num_frames, model.num_tokens
    eps = model.blocks[0].norm1.eps
    h = rearrange(model.x_embedder.proj(rearrange(x, "b f c h w -> (b f) c h w")), "n d h w -> n (h w) d")
    h = h + model.pos_embed  # (B*T, L, D)
    t_freq = timestep_frequencies(t, model.t_embedder.frequency_embedding_size)
    cond = _linear(F.silu(_linear(t_freq, model.t_embedder.mlp[0])), model.t_embedder.mlp[2])  # (B, D)
    if text is not None:
        cond = cond + official_mlp(model.text_embeds_proj, text)
    cond_s, cond_t = repeat(cond, "b d -> (b f) d", f=frames), repeat(cond, "b d -> (b l) d", l=tokens)
    context = _linear(features, model.frame_proj) + model.frame_embed  # (B, M, D)
    ctx_s = repeat(context, "b n d -> (b f) n d", f=frames)  # (B*T, M, D)
    ctx_t = repeat(context, "b n d -> (b l) n d", l=tokens)  # (B*L, M, D)
    for i, block in enumerate(model.blocks):
        cond_i, ctx_i = (cond_s, ctx_s) if i % 2 == 0 else (cond_t, ctx_t)
        mod = _linear(F.silu(cond_i), block.adaLN_modulation[1]).unsqueeze(1)  # (N, 1, 7D)
        shift_msa, scale_msa, gate_msa, gate_mxa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(7, dim=-1)
        normed = F.rms_norm(h, (h.shape[-1],), None, eps)
        modulated = normed * (1 + scale_msa) + shift_msa
        h = h + gate_msa * official_attention(block.attn, modulated, modulated)
        h = h + gate_mxa * official_attention(block.xattn, h, ctx_i)
        normed = F.rms_norm(h, (h.shape[-1],), None, eps)
        h = h + gate_mlp * official_mlp(block.mlp, normed * (1 + scale_mlp) + shift_mlp)
        if i % 2 == 0:
            h = rearrange(h, "(b f) l d -> (b l) f d", f=frames)
            if i == 0:
                h = h + model.temp_embed
        else:
            h = rearrange(h, "(b l) f d -> (b f) l d", l=tokens)
    final = model.final_layer
    shift, scale = _linear(F.silu(cond_s), final.adaLN_modulation[1]).unsqueeze(1).chunk(2, dim=-1)
    out = _linear(F.rms_norm(h, (h.shape[-1],), None, eps) * (1 + scale) + shift, final.linear)  # (B*T, L, p*p*C)
    rows, cols = model.token_grid
    p = model.patch_size
    return rearrange(out, "(b f) (h w) (p q c) -> b f c (h p) (w q)", b=batch, h=rows, w=cols, p=p, q=p)


def _official_vae_blocks(vae: TrajectoryVAE, h: torch.Tensor, blocks, context: torch.Tensor,
                         add_temp_embed: bool) -> torch.Tensor:
    """VAE spatial/temporal blocks with the context repeated per sequence (h [(B T), L, C])."""
    frames, tokens = vae.num_frames, vae.num_latent_tokens
    ctx_s = repeat(context, "b n d -> (b f) n d", f=frames)
    ctx_t = repeat(context, "b n d -> (b l) n d", l=tokens)
    for i, block in enumerate(blocks):
        ctx_i = ctx_s if i % 2 == 0 else ctx_t
        width = h.shape[-1]
        normed = F.rms_norm(h, (width,), block.norm1.weight, block.norm1.eps)
        h = h + block.gate_msa * official_attention(block.attn, normed, normed)
        normed = F.rms_norm(h, (width,), block.norm2.weight, block.norm2.eps)
        h = h + block.gate_mxa * official_attention(block.xattn, normed, ctx_i)
        normed = F.rms_norm(h, (width,), block.norm3.weight, block.norm3.eps)
        h = h + block.gate_mlp * official_mlp(block.mlp, normed)
        if i % 2 == 0:
            h = rearrange(h, "(b f) l d -> (b l) f d", f=frames)
            if add_temp_embed and i == 0:
                h = h + vae.temp_embed
        else:
            h = rearrange(h, "(b l) f d -> (b f) l d", l=tokens)
    return h


def official_vae_encode(vae: TrajectoryVAE, tracks: torch.Tensor,
                        features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) [B, T, L, Z] of tracks [B, T, 2, H, W], official style (plain ops, full input)."""
    batch = tracks.shape[0]
    lff = vae.x_encoder.lff
    points = rearrange(tracks, "b t c h w -> b t h w c")
    u = points @ lff.w.T
    fourier = lff.scale * torch.cat([torch.cos(u), torch.sin(u)], dim=-1)
    fourier = _linear(F.gelu(_linear(fourier, lff.mlp[0]), approximate="tanh"), lff.mlp[3])
    x = rearrange(torch.cat([points, fourier], dim=-1), "b t h w c -> (b t) c h w")
    h = rearrange(vae.x_embedder.proj(x), "n d h w -> n (h w) d") + vae.pos_embed  # (B*T, L, C)
    context = _linear(features, vae.frame_proj) + vae.frame_embed
    h = _official_vae_blocks(vae, h, vae.encoder_blocks, context, add_temp_embed=True)
    mean, logvar = _linear(rearrange(h, "(b f) l c -> b f l c", b=batch), vae.to_latents).chunk(2, dim=-1)
    return mean, F.softplus(0.5 * logvar)


def official_vae_decode(vae: TrajectoryVAE, z: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Latents z [B, T, L, Z] -> normalised tracks [B, T, 2, H, W], official style."""
    batch = z.shape[0]
    h = rearrange(_linear(z, vae.from_latents), "b f l c -> (b f) l c")
    context = _linear(features, vae.frame_proj) + vae.frame_embed
    h = _official_vae_blocks(vae, h, vae.decoder_blocks, context, add_temp_embed=False)
    rows, cols = vae.latent_grid
    p = vae.patch_size
    return rearrange(_linear(h, vae.final_layer.linear), "(b f) (h w) (p q c) -> b f c (h p) (w q)", b=batch,
                     h=rows, w=cols, p=p, q=p)


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference| (float64)."""
    ours, reference = ours.double(), reference.double()
    return float((ours - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------- timing
def measure(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call (run it on the reference modules: the CPU kernels' oneDNN ops are not registered)."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


def random_libero_modules(seed: int = 0) -> Tuple[LatteDenoiser, TrajectoryVAE]:
    """LIBERO-size denoiser and VAE with every trainable weight N(0, 0.02) (no zero-initialised shortcuts)."""
    torch.manual_seed(seed)
    config = libero_config("atm")
    denoiser = LatteDenoiser(config.denoiser).eval()
    vae = TrajectoryVAE(config.vae).eval()
    with torch.no_grad():
        for module in (denoiser, vae):
            for param in module.parameters():
                if param.requires_grad:
                    param.normal_(0.0, 0.02)
    return denoiser, vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    denoiser, vae = random_libero_modules()

    x = torch.randn(1, 16, 8, 16, 16)
    t = torch.tensor([0.3])
    features = torch.randn(1, 81, 1024)
    text = torch.randn(1, 768)
    tracks = torch.rand(1, 16, 2, 64, 64) * 2 - 1
    latents = torch.randn(1, 16, 256, 8)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    ops = FastCPUOps(KernelOptions(dtype=dtype))
    cases: Dict[str, Tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]] = {
        "denoiser": (lambda: denoiser(x, t, features, text, ops),
                     lambda: official_denoiser_forward(denoiser, x, t, features, text)),
        "vae.encode": (lambda: vae.encode(tracks, features, ops)[0],
                       lambda: official_vae_encode(vae, tracks, features)[0]),
        "vae.decode": (lambda: vae.decode(latents, features, ops), lambda: official_vae_decode(vae, latents, features)),
    }
    print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}, batch 1, LIBERO sizes")
    with torch.inference_mode(), autocast:
        for name, (ours, official) in cases.items():
            difference = relative_difference(ours().float(), official().float())
            flops = count_flops(official)  # same maths; the oneDNN ops are not in the FLOP registry
            for label, fn in (("ours", ours), ("official-style", official)):
                seconds = measure(fn, args.repeats)
                print(f"{name:11s} {label:15s} {seconds:7.3f} s  {flops / 1e9:7.1f} GFLOP  "
                      f"{flops / 1e9 / seconds:6.1f} GFLOP/s")
            print(f"{name:11s} max relative difference ours vs official-style: {difference:.2e}")


if __name__ == "__main__":
    main()
