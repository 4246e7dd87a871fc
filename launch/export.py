"""Export a trained checkpoint to TorchScript and ONNX, with its preprocessing written beside it.

    python launch/export.py --checkpoint runs/ants_bees_lite0/checkpoints/best [--out_dir runs/ants_bees_lite0/export]

Writes into ``out_dir`` (default: ``<run>/export`` next to the run's ``checkpoints/``):

* ``model.torchscript.pt`` - ``torch.jit.trace`` of the classifier in eval mode; load with
  ``torch.jit.load`` (no trainer code, no timm needed).
* ``model.onnx`` - ONNX (opset 17 by default, TorchScript-based exporter ``torch.onnx.export(dynamo=False)``),
  input ``images`` and output ``logits`` (multi-label: ``probabilities``) with a dynamic batch axis; runs in
  ONNX Runtime.
* ``preprocessing.json`` - what a caller must do to an image before the model and how to read the
  output: ``input_size``, ``resize_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``,
  ``class_names``, input/output names and shapes, the steps in words, and the checkpoint's metrics.

Both models take ``images: (B, 3, S, S) float32`` = ``(rgb_uint8 / 255 - mean) / std`` after
"resize the short side to ``resize_size``, centre-crop ``S``" (the trainer's eval transform), and
return ``logits: (B, C) float32`` (softmax gives probabilities, in ``class_names`` order).

A multi-label checkpoint (``data.task: multilabel``) is exported with the sigmoid inside the graph: the models
return ``probabilities: (B, C) float32`` in [0, 1], one per class, and ``preprocessing.json`` adds
``"task": "multilabel"``, ``"outputs": "sigmoid probabilities"``, the per-class ``thresholds`` saved in the
checkpoint (a class is present when its probability is >= its threshold; 0.5 where none were saved) and the
``label_delimiter`` of its label sets.

With ``--check`` (default) a random batch of 2 is run through PyTorch, TorchScript and ONNX Runtime
and the largest output difference (logits; multi-label: probabilities) is printed; above ``--atol`` the export
fails.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from trainer.checkpoint.inference import load_for_inference, read_model_meta, resolve
from trainer.files.atomic import atomic_write

FORMATS = ("torchscript", "onnx")
FILES = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx", "preprocessing": "preprocessing.json"}


def preprocessing_spec(pre, class_names: list[str], *, backbone: str, metrics: dict | None = None,
                       multilabel: dict | None = None) -> dict:
    """The content of ``preprocessing.json`` (see module docstring).

    Args:
        pre: :class:`trainer.model.Preprocessing` of the checkpoint.
        class_names: C names in output order.
        multilabel: for a multi-label checkpoint ``{"thresholds": [C floats], "label_delimiter": str}``: the output
            is described as sigmoid probabilities and these are recorded (None: single-label, logits).
    """
    s = pre.input_size
    output = {"name": "logits", "shape": ["batch", len(class_names)], "dtype": "float32",
              "meaning": "unnormalised class scores; softmax over axis 1 gives probabilities in class_names order"}
    if multilabel is not None:
        output = {"name": "probabilities", "shape": ["batch", len(class_names)], "dtype": "float32",
                  "meaning": "sigmoid probability of each class in class_names order, independently, in [0, 1]; "
                             "a class is present when its probability >= its entry of thresholds"}
    spec = {
        "format_version": 1,
        "backbone": backbone,
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "input_size": s,
        "resize_size": int(s / pre.crop_pct),
        "crop_pct": pre.crop_pct,
        "interpolation": pre.interpolation,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "input": {"name": "images", "shape": ["batch", 3, s, s], "dtype": "float32", "layout": "NCHW",
                  "channels": "RGB"},
        "output": output,
        "steps": [
            "decode the image to 8-bit RGB (transparent pixels over a fixed background)",
            f"resize so the shorter side is {int(s / pre.crop_pct)} px ({pre.interpolation}, antialiased)",
            f"centre-crop {s} x {s}",
            "convert to float32 and divide by 255",
            "subtract mean and divide by std, per channel",
            "stack as (batch, 3, H, W)",
        ],
        "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str))},
    }
    if multilabel is not None:
        spec.update({"task": "multilabel", "outputs": "sigmoid probabilities",
                     "thresholds": [float(t) for t in multilabel["thresholds"]],
                     "label_delimiter": multilabel["label_delimiter"]})
    return spec


class LogitsModule(torch.nn.Module):
    """``images (B, 3, S, S) float32 -> logits (B, C)``: the classifier with a one-tensor ``forward``
    (``sigmoid=True``: ``-> sigmoid(logits)``, the per-class probabilities of a multi-label model).

    The tracers see only this signature, whatever extra keyword options the trainer's
    ``ImageClassifier.forward`` grows (the TorchScript-based ONNX exporter passes every parameter
    positionally).
    """

    def __init__(self, model: torch.nn.Module, sigmoid: bool = False):
        super().__init__()
        self.model = model
        self.sigmoid = sigmoid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        return torch.sigmoid(out) if self.sigmoid else out


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Trace ``model`` (eval mode) on ``example: (B, 3, S, S) float32`` and save it with ``torch.jit.save``.

    ``torch.jit`` is deprecated upstream in favour of ``torch.export``, but TorchScript files still
    load in every PyTorch / LibTorch release without Python model code, which is why it is offered.
    """
    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        atomic_write(path, lambda tmp: torch.jit.save(traced, str(tmp)))
    return path


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | Path, *, opset: int = 17,
                output_name: str = "logits") -> Path:
    """Export ``model`` to ONNX with a dynamic batch axis (input ``images``, output ``output_name``: ``logits``,
    or ``probabilities`` for a multi-label model).

    Uses the TorchScript-based exporter (``dynamo=False``): no extra dependency (the dynamo exporter
    needs ``onnxscript``), one self-contained file for models under 2 GB.

    Raises:
        RuntimeError: from ``torch.onnx.export`` for an operator the opset cannot express.
    """
    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        atomic_write(path, lambda tmp: torch.onnx.export(
            model, (example,), str(tmp), dynamo=False, input_names=["images"], output_names=[output_name],
            dynamic_axes={"images": {0: "batch"}, output_name: {0: "batch"}}, opset_version=opset,
            do_constant_folding=True))
    return path


def onnx_logits(path: str | Path, images: torch.Tensor) -> torch.Tensor:
    """Run an exported ONNX model in ONNX Runtime (CPU). ``images: (B, 3, S, S) float32`` -> its one output
    ``(B, C)`` (logits; multi-label: probabilities)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"images": images.detach().cpu().numpy()})[0])


def export(checkpoint: str, out_dir: str | None = None, formats: str | list[str] = FORMATS, opset: int = 17,
           check: bool = True, atol: float = 1e-3) -> dict:
    """Export ``checkpoint`` to the given formats plus ``preprocessing.json``.

    Args:
        checkpoint: an inference checkpoint folder (``<run>/checkpoints/best``, ``model.safetensors`` +
            ``model.json``), a file in it, a run folder, or a ``best.pt`` / ``last.pt``; a multi-label one is
            exported with its sigmoid (module docstring).
        out_dir: output folder (default ``<run>/export``).
        formats: ``torchscript``, ``onnx`` or both, comma-separated (``onnx,torchscript``) or a list.
        opset: ONNX opset version.
        check: compare the exported models with PyTorch on a random batch of 2.
        atol: largest allowed absolute difference of the outputs (logits; multi-label: probabilities) in that check.

    Returns:
        ``{"torchscript": path, "onnx": path, "preprocessing": path, "max_abs_diff": {fmt: float}}``.

    Raises:
        trainer.checkpoint.state.CheckpointError: unreadable checkpoint (or saved thresholds that are not one
            number in [0, 1] per class).
        ValueError: unknown format. RuntimeError: the check exceeds ``atol`` (names the format).
    """
    fmts = [f.strip() for f in formats.split(",")] if isinstance(formats, str) else list(formats)
    bad = [f for f in fmts if f not in FORMATS]
    if bad:
        raise ValueError(f"--formats: unknown {bad}, choose from {list(FORMATS)}")
    ckpt_path = resolve(checkpoint)
    out = Path(out_dir) if out_dir else ckpt_path.resolve().parent.parent / "export"
    out.mkdir(parents=True, exist_ok=True)
    model, pre, class_names = load_for_inference(ckpt_path, "cpu")
    meta = read_model_meta(ckpt_path)
    multilabel = _multilabel_fields(meta, len(class_names))
    model = LogitsModule(model.to(memory_format=torch.contiguous_format), sigmoid=multilabel is not None).eval()
    what = "logit" if multilabel is None else "probability"
    s = pre.input_size
    example = torch.zeros(1, 3, s, s)
    result: dict = {"max_abs_diff": {}}
    if "torchscript" in fmts:
        result["torchscript"] = export_torchscript(model, example, out / FILES["torchscript"])
    if "onnx" in fmts:
        result["onnx"] = export_onnx(model, example, out / FILES["onnx"], opset=opset,
                                     output_name="logits" if multilabel is None else "probabilities")
    spec = preprocessing_spec(pre, class_names, backbone=meta["backbone"], metrics=meta.get("metrics"),
                              multilabel=multilabel)
    spec["files"] = {f: FILES[f] for f in fmts}
    ppath = out / FILES["preprocessing"]
    atomic_write(ppath, lambda tmp: tmp.write_text(json.dumps(spec, indent=2) + "\n"))
    result["preprocessing"] = ppath
    if check:
        x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(x)
            if "torchscript" in fmts:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    ts = torch.jit.load(str(result["torchscript"]))
                result["max_abs_diff"]["torchscript"] = (ts(x) - ref).abs().max().item()
        if "onnx" in fmts:
            result["max_abs_diff"]["onnx"] = (onnx_logits(result["onnx"], x) - ref).abs().max().item()
        for f, d in result["max_abs_diff"].items():
            if not d <= atol:
                raise RuntimeError(f"export check: {f} {what}s differ from PyTorch by {d:.3g} > atol {atol}")
    for k in ("torchscript", "onnx", "preprocessing"):
        if k in result:
            print(f"wrote {result[k]}")
    if result["max_abs_diff"]:
        print(f"max |{what} difference| vs PyTorch on a random batch: "
              + ", ".join(f"{f} {d:.2e}" for f, d in result["max_abs_diff"].items()))
    return result


def _multilabel_fields(meta: dict, num_classes: int) -> dict | None:
    """``{"thresholds", "label_delimiter"}`` of a multi-label checkpoint's ``model.json`` (thresholds: the saved
    ones, else 0.5 each: what ``finetune predict`` applies), None for a single-label one. Raises CheckpointError
    for bad saved thresholds."""
    from trainer.checkpoint.labels import decision_thresholds

    thresholds = decision_thresholds(meta, num_classes)
    if thresholds is None:
        return None
    data = (meta.get("config") or {}).get("data") or {}
    return {"thresholds": thresholds, "label_delimiter": data.get("label_delimiter") or "|"}


def cli() -> None:
    """Console script ``finetune-export`` (same as ``python launch/export.py``)."""
    from trainer.cli.errors import run_cli

    run_cli(export, prog="finetune-export")


if __name__ == "__main__":
    from trainer.cli.errors import run_cli

    run_cli(export)
