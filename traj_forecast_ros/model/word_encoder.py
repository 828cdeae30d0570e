"""A small word-level instruction encoder, trained together with the denoiser on a closed instruction set.

No CLIP tokenizer or weights are reachable offline, so language-conditioned models trained here (``sim-manipulation``)
use this encoder instead (``TextEncoderConfig(kind="words")``). Tokens are the lower-case alphanumeric words of an
instruction; the vocabulary is ``<pad>``, ``<unk>`` and then the sorted words of the training set's instructions
(:func:`build_vocabulary`), stored in the model's ``config.yaml`` (``text_encoder.config.vocab``), so a model directory
always carries the vocabulary its weights were trained with. A word outside the vocabulary maps to ``<unk>``
(id 1), so an unseen instruction still gets a deterministic embedding. An empty instruction embeds to the learned
"no instruction" vector (the CLS token alone), which the flow stage trains by dropping instructions at random.

Architecture: token embedding + learned positions, a CLS token, ``layers`` pre-norm transformer layers (no dropout)
with the padding masked, final LayerNorm, and a linear projection of the CLS output to ``embed_dim`` (the
denoiser's ``text_embed_dim``). With ``pooling="cls+words"`` the mean of the instruction's words in a second,
``embed_dim``-wide word table is added to it (a bag of words): every word reaches the embedding directly, so
instructions that differ in one word ("reach for the can" / "pick up the can", "left" / "right") cannot collapse
onto one vector the way the CLS output alone lets them. Weights: ``<model dir>/text_encoder/model.safetensors``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from traj_forecast_ros.errors import CheckpointError, WeightsNotFoundError
from traj_forecast_ros.model.checkpoint import (load_into_extended, load_state_dict_into, read_safetensors,
                                                save_tensors)
from traj_forecast_ros.model.config import TEXT_ENCODER_DIR, TextEncoderConfig

PAD_TOKEN, UNKNOWN_TOKEN = "<pad>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, UNKNOWN_TOKEN)
PAD_ID, UNKNOWN_ID = 0, 1
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab.json"  # a readable copy; the config's vocabulary is the one used
DEFAULT_MAX_WORDS = 24
POOLINGS = ("cls", "cls+words")  # the CLS output alone; the CLS output + the mean of a word table
_WORD = re.compile(r"[a-z0-9]+")

PathLike = Union[str, Path]


def text_encoder_weights(model_dir: PathLike) -> Path:
    """Path of a model directory's words text encoder weights (``<model_dir>/text_encoder/model.safetensors``)."""
    return Path(model_dir) / TEXT_ENCODER_DIR / WEIGHTS_FILE


def split_words(text: str) -> List[str]:
    """Lower-case alphanumeric words of ``text`` ("Put the can, left!" -> ["put", "the", "can", "left"])."""
    return _WORD.findall(text.lower())


def build_vocabulary(instructions: Iterable[str]) -> List[str]:
    """``<pad>``, ``<unk>``, then every word of ``instructions`` sorted (deterministic in the set of words)."""
    found = sorted({word for text in instructions for word in split_words(text)})
    return list(SPECIAL_TOKENS) + found


class WordVocabulary:
    """Word <-> id table; unknown words get :data:`UNKNOWN_ID`, padding is :data:`PAD_ID`."""

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = [str(t) for t in tokens]
        if tuple(tokens[:2]) != SPECIAL_TOKENS:
            raise ValueError(f"a word vocabulary starts with {list(SPECIAL_TOKENS)}, got {tokens[:2]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("the word vocabulary has duplicate entries")
        self.tokens = tokens
        self.ids: Dict[str, int] = {token: index for index, token in enumerate(tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, max_words: int = DEFAULT_MAX_WORDS) -> List[int]:
        """Ids of the first ``max_words`` words of ``text`` (no padding)."""
        return [self.ids.get(word, UNKNOWN_ID) for word in split_words(text)[:max_words]]

    def encode_batch(self, texts: Sequence[str], max_words: int = DEFAULT_MAX_WORDS) -> torch.Tensor:
        """``[B, max_words]`` int64 ids, right-padded with :data:`PAD_ID`."""
        ids = torch.full((len(texts), max_words), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            encoded = self.encode(text, max_words)
            if encoded:
                ids[row, :len(encoded)] = torch.tensor(encoded, dtype=torch.long)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ``ids`` joined by spaces (padding dropped)."""
        return " ".join(self.tokens[int(i)] for i in ids if int(i) != PAD_ID)


class WordTextEncoder(nn.Module):
    """Instructions -> ``[B, E]`` embeddings (``forward(list[str])``, like :class:`~.encoders.TextEncoder`)."""

    def __init__(self, vocab: Sequence[str], embed_dim: int = 64, width: int = 64, layers: int = 1, heads: int = 2,
                 max_words: int = DEFAULT_MAX_WORDS, pooling: str = "cls") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"words text encoder pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        self.vocabulary = WordVocabulary(vocab)
        self.max_words = int(max_words)
        self.pooling = pooling
        self.settings: Dict[str, Any] = dict(embed_dim=int(embed_dim), width=int(width), layers=int(layers),
                                             heads=int(heads), max_words=self.max_words)
        if pooling != "cls":  # older configs carry no pooling: they stay loadable and unchanged
            self.settings["pooling"] = pooling
        self.word_bag: Optional[nn.Embedding] = None
        if pooling == "cls+words":
            self.word_bag = nn.Embedding(len(self.vocabulary), int(embed_dim), padding_idx=PAD_ID)
            with torch.no_grad():
                self.word_bag.weight.normal_(0.0, 0.02)
                self.word_bag.weight[PAD_ID].zero_()
        self.token_embed = nn.Embedding(len(self.vocabulary), width, padding_idx=PAD_ID)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.max_words + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)

    @classmethod
    def from_config(cls, cfg: TextEncoderConfig, model_dir: Optional[PathLike] = None) -> "WordTextEncoder":
        """Build from ``cfg.config`` (which must hold ``vocab``). With ``model_dir`` the weights
        ``<model_dir>/text_encoder/model.safetensors`` are loaded (frozen, eval mode) and must exist
        (:class:`CheckpointError` otherwise); without it the weights are random (the flow stage trains them)."""
        fields: Dict[str, Any] = dict(cfg.config or {})
        vocab = fields.pop("vocab", None)
        if not vocab:
            raise WeightsNotFoundError("words text encoder: the config has no vocabulary (text_encoder.config.vocab); "
                                       "`traj-forecast train flow` builds it from the dataset's instructions")
        encoder = cls(vocab, **fields)
        if model_dir is not None:
            weights = text_encoder_weights(model_dir)
            if not weights.is_file():
                raise CheckpointError(f"words text encoder: {weights} is missing (the model directory is incomplete; "
                                      "its instruction embeddings would be random)")
            encoder.load_weights(weights)
            encoder.requires_grad_(False).eval()
        return encoder

    @property
    def embed_dim(self) -> int:
        """E, the width of the instruction embedding."""
        return int(self.proj.out_features)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """``[B, max_words]`` ids on the encoder's device."""
        return self.vocabulary.encode_batch(texts, self.max_words).to(self.cls_token.device)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids ``[B, L]`` (:data:`PAD_ID`-padded) -> ``[B, E]``."""
        batch = ids.shape[0]
        tokens = self.token_embed(ids)  # (B, L, W)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)  # (B, 1 + L, W)
        tokens = tokens + self.pos_embed[:, :tokens.shape[1]]
        padding = torch.cat([torch.zeros(batch, 1, dtype=torch.bool, device=ids.device), ids == PAD_ID], dim=1)
        hidden = self.blocks(tokens, src_key_padding_mask=padding)  # (B, 1 + L, W)
        embedding = self.proj(self.norm(hidden[:, 0]))  # (B, E)
        if self.word_bag is not None:  # + the mean of the words (an empty instruction adds nothing)
            words = (ids != PAD_ID).sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
            embedding = embedding + self.word_bag(ids).sum(dim=1) / words
        return embedding

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """``B`` instructions -> ``[B, E]`` embeddings (unknown words -> ``<unk>``; deterministic)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("WordTextEncoder expects a list of strings")
        return self.embed_ids(self.tokenize(texts))

    def config_dict(self) -> Dict[str, Any]:
        """What goes into ``TextEncoderConfig.config`` to rebuild this encoder."""
        return {"vocab": list(self.vocabulary.tokens), **self.settings}

    def load_weights(self, path: PathLike) -> None:
        """Strictly load a ``model.safetensors`` written by :meth:`save_pretrained`."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"no words text encoder weights at {path}")
        load_state_dict_into(self, read_safetensors(path), path, "words text encoder")

    def with_word_bag(self, seed: int = 0) -> "WordTextEncoder":
        """A copy of this encoder with ``pooling="cls+words"``: every weight kept, the word table new (N(0, 0.02)),
        so the embeddings start within the small table's reach of this encoder's. Itself when it has one."""
        if self.word_bag is not None:
            return self
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            extended = WordTextEncoder(self.vocabulary.tokens, **{**self.settings, "pooling": "cls+words"})
        load_into_extended(extended, self.state_dict(), ["word_bag."], "words text encoder")
        return extended.to(self.cls_token.device)

    def save_pretrained(self, path: PathLike) -> None:
        """Write ``model.safetensors`` and a readable ``vocab.json`` into the directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_tensors(self, path / WEIGHTS_FILE)
        (path / VOCAB_FILE).write_text(json.dumps(self.config_dict(), indent=1))
