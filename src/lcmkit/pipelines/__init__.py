"""LCM pipelines with the diffusers call surface."""

from lcmkit.pipelines.img2img import LatentConsistencyModelImg2ImgPipeline
from lcmkit.pipelines.output import StableDiffusionPipelineOutput
from lcmkit.pipelines.text2img import LatentConsistencyModelPipeline

__all__ = [
    "LatentConsistencyModelImg2ImgPipeline",
    "LatentConsistencyModelPipeline",
    "StableDiffusionPipelineOutput",
]
