"""PyTorch reference ViTs written from the published key names and shapes (no timm,
torchvision or open_clip needed). Module and parameter names, their registration order (which
is the state_dict order) and the forward passes mirror:

- `TimmViT`: timm `timm/models/vision_transformer.py` `VisionTransformer`: fused `attn.qkv`
  reshaped to (B, N, 3, heads, head_dim); `global_pool="token"` (`norm` then the class token)
  or `"avg"` with `class_token=False` (`norm` an Identity, `fc_norm` on the token mean);
  `pre_norm` adds `norm_pre` and drops the patch conv's bias, as timm's CLIP models.
- `TorchvisionViT`: torchvision `models/vision_transformer.py`: `conv_proj`, `class_token`,
  `encoder.pos_embedding`, `encoder.layers.encoder_layer_{i}` with `nn.MultiheadAttention
  (batch_first=True)` and `mlp` = Linear, GELU, Dropout, Linear, Dropout; `heads.head`.
- `OpenClipVisual` / `OpenClip`: open_clip `src/open_clip/transformer.py` `VisionTransformer`
  (conv1 without bias, `class_embedding` (D,), `positional_embedding` (T, D), `ln_pre`,
  `transformer.resblocks` with `nn.MultiheadAttention` on (L, N, D), `mlp.c_fc` / `gelu` /
  `c_proj`, `ln_post`, `proj` (D, out)), GELU or QuickGELU; `OpenClip` adds a small text tower
  so its state_dict has the CLIP model's other keys.
"""

from collections import OrderedDict

import torch
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


ACTS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


# ------------------------------------------------------------------------------------- timm
class TimmAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TimmMlp(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTS[act]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, dim, heads, hidden, act, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = TimmMlp(dim, hidden, act)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmPatchEmbed(nn.Module):
    def __init__(self, patch, in_chans, dim, bias):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch, bias=bias)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major patches


class TimmViT(nn.Module):
    def __init__(self, img=8, patch=2, in_chans=3, num_classes=5, dim=16, depth=2, heads=4,
                 mlp_ratio=2.0, global_pool="token", pre_norm=False, act="gelu", eps=1e-6):
        super().__init__()
        avg = global_pool == "avg"  # with class_token=False (timm's "gap" models)
        self.global_pool = global_pool
        self.patch_embed = TimmPatchEmbed(patch, in_chans, dim, bias=not pre_norm)
        self.cls_token = None if avg else nn.Parameter(torch.zeros(1, 1, dim))
        tokens = (img // patch) ** 2 + (not avg)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.norm_pre = nn.LayerNorm(dim, eps=eps) if pre_norm else nn.Identity()
        self.blocks = nn.Sequential(*[TimmBlock(dim, heads, int(dim * mlp_ratio), act, eps)
                                      for _ in range(depth)])
        self.norm = nn.Identity() if avg else nn.LayerNorm(dim, eps=eps)
        self.fc_norm = nn.LayerNorm(dim, eps=eps) if avg else nn.Identity()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm_pre(x + self.pos_embed)
        x = self.norm(self.blocks(x))
        x = x.mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        return self.head(self.fc_norm(x))


# ------------------------------------------------------------------------------ torchvision
class TorchvisionEncoderBlock(nn.Module):
    def __init__(self, heads, dim, mlp_dim):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(mlp_dim, dim), nn.Dropout(0.0))

    def forward(self, inputs):
        x = self.ln_1(inputs)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + inputs
        return x + self.mlp(self.ln_2(x))


class TorchvisionEncoder(nn.Module):
    def __init__(self, seq_length, depth, heads, dim, mlp_dim):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", TorchvisionEncoderBlock(heads, dim, mlp_dim))
            for i in range(depth)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class TorchvisionViT(nn.Module):
    def __init__(self, img=8, patch=2, depth=2, heads=4, dim=16, mlp_dim=32, num_classes=5):
        super().__init__()
        self.patch_size, self.hidden_dim = patch, dim
        self.conv_proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = TorchvisionEncoder((img // patch) ** 2 + 1, depth, heads, dim, mlp_dim)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, num_classes)))

    def forward(self, x):
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.hidden_dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


# -------------------------------------------------------------------------------- open_clip
class ResidualAttentionBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, act):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)  # open_clip's LayerNorm: torch's, eps 1e-5
        self.attn = nn.MultiheadAttention(dim, heads)  # sequence first: (L, N, D)
        self.ln_2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(dim, hidden)), ("gelu", ACTS[act]()),
            ("c_proj", nn.Linear(hidden, dim))]))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, dim, depth, heads, mlp_ratio, act):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(dim, heads, mlp_ratio, act)
                                       for _ in range(depth))

    def forward(self, x):  # (N, L, D) in and out, as open_clip's
        x = x.transpose(0, 1)
        for block in self.resblocks:
            x = block(x)
        return x.transpose(0, 1)


class OpenClipVisual(nn.Module):
    def __init__(self, img=8, patch=2, dim=16, depth=2, heads=4, mlp_ratio=4.0, output_dim=8,
                 act="gelu"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, dim, kernel_size=patch, stride=patch, bias=False)
        scale = dim ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(dim))
        self.positional_embedding = nn.Parameter(scale * torch.randn((img // patch) ** 2 + 1, dim))
        self.ln_pre = nn.LayerNorm(dim)
        self.transformer = Transformer(dim, depth, heads, mlp_ratio, act)
        self.ln_post = nn.LayerNorm(dim)
        self.proj = nn.Parameter(scale * torch.randn(dim, output_dim))

    def forward(self, x):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_post(self.transformer(self.ln_pre(x)))
        return x[:, 0] @ self.proj  # pool_type "tok", ln_post before pooling


class OpenClip(nn.Module):
    """A CLIP model: the visual tower under `visual.` and a (tiny) text tower beside it."""

    def __init__(self, act="gelu", **visual):
        super().__init__()
        self.visual = OpenClipVisual(act=act, **visual)
        width, out = 8, self.visual.proj.shape[1]
        self.transformer = Transformer(width, 1, 2, 4.0, act)
        self.token_embedding = nn.Embedding(50, width)
        self.positional_embedding = nn.Parameter(torch.randn(7, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, out))
        self.logit_scale = nn.Parameter(torch.ones([]) * 2.6592)


@torch.no_grad()
def randomize(model, seed=0):
    """Random weights keeping activations O(1): linear / conv weights ~ N(0, 1/fan_in), biases
    and LayerNorm shifts U(-0.1, 0.1), LayerNorm scales U(0.5, 1.5), class tokens and position
    embeddings N(0, 0.5^2). Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    norm_scales = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm)}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if id(p) in norm_scales:
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif leaf in ("cls_token", "class_token", "class_embedding", "pos_embed",
                      "pos_embedding", "positional_embedding"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        elif p.ndim >= 2:
            fan_in = p.shape[0] if leaf == "proj" and p.ndim == 2 else p[0].numel()  # x @ proj
            p.copy_(torch.randn(p.shape, generator=g) * fan_in ** -0.5)
        else:
            p.copy_(torch.rand(p.shape, generator=g) * 0.2 - 0.1)
    return model.eval()
