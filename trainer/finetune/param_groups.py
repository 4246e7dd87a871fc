"""Optimizer parameter groups from parameter names, shapes and layer ids (pure, no torch needed).

Every parameter goes into exactly one group named ``layerNN_decay`` or ``layerNN_no_decay``.
Groups are keyed by *name* (not position) so optimizer state can be matched on resume. The group
dicts carry parameter names, not tensors; the optimizer builder maps names to tensors::

    named = dict(model.named_parameters())
    groups = build_param_groups([(n, tuple(p.shape)) for n, p in named.items()], layer_of, L, ...)
    opt = torch.optim.AdamW([{"params": [named[n] for n in g["param_names"]], "lr": base_lr * g["lr_scale"],
                              "weight_decay": g["weight_decay"], "name": g["name"]} for g in groups])

Every parameter, frozen or not, is in the optimizer from the start (frozen ones have no grad and
are skipped by the optimizer), so unfreezing never rebuilds the optimizer.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping, Sequence

from trainer.config.fields import ConfigError

__all__ = ["DEFAULT_NO_DECAY_NAMES", "build_param_groups", "format_group_table", "is_no_decay"]

# Token / position-embedding parameters excluded from weight decay, as in timm's
# ``no_weight_decay()`` sets (ViT/DeiT/Swin/BEiT) and torchvision ViT names.
DEFAULT_NO_DECAY_NAMES: tuple[str, ...] = (
    "cls_token", "class_token", "dist_token", "reg_token", "mask_token",
    "pos_embed", "pos_embedding", "absolute_pos_embed", "relative_position_bias_table",
)


def _matches(name: str, pattern: str) -> bool:
    """True if ``pattern`` equals ``name`` or a run of its dotted components
    (``"pos_embed"`` matches ``"backbone.pos_embed"``, ``"encoder.pos_embedding"`` matches
    ``"backbone.encoder.pos_embedding"``; ``"embed"`` does not match ``"backbone.pos_embed"``)."""
    return f".{pattern}." in f".{name}."


def is_no_decay(name: str, shape: Sequence[int], *, no_decay_1d: bool = True,
                extra_no_decay: Iterable[str] = ()) -> bool:
    """Whether parameter ``name`` of ``shape`` gets weight decay 0.

    No decay for tensors with ``ndim <= 1`` (norm weights/biases, all biases; when
    ``no_decay_1d``) and for names matching :data:`DEFAULT_NO_DECAY_NAMES` or ``extra_no_decay``
    (whole dotted components, see :func:`_matches`)."""
    if no_decay_1d and len(tuple(shape)) <= 1:
        return True
    return any(_matches(name, p) for p in (*DEFAULT_NO_DECAY_NAMES, *extra_no_decay))


def build_param_groups(
    params: list[tuple[str, tuple[int, ...]]],
    layer_of: dict[str, int],
    num_layers: int,
    *,
    weight_decay: float,
    layer_decay: float | None = None,
    layer_lr_scale: dict[int, float] | None = None,
    no_decay_1d: bool = True,
    extra_no_decay: tuple[str, ...] = (),
) -> list[dict]:
    """Split parameters into optimizer groups by layer id and weight-decay class.

    Args:
        params: ``(name, shape)`` for every parameter of the model (``model.named_parameters()``),
            frozen ones included.
        layer_of: ``{name: layer id}`` from :func:`trainer.models.layers.layer_ids`; ids in
            ``[0, num_layers)``, the head is ``num_layers - 1``.
        num_layers: number of layer ids (L + 1).
        weight_decay: decoupled weight decay for decayed groups (e.g. AdamW's 0.05).
        layer_decay: layer-wise lr decay: ``lr_scale = layer_decay ** (num_layers - 1 - layer_id)``,
            head scale 1 (ELECTRA, Clark et al. 2020; BEiT, Bao et al. 2021, as in timm's
            ``param_groups_layer_decay``). ``None`` = off.
        layer_lr_scale: explicit per-layer lr multipliers ``{layer_id: scale}`` (discriminative
            fine-tuning, ULMFiT, Howard & Ruder 2018); ids not listed keep 1.0. Exclusive with
            ``layer_decay``.
        no_decay_1d: no weight decay on tensors with ``ndim <= 1`` (norms, biases).
        extra_no_decay: more names without weight decay (e.g. ``model.no_weight_decay()`` of timm).

    Returns:
        Groups sorted by layer id (decay before no_decay), empty ones omitted; each
        ``{"name": "layer03_decay", "param_names": [...], "layer_id": 3, "lr_scale": float,
        "weight_decay": float}``.

    The ranges of ``weight_decay``, ``layer_decay`` and the scales, and that ``layer_decay`` and
    ``layer_lr_scale`` exclude each other, are checked by the config (``trainer/config/sections/finetune.py``);
    given both, ``layer_decay`` wins.

    Raises:
        ConfigError: a ``layer_lr_scale`` id outside ``[0, num_layers)`` (``finetune.layer_lr_scale``).
        ValueError: a duplicated parameter, a parameter without layer id, a layer id outside
            ``[0, num_layers)`` or a ``layer_of`` entry that is not a parameter.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    scales = {}
    for lid, s in (layer_lr_scale or {}).items():
        if not 0 <= int(lid) < num_layers:  # known only once the model is built
            raise ConfigError(f"finetune.layer_lr_scale: layer id {lid} is not allowed (allowed: [0, "
                              f"{num_layers - 1}], the model's layer ids)")
        scales[int(lid)] = float(s)

    names = [n for n, _ in params]
    dup = sorted(n for n, c in Counter(names).items() if c > 1)
    if dup:
        raise ValueError(f"param groups: duplicated parameter name(s) {dup[:10]}")
    no_id = [n for n in names if n not in layer_of]
    if no_id:
        raise ValueError(f"param groups: parameter(s) without layer id {no_id[:10]}")
    stray = sorted(set(layer_of) - set(names))
    if stray:
        raise ValueError(f"param groups: layer_of names unknown parameter(s) {stray[:10]}")

    groups: dict[tuple[int, bool], dict] = {}
    for name, shape in params:
        lid = int(layer_of[name])
        if not 0 <= lid < num_layers:
            raise ValueError(f"param groups: layer id {lid} of {name!r} outside [0, {num_layers})")
        nd = is_no_decay(name, shape, no_decay_1d=no_decay_1d, extra_no_decay=extra_no_decay)
        key = (lid, nd)
        if key not in groups:
            if layer_decay is not None:
                scale = float(layer_decay) ** (num_layers - 1 - lid)
            else:
                scale = scales.get(lid, 1.0)
            groups[key] = {"name": f"layer{lid:02d}_{'no_decay' if nd else 'decay'}", "param_names": [],
                           "layer_id": lid, "lr_scale": scale, "weight_decay": 0.0 if nd else float(weight_decay)}
        groups[key]["param_names"].append(name)

    out = [groups[k] for k in sorted(groups)]
    placed = [n for g in out for n in g["param_names"]]
    assert sorted(placed) == sorted(names), "every parameter must be in exactly one group"
    return out


def format_group_table(groups: list[dict], counts: Mapping[str, int], base_lr: float,
                       phases_trainable: Sequence[set[int] | frozenset[int]]) -> str:
    """Plain-text table of the optimizer groups, for the dry-run command.

    Args:
        groups: from :func:`build_param_groups`.
        counts: ``{parameter name: number of elements}`` (``p.numel()``).
        base_lr: the peak learning rate (``optim.lr``); the table shows ``base_lr * lr_scale``.
        phases_trainable: per unfreeze phase, the trainable layer ids
            (:func:`trainer.finetune.freezing.trainable_layer_ids`).

    Returns:
        One line per group: group, #params, peak lr, weight decay, and ``yes``/``no`` per phase,
        then a total line.

    Raises:
        KeyError: a parameter missing from ``counts`` (named).
    """
    header = ["group", "#params", "lr", "weight_decay"] + [f"phase{i}" for i in range(len(phases_trainable))]
    rows = []
    total = 0
    for g in groups:
        try:
            n = sum(int(counts[p]) for p in g["param_names"])
        except KeyError as e:
            raise KeyError(f"format_group_table: no count for parameter {e.args[0]!r}") from None
        total += n
        rows.append([g["name"], f"{n:,}", f"{base_lr * g['lr_scale']:.3g}", f"{g['weight_decay']:g}"]
                    + ["yes" if g["layer_id"] in t else "no" for t in phases_trainable])
    rows.append(["total", f"{total:,}", "", ""] + [""] * len(phases_trainable))
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def _line(r):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([_line(header), sep] + [_line(r) for r in rows[:-1]] + [sep, _line(rows[-1])])


