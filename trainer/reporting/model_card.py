"""The model card ``README.md`` beside an inference checkpoint (``checkpoints/best/``).

Hugging Face model-card style: YAML front matter (``library_name: timm`` when the folder loads with
``timm.create_model("local-dir:...")``, ``tags``, ``pipeline_tag``, the pretrained weights' ``license`` when timm
names one), then in Markdown: how to use it, the data (source, task, classes, split sizes), the metrics of the
checkpoint (the validation metrics it was selected by, test metrics once the run evaluated it), the recipe
(backbone, weights, strategy, input size and preprocessing, optimizer, batch size, steps) and the command that
trains it again. The folder is the layout ``huggingface_hub.upload_folder`` uploads as it is.

:func:`model_card` builds the text from plain values (``model.json``'s dict); it reads and writes no file.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

_MAX_LISTED_CLASSES = 50
_NOT_METRICS = ("epoch", "step", "weights", "stage")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4f}".rstrip("0").rstrip(".") if value else "0"
    if value is None:
        return "n/a"
    return str(value)


def _metric_rows(metrics: Mapping[str, Any]) -> list[str]:
    return [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()
            if k not in _NOT_METRICS and (isinstance(v, (int, float)) or v is None) and not isinstance(v, bool)]


def _data_source(data: Mapping[str, Any]) -> str:
    for key, what in (("root", "image folder"), ("manifest", "manifest"), ("train_shards", "shards"),
                      ("download_url", "download")):
        if data.get(key):
            return f"{what} `{data[key]}` (`data.{key}`)"
    return f"shards in `{data.get('shard_dir', '?')}`"


def model_card(meta: Mapping[str, Any], *, timm_loadable: bool, timm_reason: str = "",
               split_sizes: Mapping[str, int] | None = None, test_metrics: Mapping[str, Any] | None = None,
               weights_license: str | None = None) -> str:
    """The ``README.md`` text of an inference checkpoint folder.

    Args:
        meta: the checkpoint's ``model.json`` content (``class_names``, ``backbone``, ``preprocessing``,
            ``metrics``, ``config`` = the run's resolved config as nested sections; missing parts read "n/a").
        timm_loadable: the folder holds ``config.json`` + timm-named weights. timm_reason: why not, in words.
        split_sizes: images per split (``{"train": N, "val": N, "test": N}``), None when unknown.
        test_metrics: the ``test/...`` record of this checkpoint, None before the run evaluated it.
        weights_license: the pretrained weights' licence as timm's ``pretrained_cfg`` names it, or None.

    Returns:
        Markdown with YAML front matter, ending in a newline.
    """
    cfg = meta.get("config") or {}
    data, model, fine = cfg.get("data") or {}, cfg.get("model") or {}, cfg.get("finetune") or {}
    optim, train = cfg.get("optim") or {}, cfg.get("train") or {}
    classes = list(meta.get("class_names") or [])
    pre = meta.get("preprocessing") or {}
    metrics = meta.get("metrics") or {}
    backbone = meta.get("backbone", "n/a")
    task = data.get("task", "multiclass")
    front = ["---"] + (["library_name: timm"] if timm_loadable else []) + ["tags:", "- image-classification"]
    front += (["- timm"] if timm_loadable else []) + ["- finetune-trainer", "pipeline_tag: image-classification"]
    front += ([f"license: {weights_license}"] if weights_license else []) + ["---", ""]
    title = cfg.get("name") or "classifier"
    if title == "run" and train.get("output_dir"):  # the default name: the run folder's says more
        title = str(train["output_dir"]).rstrip("/").rsplit("/", 1)[-1]
    out = front + [f"# {title}", "",
                   f"An image classifier for {len(classes)} classes ({task}), fine-tuned from `{backbone}` "
                   f"(weights `{model.get('weights', 'n/a')}`) with finetune-trainer.", "", "## Use", ""]
    if timm_loadable:
        act = "sigmoid()" if task == "multilabel" else "softmax(-1)"
        out += ["With timm alone (this folder: `config.json` + `model.safetensors` in timm's key names):", "",
                "```python", "import timm, torch", "from PIL import Image", "",
                'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()',
                "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))",
                "with torch.no_grad():",
                f'    probs = model(transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0)).{act}']
        if task == "multilabel":  # the label set: every class at or above its threshold (model.json)
            out[-7] = "import json, timm, torch"
            out += ['thresholds = json.load(open("PATH/TO/THIS/FOLDER/model.json")).get("thresholds") '
                    "or [0.5] * probs.shape[-1]",
                    'print([name for name, p, t in zip(model.pretrained_cfg["label_names"], probs[0].tolist(), '
                    "thresholds) if p >= t])", "```", ""]
        else:
            out += ['print(model.pretrained_cfg["label_names"][probs.argmax().item()])', "```", ""]
    else:
        out += [f"Not loadable with `timm.create_model`: {timm_reason or 'not a timm model'}.", ""]
    out += ["With the trainer: `finetune predict --checkpoint PATH/TO/THIS/FOLDER --images DIR --out predictions.csv` "
            "(also `finetune evaluate`, `finetune export`; they read `model.json`).", ""]
    if task == "multilabel":
        out += ["Multi-label: each class is scored by its own sigmoid; `model.json` holds the decision thresholds "
                "when the run chose them.", ""]
    listed = ", ".join(f"`{c}`" for c in classes[:_MAX_LISTED_CLASSES])
    more = f" ... ({len(classes)} in all)" if len(classes) > _MAX_LISTED_CLASSES else ""
    sizes = ", ".join(f"{k} {v}" for k, v in (split_sizes or {}).items()) or "not recorded"
    out += ["## Data", "", f"- source: {_data_source(data)}", f"- task: {task}",
            f"- classes ({len(classes)}, output order): {listed}{more}", f"- images per split: {sizes}", ""]
    monitor = (train.get("early_stopping") or {}).get("monitor", "val/top1")
    out += ["## Metrics", "",
            f"Checkpoint selected by `{monitor}` at epoch {_fmt(metrics.get('epoch'))}, step "
            f"{_fmt(metrics.get('step'))} ({metrics.get('weights', 'raw')} weights).", "",
            "| metric | value |", "| --- | --- |", *_metric_rows(metrics), *_metric_rows(test_metrics or {}), ""]
    if not test_metrics:
        out += ["Test metrics: none yet (no test split, or the run has not finished).", ""]
    size = pre.get("input_size", "n/a")
    out += ["## Recipe", "",
            f"- backbone `{backbone}`, pretrained weights `{model.get('weights', 'n/a')}`, head dropout "
            f"{_fmt(model.get('drop_rate'))}",
            f"- strategy `{fine.get('strategy', 'n/a')}`, frozen: `{fine.get('freeze', 'n/a')}`",
            f"- input {size}x{size}; eval: resize the short side to {_scale(pre)}, centre-crop {size} "
            f"({pre.get('interpolation', 'n/a')}), mean {pre.get('mean', 'n/a')}, std {pre.get('std', 'n/a')}; "
            f"training augmentation `{data.get('augment', 'n/a')}`",
            f"- optimizer `{optim.get('name', 'n/a')}`, lr {_fmt(optim.get('lr'))}, weight decay "
            f"{_fmt(optim.get('weight_decay'))}, warmup steps {_fmt(optim.get('warmup_steps'))}",
            f"- global batch size {_fmt(train.get('global_batch_size'))}, "
            + (f"{_fmt(train.get('steps'))} optimizer steps" if train.get("steps")
               else f"epochs {_fmt(train.get('epochs'))}, max steps {_fmt(train.get('max_steps'))}")
            + f"; this checkpoint after {_fmt(metrics.get('step'))} steps",
            f"- mixed precision `{train.get('mixed_precision', 'n/a')}`, seed {_fmt(train.get('seed'))}", ""]
    out_dir = train.get("output_dir") or "RUN_FOLDER"
    out += ["## Command", "",
            "The run's resolved config is `config.yaml` in its folder (and `config` in `model.json`); "
            "training it again:", "", "```bash",
            f"finetune train --config {out_dir}/config.yaml --train.output_dir={out_dir}-again", "```", ""]
    return "\n".join(out)


def _scale(pre: Mapping[str, Any]) -> str:
    try:
        return str(int(float(pre["input_size"]) / float(pre["crop_pct"])))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return "n/a"
