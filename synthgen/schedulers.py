"""The one sampler factory and scheduler-config reader for every generator kind."""

from __future__ import annotations

import json
from pathlib import Path

from synthgen.errors import SynthgenError

# sampler name -> diffusers class (+ fixed options); "dpm" and "dpm++" are DPM-Solver++ (2M) both
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpm": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


def make_scheduler(name: str, config: dict, allowed: tuple[str, ...] = tuple(SAMPLERS)):
    """A diffusers sampler built from a model's training noise schedule; `allowed` is what the
    caller's sampling loop supports."""
    import diffusers

    if name not in allowed:
        raise SynthgenError(f"unknown sampler {name!r}; choose one of {', '.join(allowed)}")
    cls, options = SAMPLERS[name]
    return getattr(diffusers, cls).from_config(config, **options)


def read_scheduler_config(folder: str | Path) -> dict:
    """The noise schedule a model folder was trained with (`scheduler/scheduler_config.json`)."""
    path = Path(folder) / SCHEDULER_CONFIG
    if not path.is_file():
        raise SynthgenError(f"{path}: missing; {folder} is not a complete synthgen model folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SynthgenError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
