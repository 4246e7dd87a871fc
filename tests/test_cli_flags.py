"""One parser for every command line (trainer/cli/args.py): every boolean flag of every command reads the
same words, a str option keeps its text, a bad value or an unknown option is one line and exit status 2
before any work; ``make_shards --overwrite=false`` never replaces a dataset; a flow mapping written
without spaces (``--data.manifest={train:a.csv,val:b.csv}``) is read as meant.

The commands and their boolean flags are enumerated from the code (``trainer.cli.commands.COMMANDS``, the
entry functions' signatures, the config dataclasses), so a new flag is covered without editing this file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer.cli.args import config_field_type, config_overrides, option_types, parse_command_line
from trainer.cli.commands import COMMANDS, entry, run_command
from trainer.cli.errors import run_cli
from trainer.config.fields import coerce, type_hints
from trainer.config.loading import load_config
from trainer.config.schema import Config

REPO = Path(__file__).resolve().parents[1]
TRUE_WORDS = ("true", "yes", "1", "on", "True", "YES", "On")
FALSE_WORDS = ("false", "no", "0", "False", "off", "NO", "Off")
CONFIG_COMMANDS = ("train", "select")  # commands that take --section.key=value config overrides


def _is_bool(tp) -> bool:
    return tp is bool or (tp is not None and bool in getattr(tp, "__args__", ()))


def _config_bool_fields(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _config_bool_fields(tp, f"{prefix}{f.name}.")
        elif _is_bool(tp):
            keys.append(prefix + f.name)
    return keys


def _required(fn) -> list[str]:
    """A dummy value for each required option of ``fn`` (all are str: paths)."""
    P = inspect.Parameter
    return [f"--{n}=x" for n, p in inspect.signature(fn).parameters.items()
            if p.default is P.empty and p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)]


FLAG_CASES = [(cmd, name) for cmd in COMMANDS for name, tp in option_types(entry(cmd)).items() if _is_bool(tp)]
CONFIG_CASES = [(cmd, key) for cmd in CONFIG_COMMANDS for key in _config_bool_fields()]


def test_the_enumeration_finds_the_known_flags():
    assert {("shards", "overwrite"), ("shards", "progress"), ("shards", "strict"), ("shards", "merge"),
            ("predict", "tta"), ("export", "check"), ("train", "dry_run"), ("train", "print_config")} <= set(FLAG_CASES)
    assert ("train", "train.overwrite") in CONFIG_CASES and ("select", "logging.progress") in CONFIG_CASES


class _Stop(Exception):
    pass


def _parsed_config_flag(cmd: str, key: str, word: str, monkeypatch):
    """The value config field ``key`` gets from ``--key=word`` on command ``cmd``: the command's own path up to
    ``load_config`` (stopped there: no training, no selection), then the field's conversion (``coerce``)."""
    import trainer.config.loading
    import trainer.main

    fn = entry(cmd)
    args, kwargs = parse_command_line(fn, [f"--{key}={word}"])
    seen: dict = {}

    def load_config_stub(path=None, overrides=None, *, parse_strings=True):
        seen.update(overrides=overrides, parse_strings=parse_strings)
        raise _Stop

    monkeypatch.setattr(trainer.main if cmd == "train" else trainer.config.loading, "load_config", load_config_stub)
    with pytest.raises(_Stop):
        fn(*args, **kwargs)
    assert seen["parse_strings"] is False  # read once, by the parser
    return coerce(seen["overrides"][key], config_field_type(key), key)


@pytest.mark.parametrize("word", TRUE_WORDS + FALSE_WORDS)
@pytest.mark.parametrize("cmd, flag", FLAG_CASES)
def test_every_bool_flag_of_every_command_reads_the_same_words(cmd, flag, word):
    fn = entry(cmd)
    _, kwargs = parse_command_line(fn, _required(fn) + [f"--{flag}={word}"])
    assert kwargs[flag] is (word in TRUE_WORDS)
    _, bare = parse_command_line(fn, _required(fn) + [f"--{flag}"])
    assert bare[flag] is True


@pytest.mark.parametrize("word", TRUE_WORDS + FALSE_WORDS)
@pytest.mark.parametrize("cmd, key", CONFIG_CASES)
def test_every_bool_config_field_reads_the_same_words(cmd, key, word, monkeypatch):
    assert _parsed_config_flag(cmd, key, word, monkeypatch) is (word in TRUE_WORDS)


def _recording(fn, ran: list):
    """``fn``'s signature and annotations, recording its calls instead of running it."""
    @functools.wraps(fn)
    def record(*args, **kwargs):
        ran.append((args, kwargs))
    return record


@pytest.mark.parametrize("cmd, flag", FLAG_CASES + CONFIG_CASES)
def test_any_other_word_for_a_bool_is_one_line_and_exit_2(cmd, flag, capfd):
    ran: list = []
    if (cmd, flag) in FLAG_CASES:  # refused by the parser: the entry function must not even be called
        fn = _recording(entry(cmd), ran)
        argv = _required(fn) + [f"--{flag}=maybe"]
    else:  # refused by the config loader inside the entry function, before any work (--print_config: no run)
        fn = entry(cmd)
        argv = [f"--{flag}=maybe"] + (["--print_config"] if cmd == "train" else [])
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(fn, argv=argv, prog=cmd)
    err = capfd.readouterr().err
    assert e.value.code == 2 and not ran, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert flag in err and "'maybe'" in err, err


def test_a_str_option_keeps_its_text_and_null_is_none():
    shards = entry("shards")
    _, kw = parse_command_line(shards, ["--out=007", "--root=true", "--label_map=null", "--path_column=2",
                                        "--label_column=label"])
    assert kw == {"out": "007", "root": "true", "label_map": None, "path_column": 2, "label_column": "label"}
    _, kw = parse_command_line(entry("train"), ["--name=007", "--optim.lr=1e-3", "--train.resume_from=null"])
    cfg = load_config(None, config_overrides(kw), parse_strings=False)
    assert cfg.name == "007" and cfg.optim.lr == 1e-3 and cfg.train.resume_from is None
    assert config_field_type("train.epochs") is int and config_field_type("train.nope") is None


@pytest.mark.parametrize("argv, message", [
    (["--root=r", "--out=o", "--overwrit=false"], "unknown option --overwrit; did you mean --overwrite?"),
    (["--root=r", "--out"], "--out needs a value"),
    (["--root=r", "--out=a", "--out=b"], "--out is given 2 times"),
])
def test_unknown_or_malformed_options_stop_before_any_work(argv, message, capfd, monkeypatch):
    import launch.make_shards as ms

    monkeypatch.setattr(ms, "write_listing", lambda *a, **k: pytest.fail("make_shards ran"))
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(ms.main, argv=argv, prog="finetune shards")
    err = capfd.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_make_shards_overwrite_false_refuses_and_keeps_the_dataset(tmp_path):
    """Regression (issue 23 defect 1): fire read --overwrite=false as a truthy string and rewrote the shards."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            (tmp_path / "img" / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / "img" / split / cls / f"{i}.png")
    out = tmp_path / "shards"
    cmd = [sys.executable, "launch/make_shards.py", "--root", str(tmp_path / "img"), "--out", str(out),
           "--progress=false"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "writing shards" not in first.stderr  # --progress=false is honoured
    before = _digest(out)
    again = subprocess.run(cmd + ["--overwrite=false"], cwd=REPO, capture_output=True, text=True, timeout=120)
    errors = [ln for ln in again.stderr.splitlines() if ln.startswith(("error:", "config error:"))]
    assert again.returncode == 2 and len(errors) == 1 and "already holds a dataset" in errors[0], again.stderr
    assert "Traceback" not in again.stderr
    assert _digest(out) == before


def test_a_flow_mapping_without_spaces_is_read_as_meant(tmp_path):
    """Regression (issue 23 defect 5): {train:a.csv,val:b.csv} was the key 'train:a.csv' -> a TypeError."""
    r = subprocess.run([sys.executable, "trainer/main.py", "--data.manifest={train:a.csv,val:b.csv}",
                        "--print_config"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["data"]["manifest"] == {"train": "a.csv", "val": "b.csv"}
    _, kw = parse_command_line(entry("shards"), ["--manifest={train:s3://b/a.csv,val:{x:1}}"])
    assert kw["manifest"] == {"train": "s3://b/a.csv", "val": {"x": 1}}


def test_a_mapping_split_by_the_shells_brace_expansion_is_one_line(capfd):
    # bash turns --data.manifest={train:a.csv,val:b.csv} (unquoted) into two options
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(entry("train"), argv=["--data.manifest=train:a.csv", "--data.manifest=val:b.csv", "--print_config"])
    err = capfd.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "'--data.manifest={train: a.csv, val: b.csv}'" in err


def test_finetune_dispatches_subcommands_and_defaults_to_train(capsys):
    with pytest.raises(SystemExit) as e:
        run_command(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(f"\n  {name} " in out for name in COMMANDS)
    run_command(["--print_config", "--name=007"])  # no subcommand: train
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "007"
    run_command(["train", "--print_config", "--train.overwrite=on"])
    assert yaml.safe_load(capsys.readouterr().out)["train"]["overwrite"] is True
    with pytest.raises(SystemExit) as e:
        run_command(["shards", "--help"], prog="finetune")
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: finetune shards ")
