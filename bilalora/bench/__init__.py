"""``bilalora bench``: the adapted model against the unadapted one, in numbers.

    from bilalora.bench import BenchOptions, run_bench
    result = run_bench(BenchOptions())          # newest runs/adapt/<run>: base vs adapted
    result.latency                              # rows: subject, backend, status, MB, params, GFLOPs, ms, FPS
    result.quality                              # per subject: mean FADE, entropy, ... over the images
    result.record_path                          # bench.json beside the report

Building blocks: :mod:`.subjects` (what is compared), :mod:`.selection` (which
images: the run's held-out test split by default), :mod:`.latency` (timing per
format, one :data:`~.latency.FORMATS` table), :mod:`.quality` (no-reference
metrics over images), :mod:`.baselines` (DCP and contrast-stretch rows),
:mod:`.figure` (metrics.png), :mod:`.pipeline`. Names are imported on first use.
"""

from __future__ import annotations

from bilalora.lazy import lazy_exports

_EXPORTS = {
    "BenchOptions": "pipeline",
    "BenchResult": "pipeline",
    "BenchEvents": "pipeline",
    "run_bench": "pipeline",
    "Subject": "subjects",
    "resolve_subjects": "subjects",
    "Timing": "latency",
    "time_callable": "latency",
    "score_images": "quality",
    "FORMATS": "latency",
    "ImageSelection": "selection",
    "select_images": "selection",
    "metrics_figure": "figure",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
