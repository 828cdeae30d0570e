"""Named models: where their weights live, how to download them, and how a name becomes a model directory.

``models/registry.yaml`` lists the named models (hub checkpoints or directories shipped with the package).
:func:`download` fetches a hub model through ``huggingface_hub`` (checkpoints with ``hf_hub_download``, encoders
with ``snapshot_download``), verifies checksums, and converts everything with
:func:`~traj_forecast_ros.model.checkpoint.export_official` into a self-contained model directory under
:func:`cache_home` ``/models/NAME``. :func:`resolve` maps a name or a path to a model directory without any network
access. Offline (``HF_HUB_OFFLINE=1`` or no network) every failure is a :class:`WeightsNotFoundError` within seconds,
with the exact files, their source and their destination in the message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import huggingface_hub
import yaml

from traj_forecast_ros.errors import CheckpointError, WeightsNotFoundError
from traj_forecast_ros.model.checkpoint import export_official
from traj_forecast_ros.model.config import CONFIG_FILE, DENOISER_FILE, VAE_FILE, ModelConfig
from traj_forecast_ros.model.encoders import ImageEncoder, TextEncoder
from traj_forecast_ros.model.hub import hub_offline
from traj_forecast_ros.model.presets import PRESETS, preset_config

log = logging.getLogger(__name__)

PACKAGE = "traj_forecast_ros"
REGISTRY_FILE = "registry.yaml"
HOME_ENV = "TRAJ_FORECAST_HOME"
REGISTRY_ENV = "TRAJ_FORECAST_REGISTRY"  # use another registry file (your own models)
SOURCE_FILE = "source.json"  # provenance written next to a downloaded model
HUB_TIMEOUT_S = 10.0  # per metadata request: fail fast when the hub is unreachable
RACY_WINDOW_NS = 2_000_000_000  # files modified this close to their stat record are always re-hashed
ENCODER_PATTERNS = ["*.json", "*.txt", "*.safetensors"]  # config, tokenizer and weights; no .bin/.h5/.msgpack

PathLike = Union[str, Path]
ENTRY_KEYS = frozenset({"description", "preset", "config_file", "hub_repo", "revision", "files", "image_encoder",
                        "text_encoder", "encoder_revisions", "local_dir"})


# ---------------------------------------------------------------------------------------------- registry file
@dataclass(frozen=True)
class HubFile:
    """One checkpoint file in a hub repository."""

    path: str
    sha256: Optional[str] = None


@dataclass(frozen=True)
class RegistryEntry:
    """A named model: either a hub model (``hub_repo`` + ``files``) or a directory shipped with the package.

    A hub model's architecture is a ``preset`` (a line of the preset table :mod:`traj_forecast_ros.model.sizes`:
    ``libero-atm``, ``libero-tramoe``; sizes, geometry, latent scale and encoders) or a ``config_file`` (ModelConfig
    YAML next to the registry file); ``image_encoder`` / ``text_encoder`` replace its encoders' hub ids.
    """

    name: str
    description: str = ""
    preset: Optional[str] = None
    config_file: Optional[Path] = None
    hub_repo: Optional[str] = None
    revision: str = "main"
    files: Dict[str, HubFile] = field(default_factory=dict)
    image_encoder: Optional[str] = None
    text_encoder: Optional[str] = None
    encoder_revisions: Dict[str, str] = field(default_factory=dict)  # image_encoder/text_encoder -> commit to pin
    local_dir: Optional[Path] = None  # absolute, for shipped models

    @property
    def is_hub_model(self) -> bool:
        """True when the weights come from a hub repository (``download`` applies)."""
        return self.hub_repo is not None

    def config(self) -> ModelConfig:
        """The :class:`ModelConfig` of a hub model: its preset (or config file) with this entry's encoder ids."""
        if self.config_file is not None:
            config = ModelConfig.load_yaml(self.config_file)
        elif self.preset in PRESETS:
            config = preset_config(self.preset)
        else:
            raise ValueError(f"registry entry '{self.name}': unknown preset '{self.preset}' "
                             f"(known: {sorted(PRESETS)}; or give config_file)")
        config.name = self.name
        if self.image_encoder is not None:
            config.image_encoder.model_id = self.image_encoder
        if self.text_encoder is not None and config.text_encoder is not None:
            config.text_encoder.model_id = self.text_encoder
        return config


def package_file_candidates(*parts: str) -> List[Path]:
    """Where a packaged file ``<parts...>`` may be, in order: the source checkout, ``sys.prefix/share/<package>``
    (pip), the ament index's share directory (colcon)."""
    candidates = [Path(__file__).resolve().parents[1].joinpath(*parts),
                  Path(sys.prefix).joinpath("share", PACKAGE, *parts)]
    try:  # a colcon / ament install
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory(PACKAGE)).joinpath(*parts))
    except Exception:  # noqa: BLE001 - ament_index not installed, or the package is not in the index
        pass
    return candidates


def registry_path() -> Path:
    """The registry file: ``$TRAJ_FORECAST_REGISTRY``, the source checkout's ``models/``, or the installed share dir."""
    if os.environ.get(REGISTRY_ENV):
        custom = Path(os.environ[REGISTRY_ENV]).expanduser()
        if not custom.is_file():
            raise FileNotFoundError(f"{REGISTRY_ENV}={custom}: no such registry file")
        return custom
    candidates = package_file_candidates("models", REGISTRY_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"model registry not found; looked in: {', '.join(map(str, candidates))}")


def load_registry(path: Optional[PathLike] = None) -> Dict[str, RegistryEntry]:
    """All entries of the registry file, by name."""
    path = Path(path) if path is not None else registry_path()
    data = yaml.safe_load(path.read_text()) or {}
    entries: Dict[str, RegistryEntry] = {}
    for name, item in (data.get("models") or {}).items():
        unknown = set(item) - ENTRY_KEYS
        if unknown:  # e.g. sizes or a latent scale restated: a hub model's come from its preset or config_file
            raise ValueError(f"{path}: model '{name}' has unknown keys {sorted(unknown)} (known: {sorted(ENTRY_KEYS)})")
        file_specs = item.get("files") or {}
        files = {role: HubFile(str(spec["path"]), spec.get("sha256")) for role, spec in file_specs.items()}
        local_dir = item.get("local_dir")
        config_file = item.get("config_file")
        entries[name] = RegistryEntry(
            name=name,
            description=" ".join(str(item.get("description", "")).split()),
            preset=item.get("preset"),
            config_file=(path.parent / config_file).resolve() if config_file else None,
            hub_repo=item.get("hub_repo"),
            revision=str(item.get("revision", "main")),
            files=files,
            image_encoder=item.get("image_encoder"),
            text_encoder=item.get("text_encoder"),
            encoder_revisions={str(k): str(v) for k, v in (item.get("encoder_revisions") or {}).items()},
            local_dir=(path.parent / local_dir).resolve() if local_dir else None,
        )
    return entries


def default_model_name(path: Optional[PathLike] = None) -> str:
    """The registry's default model (``libero-atm``)."""
    path = Path(path) if path is not None else registry_path()
    return str((yaml.safe_load(path.read_text()) or {}).get("default", "libero-atm"))


def get_entry(name: str) -> RegistryEntry:
    """The registry entry called ``name`` (``WeightsNotFoundError`` listing the known names otherwise)."""
    entries = load_registry()
    if name not in entries:
        raise WeightsNotFoundError(f"unknown model '{name}': not a directory and not in the registry "
                                   f"(known models: {', '.join(sorted(entries))})")
    return entries[name]


# ---------------------------------------------------------------------------------------------- cache
def cache_home() -> Path:
    """Root of downloaded models: ``$TRAJ_FORECAST_HOME``, else the user cache dir + ``traj_forecast_ros``."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / PACKAGE


def model_cache_dir(name: str, cache_dir: Optional[PathLike] = None) -> Path:
    """Where the model directory of a downloaded model ``name`` lives."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_home()
    return root / "models" / name


def has_weights(model_dir: PathLike) -> bool:
    """True when ``model_dir`` holds a config and the weights it needs (denoiser, and the VAE for latent models)."""
    model_dir = Path(model_dir)
    config_file = model_dir / CONFIG_FILE
    if not (config_file.is_file() and (model_dir / DENOISER_FILE).is_file()):
        return False
    try:
        latent = (yaml.safe_load(config_file.read_text()) or {}).get("vae") is not None
    except yaml.YAMLError:
        return False
    return (model_dir / VAE_FILE).is_file() or not latent


def resolve(name_or_dir: PathLike, cache_dir: Optional[PathLike] = None) -> Path:
    """A model directory for a path or a registry name, without network access.

    Raises:
        WeightsNotFoundError: the directory does not exist, or the named model is not downloaded (the message says
            how to get it).
    """
    candidate = Path(name_or_dir).expanduser()
    if candidate.is_dir():
        if not (candidate / CONFIG_FILE).is_file():
            raise WeightsNotFoundError(f"{candidate} is not a model directory (no {CONFIG_FILE})")
        verify_model_dir(candidate)
        return candidate
    name = str(name_or_dir)
    if (os.sep in name or name.startswith(".")) and name not in load_registry():
        raise WeightsNotFoundError(f"model directory not found: {candidate}")
    entry = get_entry(name)
    if entry.local_dir is not None:
        if has_weights(entry.local_dir):
            return entry.local_dir
        raise WeightsNotFoundError(f"model '{name}' should ship with the package in {entry.local_dir}, but that "
                                   "directory is missing or incomplete (reinstall the package or retrain the model)")
    target = model_cache_dir(name, cache_dir)
    if has_weights(target):
        verify_model_dir(target)
        return target
    raise WeightsNotFoundError(f"model '{name}' is not downloaded (looked in {target}). Run "
                               f"`traj-forecast download {name}` once with network access.\n"
                               + manual_instructions(entry, target))


# ---------------------------------------------------------------------------------------------- download
def manual_instructions(entry: RegistryEntry, target: Path) -> str:
    """How to install a hub model by hand: which files, from where, to where."""
    url = f"https://huggingface.co/{entry.hub_repo}"
    lines = [f"To install '{entry.name}' by hand, on a machine with network access download from {url} "
             f"(revision {entry.revision}):"]
    for role, hub_file in entry.files.items():
        lines.append(f"  {role}: {hub_file.path}    (hf download {entry.hub_repo} '{hub_file.path}')")
    config = entry.config()
    encoders = [e.model_id for e in (config.image_encoder, config.text_encoder) if e is not None and e.model_id]
    if encoders:
        lines.append("  encoders: " + ", ".join(f"https://huggingface.co/{e}" for e in encoders)
                     + "    (hf download ID; they land in the Hugging Face cache)")
    args = " ".join(f"--{role} PATH/{Path(f.path).name}" for role, f in entry.files.items())
    lines.append(f"then convert them into the model directory {target}:")
    lines.append(f"  traj-forecast export-official --preset {entry.name} {args} --out {target}")
    lines.append(f"(models are looked up under {target.parent}; set {HOME_ENV} to use another cache root, "
                 "or pass the model directory itself)")
    return "\n".join(lines)


def _offline_error(entry: RegistryEntry, target: Path, reason: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(f"cannot download model '{entry.name}' from the Hugging Face hub: {reason}.\n"
                                + manual_instructions(entry, target))


def sha256_of(path: PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hub_commit_of(path: PathLike) -> Optional[str]:
    """The commit hash in a Hugging Face cache path (``.../snapshots/<40 hex>/...``), None when there is none."""
    parts = Path(path).parts
    for index, part in enumerate(parts[:-1]):
        if part == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", parts[index + 1]):
            return parts[index + 1]
    return None


def model_dir_files(model_dir: PathLike) -> Dict[str, Path]:
    """``{relative path: path}`` of every file in a model directory except its ``source.json``, sorted."""
    model_dir = Path(model_dir)
    files = {path.relative_to(model_dir).as_posix(): path for path in sorted(model_dir.rglob("*")) if path.is_file()}
    files.pop(SOURCE_FILE, None)
    return files


def model_dir_digests(model_dir: PathLike) -> Dict[str, str]:
    """``{relative path: sha256}`` of every file in a model directory except its ``source.json``."""
    return {name: sha256_of(path) for name, path in model_dir_files(model_dir).items()}


def _stat_record(model_dir: PathLike, names: Iterable[str]) -> Dict[str, object]:
    """The ``stat`` entry of ``source.json``: the files' [size, mtime_ns] and when they were recorded."""
    return {"recorded_ns": time.time_ns(), "files": {name: _file_stat(Path(model_dir) / name) for name in names}}


def verify_model_dir(model_dir: PathLike) -> None:
    """Check a downloaded model directory against the sha256 pinned in its ``source.json`` at download time.

    Directories without a ``source.json`` (trained or shipped models) or written before pinning are not checked.
    Only files whose (size, mtime_ns) differ from the ``stat`` recorded beside the sha256 are hashed again (a
    LIBERO model is about 1.9 GB); a changed size is refused without hashing. As in git's index, a file modified
    within :data:`RACY_WINDOW_NS` of the record could keep its mtime, so such files are always hashed; after a
    successful re-hash the record is refreshed (best effort). This guards against corruption and accidental edits,
    not against someone who restores a file's size and mtime on purpose.

    Raises:
        CheckpointError: a pinned file is missing or changed, or a weights file was added since the download.
    """
    model_dir = Path(model_dir)
    source_path = model_dir / SOURCE_FILE
    if not source_path.is_file():
        return
    try:
        source = json.loads(source_path.read_text())
        pinned = source.get("sha256")
        stat = source.get("stat") or {}
        recorded = dict(stat.get("files") or {})
        recorded_ns = int(stat.get("recorded_ns") or 0)
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"{source_path}: unreadable provenance file ({exc}); download the model again "
                              "(`traj-forecast download NAME --force`)") from exc
    if pinned is None:
        return
    present = model_dir_files(model_dir)
    started_ns = time.time_ns()  # the refreshed record's time: a file modified after this is hashed next time
    changed: List[str] = []
    rehashed: Dict[str, Optional[List[int]]] = {}  # name -> stat taken before its hash (None: it moved meanwhile)
    for name, digest in pinned.items():
        path = present.get(name)
        if path is None:
            changed.append(name)
            continue
        current = _file_stat(path)
        known = recorded.get(name)
        if isinstance(known, list) and len(known) == 2:
            if known[0] != current[0]:  # another size: changed, no need to hash
                changed.append(name)
                continue
            if known == current and current[1] < recorded_ns - RACY_WINDOW_NS:
                continue  # unchanged since the record, and not racy
        if sha256_of(path) != digest:
            changed.append(name)
        else:  # verified as it was when stat'ed: record that stat only if the file did not change during the hash
            rehashed[name] = current if _file_stat(path) == current else None
    added = sorted(name for name in present if name not in pinned)
    if changed or added:
        raise CheckpointError(f"{model_dir}: files differ from the sha256 pinned in {SOURCE_FILE} at download "
                              f"(changed or missing: {sorted(changed) or 'none'}; added: {added or 'none'}); "
                              "refusing to load it. Download it again (`traj-forecast download NAME --force`) if "
                              "the change is intended.")
    if rehashed:
        files = {name: stat for name, stat in recorded.items() if name not in rehashed}
        files.update({name: stat for name, stat in rehashed.items() if stat is not None})
        _write_stat_record(source_path, source, {"recorded_ns": started_ns, "files": files})


def _file_stat(path: Path) -> List[int]:
    """``[size, mtime_ns]`` of one file, as recorded in ``source.json``."""
    info = path.stat()
    return [int(info.st_size), int(info.st_mtime_ns)]


def _write_stat_record(source_path: Path, source: dict, record: Dict[str, object]) -> None:
    """Rewrite ``source.json`` with a new ``stat`` record (best effort: a read-only cache is hashed again)."""
    try:
        source["stat"] = record
        partial = source_path.with_name(f"{SOURCE_FILE}.{os.getpid()}.partial")
        partial.write_text(json.dumps(source, indent=2) + "\n")
        os.replace(partial, source_path)
    except OSError as exc:
        log.debug("%s: stat record not refreshed (%s)", source_path, exc)


def _repo_listing(entry: RegistryEntry, target: Path) -> Optional[Dict[str, Optional[str]]]:
    """``{path: lfs sha256 or None}`` of the hub repo; None in offline mode (only the local HF cache is used).

    Raises the offline error when the hub is unreachable.
    """
    if hub_offline():
        return None
    try:
        info = huggingface_hub.HfApi().model_info(entry.hub_repo, revision=entry.revision, timeout=HUB_TIMEOUT_S,
                                  files_metadata=True)
    except Exception as exc:  # DNS / connection errors, timeouts, missing or gated repo
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise _offline_error(entry, target, f"{type(exc).__name__}: {first_line}") from exc
    return {s.rfilename: (s.lfs.sha256 if getattr(s, "lfs", None) else None) for s in info.siblings or []}


def _find_in_listing(listing: Dict[str, Optional[str]], wanted: str) -> Optional[str]:
    """The repo path for ``wanted``: exact, else the unique path ending in ``/wanted``."""
    if wanted in listing:
        return wanted
    matches = [path for path in listing if path.endswith("/" + wanted)]
    return matches[0] if len(matches) == 1 else None


def _fetch_checkpoint(entry: RegistryEntry, role: str, listing: Optional[Dict[str, Optional[str]]],
                      target: Path) -> Tuple[Path, str]:
    """Download one checkpoint file (offline: take it from the HF cache) and verify it; returns (path, sha256)."""
    hub_file = entry.files[role]
    offline = listing is None
    repo_path = hub_file.path if offline else _find_in_listing(listing, hub_file.path)
    if repo_path is None:
        raise _offline_error(entry, target, f"the {role} file '{hub_file.path}' is not in {entry.hub_repo} "
                                            f"({len(listing)} files listed); the registry path may be out of date")
    try:
        local = Path(huggingface_hub.hf_hub_download(entry.hub_repo, repo_path, revision=entry.revision,
                                                     etag_timeout=HUB_TIMEOUT_S, local_files_only=offline))
    except Exception as exc:
        reason = ("offline mode is on (HF_HUB_OFFLINE=1) and the Hugging Face cache does not hold " + repo_path
                  if offline else f"downloading {repo_path} failed: {type(exc).__name__}: {exc}")
        raise _offline_error(entry, target, reason) from exc
    digest = sha256_of(local)
    hub_digest = listing.get(repo_path) if listing else None
    for expected, origin in ((hub_file.sha256, "the registry"), (hub_digest, "the hub's LFS metadata")):
        if expected and expected.lower() != digest:
            raise CheckpointError(f"{local}: sha256 {digest} does not match {origin} ({expected}); the download is "
                                  "corrupt or the file changed: delete it from the Hugging Face cache and retry")
    if not hub_file.sha256:
        log.info("%s: sha256 %s (not listed in the registry)", repo_path, digest)
    return local, digest


def _fetch_encoder(model_id: str, entry: RegistryEntry, target: Path, role: str) -> Path:
    offline = hub_offline()
    try:  # revision None = the repo's default branch, unless the registry pins a commit (encoder_revisions)
        return Path(huggingface_hub.snapshot_download(model_id, allow_patterns=ENCODER_PATTERNS,
                                                      etag_timeout=HUB_TIMEOUT_S, local_files_only=offline,
                                                      revision=entry.encoder_revisions.get(role)))
    except Exception as exc:
        reason = (f"offline mode is on (HF_HUB_OFFLINE=1) and the Hugging Face cache does not hold {model_id}"
                  if offline else f"downloading encoder {model_id} failed: {type(exc).__name__}: {exc}")
        raise _offline_error(entry, target, reason) from exc


def download(name: str, cache_dir: Optional[PathLike] = None, force: bool = False) -> Path:
    """Fetch a named model and convert it into a model directory in the cache; returns that directory.

    Already-converted models are returned as they are unless ``force``. Shipped models (``local_dir``) need no
    download and are returned when present. With ``HF_HUB_OFFLINE=1`` only files already in the Hugging Face
    cache are used (e.g. fetched elsewhere with ``hf download`` and copied over).
    """
    entry = get_entry(name)
    if entry.local_dir is not None:
        return resolve(name)
    target = model_cache_dir(name, cache_dir)
    if has_weights(target) and not force:
        log.info("model '%s' already in %s", name, target)
        return target
    listing = _repo_listing(entry, target)  # None offline: files must already be in the Hugging Face cache
    checkpoints = {role: _fetch_checkpoint(entry, role, listing, target) for role in entry.files}
    config = entry.config()
    image_encoder = text_encoder = None
    encoder_commits: Dict[str, Optional[str]] = {}
    if config.image_encoder.model_id:
        snapshot = _fetch_encoder(config.image_encoder.model_id, entry, target, "image_encoder")
        encoder_commits["image_encoder"] = hub_commit_of(snapshot)
        image_encoder = ImageEncoder.from_config(replace(config.image_encoder, model_id=str(snapshot)))
    if config.text_encoder is not None and config.text_encoder.model_id:
        snapshot = _fetch_encoder(config.text_encoder.model_id, entry, target, "text_encoder")
        encoder_commits["text_encoder"] = hub_commit_of(snapshot)
        text_encoder = TextEncoder.from_config(replace(config.text_encoder, model_id=str(snapshot)))

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    export_official(config, checkpoints["denoiser"][0], checkpoints.get("vae", (None,))[0], partial,
                    image_encoder=image_encoder, text_encoder=text_encoder)
    provenance = {
        "name": name,
        "hub_repo": entry.hub_repo,
        "revision": entry.revision,
        # The commit the (possibly moving) revision resolved to: pin it with `revision: <commit>` in the registry.
        "resolved_commit": next((commit for commit in (hub_commit_of(path) for path, _ in checkpoints.values())
                                 if commit), None),
        "files": {role: {"path": entry.files[role].path, "sha256": digest}
                  for role, (_, digest) in checkpoints.items()},
        "image_encoder": config.image_encoder.model_id,
        "image_encoder_commit": encoder_commits.get("image_encoder"),
        "text_encoder": config.text_encoder.model_id if config.text_encoder else None,
        "text_encoder_commit": encoder_commits.get("text_encoder"),
        "sha256": model_dir_digests(partial),  # every converted file; resolve() refuses a directory that differs
    }
    # (size, mtime_ns) per file: resolve() re-hashes only files whose stat changed (the rename keeps mtimes)
    provenance["stat"] = _stat_record(partial, provenance["sha256"])
    (partial / SOURCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, target)
    log.info("model '%s' ready in %s", name, target)
    return target
