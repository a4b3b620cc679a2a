"""CogVideoX (diffusers CogVideoXTransformer3DModel): joint attention over [text; video] rows
(text first), latents B,F,C,H,W, sincos positions (2B) or 3-D rotary tables (5B)."""

from __future__ import annotations

from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

from ..errors import ConfigError
from .base import FAMILIES, Conditioning, Family, Preset

_COG = dict(
    attention_head_dim=64, in_channels=16, out_channels=16, flip_sin_to_cos=True, freq_shift=0,
    time_embed_dim=512, text_embed_dim=4096, dropout=0.0, attention_bias=True, sample_width=90,
    sample_height=60, sample_frames=49, patch_size=2, temporal_compression_ratio=4,
    max_text_seq_length=226, activation_fn="gelu-approximate", timestep_activation_fn="silu",
    norm_elementwise_affine=True, norm_eps=1e-5, spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0, use_learned_positional_embeddings=False,
)
_TINY = dict(
    _COG, num_attention_heads=2, attention_head_dim=16, time_embed_dim=32, text_embed_dim=32, num_layers=2,
    sample_width=8, sample_height=8, sample_frames=17, max_text_seq_length=16,
)
# The released scheduler configs (scheduler/scheduler_config.json of CogVideoX-2b and -5b).
_SCHED = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
    clip_sample=False, steps_offset=0, timestep_spacing="trailing",
)


@FAMILIES.register("cogvideox")
class CogVideoX(Family):
    name = "cogvideox"
    model_class = CogVideoXTransformer3DModel
    pipeline_class = "CogVideoXPipeline"
    layout = "BFCHW"
    schedulers = ("cogvideox_ddim", "cogvideox_dpm")
    block_containers = ("transformer_blocks",)
    self_attention = ("attn1",)  # the token-mixing attention of a block (others attend to text)
    token_tables = {"image_rotary_emb": 0}  # block arguments indexed by token (argument name: token dim)
    joint_attention = True
    latents_in_model_dtype = True
    pipeline_cfg_per_branch = False  # CogVideoXPipeline calls the transformer once with the CFG batch
    presets = {
        "cogvideox-2b": Preset("cogvideox-2b", dict(_COG, num_attention_heads=30, num_layers=30, use_rotary_positional_embeddings=False), 226, (49, 480, 720)),
        "cogvideox-5b": Preset("cogvideox-5b", dict(_COG, num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True), 226, (49, 480, 720)),
        "tiny": Preset("tiny", dict(_TINY, use_rotary_positional_embeddings=False), 16, (17, 64, 64), "sincos positions, like 2B"),
        "tiny-rotary": Preset("tiny-rotary", dict(_TINY, use_rotary_positional_embeddings=True), 16, (17, 64, 64), "rotary tables, like 5B"),
    }

    def cp_plan(self):
        """diffusers 0.42 gives CogVideoX no `_cp_plan`: the video rows are split at the first
        block's input and the rotary tables (the transformer's input), gathered after proj_out;
        the text rows stay whole on every rank (Ulysses exchanges only the video rows)."""
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        table = ContextParallelInput(split_dim=0, expected_dims=2, split_output=False)
        return {"": {"image_rotary_emb": [table, table]},
                "transformer_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
                "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}

    @staticmethod
    def patch(config):
        return (config.get("patch_size_t") or 1, config["patch_size"], config["patch_size"])

    def video_offset(self, text_rows):
        return text_rows  # [text; video]

    def text_dim(self, config):
        return config["text_embed_dim"]

    def default_text_length(self, config):
        return config["max_text_seq_length"]

    def validate(self, cfg):
        super().validate(cfg)
        config = self.model_config(cfg)
        n = cfg.sampling.text_length
        if n is not None and n != config["max_text_seq_length"]:
            raise ConfigError("sampling.text_length", f"CogVideoX's positional table is built for {config['max_text_seq_length']} text tokens; leave it unset or set that")
        if cfg.sampling.shift is not None:
            raise ConfigError("sampling.shift", "CogVideoX's DDIM/DPM schedulers have no flow shift")

    def make_scheduler(self, name, shift, config, video):
        if name == "default":
            name = "cogvideox_dpm" if config.get("use_rotary_positional_embeddings") else "cogvideox_ddim"
        if name == "cogvideox_dpm":
            return CogVideoXDPMScheduler(**_SCHED, snr_shift_scale=1.0)
        return CogVideoXDDIMScheduler(**_SCHED, snr_shift_scale=3.0)

    def encode(self, pipe, prompts, text_length, device):
        embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=text_length, device=device)
        return Conditioning(embeds)

    def prepare_capture(self, model, video):
        """CogVideoX-2B recomputes its sincos table in forward (numpy) when the video is not the
        config's sample size, which torch.export cannot trace: store the table for this size."""
        pe = model.transformer.patch_embed
        if not pe.use_positional_embeddings or pe.use_learned_positional_embeddings:
            return
        frames = model.geometry.latent_frames(video.frames)
        height, width = video.height // model.geometry.spatial, video.width // model.geometry.spatial  # latent units
        pre = (frames - 1) * pe.temporal_compression_ratio + 1
        if (pe.sample_height, pe.sample_width, pe.sample_frames) != (height, width, pre):
            table = pe._get_positional_embeddings(height, width, pre, device=model.device)
            pe.register_buffer("pos_embedding", table, persistent=False)
            pe.sample_height, pe.sample_width, pe.sample_frames = height, width, pre

    def vae_decode(self, vae, latents):
        return vae.decode(latents.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor).sample

    def static_inputs(self, model, video, sampling):
        config = model.transformer.config
        if not config.use_rotary_positional_embeddings:
            return {"image_rotary_emb": None}
        p, stride = config.patch_size, model.geometry.spatial
        gh, gw = video.height // (stride * p), video.width // (stride * p)
        frames = model.geometry.latent_frames(video.frames)
        base_w, base_h = config.sample_width // p, config.sample_height // p
        if config.patch_size_t is None:  # CogVideoX 1.0, as the pipeline computes it
            crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
            cos, sin = get_3d_rotary_pos_embed(config.attention_head_dim, crops, (gh, gw), frames, device=model.device)
        else:  # CogVideoX 1.5
            pt = config.patch_size_t
            cos, sin = get_3d_rotary_pos_embed(
                config.attention_head_dim, None, (gh, gw), (frames + pt - 1) // pt,
                grid_type="slice", max_size=(base_h, base_w), device=model.device,
            )
        return {"image_rotary_emb": (cos, sin)}

    def model_inputs(self, latents, t, cond, static):
        return dict(
            hidden_states=latents, encoder_hidden_states=cond.embeds, timestep=t.expand(latents.shape[0]),
            image_rotary_emb=static["image_rotary_emb"], return_dict=False,
        )

    def stochastic(self, scheduler) -> bool:
        return isinstance(scheduler, CogVideoXDPMScheduler)

    def scheduler_step(self, scheduler, pred, t, latents, state):
        if not isinstance(scheduler, CogVideoXDPMScheduler):
            return scheduler.step(pred, t, latents, return_dict=False)[0]
        i, timesteps = state["i"], state["timesteps"]
        latents, state["old_pred"] = scheduler.step(  # stochastic: noise from the sample's generator
            pred, state.get("old_pred"), t, timesteps[i - 1] if i > 0 else None, latents,
            generator=state["generator"], return_dict=False,
        )
        return latents
