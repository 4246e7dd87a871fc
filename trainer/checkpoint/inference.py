"""The inference checkpoint: a folder with ``model.safetensors`` + ``model.json`` (the one home of its format),
for timm backbones also timm's ``config.json``, and a model card ``README.md``.

The trainer writes it as ``<output_dir>/checkpoints/best/`` whenever the monitored metric improves;
``launch/predict.py``, ``launch/export.py`` and ``launch/evaluate.py`` read it. Nothing in it is
unpickled, so a checkpoint from a shared folder cannot run code. With a timm backbone the folder is also
timm's own format (:mod:`trainer.models.timm_format`): ``timm.create_model("local-dir:<folder>",
pretrained=True)`` builds the same model and ``timm.data.resolve_data_config({}, model=m)`` gives the run's
eval preprocessing; ``huggingface_hub.upload_folder`` uploads it as it is.

* ``model.safetensors`` - the classifier's ``state_dict``; its header metadata holds ``format``, ``write_id``
  and the text of the ``model.json`` (and ``config.json``) written with it. Stored in timm's names
  (``weights_keys: timm``: ``backbone.<k>`` as ``<k>``, the head as timm's classifier ``timm.classifier``) when
  the model is exactly timm's architecture with C classes, else in the classifier's own (``weights_keys:
  trainer``, ``timm_unavailable`` says why). :func:`load_state` gives the classifier's names either way.
* ``config.json`` - timm's config (architecture, num_classes, label_names, pretrained_cfg); ``weights_keys: timm``.
* ``README.md`` - the model card (:mod:`trainer.reporting.model_card`), when ``config`` is a run's config (has
  ``data`` and ``model`` sections); :func:`write_model_card` adds the test metrics at the end of a run.
* ``model.json`` - ``format`` (:data:`FORMAT`), ``format_version``, ``write_id`` (the same random id
  as the weights' header: the pair belongs together), ``class_names`` (output order), ``backbone``,
  ``drop_rate``, ``preprocessing`` (``input_size``, ``mean``, ``std``, ``interpolation``,
  ``crop_pct``), ``metrics`` (``epoch``, ``step``, ``val/...``; NaN / inf written as null),
  ``config`` (the resolved config of the run), ``weights_keys`` with ``timm`` (``architecture``,
  ``classifier``) or ``timm_unavailable``, plus any fields the caller adds (``extra``).

Writing (:func:`save`): the weights, ``config.json``, ``README.md``, then ``model.json`` (the commit), each with
:func:`trainer.files.atomic.atomic_write` (temp file, fsync, rename). A kill before the last leaves weights and
JSON of different writes: readers detect that by ``write_id`` and refuse with one line, and the next start of
the run (:func:`repair`) rewrites ``model.json``, ``config.json`` and ``README.md`` from the weights' header.
A folder of an earlier version (no ``weights_keys``, no ``config.json``) loads as before; :func:`convert` writes
it in the current format.

A ``best.pt`` of an earlier trainer version (plain data, read with ``weights_only=True``) and a
``last.pt`` are read too, so old runs still predict and export.

Older ``model.json`` files (:func:`load_for_inference`): fields this trainer no longer reads are ignored (at the
top level and in ``preprocessing``, logged); a missing field it needs (:data:`INFERENCE_FIELDS`, a
preprocessing key) is refused with one line naming the fields and how to convert: add them to ``model.json``,
or pass the run's ``checkpoints/last.pt``, which holds them too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import uuid
from pathlib import Path

import torch

from trainer.models.timm_format import CONFIG_FILE, from_timm_keys, timm_config, timm_layout, to_timm_keys
from trainer.checkpoint.card import write_card
from trainer.checkpoint.state import CheckpointError, checkpoint_dir, load
from trainer.files.atomic import atomic_write

FORMAT = "finetune-trainer.inference"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
BEST_DIR = "best"
INFERENCE_FIELDS = ("class_names", "backbone", "preprocessing")
"""Fields of ``model.json`` (or a ``.pt``) that :func:`load_for_inference` needs."""

log = logging.getLogger("trainer")


def best_dir(output_dir: str | Path) -> Path:
    """``<output_dir>/checkpoints/best``: the run's inference checkpoint folder."""
    return checkpoint_dir(output_dir) / BEST_DIR


def _plain(value):
    """JSON-safe copy: tuples -> lists, tensors -> numbers / lists, NaN / inf -> None, others -> str."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if torch.is_tensor(value):
        return _plain(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def save(folder: str | Path, model_state: dict[str, torch.Tensor], *, class_names: list[str], backbone: str,
         drop_rate: float, preprocessing: dict, config: dict, metrics: dict, extra: dict | None = None) -> Path:
    """Write ``folder/model.safetensors`` + ``folder/model.json`` (see the module docstring).

    Args:
        model_state: the classifier's ``state_dict()`` (any device, any memory format; copied to
            contiguous CPU tensors, so tied weights are stored once per name).
        class_names: C names in output order. preprocessing: ``Preprocessing.to_dict()``.
        config: ``Config.to_dict()``. metrics: numbers describing this model (non-finite -> null).
        extra: further JSON fields (e.g. which weights these are); may not replace the fields above.

    Returns:
        ``folder``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    write_id = uuid.uuid4().hex
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model_state.items()}
    size = preprocessing.get("input_size") if isinstance(preprocessing, dict) else None
    layout, why = timm_layout(backbone, tensors, len(class_names), int(size or 0))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "write_id": write_id,
            "class_names": list(class_names), "backbone": backbone, "drop_rate": float(drop_rate),
            "preprocessing": _plain(preprocessing), "metrics": _plain(metrics), "config": _plain(config),
            "weights": WEIGHTS_FILE}
    header = {"format": FORMAT, "write_id": write_id}
    if layout is not None:  # one weights file in timm's names, read back by load_state
        tensors = to_timm_keys(tensors, layout.classifier)
        meta.update(weights_keys="timm", timm=layout.to_dict())
        header[CONFIG_FILE] = json.dumps(timm_config(layout, list(class_names), preprocessing), indent=2) + "\n"
    else:
        meta.update(weights_keys="trainer", timm_unavailable=why)
    clash = set(extra or {}) & set(meta)
    if clash:
        raise ValueError(f"inference checkpoint: extra fields {sorted(clash)} would replace standard ones")
    meta.update(_plain(extra or {}))
    text = json.dumps(meta, indent=2, allow_nan=False) + "\n"
    header[META_FILE] = text
    atomic_write(folder / WEIGHTS_FILE, lambda t: save_file(tensors, str(t), metadata=header))
    _write_companions(folder, meta, header.get(CONFIG_FILE))
    atomic_write(folder / META_FILE, text)  # the commit: from here on both files are this write's
    return folder


def _write_companions(folder: Path, meta: dict, config_text: str | None) -> None:
    """timm's ``config.json`` (``config_text``; None: remove a stale one, the weights are not in timm's names)
    and the model card (:func:`trainer.checkpoint.card.write_card`)."""
    if config_text:
        atomic_write(folder / CONFIG_FILE, config_text)
    else:
        (folder / CONFIG_FILE).unlink(missing_ok=True)
    write_card(folder, meta, config_text)


def write_model_card(path: str | Path, test_metrics: dict | None = None) -> bool:
    """Rewrite the model card ``README.md`` of the inference checkpoint folder at ``path`` from its ``model.json``,
    with ``test_metrics`` (the ``test/...`` record of this checkpoint) when given.

    Returns:
        False when the folder's ``model.json`` holds no run config (no card is written for it).

    Raises:
        CheckpointError: no inference checkpoint folder at ``path``, or an unreadable ``model.json``.
    """
    src = resolve(path)
    if not src.is_dir():
        raise CheckpointError(f"{src}: a model card belongs to an inference checkpoint folder, not a .pt file")
    meta = _read_json(src / META_FILE)
    config = src / CONFIG_FILE
    text = config.read_text() if meta.get("weights_keys") == "timm" and config.is_file() else None
    return write_card(src, meta, text, test_metrics)


def resolve(path: str | Path) -> Path:
    """The checkpoint a user named: an inference folder, or a ``.pt`` file.

    Accepts the folder, either file inside it, a run folder or its ``checkpoints/`` (``best/`` in it, else a
    ``best.pt`` of an older trainer version) or a ``best.pt`` / ``last.pt``.

    Raises:
        CheckpointError: nothing of the kind at ``path``: one line naming it and what to pass instead.
    """
    p = Path(path)
    if p.is_file() and p.name in (META_FILE, WEIGHTS_FILE):
        return p.parent
    if p.is_file():
        return p
    ckpts = p if p.name == "checkpoints" else checkpoint_dir(p)
    for folder in (p, ckpts / BEST_DIR):
        if (folder / META_FILE).is_file():
            return folder
    if (ckpts / "best.pt").is_file():  # a run of an older trainer version
        return ckpts / "best.pt"
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p} does not exist (pass a run folder, its "
                              f"checkpoints/{BEST_DIR} folder with {META_FILE} + {WEIGHTS_FILE}, or a .pt file)")
    if (ckpts / "last.pt").is_file():
        raise CheckpointError(f"checkpoint not found: {p} has no checkpoints/{BEST_DIR} (no evaluation of the run has "
                              f"finished yet): pass {ckpts / 'last.pt'} for its latest weights")
    raise CheckpointError(f"checkpoint not found: {p} holds no {META_FILE} and no checkpoints/{BEST_DIR} or "
                          f"checkpoints/best.pt (pass a run folder, its checkpoints/{BEST_DIR} folder or a .pt file)")


def _read_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {' '.join(str(e).split())}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an inference checkpoint of this trainer (format {FORMAT!r} expected)")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {meta.get('format_version')}, newer than this trainer "
                              f"reads ({FORMAT_VERSION}): update the trainer")
    return meta


def _weights_header(path: Path) -> dict:
    """The safetensors header metadata of ``path`` (``format``, ``write_id``, ``model.json``)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # truncated / not a safetensors file
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {' '.join(str(e).split())}") from None


def read_model_meta(path: str | Path) -> dict:
    """The description of a checkpoint without its weights (``model.json``, or a ``.pt``'s fields).

    Raises:
        CheckpointError: missing, unreadable, refused (:func:`trainer.checkpoint.state.load`) or not
            an inference checkpoint of this trainer.
    """
    src = resolve(path)
    if src.is_dir():
        return _read_json(src / META_FILE)
    return {k: v for k, v in load(src).items() if k not in ("model", "optimizer", "rng", "scaler")}


def load_state(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, state_dict)`` of a checkpoint (see :func:`resolve` for what ``path`` may be).

    Raises:
        CheckpointError: as :func:`read_model_meta`, or weights and JSON from different writes (an
            interrupted write; the run's next start repairs it).
    """
    from safetensors.torch import load_file

    src = resolve(path)
    if not src.is_dir():
        ckpt = load(src)
        if "model" not in ckpt or "class_names" not in ckpt:
            raise CheckpointError(f"{src} holds no model weights with class names")
        return {k: v for k, v in ckpt.items() if k != "model"}, ckpt["model"]
    meta = _read_json(src / META_FILE)
    weights = src / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"checkpoint not found: {weights} (beside {META_FILE})")
    if _weights_header(weights).get("write_id") != meta.get("write_id"):
        raise CheckpointError(f"{weights} and {META_FILE} come from different writes (one was interrupted): "
                              "start the run once more to repair it, or use a copy made before")
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as e:
        raise CheckpointError(f"cannot read {weights}: {type(e).__name__}: {' '.join(str(e).split())}") from None
    keys = meta.get("weights_keys", "trainer")  # absent: a folder written before config.json existed
    if keys == "timm":
        classifier = (meta.get("timm") or {}).get("classifier")
        if not isinstance(classifier, str) or not classifier:
            raise CheckpointError(f"{src / META_FILE}: weights_keys is timm but timm.classifier is missing")
        return meta, from_timm_keys(state, classifier)
    if keys != "trainer":
        raise CheckpointError(f"{src / META_FILE}: weights_keys {keys!r} is not timm or trainer: update the trainer")
    return meta, state


def convert(path: str | Path, dest: str | Path | None = None) -> Path:
    """Write the checkpoint at ``path`` (an older ``model.json`` folder, or a ``best.pt`` / ``last.pt``) in the
    current format at ``dest`` (default: the folder itself; required for a ``.pt``): for a timm backbone with
    ``config.json`` and timm's weight names, and with the model card.

    Raises:
        CheckpointError: unreadable, refused, or lacking the fields :func:`load_for_inference` needs.
        ValueError: ``dest`` missing for a ``.pt``.
    """
    from trainer.models.classifier import Preprocessing

    src = resolve(path)
    if dest is None and not src.is_dir():
        raise ValueError(f"convert {src}: name the destination folder for a .pt file")
    meta, state = load_state(src)
    pre = _inference_fields(meta, src, {f.name for f in dataclasses.fields(Preprocessing)})
    known = {"format", "format_version", "write_id", "class_names", "backbone", "drop_rate", "preprocessing",
             "metrics", "config", "weights", "weights_keys", "timm", "timm_unavailable"}
    extra = {k: v for k, v in meta.items() if k not in known} if src.is_dir() else {}  # e.g. thresholds
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    return save(dest or src, state, class_names=list(meta["class_names"]), backbone=meta["backbone"],
                drop_rate=meta.get("drop_rate") or 0.0, preprocessing=pre, config=meta.get("config") or {},
                metrics=metrics, extra=extra)


def load_for_inference(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the model of a checkpoint without any download (see :func:`resolve` for ``path``).

    Returns:
        (model in eval mode on ``device``, Preprocessing, class_names)

    Raises:
        CheckpointError: unreadable, refused or mismatched files, or weights that do not fit the stored
            backbone / class count (one line naming the file).
    """
    from trainer.models.build import build_model
    from trainer.models.classifier import Preprocessing

    meta, state = load_state(path)
    src = resolve(path)
    pre_dict = _inference_fields(meta, src, {f.name for f in dataclasses.fields(Preprocessing)})
    class_names = list(meta["class_names"])
    try:
        pre = Preprocessing.from_dict(pre_dict)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: preprocessing: {' '.join(str(e).split())}") from None
    model, _ = build_model(meta["backbone"], len(class_names), weights="none",
                           drop_rate=meta.get("drop_rate") or 0.0, preprocessing=pre)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit backbone {meta['backbone']} with "
                              f"{len(class_names)} classes: {' '.join(str(e).split())[:300]}") from None
    return model.to(device).eval(), pre, class_names


def _inference_fields(meta: dict, src: Path, pre_keys: set[str]) -> dict:
    """The ``preprocessing`` dict of ``meta`` restricted to ``pre_keys`` (other keys, written by an older
    version, are logged and dropped), after checking that every field :func:`load_for_inference` needs is there.

    Raises:
        CheckpointError: one line naming the missing fields and how to convert the checkpoint.
    """
    pre = meta.get("preprocessing")
    missing = [k for k in INFERENCE_FIELDS if k not in meta or meta[k] is None]
    if isinstance(pre, dict):
        missing += [f"preprocessing.{k}" for k in sorted(pre_keys - set(pre))]
    if missing:
        where = src / META_FILE if src.is_dir() else src
        last = src.parent / "last.pt"  # checkpoints/last.pt beside best/ (or beside an older best.pt)
        alt = f", or pass {last} (it holds them)" if last.is_file() and last != src else ""
        raise CheckpointError(
            f"{where}: written by another trainer version (format_version {meta.get('format_version')}), it lacks "
            f"{', '.join(missing)}; convert: add them to {META_FILE} (class_names: output order, backbone: "
            f"config.model.backbone, preprocessing: input_size, mean, std, interpolation, crop_pct){alt}")
    if not isinstance(pre, dict):
        raise CheckpointError(f"{src}: preprocessing: expected a mapping, got {type(pre).__name__}")
    ignored = sorted(set(pre) - pre_keys)
    if ignored:
        log.info("%s: preprocessing field(s) %s of an older version ignored", src, ", ".join(ignored))
    return {k: pre[k] for k in pre_keys}


def repair(folder: str | Path) -> bool:
    """Complete a write that a kill interrupted between its two files; True if it did.

    The weights of the interrupted write are in place but ``model.json`` is the previous one (or
    missing): ``model.json`` is rewritten from the weights' header, and ``config.json`` / ``README.md`` with it.
    Call from one process at start-up.
    """
    folder = Path(folder)
    weights, meta_path = folder / WEIGHTS_FILE, folder / META_FILE
    if not weights.is_file():
        return False
    try:
        header = _weights_header(weights)
    except CheckpointError:  # damaged weights: nothing to rebuild from
        return False
    try:
        current = json.loads(meta_path.read_text()).get("write_id") if meta_path.is_file() else None
    except (OSError, ValueError, AttributeError):  # unreadable / cut / not an object
        current = None
    text = header.get(META_FILE)
    if not text or header.get("write_id") == current:
        return False
    try:
        meta = json.loads(text)
    except ValueError:
        meta = None
    if isinstance(meta, dict):
        _write_companions(folder, meta, header.get(CONFIG_FILE))
    atomic_write(meta_path, text)
    return True
