"""Schedulers: the LCM sampler (`LCMScheduler`) and its pure math (`lcm_math`); the few-step family: TCD (`tcd`),
Euler (`euler`) and DDIM (`ddim`, also the teachers' sampler), each matching its diffusers namesake."""

from lcmkit.schedulers.ddim import DDIMScheduler, DDIMSchedulerConfig
from lcmkit.schedulers.euler import EulerDiscreteScheduler, EulerDiscreteSchedulerConfig
from lcmkit.schedulers.lcm import LCMScheduler, LCMSchedulerConfig, LCMSchedulerOutput
from lcmkit.schedulers.tcd import TCDScheduler, TCDSchedulerOutput

__all__ = [
    "DDIMScheduler",
    "DDIMSchedulerConfig",
    "EulerDiscreteScheduler",
    "EulerDiscreteSchedulerConfig",
    "LCMScheduler",
    "LCMSchedulerConfig",
    "LCMSchedulerOutput",
    "TCDScheduler",
    "TCDSchedulerOutput",
]
