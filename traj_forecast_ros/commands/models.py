"""``traj-forecast download | info | export-official``: get, inspect and convert models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from dataclasses import replace
from typing import Any, Dict, Optional

import torch
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import load_file

from traj_forecast_ros import registry
from traj_forecast_ros.commands import command_help
from traj_forecast_ros.cpu_cores import resolve_threads
from traj_forecast_ros.errors import TrajForecastError
from traj_forecast_ros.forecast import DEFAULT_NUM_SAMPLES
from traj_forecast_ros.model.checkpoint import build_modules, export_official, load_model_config
from traj_forecast_ros.model.config import CONFIG_FILE, DENOISER_FILE, IMAGE_ENCODER_DIR, TEXT_ENCODER_DIR, ModelConfig
from traj_forecast_ros.model.encoders import ImageEncoder, TextEncoder, resolve_source
from traj_forecast_ros.sampling_plan import (
    PROBE_MAX_GFLOP,
    SamplingPlan,
    cpu_size_rule,
    denoiser_gflop,
    plan_for_model,
    weights_identity,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``download``, ``info`` and ``export-official`` commands."""
    download = subparsers.add_parser(
        "download", help=command_help("download"),
        description="Fetches the checkpoints and encoders of a registry model (models/registry.yaml) from the "
                    "Hugging Face hub and converts them into $TRAJ_FORECAST_HOME/models/NAME. Offline it fails "
                    "at once and prints what to download by hand.")
    download.add_argument("name", help="registry name (e.g. libero-atm, libero-tramoe)")
    download.add_argument("--cache-dir", type=Path, default=None,
                          help="cache root (default: $TRAJ_FORECAST_HOME or ~/.cache/traj_forecast_ros)")
    download.add_argument("--force", action="store_true", help="download and convert again even if present")
    download.set_defaults(func=_download)

    info = subparsers.add_parser("info", help=command_help("info"),
                                 description="Without NAME, lists the registry with each model's status.")
    info.add_argument("name", nargs="?", default=None, help="registry name or model directory")
    info.add_argument("--cache-dir", type=Path, default=None, help="cache root (default: $TRAJ_FORECAST_HOME)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)

    export = subparsers.add_parser(
        "export-official", help=command_help("export-official"),
        description="Strictly loads the official denoiser (and VAE) .pth files into the architecture of a preset "
                    "(or a config YAML) and writes config.yaml + safetensors (+ encoders when given).")
    export.add_argument("--denoiser", type=Path, required=True, help="official denoiser checkpoint (.pth)")
    export.add_argument("--vae", type=Path, default=None, help="official trajectory-VAE checkpoint (.pth)")
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="registry model whose architecture and latent scale to use "
                                         "(libero-atm, libero-tramoe)")
    source.add_argument("--config", type=Path, help="a ModelConfig YAML instead of a preset")
    export.add_argument("--image-encoder", type=Path, default=None,
                        help="transformers directory of the DINOv2 model to ship in the model dir (optional)")
    export.add_argument("--text-encoder", type=Path, default=None,
                        help="transformers directory of the CLIP model (+ tokenizer) to ship (optional)")
    export.add_argument("--out", type=Path, required=True, help="model directory to write")
    export.set_defaults(func=_export)


def _fail(command: str, message: str) -> int:
    print(f"traj-forecast {command}: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------- download
def _download(args: argparse.Namespace) -> int:
    try:
        path = registry.download(args.name, cache_dir=args.cache_dir, force=args.force)
    except TrajForecastError as exc:
        return _fail("download", str(exc))
    print(f"model '{args.name}' ready in {path}")
    return 0


# ---------------------------------------------------------------------------------------------- info
def _parameter_counts(config) -> Dict[str, int]:
    """Parameter numbers of the denoiser and VAE (fixed tables that are Parameters included, buffers not), built
    on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        denoiser, vae = build_modules(config)
    counts = {"denoiser": sum(p.numel() for p in denoiser.parameters())}
    if vae is not None:
        counts["vae"] = sum(p.numel() for p in vae.parameters())
    return counts


def _cpu_plans(config, model_name: str, model_dir: Optional[Path] = None,
               cache_dir: Optional[Path] = None) -> Dict[str, str]:
    """The CPU sampling plan per dtype for the default K and the node's default thread count (the cores
    available): a cached probe decision where one exists (``<cache_dir>/plans``, keyed by the weights in
    ``model_dir``), else the size rule. Nothing is timed here."""
    with torch.device("meta"):
        denoiser, _ = build_modules(config)
    threads = resolve_threads(0)
    weights_id = None
    weights = model_dir / DENOISER_FILE if model_dir is not None else None
    batch = cpu_size_rule(denoiser, torch.float32)["sample_batch_size"]
    if (weights is not None and weights.is_file()
            and denoiser_gflop(denoiser, min(DEFAULT_NUM_SAMPLES, batch)) <= PROBE_MAX_GFLOP):  # probed models only
        weights_id = weights_identity(load_file(str(weights)))
    plans_dir = Path(cache_dir).expanduser() / "plans" if cache_dir is not None else None
    plans = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        base = SamplingPlan(device=torch.device("cpu"), dtype=dtype, sample_batch_size=1, threads=threads)
        plans[name] = plan_for_model(base, denoiser, DEFAULT_NUM_SAMPLES, cache_dir=plans_dir, model_name=model_name,
                                     cache_only=True, weights_id=weights_id).summary()
    return plans


def _encoder_status(model_dir: Optional[Path], sub_dir: str, model_id: Optional[str], has_config: bool) -> str:
    source = resolve_source(model_id, model_dir, sub_dir)  # the order the encoders load in
    if source is None:
        return "random weights from config" if has_config else "not configured"
    if model_dir is not None and source == str(model_dir / sub_dir):
        return f"shipped in {sub_dir}/"
    if Path(source).is_dir():
        return f"local directory {model_id}"
    cached = try_to_load_from_cache(model_id, "config.json")
    return f"hub {model_id} ({'in the Hugging Face cache' if isinstance(cached, str) else 'NOT downloaded'})"


def _config_summary(config) -> Dict[str, Any]:
    den = config.denoiser
    return {
        "name": config.name,
        "image_size": list(config.image_size),
        "query_grid": list(config.query_grid),
        "query_stride": config.query_stride,
        "query_offset": config.query_offset,
        "num_frames": config.num_frames,
        "denoiser": f"{'latent' if den.latent else 'raw'} Latte, depth {den.depth}, width {den.hidden_size}, "
                    f"{den.num_heads} heads, input {den.input_size}, patch {den.patch_size}",
        "vae": (f"depth {config.vae.encoder_depth}+{config.vae.decoder_depth}, width {config.vae.hidden_size}, "
                f"patch {config.vae.patch_size}, {config.vae.latent_channels} latent channels"
                if config.vae is not None else None),
        "text_conditioned": den.text_embed_dim is not None,
        "latent_scale": config.latent_scale,
    }


def describe_model(name_or_dir: str, cache_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Everything ``info`` prints about a registry name or a model directory, as a dict."""
    description: Dict[str, Any] = {"model": name_or_dir}
    entry = registry.load_registry().get(name_or_dir)
    candidate = Path(name_or_dir).expanduser()
    model_dir: Optional[Path]
    if candidate.is_dir():
        model_dir = candidate
    elif entry is not None:
        model_dir = entry.local_dir or registry.model_cache_dir(name_or_dir, cache_dir)
        description.update(registry=entry.description, hub_repo=entry.hub_repo,
                           hub_files={role: f.path for role, f in entry.files.items()} or None)
    else:
        raise FileNotFoundError(f"'{name_or_dir}' is neither a model directory nor a registry name "
                                f"(known: {', '.join(sorted(registry.load_registry()))})")
    present = model_dir.is_dir() and (model_dir / CONFIG_FILE).is_file()
    if present:
        config = load_model_config(model_dir)
    elif entry is not None and entry.is_hub_model:
        config = entry.config()
    else:
        config = None
    description["model_dir"] = str(model_dir)
    description["weights_present"] = registry.has_weights(model_dir)
    if config is not None:
        description["config"] = _config_summary(config)
        description["parameters"] = _parameter_counts(config)
        description["cpu_sampling_plan"] = _cpu_plans(config, config.name if candidate.is_dir() else name_or_dir,
                                                      model_dir if present else None, cache_dir)
        description["image_encoder"] = _encoder_status(model_dir if present else None, IMAGE_ENCODER_DIR,
                                                       config.image_encoder.model_id,
                                                       bool(config.image_encoder.config))
        if config.text_encoder is not None:
            description["text_encoder"] = _encoder_status(model_dir if present else None, TEXT_ENCODER_DIR,
                                                          config.text_encoder.model_id,
                                                          bool(config.text_encoder.config))
    if present:
        description["files"] = {
            str(p.relative_to(model_dir)): p.stat().st_size for p in sorted(model_dir.rglob("*")) if p.is_file()
        }
    return description


def _print_description(description: Dict[str, Any]) -> None:
    for key, value in description.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for sub_key, sub_value in value.items():
                if key == "files":
                    sub_value = f"{sub_value / 1e6:.1f} MB" if sub_value >= 1e5 else f"{sub_value} B"
                elif key == "parameters":
                    sub_value = f"{sub_value:,}"
                print(f"  {sub_key}: {sub_value}")
        else:
            print(f"{key}: {value}")


def _info(args: argparse.Namespace) -> int:
    if args.name is None:
        entries = registry.load_registry()
        default = registry.default_model_name()
        rows = []
        for name, entry in entries.items():
            model_dir = entry.local_dir or registry.model_cache_dir(name, args.cache_dir)
            rows.append({"name": name, "default": name == default, "weights_present": registry.has_weights(model_dir),
                         "model_dir": str(model_dir), "description": entry.description})
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                flag = "*" if row["default"] else " "
                status = "present" if row["weights_present"] else "not downloaded"
                print(f"{flag} {row['name']:<16} {status:<15} {row['model_dir']}")
        return 0
    try:
        description = describe_model(args.name, args.cache_dir)
    except (FileNotFoundError, TrajForecastError, ValueError) as exc:
        return _fail("info", str(exc))
    if args.json:
        print(json.dumps(description, indent=2))
    else:
        _print_description(description)
    return 0


# ---------------------------------------------------------------------------------------------- export
def _export(args: argparse.Namespace) -> int:
    try:
        if args.preset is not None:
            entry = registry.get_entry(args.preset)
            if not entry.is_hub_model:
                return _fail("export-official", f"'{args.preset}' has no official checkpoint preset")
            config = entry.config()
        else:
            config = ModelConfig.load_yaml(args.config)
        image_encoder = text_encoder = None
        if args.image_encoder is not None or args.text_encoder is not None:
            if args.image_encoder is not None:
                image_encoder = ImageEncoder.from_config(replace(config.image_encoder,
                                                                 model_id=str(args.image_encoder)))
            if args.text_encoder is not None:
                if config.text_encoder is None:
                    return _fail("export-official", "--text-encoder given but the model has no text conditioning")
                text_encoder = TextEncoder.from_config(replace(config.text_encoder, model_id=str(args.text_encoder)))
        out = export_official(config, args.denoiser, args.vae, args.out, image_encoder, text_encoder)
        load_model_config(out)  # written config reads back
    except (TrajForecastError, ValueError, OSError) as exc:
        return _fail("export-official", str(exc))
    print(f"wrote model directory {out}")
    return 0
