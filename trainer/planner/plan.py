"""The plan: what a budgeted run does, stage by stage, with its expected minutes and the config it trains with.

:func:`make_plan` (rank 0, or ``--dry_run``) surveys the data, measures the rates and applies
:mod:`trainer.planner.rules`; :func:`format_plan` is the table printed before training;
:func:`save_plan` / :func:`read_plan` keep it as ``plan.json`` in the run folder, so a resumed, preempted or
requeued run keeps its plan; :func:`apply_plan` gives the config the run trains with (the user's config with
the plan's values set).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainer.config.duration import format_duration
from trainer.config.loading import config_from_dict
from trainer.config.schema import Config, ConfigError
from trainer.planner import rules
from trainer.planner.budget import Budget
from trainer.planner.rates import Rate, rates_for
from trainer.data.survey import DataSurvey, survey_data
from trainer.files.atomic import atomic_write

PLAN_FILE = "plan.json"
VERSION = 1


@dataclass
class Stage:
    """One row of the plan: ``name``, what it does, why, and its expected seconds."""

    name: str
    what: str
    why: str
    seconds: float


@dataclass
class Plan:
    """A budgeted run's plan (``plan.json``).

    Attributes:
        budget_s, budget_source, started_at: the :class:`~trainer.planner.budget.Budget`.
        world_size: processes the plan was made for.
        survey: :meth:`~trainer.data.survey.DataSurvey.to_dict`.
        overrides: ``{"section.key": value}`` set on the user's config (:func:`apply_plan`).
        stages: the table's rows.
        steps: fine-tuning optimizer steps (0: the run is the linear probe). seconds_per_step: as planned.
        after_training_s: expected seconds after the last step and its evaluation (test pass, reports).
        eval_s: expected seconds of one evaluation (raw and EMA weights) on the val split.
        replans: ``{step, seconds_per_step, steps}`` each time the measured rate moved the step count.
    """

    budget_s: float
    budget_source: str
    started_at: float
    world_size: int
    survey: dict
    overrides: dict
    stages: list[Stage]
    steps: int
    seconds_per_step: float
    after_training_s: float
    eval_s: float = 0.0
    replans: list[dict] = field(default_factory=list)
    version: int = VERSION

    @property
    def deadline(self) -> float:
        """Epoch seconds by which the whole command must end."""
        return self.started_at + self.budget_s

    def to_dict(self) -> dict:
        """Plain dict (``plan.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["stages"] = [Stage(**s) for s in d["stages"]]
        return cls(**d)


def apply_plan(cfg: Config, plan: Plan) -> Config:
    """``cfg`` with the plan's values set (``finetune.strategy`` becomes the planned one).

    Raises:
        ConfigError: the values do not form a valid config (names the key; a bug or a hand-edited plan.json).
    """
    d = cfg.to_dict()
    for key, value in plan.overrides.items():
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config_from_dict(d)


def save_plan(plan: Plan, out_dir: str | Path) -> Path:
    """Write ``plan.json`` into the run folder (atomically)."""
    return atomic_write(Path(out_dir) / PLAN_FILE, json.dumps(plan.to_dict(), indent=1) + "\n")


def read_plan(out_dir: str | Path) -> Plan | None:
    """The run folder's ``plan.json``, or None when it has none.

    Raises:
        ConfigError: a ``plan.json`` that cannot be read (names the file and what to do).
    """
    path = Path(out_dir) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return Plan.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); restore it, or start the run in a new "
                          "train.output_dir") from None


def _free_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 4096.0


def _eval_s(n: int, rate: Rate, world_size: int, loader_s: float, passes: int = 1) -> float:
    """Seconds of ``passes`` evaluation passes over ``n`` images, split over ``world_size`` processes."""
    return passes * n / world_size * (1 / rate.infer_img_s + loader_s)


def make_plan(cfg: Config, budget: Budget, *, world_size: int, device: torch.device,
              survey: DataSurvey | None = None, now: float | None = None) -> Plan:
    """Plan a run of ``cfg`` (``finetune.strategy: auto``) that ends inside ``budget``.

    Args:
        cfg: the user's config (resolved precision). budget: seconds and start time.
        world_size: processes (the rates are per process; data-parallel steps divide the work).
        device: where the rates are measured. survey: the data (default: :func:`survey_data` now).
        now: the current time (default ``time.time()``): what has already passed counts against the budget.

    Returns:
        The :class:`Plan`.

    Raises:
        ConfigError: the budget is too short even for the linear probe: names ``train.time_budget`` and the
            shortest budget that fits this data on this machine, as measured.
    """
    clock = time.time()
    survey = survey or survey_data(cfg.data)
    now = clock if now is None else now
    from trainer.models.build import build_model  # the pretraining size, without weights

    native = build_model(cfg.model.backbone, 2, "none")[1].input_size
    # data.image_size set by the user is kept (its default is null: the planner's to choose)
    pref = cfg.data.image_size or rules.preferred_size(survey.source_side, native)
    gbs = rules.global_batch(survey.num_train)
    batch = min(32, max(1, gbs // world_size))
    n, large = survey.num_train, survey.num_train >= rules.LARGE_DATA
    fixed = rules.STARTUP_S + survey.write_shards * rules.SHARD_WRITE_S + rules.REPORT_S
    spent = max(0.0, now - budget.started_at)
    usable = budget.seconds * (1 - rules.MARGIN) - spent

    def costs(size: int, rate: Rate) -> tuple[float, float, float, float]:
        loader_s = rules.loader_seconds(size, device.type)
        n_probe = min(n, rules.PROBE_MAX_SAMPLES) if large else n
        probe = _eval_s(n_probe + survey.num_val, rate, world_size, loader_s) + n_probe * rules.LP_FIT_S_PER_SAMPLE \
            + _eval_s(survey.num_val, rate, world_size, loader_s)
        test = _eval_s(survey.num_test, rate, world_size, loader_s)
        sps = gbs / world_size * (1 / rate.train_img_s + loader_s)  # seconds per optimizer step
        return probe, test, sps, _eval_s(survey.num_val, rate, world_size, loader_s, passes=1 if large else 2)

    sizes = [pref] if cfg.data.image_size else [pref] + [s for s in rules.CANDIDATE_SIZES if s < pref][::-1]
    tried = []
    for size in sizes:  # each size measured (or read from the per-machine cache) before it is judged
        rate = rates_for(cfg.model.backbone, [size], device=device, precision=cfg.train.mixed_precision,
                         batch=batch, channels_last=cfg.model.channels_last)[size]
        probe, test, sps, one_eval = costs(size, rate)
        left = usable - fixed - (time.time() - clock) - probe - test  # measuring takes time too
        steps_per_pass = max(1, math.ceil(n / gbs))
        evals = rules.num_evaluations(max(0.0, left / (sps * steps_per_pass)), n)
        evals = rules.num_evaluations(max(0.0, (left - evals * one_eval) / (sps * steps_per_pass)), n)
        steps = rules.steps_that_fit(left - evals * one_eval, sps)
        tried.append((size, rate, probe, test, sps, one_eval, evals, steps, steps / steps_per_pass, left))
        if tried[-1][8] >= rules.min_passes(n):
            break
    # the largest size allowing min_passes; else the smallest, if it fine-tunes at all; else the probe alone,
    # at the largest size whose probe fits
    chosen = tried[-1]
    if chosen[8] < rules.MIN_PASSES_TO_FINETUNE:
        chosen = next((t for t in tried if t[9] >= 0), tried[-1])
    size, rate, probe, test, sps, one_eval, evals, steps, passes, left = chosen
    measuring = time.time() - clock  # seconds spent measuring (0 with the rates cached)
    probe_only = passes < rules.MIN_PASSES_TO_FINETUNE
    if left < 0:
        smallest = tried[-1]
        need = (fixed + smallest[2] + smallest[3] + spent) / (1 - rules.MARGIN)  # the rates are cached now
        raise ConfigError(f"train.time_budget: {format_duration(budget.seconds)} is too short for this data on this "
                          f"machine: the linear probe alone ({survey.num_train} + {survey.num_val} images at "
                          f"{smallest[0]} px) needs about {format_duration(need)} for the whole command, as "
                          f"measured; give at least {math.ceil(need / 60)}m")
    ov = {"data.image_size": size, "train.global_batch_size": gbs,
          "train.micro_batch_size": rules.micro_batch(gbs, world_size, rate.peak_mem_mib, rate.batch,
                                                      _free_mib(device))}
    if survey.write_shards:  # enough shards for every loader worker of every rank to read its own
        readers = world_size * max(1, cfg.data.num_workers)
        ov["data.samples_per_shard"] = min(cfg.data.samples_per_shard, max(8, math.ceil(n / (8 * readers))))
    if large:
        ov.update({"finetune.lp_l2_grid": rules.LARGE_DATA_L2_GRID, "finetune.lp_max_iter": 100,
                   "finetune.lp_max_samples": rules.PROBE_MAX_SAMPLES})
    stages = [Stage("data", f"{survey.num_train} train / {survey.num_val} val / {survey.num_test} test images, "
                    f"{len(survey.class_counts)} classes" + (f", shards written ({survey.write_shards} images)"
                                                              if survey.write_shards else ", shards reused"),
                    f"source short side {survey.source_side or '?'} px; class counts "
                    f"{min(survey.class_counts)}-{max(survey.class_counts)}",
                    rules.STARTUP_S + survey.write_shards * rules.SHARD_WRITE_S),
              Stage("rates", f"{cfg.model.backbone} at {', '.join(str(t[0]) for t in tried)} px",
                    f"fine-tuning {rate.train_img_s:.0f} img/s, inference {rate.infer_img_s:.0f} img/s, "
                    f"peak {rate.peak_mem_mib:.0f} MiB at batch {rate.batch} (model alone; cached per machine)",
                    measuring),
              Stage("probe", f"linear probe at {size} px (frozen backbone, L-BFGS head, L2 on val)",
                    "the baseline, the head fine-tuning starts from, and the distance from ImageNet", probe)]
    if probe_only:
        ov.update({"finetune.strategy": "linear_probe", "finetune.freeze": "backbone", "train.steps": None,
                   "train.ema_decay": None, "train.eval_every_steps": 0})
        steps = 0
    else:
        small = n < rules.SMALL_DATA
        warmup = max(1, min(100, steps // 4))  # the fixed recipe warms up for 100 steps (half a 5-minute run)
        every = max(1, steps // evals)
        ov.update({"finetune.strategy": "lp_ft", "finetune.freeze": "none", "finetune.phases": None,
                   "finetune.gradual_every": 0, "finetune.layer_decay": 0.7, "finetune.bn_stats": "frozen",
                   "finetune.l2_sp": 1000.0 if small and cfg.model.weights != "none" else None,
                   "data.crop_scale": [0.35, 1.0], "optim.name": "adamw",
                   "optim.lr": 3e-4 if small else 1e-3, "optim.weight_decay": 1e-2, "optim.warmup_steps": warmup,
                   "optim.label_smoothing": 0.1, "train.steps": steps,
                   "train.ema_decay": rules.ema_decay(steps, n), "train.eval_every_steps": every})
        stages.append(Stage("fine-tune", f"LP-FT: all layers from the probe's head, {steps} steps x {gbs} images "
                            f"({passes:.1f} passes) at {size} px, lr warm-up {warmup} steps then cosine to 0, "
                            f"layer_decay 0.7{', L2-SP 1000' if ov['finetune.l2_sp'] else ''}"
                            f"{', EMA' if ov['train.ema_decay'] else ''}; {evals} evaluation(s)",
                            (f"{size} px: set in data.image_size" if cfg.data.image_size else
                             f"{size} px is the largest size <= {pref} px (2x the source's short side, >= 128, "
                             f"<= the pretraining size) that allows {rules.min_passes(n):g} passes in the budget, "
                             "or the smallest tried"),
                            steps * sps + evals * one_eval))
    if survey.num_test:
        stages.append(Stage("test", f"checkpoints/best on the {survey.num_test} test images", "the figure to "
                            "report: chosen on val, measured once on test", test))
    stages.append(Stage("reports", "training curves, per-class report", "", rules.REPORT_S))
    return Plan(budget_s=budget.seconds, budget_source=budget.source, started_at=budget.started_at,
                world_size=world_size, survey=survey.to_dict(), overrides=ov, stages=stages, steps=steps,
                seconds_per_step=sps, after_training_s=test + rules.REPORT_S, eval_s=one_eval)


def format_plan(plan: Plan) -> str:
    """The plan as the table printed before training: stage, what, why, expected minutes."""
    rows = [(s.name, s.what, s.why, f"{s.seconds / 60:.1f}") for s in plan.stages]
    total = sum(s.seconds for s in plan.stages)
    lines = [f"plan for a budget of {format_duration(plan.budget_s)} ({plan.budget_source}), "
             f"{plan.world_size} process(es); expected {total / 60:.1f} min:"]
    w = max(len(r[0]) for r in rows)
    for name, what, why, minutes in rows:
        lines.append(f"  {name:<{w}}  {minutes:>5} min  {what}" + (f"\n  {'':<{w}}             why: {why}" if why else ""))
    return "\n".join(lines)
