"""Config values that a launcher or the hardware decide: ``train.mixed_precision: auto``.

``accelerate launch --mixed_precision bf16`` (or an ``accelerate config`` default) reaches every process
as ``ACCELERATE_MIXED_PRECISION``. ``train.mixed_precision: auto`` (the default) resolves as follows
(:func:`resolve_mixed_precision`, the one place this rule lives):

1. The launcher's ``bf16`` or ``fp16`` applies. (``accelerate launch`` always sets the variable, ``no``
   when not asked, so the launcher's ``no`` cannot be told from its default and goes on to rule 2; to
   force float32, set ``train.mixed_precision: no``.)
2. ``bf16`` where the hardware computes it natively and it measures faster (:func:`bf16_hardware`):
   a CUDA GPU of compute capability >= 8.0 (Ampere or newer), for feature extraction and fine-tuning;
   a CPU with ``avx512_bf16`` or ``amx_bf16`` (``/proc/cpuinfo`` flags), for feature extraction only, i.e.
   a backbone frozen for the whole run (:func:`backbone_frozen_throughout`). Fine-tuning on a CPU stays
   float32: its backward pass (depthwise convolutions, BatchNorm) was slower in bf16 both on an AMD EPYC
   with avx512_bf16 and on a Xeon with AMX (docs/performance.md, precision per hardware).
3. Otherwise ``no`` (float32).

A value set in the YAML or on the command line wins over both, and when it differs from the launcher's
the run says so in one line. The resolved value is logged and saved in the run's ``config.yaml``.
The number of processes (``WORLD_SIZE``) and CPU mode (``ACCELERATE_USE_CPU``) have no config field: the
launcher's values always apply (``trainer.distributed.accelerator.make_accelerator``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trainer.config.fields import ConfigError

MIXED_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
_PRECISIONS = ("no", "bf16", "fp16")
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""``/proc/cpuinfo`` flags of CPUs with bf16 arithmetic in hardware (AMX tiles, AVX-512 BF16 dot products)."""


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The ISA flags of the first CPU listed in ``cpuinfo`` (empty where the file does not exist)."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def bf16_hardware(env: dict | None = None, flags: frozenset[str] | None = None) -> str | None:
    """What computes bf16 natively here: ``"cuda"`` (a GPU of compute capability >= 8.0 that this run
    uses), the CPU flag that does (``"amx_bf16"`` or ``"avx512_bf16"``), or None.

    Args:
        env: environment (default ``os.environ``): ``ACCELERATE_USE_CPU`` (``accelerate launch --cpu``)
            means the run uses the CPU even where a GPU exists.
        flags: CPU flags (default :func:`cpu_flags`); tests pass fakes.
    """
    import torch

    env = os.environ if env is None else env
    use_cpu = str(env.get("ACCELERATE_USE_CPU", "")).strip().lower() in ("1", "true", "yes", "on")
    if not use_cpu and torch.cuda.is_available():
        return "cuda" if torch.cuda.get_device_capability()[0] >= 8 else None
    flags = cpu_flags() if flags is None else flags
    return next((f for f in NATIVE_BF16_CPU_FLAGS if f in flags), None)


def backbone_frozen_throughout(finetune: Any) -> bool:
    """Whether the run trains only the head (no backbone parameter ever trains): ``finetune.strategy``
    ``linear_probe``, or ``epochs`` with ``freeze: backbone``, ``frozen_bn: eval``, no ``gradual_every``
    and every ``phases`` entry training ``head``.

    Args:
        finetune: the ``finetune`` section, as a config object or a plain dict (a saved ``config.yaml``).
    """
    def get(key, default=None):
        return finetune.get(key, default) if isinstance(finetune, dict) else getattr(finetune, key, default)

    strategy = get("strategy", "epochs")
    if strategy == "linear_probe":
        return True
    if strategy != "epochs" or get("frozen_bn", "eval") != "eval" or get("gradual_every", 0):
        return False
    phases = get("phases")
    if phases:
        return all((p.get("train") if isinstance(p, dict) else getattr(p, "train", None)) == "head" for p in phases)
    return get("freeze", "backbone") == "backbone"


def resolve_mixed_precision(configured: str, env: dict | None = None, *, frozen_backbone: bool = False,
                            hardware: str | None = "detect") -> tuple[str, str | None]:
    """``(value to use, note or None)`` for ``train.mixed_precision`` = ``configured`` (the rule: module
    docstring).

    Args:
        configured: ``auto``, ``no``, ``bf16`` or ``fp16``.
        env: environment (default ``os.environ``).
        frozen_backbone: the run trains only the head (:func:`backbone_frozen_throughout`).
        hardware: :func:`bf16_hardware`'s answer; ``"detect"`` (default) asks it.

    Returns:
        The value, and where a launcher's value applies or is overridden one line saying so (else None).

    Raises:
        ConfigError: the launcher's value is not one of no/bf16/fp16 (names the variable).
    """
    env = os.environ if env is None else env
    launcher = env.get(MIXED_PRECISION_ENV, "").strip().lower() or None
    if launcher is not None and launcher not in _PRECISIONS:
        raise ConfigError(f"{MIXED_PRECISION_ENV}={launcher!r} (set by accelerate launch --mixed_precision or "
                          f"accelerate config) is not allowed (allowed: {', '.join(_PRECISIONS)})")
    if configured == "auto":
        if launcher in ("bf16", "fp16"):
            return launcher, (f"train.mixed_precision=auto -> {launcher} from the launcher "
                              f"({MIXED_PRECISION_ENV}={launcher})")
        # no note: the trainer's start-up log line and config.yaml show the value chosen
        hw = bf16_hardware(env) if hardware == "detect" else hardware
        if hw == "cuda" or (hw in NATIVE_BF16_CPU_FLAGS and frozen_backbone):
            return "bf16", None
        return "no", None
    if launcher is not None and launcher != configured:
        return configured, (f"train.mixed_precision={configured} from the config wins over the launcher's "
                            f"{MIXED_PRECISION_ENV}={launcher}")
    return configured, None


def resolve_config_precision(cfg: Any, env: dict | None = None) -> tuple[str, str | None]:
    """:func:`resolve_mixed_precision` for a whole config (a config object or a plain dict): its
    ``train.mixed_precision`` and whether its backbone stays frozen."""
    if isinstance(cfg, dict):
        configured = (cfg.get("train") or {}).get("mixed_precision", "auto")
        finetune = cfg.get("finetune") or {}
    else:
        configured, finetune = cfg.train.mixed_precision, cfg.finetune
    return resolve_mixed_precision(configured, env, frozen_backbone=backbone_frozen_throughout(finetune))
