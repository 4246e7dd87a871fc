"""The command line: --help of the trainer and of every launch script, --print_config, console scripts,
and launcher settings (ACCELERATE_MIXED_PRECISION) honoured unless the config sets them."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from trainer.cli.commands import COMMANDS, entry, run_command
from trainer.cli.errors import run_cli
from trainer.cli.help import config_help, function_help
from trainer.config.launcher import resolve_mixed_precision
from trainer.config.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_trainer_help_lists_every_option_with_default_and_doc():
    r = subprocess.run([sys.executable, "trainer/main.py", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.strip().startswith("--optim.lr "))
    assert lines[i].split() == ["--optim.lr", "float", "=", "0.001", "(allowed:", ">", "0)"]
    assert lines[i + 1].strip() == "Peak learning rate of the head (per-group scales multiply it)."
    assert r.stdout == config_help() + "\n"
    # -h is the same; every field of every section is listed
    from trainer.config.fields import type_hints
    from trainer.config.schema import SECTIONS
    import dataclasses
    text = config_help()
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(type_hints(cls)[f.name]):
                assert f"--{name}.{f.name} " in text, f"{name}.{f.name}"
    assert "--train.early_stopping.patience " in text


@pytest.mark.parametrize("target", sorted(set(SCRIPTS.values()) - {"trainer.main:cli"}))
def test_each_launch_script_help_exits_0(target, capsys):
    module, _ = target.split(":")
    mod = importlib.import_module(module)
    fn = {"launch.export": "export", "launch.prefetch_weights": "prefetch"}.get(module, "main")
    with pytest.raises(SystemExit) as e:
        run_cli(getattr(mod, fn), argv=["--help"], prog=module)
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: {module}") and "-h, --help" in out
    assert "  --" in out or "ARG" in out


def test_script_help_by_path_and_console_script_targets():
    r = subprocess.run([sys.executable, "launch/make_shards.py", "-h"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--max_samples_per_shard  int = 1000" in r.stdout, r.stderr
    assert {"finetune", "finetune-predict", "finetune-shards", "finetune-export"} <= set(SCRIPTS)
    for name, target in SCRIPTS.items():
        module, attr = target.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_print_config_prints_the_resolved_config(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1e-3\ntrain:\n  epochs: 7\n")
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16"}
    r = subprocess.run([sys.executable, "trainer/main.py", "--config", str(p), "--optim.lr=5e-4", "--print_config",
                        f"--train.output_dir={tmp_path}/run"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["optim"]["lr"] == 5e-4 and cfg["train"]["epochs"] == 7 and cfg["train"]["mixed_precision"] == "bf16"
    assert not (tmp_path / "run").exists()


def test_mixed_precision_auto_takes_the_launchers_value_unless_the_config_sets_it():
    env = {"ACCELERATE_MIXED_PRECISION": "bf16"}
    for hw in (None, "avx512_bf16", "cuda"):
        assert resolve_mixed_precision("auto", env, hardware=hw)[0] == "bf16"
        assert resolve_mixed_precision("auto", {"ACCELERATE_MIXED_PRECISION": "fp16"}, hardware=hw)[0] == "fp16"
    assert resolve_mixed_precision("auto", {}, hardware=None) == ("no", None)
    value, note = resolve_mixed_precision("no", env)
    assert value == "no" and "train.mixed_precision=no from the config wins" in note and "=bf16" in note
    assert resolve_mixed_precision("bf16", env) == ("bf16", None)
    with pytest.raises(ConfigError, match="ACCELERATE_MIXED_PRECISION='fp8'"):
        resolve_mixed_precision("auto", {"ACCELERATE_MIXED_PRECISION": "fp8"})


@pytest.mark.parametrize("flags, frozen, want", [
    ({"avx2", "fma"}, True, "no"),                            # no native bf16: float32 everywhere
    ({"avx2", "avx512f"}, True, "no"),                        # AVX-512 without BF16: emulated, float32
    ({"avx512f", "avx512_bf16"}, True, "bf16"),               # AMD Zen 4 / Xeon Cooper Lake: feature extraction
    ({"avx512f", "avx512_bf16"}, False, "no"),                # ... but fine-tuning stays float32
    ({"avx512_bf16", "amx_tile", "amx_bf16"}, True, "bf16"),  # Xeon Sapphire Rapids (AMX)
    ({"avx512_bf16", "amx_tile", "amx_bf16"}, False, "no"),   # fine-tuning measured slower in bf16 there too
])
def test_mixed_precision_auto_follows_the_cpu_flags(monkeypatch, tmp_path, flags, frozen, want):
    import torch

    from trainer.config import launcher

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Fake CPU\nflags\t\t: fpu sse2 {' '.join(sorted(flags))}\n\n")
    assert launcher.cpu_flags(cpuinfo) == frozenset({"fpu", "sse2", *flags})
    read_flags = launcher.cpu_flags
    monkeypatch.setattr(launcher, "cpu_flags", lambda: read_flags(cpuinfo))
    assert resolve_mixed_precision("auto", {}, frozen_backbone=frozen) == (want, None)
    # the launcher's no is accelerate's default, not a choice: the hardware rule still applies
    assert resolve_mixed_precision("auto", {"ACCELERATE_MIXED_PRECISION": "no"}, frozen_backbone=frozen)[0] == want
    # an explicit value always wins
    assert resolve_mixed_precision("no", {}, frozen_backbone=frozen) == ("no", None)


def test_mixed_precision_auto_on_a_gpu_and_under_accelerate_cpu(monkeypatch):
    import torch

    from trainer.config import launcher

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(launcher, "cpu_flags", lambda: frozenset({"avx2"}))
    for major, want in ((7, "no"), (8, "bf16"), (9, "bf16")):  # V100 / A100 / H100
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, m=major: (m, 0))
        assert resolve_mixed_precision("auto", {}, frozen_backbone=False)[0] == want
    # accelerate launch --cpu: the CPU's flags decide, not the GPU
    assert resolve_mixed_precision("auto", {"ACCELERATE_USE_CPU": "true"}, frozen_backbone=True)[0] == "no"


def test_backbone_frozen_throughout_reads_the_finetune_section():
    from trainer.config.launcher import backbone_frozen_throughout, resolve_config_precision

    assert backbone_frozen_throughout({})  # the defaults: freeze backbone, strategy epochs
    assert backbone_frozen_throughout({"strategy": "linear_probe", "freeze": "none"})
    assert not backbone_frozen_throughout({"freeze": "none"})
    assert not backbone_frozen_throughout({"strategy": "lp_ft"})
    assert not backbone_frozen_throughout({"frozen_bn": "affine"})  # BN scale/shift train: backward through it
    assert not backbone_frozen_throughout({"gradual_every": 2})
    assert backbone_frozen_throughout({"phases": [{"start_epoch": 0, "train": "head"}]})
    assert not backbone_frozen_throughout({"phases": [{"start_epoch": 0, "train": "head"},
                                                      {"start_epoch": 2, "train": "all"}]})
    from trainer.config.loading import load_config

    cfg = load_config(REPO / "configs/ants_bees_lite0.yaml", {})
    assert backbone_frozen_throughout(cfg.finetune)
    assert resolve_config_precision(cfg, {})[0] == resolve_config_precision(cfg.to_dict(), {})[0]


@pytest.mark.slow
def test_launcher_bf16_gives_a_bf16_run_unless_the_yaml_says_otherwise(tmp_path):
    from helpers.realdata import HYMENOPTERA, subset_folder, tiny_overrides

    if not HYMENOPTERA.is_dir():
        pytest.skip(f"needs {HYMENOPTERA}")
    images = subset_folder(tmp_path / "images", {"train": {"ants": 8, "bees": 8}, "val": {"ants": 2, "bees": 2}})
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16"}
    yaml_no = tmp_path / "no.yaml"
    yaml_no.write_text((REPO / "configs/ants_bees_lite0.yaml").read_text() + "\n")
    cfg = yaml.safe_load(yaml_no.read_text())
    cfg.setdefault("train", {})["mixed_precision"] = "no"
    yaml_no.write_text(yaml.safe_dump(cfg))
    for config, want in (("configs/ants_bees_lite0.yaml", "bf16"), (str(yaml_no), "no")):
        out = tmp_path / f"run-{want}"
        r = subprocess.run([sys.executable, "trainer/main.py", "--config", config,
                            *tiny_overrides(images, tmp_path / "shards", out, **{"train.max_steps": 1,
                                                                                  "data.augment": "none"})],
                           cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert yaml.safe_load((out / "config.yaml").read_text())["train"]["mixed_precision"] == want
        note = [ln for ln in r.stderr.splitlines() if ln.startswith("train.mixed_precision=")]
        assert len(note) == 1, r.stderr[-3000:]
        assert ("-> bf16 from the launcher" in note[0]) if want == "bf16" else ("from the config wins" in note[0])


@pytest.mark.parametrize("cmd", sorted(set(COMMANDS) - {"train"}))
def test_every_option_of_every_command_has_its_type_and_its_own_doc(cmd):
    """Issue 24: `finetune-shards --help` gave five options one shared text and no type."""
    import inspect

    fn = entry(cmd)
    lines = function_help(fn, f"finetune {cmd}").splitlines()
    docs = {}
    for name, p in inspect.signature(fn).parameters.items():
        flag = {p.VAR_POSITIONAL: f"{name.upper()} ...",
                p.VAR_KEYWORD: "--SECTION.KEY=VALUE ..."}.get(p.kind, f"--{name}")
        i = next(i for i, ln in enumerate(lines) if ln.startswith(f"  {flag}  "))
        type_text = lines[i][len(f"  {flag}  "):].split(" = ")[0].removesuffix("  (required)")
        assert type_text and type_text.split()[0] in {"str", "int", "float", "bool", "one", "any"}, lines[i]
        assert lines[i + 1].startswith("      ") and lines[i + 1].strip(), f"{cmd} --{name}: no doc"
        docs[name] = lines[i + 1].strip()
    assert len(set(docs.values())) == len(docs), docs
    assert "Booleans: true/false, yes/no, on/off, 1/0" in "\n".join(lines)


def test_finetune_help_lists_the_subcommands_and_each_has_the_same_help_style(capsys):
    with pytest.raises(SystemExit):
        run_command(["-h"])
    out = capsys.readouterr().out
    assert out.startswith("usage: finetune COMMAND") and all(f"  {c} " in out for c in COMMANDS)
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            run_command([cmd, "--help"])
        assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: finetune {cmd} ")


def test_launch_scripts_run_without_sys_path_edits():
    for path in sorted((REPO / "launch").glob("*.py")):
        assert "sys.path" not in path.read_text(), path
    r = subprocess.run([sys.executable, str(REPO / "launch/prefetch_weights.py"), "--help"], cwd="/",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: "), r.stderr
