"""Pretrained backbone weights: where they are cached, and getting them there once per node.

Compute nodes on clusters often have no internet. The rule this module enforces:

* The cache is the library's own cache, so files put there by ``launch/prefetch_weights.py`` on a
  login node (same ``$TORCH_HOME`` / ``$HF_HOME``) are found by torchvision and timm unchanged:

  - torchvision (``resnet50``, ``torchvision:resnet50``): ``torch.hub.get_dir()/checkpoints/<file>``,
    ``<file>`` being the basename of the weights enum's url, e.g. ``resnet50-11ad3fa6.pth``
    (``torch.hub.get_dir()`` is ``$TORCH_HOME/hub``, default ``~/.cache/torch/hub``).
  - timm (``timm:convnext_tiny``, ``timm:convnext_tiny.fb_in1k``): the Hugging Face hub cache,
    ``$HF_HUB_CACHE`` (default ``$HF_HOME/hub``) ``/models--timm--<name.tag>/snapshots/<rev>/
    model.safetensors`` (or ``pytorch_model.bin``), exactly what ``timm.create_model(...,
    pretrained=True)`` reads; the few timm models whose pretrained config has only a ``url`` use
    the torch hub ``checkpoints/`` folder like torchvision.

* Only local rank 0 of each node downloads; the other local ranks wait at ``barrier`` and then
  read the cache. Local rank 0 always reaches the barrier, also when it fails, so a failure never
  leaves the other ranks waiting: they see no file and fail with the same message.

* With no cached file and no network the failure is fast (no socket time-out): offline mode
  (``offline=True``, or env ``TRAINER_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``) fails at once; otherwise
  a TCP connect to the download host (or ``$HTTPS_PROXY``) with a 3 s time-out decides. The error
  names the expected file and the prefetch command.

* A cached file is verified before use: torchvision file names carry the first hex digits of the
  file's SHA-256 (``torch.hub.HASH_REGEX``, the same check as ``check_hash=True``); Hugging Face
  blobs of LFS files are named by their full SHA-256; other files are verified by loading them
  (``safetensors`` / :func:`trainer.models.state_dict.safe_torch_load`). A truncated or corrupt file is an error
  naming its path (delete it and prefetch again).

Loading without the network: torchvision's ``weights.get_state_dict()`` reads the cached file
without a network call. For timm, pass the returned path as
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})``; letting
timm call ``hf_hub_download`` itself would first ask the hub for a newer revision (a network call
that waits for a time-out on offline nodes) unless ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import urllib.parse
from pathlib import Path
from typing import Callable

import torch

from trainer.models.state_dict import safe_torch_load
from trainer.files.atomic import sha256_file

PREFETCH_COMMAND = "python launch/prefetch_weights.py {backbone}"
PROBE_TIMEOUT_S = 3.0
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order of preference
_TRUE = {"1", "true", "yes", "on"}


class WeightsUnavailableError(RuntimeError):
    """No usable cached weights file and no way to download it (offline / no network / failed)."""


class CorruptWeightsError(RuntimeError):
    """A cached weights file fails its hash check or cannot be loaded (e.g. truncated)."""


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """Where one backbone's default pretrained weights come from and are cached.

    Attributes:
        backbone: the name as given, e.g. ``"resnet50"`` or ``"timm:convnext_tiny"``.
        kind: ``"url"`` (torch hub ``checkpoints/`` file) or ``"hf"`` (Hugging Face hub cache).
        url: download url (``kind == "url"``) else ``None``.
        hf_repo: Hugging Face repo id (``kind == "hf"``), e.g. ``"timm/convnext_tiny.fb_in1k"``.
        hf_revision: revision (``None`` = the repo's default branch).
        hf_filenames: candidate file names in the repo, tried in order.
        hash_prefix: leading hex digits of the file's SHA-256 when the file name carries them.
    """

    backbone: str
    kind: str
    url: str | None = None
    hf_repo: str | None = None
    hf_revision: str | None = None
    hf_filenames: tuple[str, ...] = ()
    hash_prefix: str | None = None

    def cache_path(self) -> Path:
        """Path of the cached weights file (read from the environment at call time; need not exist).

        For Hugging Face sources that are not cached yet the snapshot revision is unknown offline,
        so the path returned is the pattern
        ``<HF hub cache>/models--<org>--<name>/snapshots/<revision>/<first candidate file>``.
        """
        if self.kind == "url":
            filename = os.path.basename(urllib.parse.urlparse(self.url).path)
            return Path(torch.hub.get_dir()) / "checkpoints" / filename
        cached = _hf_cached_file(self)
        if cached is not None:
            return cached
        folder = "models--" + self.hf_repo.replace("/", "--")
        return hf_cache_dir() / folder / "snapshots" / (self.hf_revision or "<revision>") / self.hf_filenames[0]


def split_backbone(backbone: str) -> tuple[str, str]:
    """The one parser of backbone names: ``"timm:x"`` -> ``("timm", "x")``; ``"torchvision:x"`` and a
    bare ``"x"`` -> ``("torchvision", "x")``.

    Raises:
        ValueError: an unknown library prefix or an empty model name (names the backbone).
    """
    library, name = backbone.split(":", 1) if ":" in backbone else ("torchvision", backbone)
    if library not in ("torchvision", "timm"):
        raise ValueError(f"model.backbone {backbone!r}: unknown library prefix {library!r}; "
                         "use 'timm:<name>', 'torchvision:<name>' or a bare torchvision name")
    if not name:
        raise ValueError(f"model.backbone {backbone!r}: empty model name after {library + ':'!r}")
    return library, name


def weights_source(backbone: str) -> WeightsSource:
    """Resolve a backbone name to its default pretrained weights' source (no network).

    Args:
        backbone: ``"resnet50"`` / ``"torchvision:resnet50"`` (torchvision ``DEFAULT`` weights of
            ``torchvision.models.get_model_weights``) or ``"timm:<model>[.<tag>]"`` (timm's
            pretrained config, as ``timm.create_model(..., pretrained=True)`` would use it).

    Raises:
        ValueError: unknown library prefix, unknown model name, or a model without pretrained
            weights; the message names the backbone.
    """
    library, name = split_backbone(backbone)
    if library == "torchvision":
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(name).DEFAULT
        except (ValueError, KeyError) as e:
            raise ValueError(f"backbone {backbone!r}: not a torchvision model with weights ({e})") from e
        url = weights.url
        match = torch.hub.HASH_REGEX.search(os.path.basename(urllib.parse.urlparse(url).path))
        return WeightsSource(backbone, "url", url=url,
                             hash_prefix=match.group(1) if match and match.group(1) else None)

    import timm.models

    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    if cfg is None:
        raise ValueError(f"backbone {backbone!r}: timm has no pretrained config for {name!r}")
    cfg = cfg.to_dict()
    if cfg.get("hf_hub_id"):
        repo, _, revision = cfg["hf_hub_id"].partition("@")
        files = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else HF_WEIGHT_FILES
        return WeightsSource(backbone, "hf", hf_repo=repo, hf_revision=revision or None,
                             hf_filenames=files)
    if cfg.get("url"):
        url = cfg["url"]
        match = torch.hub.HASH_REGEX.search(os.path.basename(urllib.parse.urlparse(url).path))
        return WeightsSource(backbone, "url", url=url,
                             hash_prefix=match.group(1) if match and match.group(1) else None)
    raise ValueError(f"backbone {backbone!r}: timm's pretrained config has neither hf_hub_id nor url")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read at call time: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    huggingface_hub's default (``~/.cache/huggingface/hub``). No file system access."""
    from huggingface_hub import constants

    # read the env at call time (constants are fixed at import; tests and users may change HF_HOME)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def _hf_cached_file(src: WeightsSource) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in src.hf_filenames:
        found = try_to_load_from_cache(src.hf_repo, filename, cache_dir=hf_cache_dir(),
                                       revision=src.hf_revision)
        if isinstance(found, str):
            return Path(found)
    return None


def verify_weights_file(path: Path, hash_prefix: str | None = None) -> None:
    """Check that a cached weights file is complete.

    Order: ``hash_prefix`` given -> SHA-256 must start with it (torchvision's file-name hash);
    else a Hugging Face blob named by a 64-hex SHA-256 -> full hash compare; else load it
    (``safetensors.torch.load_file`` for ``.safetensors``, :func:`trainer.models.state_dict.safe_torch_load`
    otherwise) on CPU.

    Raises:
        CorruptWeightsError: hash mismatch or load failure; the message names the path.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    advice = f"delete {path} and run the prefetch command again"
    if hash_prefix:
        actual = sha256_file(path)
        if not actual.startswith(hash_prefix):
            raise CorruptWeightsError(
                f"weights file {path} is corrupt or truncated: sha256 {actual[:len(hash_prefix)]}... "
                f"does not start with {hash_prefix} from its file name ({path.stat().st_size} bytes); {advice}"
            )
        return
    blob = path.resolve()
    if re.fullmatch(r"[0-9a-f]{64}", blob.name):
        actual = sha256_file(blob)
        if actual != blob.name:
            raise CorruptWeightsError(
                f"weights file {path} (blob {blob}) is corrupt or truncated: sha256 {actual} "
                f"does not match its blob name; {advice}"
            )
        return
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            safetensors.torch.load_file(str(path), device="cpu")
        else:
            safe_torch_load(path)
    except Exception as e:  # any load failure means the file is unusable
        raise CorruptWeightsError(f"weights file {path} cannot be loaded ({type(e).__name__}: {e}); {advice}") from e


def is_offline(offline: bool | None = None) -> bool:
    """``offline`` if given, else true when env ``TRAINER_OFFLINE`` or ``HF_HUB_OFFLINE`` is set truthy."""
    if offline is not None:
        return offline
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("TRAINER_OFFLINE", "HF_HUB_OFFLINE"))


def _download_host(src: WeightsSource) -> tuple[str, int]:
    """(host, port) a download would connect to first: the https proxy if set, else the server."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parsed = urllib.parse.urlparse(proxy if "://" in proxy else "http://" + proxy)
        return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    if src.kind == "url":
        url = src.url
    else:
        url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urllib.parse.urlparse(url)
    return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)


def network_reachable(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True if a TCP connection to ``host:port`` opens within ``timeout_s`` seconds (DNS included)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _unavailable(src: WeightsSource, reason: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"pretrained weights for backbone {src.backbone!r} are not cached at {src.cache_path()} "
        f"and cannot be downloaded: {reason}. On a machine with internet and the same "
        f"TORCH_HOME/HF_HOME run: {PREFETCH_COMMAND.format(backbone=src.backbone)}"
    )


def _download(src: WeightsSource) -> Path:
    """Download into the library cache (atomic: temp file + rename, as the libraries do)."""
    if src.kind == "url":
        dst = src.cache_path()
        dst.parent.mkdir(parents=True, exist_ok=True)
        # torch.hub writes <dst>.<uuid>.partial, checks hash_prefix, then moves it into place
        torch.hub.download_url_to_file(src.url, str(dst), hash_prefix=src.hash_prefix, progress=False)
        return dst
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    last: Exception | None = None
    for filename in src.hf_filenames:
        try:
            return Path(huggingface_hub.hf_hub_download(src.hf_repo, filename, revision=src.hf_revision,
                                                        cache_dir=hf_cache_dir()))
        except EntryNotFoundError as e:
            last = e
    raise WeightsUnavailableError(f"backbone {src.backbone!r}: none of {src.hf_filenames} in {src.hf_repo}: {last}")


def fetch_weights(backbone: str, *, offline: bool | None = None, verify: bool = True) -> Path:
    """Return the verified cached file for ``backbone``, downloading it if needed (single process).

    Raises:
        WeightsUnavailableError: not cached and offline / host unreachable (within
            ``PROBE_TIMEOUT_S``) / download failed; names the expected path and prefetch command.
        CorruptWeightsError: the cached (or just downloaded) file fails verification.
        ValueError: unknown backbone.
    """
    src = weights_source(backbone)
    path = src.cache_path()
    if not path.exists():
        if is_offline(offline):
            raise _unavailable(src, "offline mode (TRAINER_OFFLINE / HF_HUB_OFFLINE or offline=True)")
        host, port = _download_host(src)
        if not network_reachable(host, port):
            raise _unavailable(src, f"no connection to {host}:{port} within {PROBE_TIMEOUT_S:.0f} s")
        try:
            path = _download(src)
        except (WeightsUnavailableError, CorruptWeightsError):
            raise
        except Exception as e:
            raise _unavailable(src, f"download failed ({type(e).__name__}: {e})") from e
    if verify:
        verify_weights_file(path, src.hash_prefix)
    return path


def ensure_weights(
    backbone: str,
    *,
    local_rank: int,
    barrier: Callable[[], None],
    offline: bool | None = None,
) -> Path:
    """Make ``backbone``'s default pretrained weights available on this node; return the file path.

    Call on every process (it calls ``barrier`` exactly once on each). Local rank 0 of each node
    checks the cache, downloads if needed (see :func:`fetch_weights`) and verifies the file; then
    all processes meet at ``barrier`` (e.g. ``accelerator.wait_for_everyone``); the other local
    ranks then only read and verify the cached file (no network). If local rank 0 fails it still enters the barrier
    before raising, so the others fail right after it instead of waiting for a collective time-out.

    Args:
        backbone: see :func:`weights_source`.
        local_rank: this process's rank within its node (``accelerator.local_process_index``).
        barrier: blocks until all processes have called it.
        offline: ``True`` never downloads; ``None`` reads ``TRAINER_OFFLINE`` / ``HF_HUB_OFFLINE``.

    Raises:
        WeightsUnavailableError: no cached file and no download possible (fast; names the expected
            path and the prefetch command); on local ranks != 0: local rank 0 did not provide it.
        CorruptWeightsError: the cached file is truncated or corrupt (names the path).
        ValueError: unknown backbone (raised on every rank before the barrier, consistently).
    """
    src = weights_source(backbone)  # same on every rank: a bad name fails everywhere, no barrier needed
    if local_rank == 0:
        try:
            path = fetch_weights(backbone, offline=offline)
        except BaseException:
            barrier()
            raise
        barrier()
        return path
    barrier()
    path = src.cache_path()
    if not path.exists():
        raise _unavailable(src, "local rank 0 of this node did not provide it (see its error)")
    verify_weights_file(path, src.hash_prefix)  # a corrupt file made local rank 0 fail: fail here too
    return path
