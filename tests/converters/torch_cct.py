"""A PyTorch reference CCT, written from the published layout of SHI-Labs/Compact-Transformers
(module names, so state_dict keys, and the eval-mode forward pass), with no dropout or
stochastic depth: what `mergejax.converters.cct_layout` must match.

    CCT
      tokenizer.conv_layers[j] = Sequential(Conv2d(k, stride, padding, bias=False), ReLU,
                                            MaxPool2d(3, 2, 1))
      classifier.positional_emb (1, T, D) Parameter (the sine table with requires_grad=False)
      classifier.attention_pool Linear(D, 1)
      classifier.blocks[i]: pre_norm, self_attn.{qkv Linear(D, 3D, bias=False), proj},
                            linear1, norm1, linear2
      classifier.norm, classifier.fc
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Tokenizer(nn.Module):
    def __init__(self, channels, kernel_size, stride, padding):
        super().__init__()
        self.conv_layers = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=False),
                          nn.ReLU(), nn.MaxPool2d(3, 2, 1))
            for c_in, c_out in zip(channels[:-1], channels[1:])])

    def forward(self, x):
        return self.conv_layers(x).flatten(2).transpose(1, 2)  # (B, H*W, D)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, T, head_dim)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.linear1 = nn.Linear(dim, hidden)
        self.norm1 = nn.LayerNorm(dim)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.self_attn(self.pre_norm(x))
        x = self.norm1(x)
        return x + self.linear2(F.gelu(self.linear1(x)))


def sine_table(tokens, dim):
    pe = torch.FloatTensor([[p / (10000 ** (2 * (i // 2) / dim)) for i in range(dim)]
                            for p in range(tokens)])
    pe[:, 0::2] = torch.sin(pe[:, 0::2])
    pe[:, 1::2] = torch.cos(pe[:, 1::2])
    return pe.unsqueeze(0)


class Classifier(nn.Module):
    def __init__(self, dim, depth, heads, mlp_ratio, num_classes, tokens, positional):
        super().__init__()
        self.attention_pool = nn.Linear(dim, 1)
        if positional == "learnable":
            self.positional_emb = nn.Parameter(torch.randn(1, tokens, dim) * 0.2)
        elif positional == "sine":
            self.positional_emb = nn.Parameter(sine_table(tokens, dim), requires_grad=False)
        else:
            self.positional_emb = None
        self.blocks = nn.ModuleList(EncoderLayer(dim, heads, int(dim * mlp_ratio))
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        if self.positional_emb is not None:
            x = x + self.positional_emb
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        weights = F.softmax(self.attention_pool(x), dim=1)  # (B, T, 1)
        return self.fc((weights.transpose(1, 2) @ x).squeeze(1))


class CCT(nn.Module):
    def __init__(self, img_size=32, in_channels=3, dim=128, depth=2, heads=2, mlp_ratio=1.0,
                 num_classes=10, conv_layers=2, kernel_size=3, conv_width=64,
                 positional="learnable"):
        super().__init__()
        stride, padding = max(1, kernel_size // 2 - 1), max(1, kernel_size // 2)
        channels = [in_channels] + [conv_width] * (conv_layers - 1) + [dim]
        self.tokenizer = Tokenizer(channels, kernel_size, stride, padding)
        with torch.no_grad():
            tokens = self.tokenizer(torch.zeros(1, in_channels, img_size, img_size)).shape[1]
        self.classifier = Classifier(dim, depth, heads, mlp_ratio, num_classes, tokens,
                                     positional)

    def forward(self, x):
        return self.classifier(self.tokenizer(x))
