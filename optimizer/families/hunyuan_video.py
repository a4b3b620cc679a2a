"""HunyuanVideo (diffusers HunyuanVideoTransformer3DModel): dual-stream then single-stream
blocks, joint attention over [video; text] rows (video first) with a text key mask, pooled
CLIP projections, and distilled (embedded) guidance; latents B,C,F,H,W."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel

from ..errors import ConfigError
from .base import FAMILIES, Conditioning, Family, Preset, _pseudo_vector, pseudo_embedding

_HY = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
    qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
    rope_theta=256.0, rope_axes_dim=(16, 56, 56),
)


@FAMILIES.register("hunyuan_video")
class HunyuanVideo(Family):
    name = "hunyuan_video"
    model_class = HunyuanVideoTransformer3DModel
    pipeline_class = "HunyuanVideoPipeline"
    layout = "BCFHW"
    schedulers = ("flow_match_euler",)
    block_containers = ("transformer_blocks", "single_transformer_blocks")
    self_attention = ("attn",)  # the token-mixing attention of a block (others attend to text)
    token_tables = {"image_rotary_emb": 0, "freqs_cis": 0}  # block arguments indexed by token (argument name: token dim)
    joint_attention = True
    embedded_guidance = True  # distilled guidance (sampling.embedded_guidance, default 6.0)
    presets = {
        "hunyuanvideo": Preset("hunyuanvideo", dict(_HY), 256, (129, 544, 960)),
        "tiny": Preset(
            "tiny",
            dict(_HY, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
                 num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6)),
            16, (17, 64, 64), "1 dual- and 1 single-stream block",
        ),
    }

    def cp_plan(self):
        """diffusers 0.42 gives HunyuanVideo no `_cp_plan`: the video rows are split at the patch
        embedding's output (so the key mask the forward builds next has this rank's length:
        its video keys all valid, the text's padding masked) and the rotary tables at theirs,
        gathered after proj_out; the text rows stay whole on every rank (Ulysses exchanges only
        the video rows)."""
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        table = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
        return {"x_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
                "rope": {0: table, 1: table},
                "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}

    @staticmethod
    def patch(config):
        return (config.get("patch_size_t", 1), config["patch_size"], config["patch_size"])

    def text_dim(self, config):
        return config["text_embed_dim"]

    def default_text_length(self, config):
        return 256

    def validate(self, cfg):
        super().validate(cfg)
        if cfg.sampling.text_length is not None and cfg.sampling.text_length > 256:
            raise ConfigError("sampling.text_length", "HunyuanVideo's prompt template crops text to at most 256 tokens")

    def make_scheduler(self, name, shift, config, video):
        return FlowMatchEulerDiscreteScheduler(shift=7.0 if shift is None else shift)

    def set_timesteps(self, scheduler, steps, device):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device=device)
        return scheduler.timesteps

    def pseudo_condition(self, prompt, config, text_length):
        embeds, mask = pseudo_embedding(prompt, text_length, config["text_embed_dim"])
        pooled = _pseudo_vector(f"pooled:{' '.join(prompt.lower().split())}", config["pooled_projection_dim"])
        return Conditioning(embeds[None], mask[None], pooled[None])

    def encode(self, pipe, prompts, text_length, device):
        embeds, pooled, mask = pipe.encode_prompt(prompts, prompts, max_sequence_length=text_length, device=device)
        return Conditioning(embeds, mask, pooled)

    def vae_decode(self, vae, latents):
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]

    def static_inputs(self, model, video, sampling):
        g = 6.0 if sampling.embedded_guidance is None else sampling.embedded_guidance
        return {"guidance": torch.tensor([g * 1000.0], device=model.device, dtype=model.dtype)}

    def model_inputs(self, latents, t, cond, static):
        b = latents.shape[0]
        return dict(
            hidden_states=latents, timestep=t.expand(b).to(latents.dtype), encoder_hidden_states=cond.embeds,
            encoder_attention_mask=cond.mask, pooled_projections=cond.pooled,
            guidance=static["guidance"].expand(b), return_dict=False,
        )
