"""The planner's decisions, each a small function of the data survey and the measured rates.

Every constant here is a rule with the measurement behind it in docs/planner.md ("Rules"); the planner's
benchmark (``bench/budget.py``) re-measures them. Times are seconds, rates images/s of one process.
"""

from __future__ import annotations

import math

CANDIDATE_SIZES = (64, 96, 128, 160, 192, 224)
"""Input sides the planner chooses from (pixels)."""
MIN_SIZE = 64
"""No run below 64 px: EfficientNet-Lite's stride-32 feature map would be 2 x 2 or smaller."""
LOADER_S = 0.0005
"""Wall seconds per image the loader adds beside the model on a CPU, whatever the size (its workers share the
cores with the model: decode, crop, resize, collate); :func:`loader_seconds` adds the part that grows with the
input's pixels."""
LOADER_S_PER_PIXEL = 1e-7
"""The loader's extra wall seconds per input pixel (S x S) on a CPU. Measured on the 2-core Xeon, the model
alone re-measured beside each run (its speed drifts by up to 1.5x over an hour on this shared VM): EuroSAT
fine-tuning ran at the model's own rate (41 against 38.5 images/s at 128 px), the probe's feature pass
below it (115 against 158-172 images/s at 128 px: +0.0025 s per image; 454 against 614 at 64 px: +0.0006).
The rule gives +0.0009 at 64 px, +0.0021 at 128 px, +0.0055 at 224 px."""


def loader_seconds(size: int, device_type: str) -> float:
    """Wall seconds per image the loader adds to a training or evaluation step at input side ``size``: 0 on a
    GPU (the loader runs on CPU cores beside it), else :data:`LOADER_S` + :data:`LOADER_S_PER_PIXEL` x size^2."""
    return 0.0 if device_type != "cpu" else LOADER_S + LOADER_S_PER_PIXEL * size * size


SHARD_WRITE_S = 0.004
"""Seconds per image to write the shards once (EuroSAT: 27,000 images; docs/planner.md)."""
STARTUP_S = 20.0
"""Imports, building the model with its weights, the loader workers' start."""
REPORT_S = 10.0
"""End-of-run reports (training curves, the test split's report)."""
MARGIN = 0.04
"""Share of the budget kept free for what the estimates miss (the whole command must end inside it)."""
LP_FIT_S_PER_SAMPLE = 0.002
"""L-BFGS fit of the probe per training sample with the large-data grid (EuroSAT: 118 s for 18,900
samples over the 10-value grid x 200 iterations, about 0.006 s; the 4-value grid x 100 iterations ~3x less)."""
LARGE_DATA = 10_000
"""Training images from which the data counts as large: 2 passes suffice (EuroSAT at 128 px reached val
0.979 (EMA) after 2 of 5 epochs), no EMA (the cosine schedule ends at lr 0, where EMA and the raw weights
meet), 2 evaluations, batch 64, lr 1e-3 (configs/eurosat_lite0_finetune.yaml)."""
SMALL_DATA = 1_000
"""Below this many training images: L2-SP 1000 holds the pretrained features (ants/bees, 244 images: best
val 0.967 with it, at most 0.954 without, docs/recipes.md), lr 3e-4 and batch 16 (ants_bees_lite0_lp_ft.yaml)."""
MIN_PASSES_TO_FINETUNE = 0.5
"""Fewer fine-tuning passes than this fit the budget: the run is the linear probe alone."""
PROBE_MAX_SAMPLES = 4_000
"""The probe reads at most about this many training images on large data (``finetune.lp_max_samples``)."""
LARGE_DATA_L2_GRID = [1e-4, 1e-3, 1e-2, 0.1]
"""The probe's L2 grid on large data (EuroSAT chose 0.01 from the full grid; large data needs weak L2)."""


def preferred_size(source_side: int | None, native: int) -> int:
    """The input side a run aims for before the budget is counted: twice the source's short side (small
    sources are upsampled: EuroSAT's 64 px patches gave test 0.982 at 128 px in 35 minutes, 0.970 at 64 px),
    at least 128 and at most the backbone's pretraining size; unknown sources: the pretraining size. Snapped
    down to :data:`CANDIDATE_SIZES`; the budget then moves it down (:func:`min_passes`). LP-FT on sign_digits
    (100 px sources) at 5 minutes: 160 px (the largest allowing the passes) val 0.983, 128 px 0.959
    (docs/planner.md)."""
    want = native if source_side is None else min(native, max(128, 2 * source_side))
    return max([s for s in CANDIDATE_SIZES if s <= want] or [MIN_SIZE])


def min_passes(num_train: int) -> float:
    """Fewest fine-tuning passes a size must allow to be chosen over a smaller one: 2 below 1,000 training
    images, 2.5 up to :data:`LARGE_DATA`, 2 from there.

    Few images close to ImageNet lose more from a lower resolution than from fewer passes (ants/bees' best
    val came after 1-2 passes in every strategy measured, docs/recipes.md). Mid-size data: below about 3
    passes, passes bought more than pixels; 2.5, not 3, because a plan's estimate runs low (the 96 px EuroSAT
    plan estimated 2.7 passes before its own timing found 3.8). Large data makes many optimizer steps per pass
    (EuroSAT: 295 steps of 64 images), and there resolution bought more than passes: at a 15-minute budget
    (docs/planner.md) 96 px for 3.8 passes gave test 0.980, 128 px for a single pass 0.978, 64 px for 4.9
    passes 0.975; with its shards written inside the budget, 2.5 passes pushed EuroSAT down to 64 px."""
    if num_train >= LARGE_DATA:
        return 2.0
    return 2.5 if num_train >= SMALL_DATA else 2.0


def global_batch(num_train: int) -> int:
    """Images per optimizer step: 64 from 2,000 training images, else 16 (enough steps per pass on small and
    mid-size data: LP-FT on sign_digits' 1,651 images reached val 0.983 with 16, 0.959 with 64, docs/planner.md)."""
    return 64 if num_train >= 2_000 else 16


def micro_batch(global_batch_size: int, world_size: int, peak_mem_mib: float, measured_batch: int,
                free_mib: float) -> int:
    """The largest micro-batch dividing ``global_batch_size / world_size`` whose training memory fits in 70%
    of ``free_mib`` (peak memory taken as proportional to the batch, from one measurement at
    ``measured_batch``: an over-estimate, the fixed part is counted per image); at least 1. The global batch,
    and so the optimisation, does not change (Composer's automatic micro-batching)."""
    per_rank = max(1, global_batch_size // world_size)
    per_image = peak_mem_mib / max(1, measured_batch)
    for mb in sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), reverse=True):
        if mb <= 32 and mb * per_image <= 0.7 * free_mib:
            return mb
    return 1


def ema_decay(steps: int, num_train: int) -> float | None:
    """Model EMA decay for a run of ``steps``: off on large data (see :data:`LARGE_DATA`), else an
    averaging horizon of about a third of the run, within [0.99, 0.9999]."""
    if num_train >= LARGE_DATA:
        return None
    return min(0.9999, max(0.99, 1 - 1 / max(1.0, 0.3 * steps)))


def num_evaluations(passes: float, num_train: int) -> int:
    """Validation passes during fine-tuning: 2 on large data (half-way, end), else one per pass up to 6."""
    if num_train >= LARGE_DATA:
        return 2
    return max(1, min(6, math.floor(passes)))


def steps_that_fit(seconds: float, seconds_per_step: float) -> int:
    """Optimizer steps in ``seconds`` at ``seconds_per_step`` (0 when none fits)."""
    return max(0, int(seconds // max(1e-9, seconds_per_step)))

