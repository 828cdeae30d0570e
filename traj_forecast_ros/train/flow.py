"""Stage 2: train the latent denoiser with rectified flow (spec section 5) on a frozen VAE.

Before training, every example's VAE posterior (mean, std) ``[T, L, C]`` and every scene's posterior of the static
query grid (frame 0, the conditioning frame) are encoded once and cached (``<out>/cache/latents-<key>.npz``), as the
official ``precomputed_latents`` recipe does. Each step then draws ``z = mean + std * eps``, scales it by
``1 / latent_scale`` and applies :func:`~traj_forecast_ros.model.flow.flow_matching_loss` (logit-normal t, frame 0
pinned to the scaled conditioning latent and masked).

The run directory is a complete model directory (``config.yaml``, ``denoiser.safetensors`` with the EMA weights when
EMA is on, ``vae.safetensors``, ``image_encoder/``) that ``Forecaster.from_pretrained(out_dir)`` loads, plus
``checkpoints/`` and ``metrics.csv``.

Language: a frozen CLIP text encoder embeds the config's default instruction (the official recipe has one per
sample; our datasets have none). A ``words`` text encoder (:mod:`traj_forecast_ros.model.word_encoder`) is instead
trained together with the denoiser on each example's own instruction (the dataset's ``instructions`` field): its
vocabulary is built from the dataset's closed instruction set and saved in the model's config, and a share
``text_dropout`` of the instructions is replaced by the empty one, so the model also forecasts without an
instruction (the marginal over the tasks).

Instruction contrast (optional, not in the paper): in a branch-grouped dataset several samples share one frame 0 and
differ in instruction and future. For each sample with such a sibling, the denoiser also runs on the same noised
input with the sibling's instruction, and a two-way cross-entropy asks its error under the own instruction to beat
the error under the sibling's (:func:`~traj_forecast_ros.model.flow.instruction_contrast_loss`). The flow loss alone
hides this signal: the instruction decides only the few moving tokens, and only near the noise end. With
``contrast_on_motion`` the contrast compares errors only on the latent tokens that move in some branch of the group
(:func:`branch_moving_maps`), so it cannot be won by moving still background under a wrong instruction, and
``crossed_still`` weighs the crossed pass's error on the other tokens, which stand still whatever the instruction.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from traj_forecast_ros.model.checkpoint import load_into_extended, load_model_dir, load_official, save_model_dir
from traj_forecast_ros.model.config import LATENT_DRAWS, ModelConfig
from traj_forecast_ros.model.denoiser import LatteDenoiser
from traj_forecast_ros.model.flow import flow_matching_loss, instruction_contrast_loss, latents_to_grid
from traj_forecast_ros.model.vae import TrajectoryVAE
from traj_forecast_ros.model.word_encoder import PAD_ID, WordTextEncoder, build_vocabulary, text_encoder_weights
from traj_forecast_ros.train.common import TrainSettings, distributed
from traj_forecast_ros.geometry import static_tracks_norm
from traj_forecast_ros.metrics import MOVING_THRESHOLD_PX, moving_mask
from traj_forecast_ros.paired_metrics import branch_pairs
from traj_forecast_ros.train.data import (
    TrackExamples,
    build_image_encoder,
    build_text_encoder,
    dataset_fingerprint,
    encoder_fingerprint,
    prepare_examples,
)
from traj_forecast_ros.train.trainer import Trainer
from traj_forecast_ros.train.vae import load_vae_dir, load_vae_weights

log = logging.getLogger(__name__)

ENCODE_BATCH = 16
TEXT_DROPOUT = 0.1  # share of training instructions replaced by the empty one (words text encoder)
CONTRAST_TEMPERATURE = 0.01  # scale of the error gap that the instruction contrast treats as a confident decision
PathLike = Union[str, Path]


class FlowObjective(nn.Module):
    """Rectified-flow loss of a denoiser on precomputed VAE posteriors.

    ``forward(latent_mean, latent_std [B, T, L, C], cond_mean, cond_std [B, 1, L, C], features [B, N, D],
    text_embeds [B, E] | None, generator) -> dict(loss)``. With ``latent_draw="sample"`` both the data latents and
    the conditioning frame are posterior draws ``mean + std * eps`` (the official recipe; the sampler also draws the
    conditioning frame); with ``"mean"`` both are the posterior means (and so is the sampler's conditioning frame).
    With ``instruction_contrast`` > 0 and a batch's sibling instructions, the loss adds that weight times the
    instruction contrast, and the dict also holds the two parts (``flow``, ``contrast``) for the log.
    """

    def __init__(self, denoiser: LatteDenoiser, latent_scale, latent_grid: Tuple[int, int],
                 latent_draw: str = "sample", text_encoder: Optional[WordTextEncoder] = None,
                 text_dropout: float = TEXT_DROPOUT, moving_weight: float = 0.0, time_mean: float = 0.0,
                 instruction_contrast: float = 0.0, contrast_temperature: float = CONTRAST_TEMPERATURE,
                 contrast_on_motion: bool = False, crossed_still: float = 0.0) -> None:
        super().__init__()
        if moving_weight < 0 or instruction_contrast < 0 or crossed_still < 0:
            raise ValueError(f"moving_weight, instruction_contrast and crossed_still must be >= 0, got "
                             f"{moving_weight}, {instruction_contrast} and {crossed_still}")
        if contrast_temperature <= 0:
            raise ValueError(f"contrast_temperature must be > 0, got {contrast_temperature}")
        if instruction_contrast > 0 and text_encoder is None:
            raise ValueError("the instruction contrast needs the trainable words text encoder")
        if (contrast_on_motion or crossed_still > 0) and instruction_contrast <= 0:
            raise ValueError("contrast_on_motion and crossed_still refine the instruction contrast: set its weight")
        if crossed_still > 0 and not contrast_on_motion:
            raise ValueError("crossed_still needs contrast_on_motion (the tokens that no branch moves)")
        self.contrast_on_motion = bool(contrast_on_motion)  # contrast only where some branch moves
        self.crossed_still = float(crossed_still)  # weight of the crossed pass's error where no branch moves
        self.time_mean = float(time_mean)  # location of the logit-normal flow time (0: the official recipe)
        self.instruction_contrast = float(instruction_contrast)  # weight of the contrast term
        self.contrast_temperature = float(contrast_temperature)  # error gap past which a row stops pushing
        self.text_encoder = text_encoder  # trained with the denoiser; embeds the batch's ``text_ids``
        self.text_dropout = float(text_dropout)
        self.moving_weight = float(moving_weight)  # extra loss weight of the latent tokens of moving points
        if latent_draw not in LATENT_DRAWS:
            raise ValueError(f"latent_draw must be one of {list(LATENT_DRAWS)}, got {latent_draw!r}")
        self.denoiser = denoiser
        self.latent_draw = latent_draw
        self.latent_grid = tuple(latent_grid)
        self.register_buffer("vae_scale", 1.0 / torch.tensor(latent_scale, dtype=torch.float32), persistent=False)

    def scaled_grid(self, mean: torch.Tensor, std: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Posterior draw (or mean) ``[B, T, L, C]`` -> scaled denoiser layout ``[B, T, C, h, w]``."""
        z = mean if self.latent_draw == "mean" else TrajectoryVAE.sample_posterior(mean, std, generator)
        z = z * self.vae_scale  # (B, T, L, C)
        return latents_to_grid(z, self.latent_grid)  # (B, T, C, h, w)

    def forward(self, latent_mean: torch.Tensor, latent_std: torch.Tensor, cond_mean: torch.Tensor,
                cond_std: torch.Tensor, features: torch.Tensor, text_embeds: Optional[torch.Tensor] = None,
                text_ids: Optional[torch.Tensor] = None, moving: Optional[torch.Tensor] = None,
                crossed_text_ids: Optional[torch.Tensor] = None, crossed: Optional[torch.Tensor] = None,
                branch_moving: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``moving`` [B, h, w]: the latent tokens of :func:`moving_token_maps`, weighted ``1 + moving_weight``.
        ``crossed_text_ids`` [B, L] and ``crossed`` [B] bool: a sibling branch's instruction per sample (rows where
        ``crossed`` is set), for the instruction contrast; a dropped instruction drops its row from the contrast.
        ``branch_moving`` [B, h, w]: the tokens that move in some branch of the sample's group
        (:func:`branch_moving_maps`), needed with ``contrast_on_motion``."""
        contrast = (self.instruction_contrast > 0 and text_ids is not None and crossed is not None
                    and crossed_text_ids is not None)
        if text_ids is not None:
            if self.text_encoder is None:
                raise ValueError("text_ids given but the objective has no trainable text encoder")
            if self.text_dropout > 0 and generator is not None:
                drop = torch.rand(text_ids.shape[0], generator=generator, device=generator.device) < self.text_dropout
                drop = drop.to(text_ids.device)
                text_ids = torch.where(drop[:, None], torch.full_like(text_ids, PAD_ID), text_ids)
                if contrast:
                    crossed = crossed.to(drop.device) & ~drop
            if contrast:
                both = self.text_encoder.embed_ids(torch.cat([text_ids, crossed_text_ids.to(text_ids.device)]))
                text_embeds, crossed_embeds = both.chunk(2)  # (B, E) each
            else:
                text_embeds = self.text_encoder.embed_ids(text_ids)  # (B, E)
        x1 = self.scaled_grid(latent_mean, latent_std, generator)  # (B, T, C, h, w)
        cond = self.scaled_grid(cond_mean, cond_std, generator)  # (B, 1, C, h, w)
        weight = None
        if moving is not None and self.moving_weight > 0:
            weight = 1.0 + self.moving_weight * moving.to(x1.dtype)[:, None, None]  # (B, 1, 1, h, w)
        if not contrast:
            return {"loss": flow_matching_loss(self.denoiser, x1, cond, features, text_embeds, generator, weight,
                                               self.time_mean)}
        if self.contrast_on_motion and branch_moving is None:
            raise ValueError("contrast_on_motion needs the batch's branch_moving token maps")
        parts = instruction_contrast_loss(self.denoiser, x1, cond, features, text_embeds, crossed_embeds, crossed,
                                          generator, weight, self.time_mean, self.contrast_temperature,
                                          region=branch_moving if self.contrast_on_motion else None)
        loss = parts.flow + self.instruction_contrast * parts.contrast + self.crossed_still * parts.crossed_still
        logged = {"loss": loss, "flow": parts.flow.detach(), "contrast": parts.contrast.detach()}
        if self.contrast_on_motion:
            logged["crossed_still"] = parts.crossed_still.detach()
        return logged


def crossed_instructions(branch_groups: np.ndarray, instructions: np.ndarray) -> List[np.ndarray]:
    """Per dataset sample, the instruction ids of its branch siblings whose instruction differs from its own
    (empty for a sample outside any branch group): the partners of
    :func:`~traj_forecast_ros.paired_metrics.branch_pairs`.
    ``branch_groups`` and ``instructions`` are [N] per sample."""
    partners: List[set] = [set() for _ in range(len(branch_groups))]
    for i, j in branch_pairs(branch_groups, instructions):
        partners[i].add(int(instructions[j]))
    return [np.array(sorted(ids), np.int64) for ids in partners]


def pick_crossed(choices: List[np.ndarray], scenes: np.ndarray,
                 seed: Union[int, Sequence[int]]) -> Tuple[np.ndarray, np.ndarray]:
    """``(instruction id [B], has one [B] bool)``: one sibling instruction per scene, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    picked = np.zeros(len(scenes), np.int64)
    found = np.zeros(len(scenes), bool)
    for row, scene in enumerate(scenes):
        options = choices[int(scene)]
        if len(options):
            picked[row], found[row] = options[rng.integers(len(options))], True
    return picked, found


def branch_moving_maps(moving: np.ndarray, example_scenes: np.ndarray, branch_groups: np.ndarray) -> np.ndarray:
    """``[E, h, w]`` bool: per example, the union of ``moving`` [E, h, w] (:func:`moving_token_maps`) over every
    example whose scene (``example_scenes`` [E], dataset indices) is in the same branch group (``branch_groups`` [N],
    -1: none). An example outside any group keeps its own map. The complement holds the tokens that no instruction
    of the group moves."""
    groups = np.asarray(branch_groups)[np.asarray(example_scenes)]  # (E,)
    union = np.array(moving, dtype=bool, copy=True)
    for group in np.unique(groups[groups >= 0]):
        members = groups == group
        union[members] = moving[members].any(axis=0)
    return union


def moving_token_maps(examples: TrackExamples, latent_grid: Tuple[int, int], chunk: int = 256) -> np.ndarray:
    """``[E, h, w]`` bool per example: the latent tokens whose patch of query points holds a point whose true track
    gets more than :data:`~traj_forecast_ros.metrics.MOVING_THRESHOLD_PX` from frame 0 (the evaluation's moving
    points; the VAE's ``moving_weight`` uses the same rule per point)."""
    rows, cols = latent_grid
    maps = []
    for start in range(0, len(examples), chunk):
        tracks = examples.tracks_pixels(np.arange(start, min(start + chunk, len(examples))))  # (b, T, Hq, Wq, 2)
        moved = moving_mask(tracks, MOVING_THRESHOLD_PX, leading_axes=1)  # (b, Hq, Wq)
        b, hq, wq = moved.shape
        if hq % rows or wq % cols:
            raise ValueError(f"query grid {hq}x{wq} does not split into the {rows}x{cols} latent tokens")
        maps.append(moved.reshape(b, rows, hq // rows, cols, wq // cols).any(axis=(2, 4)))
    return np.concatenate(maps) if maps else np.zeros((0, rows, cols), dtype=bool)


@torch.no_grad()
def encode_latents(vae: TrajectoryVAE, examples: TrackExamples, config: ModelConfig, device: torch.device,
                   progress: bool = False) -> Dict[str, np.ndarray]:
    """Posteriors of every example (``mean``, ``std`` ``[E, T, L, C]``) and of every dataset sample's static grid at
    frame 0 (``cond_mean``, ``cond_std`` ``[len(dataset), 1, L, C]``, indexed by :meth:`TrackExamples.scenes`),
    float32."""
    vae = vae.to(device).eval()
    parts: Dict[str, list] = {"mean": [], "std": [], "cond_mean": [], "cond_std": []}
    batches = range(0, len(examples), ENCODE_BATCH)
    if progress:
        batches = tqdm(batches, desc="encode latents", unit="batch")
    for start in batches:
        chosen = np.arange(start, min(start + ENCODE_BATCH, len(examples)))
        mean, std = vae.encode(examples.tracks_norm(chosen).to(device), examples.features(chosen).to(device))
        parts["mean"].append(mean.float().cpu().numpy())
        parts["std"].append(std.float().cpu().numpy())
    for start in range(0, len(examples.features_all), ENCODE_BATCH):  # every dataset sample: indexed by scene
        scenes = np.arange(start, min(start + ENCODE_BATCH, len(examples.features_all)))
        features = torch.from_numpy(np.ascontiguousarray(examples.features_all[scenes])).to(device)
        static = torch.from_numpy(static_tracks_norm(config, len(scenes))).to(device)
        mean, std = vae.encode(static, features)  # (b, T, L, C)
        parts["cond_mean"].append(mean[:, :1].float().cpu().numpy())
        parts["cond_std"].append(std[:, :1].float().cpu().numpy())
    return {key: np.concatenate(value) for key, value in parts.items()}


def cached_latents(vae: TrajectoryVAE, examples: TrackExamples, config: ModelConfig, out_dir: Path,
                   device: torch.device, progress: bool = False) -> Dict[str, np.ndarray]:
    """:func:`encode_latents`, cached in ``<out>/cache`` per (VAE weights, dataset size, image features, dataset).

    The features are identified by ``examples.features_key`` (the image encoder's fingerprint) or, when unknown, by a
    hash of their values; the dataset by a hash of its ``index.json``.
    """
    features_id = examples.features_key
    if features_id is None:
        features_id = hashlib.sha256(np.ascontiguousarray(examples.features_all)).hexdigest()
    source = hashlib.sha256(f"{features_id}:{dataset_fingerprint(examples.dataset)}".encode()).hexdigest()[:10]
    key = (encoder_fingerprint(vae, config.image_size)[:10] + f"-{len(examples)}-{examples.features_all.shape[1]}"
           + f"-{source}")
    path = out_dir / "cache" / f"latents-{key}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return {name: cached[name] for name in cached.files}
    latents = encode_latents(vae, examples, config, device, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **latents)
    partial.replace(path)
    return latents


def with_text_paths(config: ModelConfig, denoiser: LatteDenoiser, seed: int, text_context: bool = False,
                    text_grounding: bool = False) -> LatteDenoiser:
    """A copy of ``denoiser`` with the instruction paths switched on here (``config`` is switched to them too):
    ``text_context`` (the instruction as a context token) and ``text_grounding`` (:class:`~traj_forecast_ros.model.
    denoiser.TextGrounding`). Every weight of ``denoiser`` is kept; the new modules are freshly initialised."""
    added = []
    if text_context and not config.denoiser.text_context:
        config.denoiser.text_context = True
        added.append("text_context_proj.")
    if text_grounding and not config.denoiser.text_grounding:
        config.denoiser.text_grounding = True
        added.append("text_grounding.")
    if not added:
        return denoiser
    torch.manual_seed(seed)
    extended = LatteDenoiser(config.denoiser)
    load_into_extended(extended, denoiser.state_dict(), added, "denoiser")
    return extended


def latent_scale_from(latents: Dict[str, np.ndarray], latent_draw: str = "sample") -> list:
    """Per-channel std of what stage 2 generates: ``mean + std * eps`` in closed form, ``sqrt(Var(mean) + E[std^2])``
    (``latent_draw="sample"``), or of the posterior means, ``sqrt(Var(mean))`` (``"mean"``)."""
    channels = latents["mean"].shape[-1]
    mean = latents["mean"].reshape(-1, channels).astype(np.float64)
    variance = mean.var(0)
    if latent_draw == "sample":
        std = latents["std"].reshape(-1, channels).astype(np.float64)
        variance = variance + (std**2).mean(0)
    return [float(v) for v in np.sqrt(variance)]


def _text_embeddings(config: ModelConfig, text_encoder: Optional[nn.Module],
                     device: torch.device) -> Optional[torch.Tensor]:
    """``[1, E]`` embedding of the config's default instruction by ``text_encoder`` for language-conditioned models
    (``denoiser.text_embed_dim`` set), else None. The encoder is left on the CPU."""
    if text_encoder is None or config.denoiser.text_embed_dim is None:
        return None
    try:
        with torch.no_grad():  # not inference_mode: inference tensors cannot enter the autograd-tracked forward
            return text_encoder.to(device)([config.default_instruction]).float().cpu()
    finally:
        text_encoder.cpu()


def _words_text_encoder(config: ModelConfig, examples: TrackExamples, model_dir: Optional[PathLike],
                        seed: int, word_bag: bool = False) -> Tuple[WordTextEncoder, torch.Tensor]:
    """The trainable words text encoder (vocabulary from the dataset's instructions unless the config has one; the
    weights of ``model_dir`` when fine-tuning one; ``word_bag``: with the bag-of-words path, added here when the
    encoder has none) and the ``[num_instructions, L]`` ids of every instruction."""
    meta = examples.dataset.meta
    if not examples.dataset.has("instructions") or not meta.instructions:
        raise ValueError(f"{examples.dataset.root}: the words text encoder trains on each example's instruction, but "
                         "the dataset has no 'instructions' field")
    fields = dict(config.text_encoder.config or {})
    if not fields.get("vocab"):
        fields["vocab"] = build_vocabulary(meta.instructions)
        config.text_encoder.config = fields
        log.info("instruction vocabulary: %d words", len(fields["vocab"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # a stage-1 run (or a model without trained instruction weights) has none: start from random weights
        weights_dir = model_dir if model_dir is not None and text_encoder_weights(model_dir).is_file() else None
        text_encoder = WordTextEncoder.from_config(config.text_encoder, model_dir=weights_dir)
    if word_bag:
        text_encoder = text_encoder.with_word_bag(seed)
        config.text_encoder.config = text_encoder.config_dict()
    text_encoder.requires_grad_(True).train()
    return text_encoder, text_encoder.tokenize(meta.instructions)  # (num_instructions, L), on the CPU


def train_flow(data_dir: PathLike, out_dir: PathLike, settings: TrainSettings, vae_dir: Optional[PathLike] = None,
               init: Optional[PathLike] = None, official_config: Optional[ModelConfig] = None,
               official_vae: Optional[PathLike] = None, resume: bool = False,
               latent_draw: Optional[str] = None, moving_weight: float = 0.0,
               text_context: bool = False, time_mean: float = 0.0,
               instruction_contrast: float = 0.0, contrast_on_motion: bool = False,
               crossed_still: float = 0.0, text_grounding: bool = False,
               word_bag: bool = False, contrast_temperature: float = CONTRAST_TEMPERATURE) -> Dict[str, float]:
    """Train (or fine-tune) the latent denoiser and write a complete model directory to ``out_dir``.

    Sources of the frozen VAE, the encoder and the starting denoiser, in order:
    ``init`` = a model directory (our format): config, denoiser, VAE and encoders come from it (``vae_dir``, when
    given, replaces its VAE); ``init`` = an official ``.pth`` denoiser: ``official_config`` and ``official_vae`` are
    required (:func:`~traj_forecast_ros.model.checkpoint.load_official`); no ``init``: a fresh denoiser on the
    stage-1 run ``vae_dir``. ``latent_draw`` ("sample" or "mean", see :class:`FlowObjective`) overrides the
    config's; it is saved with the model so the sampler conditions the same way. ``moving_weight``: extra loss
    weight of the latent tokens of moving points (:func:`moving_token_maps`; 0: every token the same).
    ``text_context``: give the denoiser the instruction as a cross-attention context token too
    (``DenoiserConfig.text_context``); ``text_grounding``: add the map of where the instruction points
    (``DenoiserConfig.text_grounding``); ``word_bag``: give the words text encoder its bag-of-words path
    (``pooling="cls+words"``). A fine-tuned model gains the new modules; every other weight is kept.
    ``time_mean``: location of the logit-normal flow time (below 0 trains nearer the noise end).
    ``instruction_contrast``: weight of the instruction contrast (:func:`~traj_forecast_ros.model.flow.
    instruction_contrast_loss`) on the samples of branch groups; needs the words text encoder.
    ``contrast_on_motion``, ``crossed_still`` and ``contrast_temperature``: see :class:`FlowObjective`.
    """
    out_dir = Path(out_dir)
    with distributed(settings.device) as info:
        encoder_dir: Optional[PathLike] = vae_dir
        encoder = None
        if init is not None and Path(init).is_dir():
            config, denoiser, vae = load_model_dir(init)
            encoder_dir = init
            if vae_dir is not None:
                load_vae_weights(vae, vae_dir)
        elif init is not None:
            if official_config is None or official_vae is None:
                raise ValueError("fine-tuning an official .pth denoiser needs --config (its preset/YAML) and --vae "
                                 "(the official VAE .pth)")
            config = official_config
            denoiser, vae = load_official(config, init, official_vae)
            encoder_dir = None
        else:
            if vae_dir is None:
                raise ValueError("stage 2 needs the stage-1 run (--vae DIR) or a model to fine-tune (--init)")
            config, vae, encoder = load_vae_dir(vae_dir)
            torch.manual_seed(settings.seed)
            denoiser = LatteDenoiser(config.denoiser)
        if config.vae is None or vae is None:
            raise ValueError(f"model '{config.name}' is a raw model; latent flow training needs a VAE")
        denoiser = with_text_paths(config, denoiser, settings.seed, text_context, text_grounding)
        if word_bag and (config.text_encoder is None or config.text_encoder.kind != "words"):
            raise ValueError("--word-bag extends the words text encoder; this model's text encoder is "
                             f"{'none' if config.text_encoder is None else config.text_encoder.kind!r}")
        vae.requires_grad_(False).eval()
        if encoder is None:
            encoder = build_image_encoder(config, model_dir=encoder_dir, seed=settings.seed)

        encoder, examples = prepare_examples(data_dir, config, out_dir, info, settings, encoder=encoder)
        latents = cached_latents(vae, examples, config, out_dir, info.device,
                                 progress=settings.progress and info.is_main)
        if latent_draw is not None:
            config.latent_draw = latent_draw
        if config.latent_scale is None:
            config.latent_scale = latent_scale_from(latents, config.latent_draw)
            log.info("latent scale measured on the training set: %s", config.latent_scale)
        trained: nn.Module = denoiser  # what the trainer optimises, averages and checkpoints
        text_ids_table: Optional[torch.Tensor] = None
        if config.text_encoder is not None and config.text_encoder.kind == "words":
            text_encoder, text_ids_table = _words_text_encoder(config, examples, encoder_dir, settings.seed,
                                                               word_bag)
            text = None
            trained = nn.ModuleDict({"denoiser": denoiser, "text_encoder": text_encoder})
        else:
            # built once: the encoder the denoiser is conditioned with is the one saved with the model
            text_encoder = build_text_encoder(config, model_dir=encoder_dir, seed=settings.seed)
            text = _text_embeddings(config, text_encoder, info.device)

        objective = FlowObjective(denoiser, config.latent_scale, vae.latent_grid, config.latent_draw,
                                  text_encoder=text_encoder if text_ids_table is not None else None,
                                  moving_weight=moving_weight, time_mean=time_mean,
                                  instruction_contrast=instruction_contrast, contrast_on_motion=contrast_on_motion,
                                  crossed_still=crossed_still, contrast_temperature=contrast_temperature)
        moving = moving_token_maps(examples, vae.latent_grid) if moving_weight > 0 or contrast_on_motion else None
        weighted = moving if moving_weight > 0 else None  # the token maps the flow loss weights
        if weighted is not None:
            log.info("moving latent tokens (weighted %.1f): %.1f %%", 1 + moving_weight, 100 * weighted.mean())
        if objective.text_encoder is not None and objective.text_dropout > 0:
            config.null_instruction = ""  # the empty instruction is trained as the unconditional one: guidance
        instruction_index = (examples.dataset.load("instructions").astype(np.int64)
                             if text_ids_table is not None else None)
        siblings = None
        if instruction_contrast > 0:
            if instruction_index is None or not examples.dataset.has("branch_groups"):
                raise ValueError("the instruction contrast needs the words text encoder and a dataset with branch "
                                 "groups (`traj-forecast data sim-manipulation`)")
            siblings = crossed_instructions(examples.dataset.load("branch_groups"), instruction_index)
            log.info("instruction contrast (weight %g, temperature %g): %.1f %% of the examples have a sibling "
                     "instruction", instruction_contrast, contrast_temperature,
                     100 * np.mean([len(siblings[i]) > 0 for i in examples.scene_indices]))
        branch_moving = None
        if contrast_on_motion:
            branch_moving = branch_moving_maps(moving, examples.scenes(np.arange(len(examples))),
                                               examples.dataset.load("branch_groups"))
            log.info("contrast on the tokens some branch moves (%.1f %%); crossed-still weight %g",
                     100 * branch_moving.mean(), crossed_still)

        def make_batch(indices: np.ndarray) -> Dict[str, torch.Tensor]:
            scenes = examples.scenes(indices)
            batch = {
                "latent_mean": torch.from_numpy(latents["mean"][indices]),
                "latent_std": torch.from_numpy(latents["std"][indices]),
                "cond_mean": torch.from_numpy(latents["cond_mean"][scenes]),
                "cond_std": torch.from_numpy(latents["cond_std"][scenes]),
                "features": examples.features(indices),
            }
            if text is not None:
                batch["text_embeds"] = text.expand(len(indices), -1)
            if text_ids_table is not None:
                batch["text_ids"] = text_ids_table[instruction_index[scenes]]  # (B, L)
            if weighted is not None:
                batch["moving"] = torch.from_numpy(weighted[indices])  # (B, h, w)
            if branch_moving is not None:
                batch["branch_moving"] = torch.from_numpy(branch_moving[indices])  # (B, h, w)
            if siblings is not None:
                crossed_ids, crossed = pick_crossed(siblings, scenes, (settings.seed, *map(int, indices[:8])))
                batch["crossed_text_ids"] = text_ids_table[crossed_ids]  # (B, L)
                batch["crossed"] = torch.from_numpy(crossed)  # (B,)
            return batch

        trainer = Trainer(objective, trained, make_batch, len(examples), settings, out_dir, info, stage="flow")
        last = trainer.fit(resume=resume)
        trained.load_state_dict(trainer.averaged_model_state())
        if text_ids_table is not None:
            text_encoder.requires_grad_(False).eval()
        if info.is_main:
            save_model_dir(out_dir, config, denoiser.cpu(), vae.cpu(), image_encoder=encoder,
                           text_encoder=text_encoder)
            log.info("model directory written to %s", out_dir)
        return last
