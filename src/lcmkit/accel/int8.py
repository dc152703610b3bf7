"""Where int8 pays, decided by measuring: the fast mode's int8 trial for the UNet and the full VAE's decoder.

On a CPU with int8 dot products (VNNI, AMX) an int8 graph (weights and activations, NNCF post-training
quantization calibrated on this pipeline's own inputs) can run faster than the base precision's (bf16, int8
weights or fp32), but whether its image holds depends on the model: on SD1.5-size weights it stays within 45 dB
of exact mode, on the shipped tiny model an int8 UNet falls to 18 dB. So `enable_fast(precision="auto")` does
not take int8 on the CPU's word; once per model, size, batch and machine it

1. runs the exact (eager) pipeline on `CALIBRATION_PROMPTS` and records every UNet input and the final latents
   (the int8 graphs' calibration data, and the reference images);
2. builds the int8 UNet and decoder for that size (cached on disk like every graph) and times each against the
   base graph, interleaved (`timed_speedup`): a part is a candidate only if its int8 graph is at least
   `MIN_SPEEDUP` times as fast here;
3. makes the reference prompts' images with the candidates, fastest combination first, and takes the first whose
   every image is within `FLOOR_DB` PSNR of exact mode (the base graphs are always acceptable);
4. writes the verdict, with its numbers, beside the graphs (`int8-verdict-<key>.json`): a later process with the
   same weights, size, CPU and threads reads it and loads only the graphs it chose, measuring nothing.

`precision="int8"` forces both parts int8 without the trial (the user's call). The trial costs one exact run of
the four prompts, NNCF's quantization of two graphs, and a few timed calls: minutes at SD1.5 size, once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcmkit.accel import graphs
from lcmkit.accel.openvino import (
    LazyUNetInputs,
    OpenVINOUNet,
    UNetInputs,
    openvino_unet,
    record_unet_inputs,
    unet_input_shapes,
    unet_source,
)
from lcmkit.accel.vae_decoder import OpenVINOVAEDecoder, decoder_source
from lcmkit.models.vae import AutoencoderKL

logger = logging.getLogger(__name__)

# The recipe: these prompts, seeds 0.., the steps and guidance of a default call, at the compiled size. It names
# the int8 graphs' cache entries (change it and they are calibrated again) and gives the trial's reference images.
CALIBRATION_PROMPTS = (
    "a photo of a cat sitting on a windowsill, soft light",
    "a landscape painting of mountains and a lake at sunset",
    "portrait of an old man, studio lighting, detailed",
    "a red sports car on a city street at night, neon",
)
CALIBRATION_STEPS, CALIBRATION_GUIDANCE = 4, 8.0
FLOOR_DB = 35.0  # every reference image of an accepted combination at least this close to exact mode
MIN_SPEEDUP = 1.1  # an int8 graph must be this much faster than the base one, measured here, to be tried
VERDICT_VERSION = 2  # 2: the int8 decoder keeps its last up block in float


@dataclass
class Verdict:
    """What the trial chose (`unet`, `vae`: int8 or not) and what it measured: each part's int8 speedup over the
    base graph, and the worst reference image's PSNR (dB) against exact mode of each combination it tried."""

    unet: bool
    vae: bool
    speedup: dict[str, float] = field(default_factory=dict)
    psnr_db: dict[str, float] = field(default_factory=dict)
    forced: bool = False

    def describe(self) -> str:
        if self.forced:
            return "int8 as asked (no trial)"
        parts = [
            f"{name} {self.speedup[name]:.2f}x" for name in ("unet", "vae decoder") if name in self.speedup
        ]
        tried = [f"{combo} {db:.1f} dB" for combo, db in self.psnr_db.items()]
        chosen = (
            "+".join(name for name, on in (("unet", self.unet), ("vae decoder", self.vae)) if on) or "none"
        )
        return (
            f"int8 chosen for: {chosen} (int8 speed vs base: {', '.join(parts) or 'not measured'}; worst reference "
            f"image vs exact: {', '.join(tried) or 'none tried'}; floor {FLOOR_DB:g} dB)"
        )


@dataclass
class Reference:
    """The exact pipeline's run of the recipe: every UNet input, the final latents, and their images."""

    unet_inputs: list[UNetInputs]
    latents: list[torch.Tensor]
    images: list[torch.Tensor]


def timed_speedup(base: Callable[[], Any], int8: Callable[[], Any], rounds: int = 3) -> float:
    """How many times faster `int8()` runs than `base()`: the best of `rounds` calls each, interleaved so that a
    change in the machine's speed hits both alike, after one untimed call each."""
    base(), int8()
    best = {base: float("inf"), int8: float("inf")}
    for _ in range(rounds):
        for fn in (base, int8):
            started = time.perf_counter()
            fn()
            best[fn] = min(best[fn], time.perf_counter() - started)
    return best[base] / best[int8]


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two images in [0, 1], in dB (100 for identical ones)."""
    mse = float(torch.mean((a.double() - b.double()) ** 2))
    return 100.0 if mse < 1e-10 else 10 * float(np.log10(1.0 / mse))


def decoder_input(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """What `vae.decode` hands its decoder for the pipeline's final `latents` (no tiling or slicing)."""
    with torch.inference_mode():
        z = latents / vae.config.scaling_factor
        return vae.post_quant_conv(z) if vae.post_quant_conv is not None else z


class Int8Trial:
    """The int8 trial for one pipeline, compiled size and batch: see the module's text. `forced=True` is
    `precision="int8"`: both parts int8, nothing measured."""

    def __init__(
        self,
        pipe: Any,
        *,
        height: int,
        width: int,
        tokens: int,
        batch: int,
        cache_dir: Path,
        threads: int | None,
        inference: str,
        base: str,
        flags: frozenset[str],
        forced: bool = False,
    ) -> None:
        self.pipe, self.height, self.width, self.tokens, self.batch = pipe, height, width, tokens, batch
        self.cache_dir, self.threads, self.inference, self.forced = cache_dir, threads, inference, forced
        self.factor = pipe.vae_scale_factor
        self.has_decoder = isinstance(
            pipe.vae, AutoencoderKL
        )  # a tiny VAE stays eager: only the UNet is tried
        self.latent_shape = (
            batch,
            pipe.vae.config.latent_channels,
            height // self.factor,
            width // self.factor,
        )
        self.recipe = (
            f"prompts={CALIBRATION_PROMPTS!r} seeds=0.. steps={CALIBRATION_STEPS} "
            f"guidance={CALIBRATION_GUIDANCE} size={height}x{width}"
        )
        # the recipe's prompts in calls of `batch` prompts (cycling), so every call has the compiled shapes
        self.groups = [
            [CALIBRATION_PROMPTS[(i + k) % len(CALIBRATION_PROMPTS)] for k in range(batch)]
            for i in range(0, len(CALIBRATION_PROMPTS), batch)
        ]
        self._reference: Reference | None = None
        self.path = cache_dir / f"int8-verdict-{self._key(base, flags)}.json"

    def _key(self, base: str, flags: frozenset[str]) -> str:
        """Names the verdict by the weights (sampled, as the graphs are), the shapes, the recipe, the base
        precision, the CPU's flags, the threads and the versions: what its measurements depend on."""
        shapes = unet_input_shapes(self.pipe.unet.config, self.batch, *self.latent_shape[2:], self.tokens)
        parts = [
            graphs.graph_digest(unet_source(self.pipe.unet, shapes, sampled_key=True)),
            graphs.graph_digest(decoder_source(self.pipe.vae, sampled_key=True)) if self.has_decoder else "",
            self.recipe,
            repr((base, self.inference, self.batch, self.threads, os.cpu_count(), sorted(flags))),
            repr((FLOOR_DB, MIN_SPEEDUP, VERDICT_VERSION, graphs.import_nncf().__version__)),
        ]
        return hashlib.blake2b("\n".join(parts).encode(), digest_size=12).hexdigest()

    def cached_verdict(self) -> Verdict | None:
        """The verdict a previous trial wrote for this key, or None (also for an unreadable file, with a warning)."""
        if self.forced:
            return Verdict(unet=True, vae=True, forced=True)
        if not self.path.is_file():
            return None
        try:
            return Verdict(**json.loads(self.path.read_text())["verdict"])
        except (OSError, ValueError, TypeError, KeyError) as err:
            logger.warning("ignoring the unreadable int8 verdict %s (%s); measuring again", self.path, err)
            return None

    def reference(self) -> Reference:
        """The exact pipeline's run of the recipe, made on first use: call it before any part is replaced."""
        if self._reference is None:
            logger.info(
                "int8 trial: running the exact pipeline on %d calibration prompts", len(CALIBRATION_PROMPTS)
            )
            inputs, latents = record_unet_inputs(
                self.pipe,
                self.groups,
                num_inference_steps=CALIBRATION_STEPS,
                guidance_scale=CALIBRATION_GUIDANCE,
                height=self.height,
                width=self.width,
            )
            images = [self._image(z) for z in latents]
            self._reference = Reference(inputs, latents, images)
        return self._reference

    def _decoder_inputs(self) -> list[list[np.ndarray]]:
        return [[graphs.to_numpy(decoder_input(self.pipe.vae, z))] for z in self.reference().latents]

    def build_unet(self) -> OpenVINOUNet:
        """The int8 UNet for the compiled size (from the cache, or calibrated on the reference run)."""
        return openvino_unet(
            self.pipe.unet,
            batch_size=self.batch,
            height=self.height,
            width=self.width,
            precision="int8",
            calibration=LazyUNetInputs(self.recipe, lambda: self.reference().unet_inputs),
            cache_dir=self.cache_dir,
            threads=self.threads,
            text_tokens=self.tokens,
            vae_scale_factor=self.factor,
            inference=self.inference,
            sampled_key=True,
        )

    def build_decoder(self) -> Any:
        """The int8 decoder's inference request for the compiled latent shape (from the cache, or calibrated on
        the reference run's final latents)."""
        decoder = OpenVINOVAEDecoder(
            self.pipe.vae,
            precision="int8",
            cache_dir=self.cache_dir,
            threads=self.threads,
            inference=self.inference,
            sampled_key=True,
            calibration=graphs.LazyCalibration(f"vae decoder {self.recipe}", self._decoder_inputs),
        )
        return decoder.prepare(self.latent_shape)

    def judge(
        self,
        unet: Any,
        base_unet: OpenVINOUNet,
        int8_unet: OpenVINOUNet,
        base_decoder: Any = None,
        int8_decoder: Any = None,
    ) -> Verdict:
        """Measure and choose (see the module's text). `unet` is the pipeline's per-shape stand-in: its entry for
        the compiled size is switched while the reference prompts run. The decoders are inference requests for
        the compiled latent shape (None with a tiny VAE). Writes the verdict file."""
        ref = self.reference()
        call = ref.unet_inputs[0]
        speedup = {"unet": timed_speedup(lambda: call.run(base_unet), lambda: call.run(int8_unet))}
        if int8_decoder is not None:
            z = self._decoder_inputs()[0]
            speedup["vae decoder"] = timed_speedup(
                lambda: base_decoder.infer(z), lambda: int8_decoder.infer(z)
            )

        def seconds(use_unet: bool, use_vae: bool) -> float:  # a default call, in base UNet calls and decodes
            return CALIBRATION_STEPS / (speedup["unet"] if use_unet else 1) + 1 / (
                speedup["vae decoder"] if use_vae else 1
            )

        combos = [
            (u, v)
            for u in (True, False)
            for v in ((True, False) if int8_decoder is not None else (False,))
            if (u or v)
            and (not u or speedup["unet"] >= MIN_SPEEDUP)
            and (not v or speedup["vae decoder"] >= MIN_SPEEDUP)
        ]
        verdict = Verdict(unet=False, vae=False, speedup={k: round(x, 3) for k, x in speedup.items()})
        latents: dict[bool, list[torch.Tensor]] = {}
        for use_unet, use_vae in sorted(combos, key=lambda c: seconds(*c)):
            if (
                use_unet not in latents
            ):  # with the base UNet: its own latents, for a fair check of the decoder
                with _switched(unet, int8_unet if use_unet else base_unet):
                    latents[use_unet] = self._latents()
            request = int8_decoder if use_vae else base_decoder
            images = [self._image(z, request) for z in latents[use_unet]]
            worst = min(psnr_db(a, b) for a, b in zip(images, ref.images, strict=True))
            name = "+".join(n for n, on in (("unet", use_unet), ("vae decoder", use_vae)) if on) + " int8"
            verdict.psnr_db[name] = round(worst, 2)
            if worst >= FLOOR_DB:
                verdict.unet, verdict.vae = use_unet, use_vae
                break
        self._write(verdict)
        return verdict

    def _image(self, latents: torch.Tensor, request: Any = None) -> torch.Tensor:
        """The [0, 1] image of final `latents`: through the VAE as it is (request None), or with the decoder
        replaced by a compiled graph's `request`."""
        vae = self.pipe.vae
        with torch.inference_mode():
            if request is None:
                x = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
            else:
                x = torch.from_numpy(
                    np.array(request.infer([graphs.to_numpy(decoder_input(vae, latents))])[0])
                )
            return (x / 2 + 0.5).clamp(0, 1)

    def _latents(self) -> list[torch.Tensor]:
        out = []
        for i, prompt in enumerate(self.groups):
            generator = torch.Generator("cpu").manual_seed(i)
            out.append(
                self.pipe(
                    prompt,
                    generator=generator,
                    output_type="latent",
                    num_inference_steps=CALIBRATION_STEPS,
                    guidance_scale=CALIBRATION_GUIDANCE,
                    height=self.height,
                    width=self.width,
                ).images
            )
        return out

    def _write(self, verdict: Verdict) -> None:
        record = {
            "verdict": asdict(verdict),
            "recipe": self.recipe,
            "floor_db": FLOOR_DB,
            "min_speedup": MIN_SPEEDUP,
        }
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, self.path)  # atomic: a reader never sees half a verdict


@contextmanager
def _switched(unet: Any, graph: OpenVINOUNet) -> Iterator[None]:
    """`unet` (a per-shape stand-in) runs `graph` for its shape inside the block, and what it ran before after."""
    h, w = graph.latent_size
    key = (graph.batch_size, h, w, graph.text_tokens)
    before = unet._compiled.get(key)
    unet.add(graph)
    try:
        yield
    finally:
        if before is not None:
            unet.add(before)
