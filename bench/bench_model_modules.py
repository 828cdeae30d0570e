"""Time the LIBERO-size torch modules (random weights): one denoiser evaluation, VAE encode, VAE decode.

Also times the denoiser with the official data layout (image context and conditioning repeated per sequence
before the blocks) to show what sharing them per sample saves, and reports FLOPs and achieved GFLOP/s.

    .venv/bin/python bench/bench_model_modules.py [--threads 2] [--repeats 3] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict

import torch
from einops import rearrange, repeat
from torch.utils.flop_counter import FlopCounterMode

from traj_forecast_ros.model.config import libero_config
from traj_forecast_ros.model.denoiser import LatteDenoiser
from traj_forecast_ros.model.vae import TrajectoryVAE


def official_layout_forward(model: LatteDenoiser, x, t, features, text) -> torch.Tensor:
    """The denoiser forward with cond/context repeated per sequence, as the official code does."""
    batch, frames, tokens = x.shape[0], model.num_frames, model.num_tokens
    h = model.x_embedder(rearrange(x, "b f c h w -> (b f) c h w")) + model.pos_embed
    cond = model.t_embedder(t) + model.text_embeds_proj(text)
    cond_s, cond_t = repeat(cond, "b d -> (b f) d", f=frames), repeat(cond, "b d -> (b l) d", l=tokens)
    context = model.frame_proj(features) + model.frame_embed
    ctx_s, ctx_t = repeat(context, "b n d -> (b f) n d", f=frames), repeat(context, "b n d -> (b l) n d", l=tokens)
    for i in range(0, len(model.blocks), 2):
        h = model.blocks[i](h, cond_s, ctx_s)
        h = rearrange(h, "(b f) l d -> (b l) f d", f=frames)
        if i == 0:
            h = h + model.temp_embed
        h = model.blocks[i + 1](h, cond_t, ctx_t)
        h = rearrange(h, "(b l) f d -> (b f) l d", l=tokens)
    out = model.final_layer(h, cond_s)
    return rearrange(out, "(b f) (h w) c -> b f c h w", b=batch, h=model.token_grid[0], w=model.token_grid[1])


def measure(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(fn: Callable[[], torch.Tensor]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)

    config = libero_config("atm")
    denoiser = LatteDenoiser(config.denoiser).eval()
    vae = TrajectoryVAE(config.vae).eval()
    with torch.no_grad():  # non-zero weights so every path does real work
        for module in (denoiser, vae):
            for param in module.parameters():
                if param.requires_grad:
                    param.normal_(0.0, 0.02)
    denoiser.to(dtype)
    vae.to(dtype)

    x = torch.randn(1, 16, 8, 16, 16)
    t = torch.tensor([0.3])
    features = torch.randn(1, 81, 1024)
    text = torch.randn(1, 768)
    tracks = torch.rand(1, 16, 2, 64, 64) * 2 - 1
    latents = torch.randn(1, 16, 256, 8)

    cases: Dict[str, Callable[[], torch.Tensor]] = {
        "denoiser (shared context)": lambda: denoiser(x, t, features, text),
        "denoiser (official layout)": lambda: official_layout_forward(
            denoiser, x.to(dtype), t, features.to(dtype), text.to(dtype)),
        "vae.encode": lambda: vae.encode(tracks, features)[0],
        "vae.decode": lambda: vae.decode(latents, features),
    }
    with torch.inference_mode():
        same = (cases["denoiser (shared context)"]() - cases["denoiser (official layout)"]()).abs().max().item()
        print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}, batch 1, LIBERO sizes")
        print(f"max |shared - official layout| = {same:.2e}")
        for name, fn in cases.items():
            flops = count_flops(fn)
            seconds = measure(fn, args.repeats)
            print(f"{name:28s} {seconds:7.3f} s  {flops / 1e9:7.1f} GFLOP  {flops / 1e9 / seconds:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
