"""Our STDiT3 (Open-Sora v1.2's transformer, astraea.families.stdit3) against the public
checkpoint's layout and against a float64 computation of the architecture written from the
public source, independently of the module (patches by unfolding, attention by explicit
softmax, rotary positions as complex rotations, the positions by the public meshgrid)."""

from __future__ import annotations

import math

import torch

from astraea.families.stdit3 import STDiT3, STDiT3Config

TOP = ["x_embedder.proj.weight", "x_embedder.proj.bias", "t_block.1.weight", "t_block.1.bias", "y_embedder.y_embedding",
       "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc1.bias", "y_embedder.y_proj.fc2.weight",
       "y_embedder.y_proj.fc2.bias", "rope.freqs", "final_layer.linear.weight", "final_layer.linear.bias",
       "final_layer.scale_shift_table"] + [f"{e}.mlp.{i}.{p}" for e in ("t_embedder", "fps_embedder") for i in (0, 2)
                                           for p in ("weight", "bias")]
BLOCK = ["scale_shift_table", "attn.qkv.weight", "attn.qkv.bias", "attn.q_norm.weight", "attn.k_norm.weight",
         "attn.proj.weight", "attn.proj.bias", "cross_attn.q_linear.weight", "cross_attn.q_linear.bias",
         "cross_attn.kv_linear.weight", "cross_attn.kv_linear.bias", "cross_attn.proj.weight", "cross_attn.proj.bias",
         "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
TINY = STDiT3Config(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=8)


def test_the_checkpoint_layout_at_the_real_size():
    """STDiT3-XL/2: the public key names, no more, and the shapes its config implies."""
    with torch.device("meta"):
        model = STDiT3(STDiT3Config())
    sd = model.state_dict()
    want = set(TOP) | {f"{kind}_blocks.{i}.{k}" for kind in ("spatial", "temporal") for i in range(28) for k in BLOCK}
    assert set(sd) == want
    assert sd["x_embedder.proj.weight"].shape == (1152, 4, 1, 2, 2) and sd["rope.freqs"].shape == (36,)
    assert sd["y_embedder.y_embedding"].shape == (300, 4096) and sd["final_layer.linear.weight"].shape == (32, 1152)
    assert sd["spatial_blocks.0.attn.q_norm.weight"].shape == (72,) and sd["t_block.1.weight"].shape == (6912, 1152)
    assert 1.0e9 < sum(p.numel() for p in model.parameters()) < 1.3e9  # "1.1B"


def _reference(sd, cfg, x, timestep, y, mask, fps, height, width):
    f = {k: v.double() for k, v in sd.items()}
    c, heads = cfg.hidden_size, cfg.num_heads
    d = c // heads

    def lin(h, name):
        return h @ f[name + ".weight"].T + f[name + ".bias"]

    def ln(h):
        return (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)

    def gelu(h):
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))

    def mlp(h, name):
        return lin(gelu(lin(h, name + ".fc1")), name + ".fc2")

    def embed(tt, name):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
        e = torch.cat([torch.cos(tt[:, None] * freqs), torch.sin(tt[:, None] * freqs)], -1)
        h = lin(e, name + ".mlp.0")
        return lin(h * torch.sigmoid(h), name + ".mlp.2")

    def rms(h, name):
        return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * f[name]

    def attend(q, k, v, bias=None):  # (G, heads, n, d)
        s = q @ k.transpose(-1, -2) / math.sqrt(d)
        if bias is not None:
            s = s + bias
        return torch.softmax(s, -1) @ v

    b, cin, frames, hh, ww = x.shape
    pt, ph, pw = cfg.patch_size
    tt, hp, wp = frames // pt, hh // ph, ww // pw
    s_ = hp * wp
    patches = x.double().reshape(b, cin, tt, pt, hp, ph, wp, pw).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, tt * s_, -1)
    h = patches @ f["x_embedder.proj.weight"].reshape(c, -1).T + f["x_embedder.proj.bias"]
    # positions, the public way: meshgrid(w, h) "here w goes first", transposed
    scale, base = math.sqrt(float(height[0]) * float(width[0])) / cfg.input_sq_size, round(s_**0.5)
    gh = torch.arange(hp, dtype=torch.float64) / scale * (base / hp)
    gw = torch.arange(wp, dtype=torch.float64) / scale * (base / wp)
    a, bb = torch.meshgrid(gw, gh, indexing="ij")
    inv = 1.0 / (10000 ** (torch.arange(0, c // 2, 2, dtype=torch.float64) / (c // 2)))

    def sincos(p):
        o = p.t().reshape(-1)[:, None] * inv
        return torch.cat([o.sin(), o.cos()], -1)

    pos = torch.cat([sincos(a), sincos(bb)], -1)
    h = (h.view(b, tt, s_, c) + pos).view(b, tt * s_, c)
    t = embed(timestep.double(), "t_embedder") + embed(fps.double().expand(b), "fps_embedder")
    t6 = lin(t * torch.sigmoid(t), "t_block.1").view(b, 6, c)
    yy = mlp(y.double(), "y_embedder.y_proj")
    bias = torch.where(mask, 0.0, -math.inf).double()[:, None, None, :]
    freqs = f["rope.freqs"]
    for i in range(cfg.depth):
        for kind in ("spatial", "temporal"):
            p = f"{kind}_blocks.{i}."
            sh1, sc1, g1, sh2, sc2, g2 = (f[p + "scale_shift_table"][None] + t6).chunk(6, dim=1)
            m = ln(h) * (1 + sc1) + sh1
            qkv = lin(m, p + "attn.qkv").view(b, tt, s_, 3, heads, d)
            q, k, v = qkv.unbind(3)  # (b, tt, s_, heads, d)
            q, k = rms(q, p + "attn.q_norm.weight"), rms(k, p + "attn.k_norm.weight")
            if kind == "temporal":
                ang = torch.arange(tt, dtype=torch.float64)[:, None] * freqs  # (tt, d/2)
                rot = torch.polar(torch.ones_like(ang), ang)[None, :, None, None]

                def rope(z):
                    zc = torch.view_as_complex(z.reshape(*z.shape[:-1], d // 2, 2).contiguous()) * rot
                    return torch.view_as_real(zc).reshape(z.shape)

                q, k = rope(q), rope(k)
                o = attend(*(z.permute(0, 2, 3, 1, 4).reshape(b * s_, heads, tt, d) for z in (q, k, v)))
                o = o.reshape(b, s_, heads, tt, d).permute(0, 3, 1, 2, 4)
            else:
                o = attend(*(z.permute(0, 1, 3, 2, 4).reshape(b * tt, heads, s_, d) for z in (q, k, v)))
                o = o.reshape(b, tt, heads, s_, d).permute(0, 1, 3, 2, 4)
            h = h + g1 * lin(o.reshape(b, tt * s_, c), p + "attn.proj")
            cq = lin(h, p + "cross_attn.q_linear").view(b, -1, heads, d).transpose(1, 2)
            ck, cv = lin(yy, p + "cross_attn.kv_linear").view(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
            co = attend(cq, ck, cv, bias).transpose(1, 2).reshape(b, -1, c)
            h = h + lin(co, p + "cross_attn.proj")
            h = h + g2 * mlp(ln(h) * (1 + sc2) + sh2, p + "mlp")
    sh, sc = (f["final_layer.scale_shift_table"][None] + t[:, None]).chunk(2, dim=1)
    out = lin(ln(h) * (1 + sc) + sh, "final_layer.linear")
    out = out.view(b, tt, hp, wp, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return out.reshape(b, -1, tt * pt, hp * ph, wp * pw)


def test_a_forward_is_the_architecture_in_float64():
    torch.manual_seed(0)
    model = STDiT3(TINY).eval()
    for p in model.parameters():  # random everything (the released init zeroes some projections)
        torch.nn.init.normal_(p, std=0.1)  # at 0.3 the outputs reach 70 and float32 rounding hides a missing rotary
    x = torch.randn(2, 4, 3, 8, 12)  # a 4 x 6 patch grid: rows and columns differ
    y = torch.randn(2, TINY.model_max_length, TINY.caption_channels)
    mask = torch.ones(2, TINY.model_max_length, dtype=torch.bool)
    mask[1, 5:] = False  # the second caption is shorter
    timestep, fps = torch.tensor([800.0, 800.0]), torch.tensor([24.0])
    height, width = torch.tensor([240.0, 240.0]), torch.tensor([426.0, 426.0])
    with torch.no_grad():
        (got,) = model(x, timestep, y, mask, fps, height, width)
    want = _reference(model.state_dict(), TINY, x, timestep, y, mask, fps, height, width)
    assert got.shape == (2, 8, 3, 8, 12) and got.dtype == torch.float32
    # float32 against float64 (outputs up to about 4): 5e-6 relative L2 and 3e-5 at worst on this
    # CPU (the float32 sin/cos of t = 800 round differently from one CPU's math library to
    # another's); without the temporal rotary 1.4e-4 and 1.8e-3
    err = got.double() - want
    assert (err.norm() / want.norm()).item() < 4e-5
    torch.testing.assert_close(got.double(), want, atol=3e-4, rtol=1e-4)
