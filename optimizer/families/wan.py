"""Wan 2.1 text-to-video (diffusers WanTransformer3DModel): self-attention over video tokens,
cross-attention to umT5 text, latents B,C,F,H,W, timestep per sample."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanTransformer3DModel

from .. import bundled
from .base import FAMILIES, Conditioning, Family, Geometry, Preset

_WAN = dict(
    patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
    freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)


@FAMILIES.register("wan")
class Wan(Family):
    name = "wan"
    model_class = WanTransformer3DModel
    pipeline_class = "WanPipeline"
    layout = "BCFHW"
    schedulers = ("flow_match_euler", "unipc")
    block_containers = ("blocks",)
    self_attention = ("attn1",)  # the token-mixing attention of a block (others attend to text)
    token_tables = {"rotary_emb": 1}  # block arguments indexed by token (argument name: token dim)
    presets = {
        "wan2.1-t2v-1.3b": Preset("wan2.1-t2v-1.3b", dict(_WAN, num_attention_heads=12, ffn_dim=8960, num_layers=30), 512, (81, 480, 832)),
        "wan2.1-t2v-14b": Preset("wan2.1-t2v-14b", dict(_WAN, num_attention_heads=40, ffn_dim=13824, num_layers=40), 512, (81, 720, 1280)),
        "tiny": Preset(
            "tiny",
            dict(_WAN, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64),
            16, (17, 64, 64), "2 blocks, 2 heads x 16, random weights: tests",
        ),
        "bundled": Preset(
            "bundled", bundled.CONFIG, bundled.TEXT_LENGTH, bundled.VIDEO,
            "the reference model trained here (docs/reference-model.md): pixel-patchify codec",
            geometry=Geometry(bundled.codec.SPATIAL, bundled.codec.TEMPORAL), weights=str(bundled.WEIGHTS),
            shift=bundled.SHIFT,
        ),
    }

    @staticmethod
    def patch(config):
        return tuple(config.get("patch_size", (1, 2, 2)))

    def text_dim(self, config):
        return config.get("text_dim", 4096)

    def default_text_length(self, config):
        return 512

    def make_scheduler(self, name, shift, config, video):
        shift = shift if shift is not None else (5.0 if video.height * video.width >= 1280 * 720 else 3.0)
        if name == "unipc":
            return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
        return FlowMatchEulerDiscreteScheduler(shift=shift)

    def encode(self, pipe, prompts, text_length, device):
        embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=text_length, device=device)
        return Conditioning(embeds)

    def vae_decode(self, vae, latents):
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape).to(latents.dtype)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape).to(latents.dtype)
        return vae.decode(latents * std + mean, return_dict=False)[0]

    def model_inputs(self, latents, t, cond, static):
        return dict(
            hidden_states=latents, timestep=t.expand(latents.shape[0]), encoder_hidden_states=cond.embeds, return_dict=False
        )
