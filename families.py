"""The diffusers families Algorithm 1 runs on, each behind the one interface the sampler uses (ltg.Denoiser).

| family      | pipeline                  | path, Eqn 7          | network predicts | conditioning                          |
| ----------- | ------------------------- | -------------------- | ---------------- | ------------------------------------- |
| SD 1.x, 2.x | StableDiffusionPipeline   | VP, DDIM             | eps, or v (768-v)| CLIP text; classifier-free pair       |
| SDXL        | StableDiffusionXLPipeline | VP, DDIM             | eps              | two CLIP texts, pooled text, time ids |
| SD 3.x      | StableDiffusion3Pipeline  | rectified flow, Euler| velocity eps - x0| two CLIPs + T5, pooled; CFG pair      |
| FLUX.1      | FluxPipeline              | rectified flow, Euler| velocity eps - x0| CLIP pooled + T5; guidance embedding  |
| digits      | UNet2DModel (pixels)      | VP, DDIM             | eps              | class label; classifier-free pair     |

An adapter holds what differs between families: how prompts become conditioning, how the network is called
(classifier-free guidance included), the family's timestep schedule (FLUX's resolution-dependent shift, SD 3's
shift), the initial noise drawn as the pipeline draws it (FLUX packs it into 2x2 patches), and the decoder D.
The equations (ltg.py) are the same for all of them.
"""

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (
    AutoencoderTiny,
    DDIMScheduler,
    DiffusionPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.flux import pipeline_flux
from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3
from diffusers.utils.torch_utils import randn_tensor


# ---------------------------------------------------------------------------------------------
# Decoding: D(z0) = vae.decode(z0 / scaling + shift), each autoencoder with its own config.
# ---------------------------------------------------------------------------------------------

def decode_latents(vae, z0):
    """D(z0) [B, c, h, w] -> images [B, 3, 8h, 8w] in [-1, 1] (z0's dtype): a diffusers AutoencoderKL or
    AutoencoderTiny run in its own dtype, unscaled as the pipelines unscale (SD 3 and FLUX also shift)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode((z0 / vae.config.scaling_factor + shift).to(vae.dtype)).sample.to(z0.dtype)


TINY_DECODERS = "TAESD or TAESDXL (4 latent channels), TAESD3 or TAEF1 (16)"


def check_guidance_decoder(vae, decoder):
    """A guidance decoder must read the pipeline's latents: the same channels and, when its config unscales them
    (scale, shift) other than (1, 0), the same scale and shift as the VAE. The TAESD family decodes the network's
    latents as they are, with (1, 0), so TAESD and TAESDXL (4 channels) cannot be told apart by config, nor TAESD3
    and TAEF1 (16): check_tiny_decoder_id tells their hub ids apart."""
    if decoder.config.latent_channels != vae.config.latent_channels:
        raise ValueError(f"ltg: the guidance decoder reads {decoder.config.latent_channels} latent channels but the "
                         f"pipeline's VAE has {vae.config.latent_channels}: take the family's tiny autoencoder "
                         f"({TINY_DECODERS})")
    scale = lambda c: (c.scaling_factor, getattr(c, "shift_factor", None) or 0.0)  # noqa: E731
    if scale(decoder.config) != (1.0, 0.0) and scale(decoder.config) != scale(vae.config):
        raise ValueError(f"ltg: the guidance decoder unscales latents by (scale, shift) = {scale(decoder.config)} but "
                         f"the pipeline's VAE by {scale(vae.config)}: take the family's tiny autoencoder "
                         f"({TINY_DECODERS})")


def classifier_free(output, z, scale, cfg):
    """output(z), with classifier-free guidance at `scale` when cfg: output runs once on the
    (unconditional, conditional) pair [2B, ...] and returns uncond + scale (cond - uncond)."""
    if not cfg:
        return output(z)
    uncond, cond = output(torch.cat([z, z])).chunk(2)
    return uncond + scale * (cond - uncond)


def _unet_output(unet, z, t, **conditioning):
    """The UNet run in its own dtype; its output in z's dtype."""
    return unet(z.to(unet.dtype), t, **conditioning).sample.to(z.dtype)


def _transformer_output(transformer, z, t, **conditioning):
    """An SD 3 or FLUX transformer run in its own dtype, timestep t for every row of z; output in z's dtype."""
    t = t.expand(z.shape[0]).to(transformer.dtype)
    return transformer(hidden_states=z.to(transformer.dtype), timestep=t, return_dict=False, **conditioning)[0].to(z.dtype)


# ---------------------------------------------------------------------------------------------
# Adapters. Each has what ltg.Denoiser names: scheduler, prediction, set_timesteps, initial_latent,
# predict, decode, guidance_decode.
# ---------------------------------------------------------------------------------------------

class _Pipeline:
    """What the text-to-image adapters share: the pipeline's scheduler, initial noise and VAE, a cheaper
    guidance decoder, and the image side `resolution` (default: the pipeline's)."""

    def __init__(self, pipe, guidance_scale, guidance_decoder, checkpoint_decoder, resolution):
        self.pipe, self.guidance_scale = pipe, guidance_scale
        self.scheduler, self.vae = pipe.scheduler, pipe.vae
        self.resolution = resolution or native_resolution(pipe)
        if guidance_decoder is not None:
            check_guidance_decoder(pipe.vae, guidance_decoder)
        self.guidance_vae = guidance_decoder or pipe.vae
        if checkpoint_decoder:
            self.guidance_vae.enable_gradient_checkpointing()

    def set_timesteps(self, num_inference_steps, device):
        self.scheduler.set_timesteps(num_inference_steps, device=device)

    def initial_latent(self, generators, device):                               # z_T [B, c, h, w], float32
        return self.pipe.prepare_latents(len(generators), self.vae.config.latent_channels, self.resolution,
                                         self.resolution, torch.float32, device, generators)

    def decode(self, z0):                                                        # -> [B, 3, H, W]
        return decode_latents(self.vae, z0)

    def guidance_decode(self, z0):
        return decode_latents(self.guidance_vae, z0)


class _UNetPipeline(_Pipeline):
    """What SD 1.x/2.x and SDXL share: a UNet predicting what its scheduler's prediction_type says (eps or v), with
    a classifier-free pair unless guidance is off or distilled into it (time_cond_proj_dim), conditioned on
    `self.conditioning` (set by each family's __init__ from its prompts)."""

    def __init__(self, pipe, guidance_scale, guidance_decoder, checkpoint_decoder, resolution):
        super().__init__(pipe, guidance_scale, guidance_decoder, checkpoint_decoder, resolution)
        self.prediction = pipe.scheduler.config.prediction_type
        self.cfg = guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None

    def predict(self, z, t):                                                     # [B, 4, h, w]
        return classifier_free(lambda x: _unet_output(self.pipe.unet, x, t, **self.conditioning), z, self.guidance_scale,
                               self.cfg)


class StableDiffusionDenoiser(_UNetPipeline):
    """SD 1.x and 2.x (epsilon or v-prediction): one prompt per image, CLIP text embeddings [B, 77, d]."""

    def __init__(self, pipe, prompts, guidance_scale=7.5, negative_prompt=None, guidance_decoder=None,
                 checkpoint_decoder=False, resolution=None):
        super().__init__(pipe, guidance_scale, guidance_decoder, checkpoint_decoder, resolution)
        cond, uncond = pipe.encode_prompt(prompts, pipe.device, 1, self.cfg, negative_prompt)
        embeds = torch.cat([uncond, cond]) if self.cfg else cond                                # [2B or B, 77, d]
        self.conditioning = dict(encoder_hidden_states=embeds.to(pipe.unet.dtype))


class StableDiffusionXLDenoiser(_UNetPipeline):
    """SDXL: two CLIP text encoders ([B, 77, 2048] together), the pooled text embedding [B, 1280] and the
    size/crop time ids [B, 6] of an uncropped image at `resolution`."""

    def __init__(self, pipe, prompts, guidance_scale=5.0, negative_prompt=None, guidance_decoder=None,
                 checkpoint_decoder=False, resolution=None):
        super().__init__(pipe, guidance_scale, guidance_decoder, checkpoint_decoder, resolution)
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=self.cfg,
            negative_prompt=negative_prompt)
        size = (self.resolution, self.resolution)
        projection = (pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None
                      else pooled.shape[-1])
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                          text_encoder_projection_dim=projection)                  # [1, 6]
        if self.cfg:
            embeds, pooled = torch.cat([neg_embeds, embeds]), torch.cat([neg_pooled, pooled])
        rows = embeds.shape[0]
        self.conditioning = dict(encoder_hidden_states=embeds.to(pipe.unet.dtype), added_cond_kwargs=dict(
            text_embeds=pooled.to(pipe.unet.dtype), time_ids=time_ids.to(pipe.device).repeat(rows, 1)))


class StableDiffusion3Denoiser(_Pipeline):
    """SD 3.x: two CLIP and one T5 text encoder (joint embeddings [B, 77 + 256, 4096], pooled [B, 2048]);
    the transformer predicts the flow velocity u = eps - x0 at timestep 1000 sigma."""

    prediction = "flow"

    def __init__(self, pipe, prompts, guidance_scale=3.5, negative_prompt=None, guidance_decoder=None,
                 checkpoint_decoder=False, resolution=None):
        super().__init__(pipe, guidance_scale, guidance_decoder, checkpoint_decoder, resolution)
        self.cfg = guidance_scale > 1
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=pipe.device, do_classifier_free_guidance=self.cfg,
            negative_prompt=negative_prompt)
        if self.cfg:
            embeds, pooled = torch.cat([neg_embeds, embeds]), torch.cat([neg_pooled, pooled])
        dtype = pipe.transformer.dtype
        self.conditioning = dict(encoder_hidden_states=embeds.to(dtype), pooled_projections=pooled.to(dtype))

    def set_timesteps(self, num_inference_steps, device):
        """SD 3's shifted schedule; with use_dynamic_shifting, shifted by the image's token count as the pipeline does."""
        config, kwargs = self.scheduler.config, {}
        if config.get("use_dynamic_shifting"):
            side = self.resolution // self.pipe.vae_scale_factor // self.pipe.transformer.config.patch_size
            kwargs["mu"] = pipeline_stable_diffusion_3.calculate_shift(
                side * side, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        pipeline_stable_diffusion_3.retrieve_timesteps(self.scheduler, num_inference_steps, device, **kwargs)

    def predict(self, z, t):                                                     # [B, 16, h, w]
        return classifier_free(lambda x: _transformer_output(self.pipe.transformer, x, t, **self.conditioning), z,
                               self.guidance_scale, self.cfg)


class FluxDenoiser(_Pipeline):
    """FLUX.1: CLIP pooled [B, 768] and T5 [B, 512, 4096] embeddings; latents packed into 2x2 patches,
    z [B, (h/2)(w/2), 64]; guidance is distilled into the transformer (guidance embedding, dev) or absent
    (schnell), so there is no classifier-free pair. The transformer predicts u = eps - x0 at timestep sigma."""

    prediction = "flow"
    cfg = False

    def __init__(self, pipe, prompts, guidance_scale=3.5, negative_prompt=None, guidance_decoder=None,
                 checkpoint_decoder=False, resolution=None):
        if negative_prompt is not None:
            raise ValueError("ltg: FLUX has no negative prompt here (its guidance is distilled, not classifier-free)")
        super().__init__(pipe, guidance_scale, guidance_decoder, checkpoint_decoder, resolution)
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=pipe.device)
        side = self.resolution // pipe.vae_scale_factor // 2                     # patches per side
        image_ids = pipe._prepare_latent_image_ids(len(prompts), side, side, pipe.device, embeds.dtype)
        dtype = pipe.transformer.dtype
        guidance = (torch.full([len(prompts)], guidance_scale, device=pipe.device, dtype=torch.float32)
                    if pipe.transformer.config.guidance_embeds else None)
        self.conditioning = dict(encoder_hidden_states=embeds.to(dtype), pooled_projections=pooled.to(dtype),
                                 txt_ids=text_ids, img_ids=image_ids, guidance=guidance)
        self.tokens = side * side

    def set_timesteps(self, num_inference_steps, device):
        """FLUX's schedule: sigmas 1 ... 1/N, shifted by mu, which grows with the image's token count."""
        config = self.scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_inference_steps,
                                                                         num_inference_steps)
        mu = pipeline_flux.calculate_shift(self.tokens, config.get("base_image_seq_len", 256),
                                           config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                           config.get("max_shift", 1.15))
        pipeline_flux.retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)

    def initial_latent(self, generators, device):                               # z_T [B, (h/2)(w/2), 64]
        channels = self.pipe.transformer.config.in_channels // 4
        return self.pipe.prepare_latents(len(generators), channels, self.resolution, self.resolution,
                                         torch.float32, device, generators)[0]

    def predict(self, z, t):                                                     # [B, L, 64]
        return _transformer_output(self.pipe.transformer, z, t / 1000, **self.conditioning)

    def unpack(self, z):                                                         # -> [B, 16, h, w]
        return self.pipe._unpack_latents(z, self.resolution, self.resolution, self.pipe.vae_scale_factor)

    def decode(self, z0):
        return decode_latents(self.vae, self.unpack(z0))

    def guidance_decode(self, z0):
        return decode_latents(self.guidance_vae, self.unpack(z0))


class ClassConditionalDenoiser:
    """A pixel-space diffusers UNet2DModel with class embeddings and a DDIMScheduler; class `null_class` is the
    unconditional one for classifier-free guidance. D is the identity."""

    prediction = "epsilon"

    def __init__(self, unet, scheduler, labels, guidance_scale=1.0, null_class=None):
        self.unet, self.scheduler, self.guidance_scale = unet, scheduler, guidance_scale
        self.cfg = guidance_scale != 1.0
        null = torch.full_like(labels, unet.config.num_class_embeds - 1 if null_class is None else null_class)
        self.class_labels = torch.cat([null, labels]) if self.cfg else labels                    # [2B or B]
        self.latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

    def set_timesteps(self, num_inference_steps, device):
        self.scheduler.set_timesteps(num_inference_steps, device=device)

    def initial_latent(self, generators, device):                               # z_T [B, c, h, w], float32
        z = randn_tensor((len(generators), *self.latent_shape), generator=generators, device=device,
                         dtype=torch.float32)
        return z * self.scheduler.init_noise_sigma

    def predict(self, z, t):                                                     # [B, c, h, w]
        return classifier_free(lambda x: _unet_output(self.unet, x, t, class_labels=self.class_labels), z,
                               self.guidance_scale, self.cfg)

    def decode(self, z0):
        return z0

    guidance_decode = decode


# ---------------------------------------------------------------------------------------------
# Loading: the family from the pipeline's class, with its adapter and defaults.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """A diffusers text-to-image family: its pipeline, adapter, path, and what a run takes by default
    (the model cards' steps and guidance scale, the dtype on a GPU, the matching tiny autoencoder)."""
    name: str
    pipeline: type
    adapter: type
    path: str
    steps: int
    guidance_scale: float
    cuda_dtype: torch.dtype
    tiny_decoder: str


FAMILIES = {
    "StableDiffusionPipeline": Family("SD 1.x / 2.x", StableDiffusionPipeline, StableDiffusionDenoiser,
                                      "variance preserving", 50, 7.5, torch.float16, "madebyollin/taesd"),
    "StableDiffusionXLPipeline": Family("SDXL", StableDiffusionXLPipeline, StableDiffusionXLDenoiser,
                                        "variance preserving", 50, 5.0, torch.float16, "madebyollin/taesdxl"),
    "StableDiffusion3Pipeline": Family("SD 3.x", StableDiffusion3Pipeline, StableDiffusion3Denoiser,
                                       "rectified flow", 28, 3.5, torch.bfloat16, "madebyollin/taesd3"),
    "FluxPipeline": Family("FLUX.1", FluxPipeline, FluxDenoiser, "rectified flow", 28, 3.5, torch.bfloat16,
                           "madebyollin/taef1"),
}
# FLUX.1-schnell (no guidance embedding) is distilled to 4 steps without guidance.
FLUX_SCHNELL_STEPS, FLUX_SCHNELL_GUIDANCE = 4, 0.0


def family_of(path_or_id):
    """The Family of a diffusers pipeline folder or hub id, from its model_index.json alone."""
    name = DiffusionPipeline.load_config(path_or_id).get("_class_name")
    if name not in FAMILIES:
        raise ValueError(f"ltg: {path_or_id} is a {name}; Algorithm 1 supports {', '.join(FAMILIES)}")
    return FAMILIES[name]


def pipeline_family(pipe):
    """The Family of a loaded pipeline; an unsupported one is refused in one line."""
    family = FAMILIES.get(type(pipe).__name__)
    if family is None:
        raise ValueError(f"ltg: a {type(pipe).__name__} is not supported; Algorithm 1 runs on {', '.join(FAMILIES)}")
    return family


def family_defaults(pipe):
    """(steps, guidance scale) of a loaded pipeline: its family's, FLUX.1-schnell's for a FLUX transformer without
    guidance embedding."""
    family = pipeline_family(pipe)
    if family.adapter is FluxDenoiser and not pipe.transformer.config.guidance_embeds:
        return FLUX_SCHNELL_STEPS, FLUX_SCHNELL_GUIDANCE
    return family.steps, family.guidance_scale


def native_resolution(pipe):
    """The image side a pipeline generates by default (SD 1.4: 512, SDXL and FLUX: 1024)."""
    size = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
    return size * pipe.vae_scale_factor


def load_pipeline(path_or_id, device="cpu", dtype=torch.float32):
    """A diffusers SD 1.x/2.x, SDXL, SD 3.x or FLUX pipeline from a local folder or hub id, ready for Algorithm 1:
    the variance-preserving families get a DDIMScheduler from their scheduler's config (Eqn 7 is DDIM there);
    the rectified-flow families keep their FlowMatchEulerDiscreteScheduler (Eqn 7 is its Euler step). An SDXL
    VAE that overflows in float16 (config.force_upcast) runs in float32, as diffusers' SDXL pipeline runs it."""
    family = family_of(path_or_id)
    extra = dict(safety_checker=None, requires_safety_checker=False) if family.pipeline is StableDiffusionPipeline else {}
    if family.pipeline is StableDiffusionXLPipeline:
        extra["add_watermarker"] = False
    pipe = family.pipeline.from_pretrained(path_or_id, dtype=dtype, **extra)
    if family.path == "variance preserving":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    if family.pipeline is StableDiffusionXLPipeline and dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_tiny_decoder_id(family, path_or_id):
    """Another family's tiny autoencoder, named by its hub id, is refused before it is loaded: its config could not
    tell (check_guidance_decoder)."""
    other = next((f for f in FAMILIES.values() if f.tiny_decoder == str(path_or_id)), family)
    if other.tiny_decoder != family.tiny_decoder:
        raise ValueError(f"ltg: {path_or_id} decodes {other.name} latents, not {family.name}'s: take "
                         f"{family.tiny_decoder}")


def load_guidance_decoder(path_or_id, device="cpu", dtype=torch.float32):
    """A diffusers AutoencoderTiny (TAESD, TAESDXL, TAESD3, TAEF1) for the guidance pass, in eval mode."""
    return AutoencoderTiny.from_pretrained(path_or_id, dtype=dtype).to(device).eval()


def denoiser_for(pipe, prompts, guidance_scale=None, **kwargs):
    """The adapter of `pipe`'s family for one prompt per image; guidance_scale defaults to the family's.
    kwargs: negative_prompt, guidance_decoder, checkpoint_decoder, resolution."""
    family = pipeline_family(pipe)
    if guidance_scale is None:
        guidance_scale = family_defaults(pipe)[1]
    return family.adapter(pipe, list(prompts), guidance_scale, **kwargs)
