"""Three-branch late-fusion multimodal classifier (image + text + audio).

Modelled on the MMBench AV-MNIST / CMU-MOSEI late-fusion workloads:
each modality is encoded independently, the pooled features are
concatenated, and an MLP head produces class logits.

Inputs (batch B):
  pixel_values   float32 [B, 3, 64, 64]   image
  input_ids      int64   [B, 16]          text tokens in [0, VOCAB_SIZE)
  input_features float32 [B, 40, 100]     audio log-mel spectrogram (40 mels x 100 frames)
Output:
  logits         float32 [B, 10]
"""
from __future__ import annotations

import torch
from torch import nn

SEED = 0
VOCAB_SIZE = 1000
SEQ_LEN = 16
IMAGE_SIZE = 64
N_MELS = 40
N_FRAMES = 100
NUM_CLASSES = 10

OUTPUT_NAMES: tuple[str, ...] = ("logits",)

MODALITIES: dict[str, str] = {
    "pixel_values": "image",
    "input_ids": "text",
    "input_features": "audio",
}


def _conv2d_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def _conv1d_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm1d(cout),
        nn.ReLU(),
        nn.MaxPool1d(2),
    )


class ImageBranch(nn.Module):
    """Conv-BN-ReLU-MaxPool x3, global average pool -> [B, 128]."""

    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv2d_block(3, 32),   # 64 -> 32
            _conv2d_block(32, 64),  # 32 -> 16
            _conv2d_block(64, dim),  # 16 -> 8
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class TextBranch(nn.Module):
    """Token + learned positional embedding, 2 post-LN transformer layers, mean pool -> [B, 128]."""

    def __init__(self, vocab: int = VOCAB_SIZE, seq_len: int = SEQ_LEN, dim: int = 128,
                 heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, seq_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=dim, nhead=heads, dim_feedforward=4 * dim, dropout=0.0,
            activation="gelu", batch_first=True, norm_first=False,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos[:, : ids.shape[1]]
        h = self.norm(self.encoder(h))
        return h.mean(dim=1)


class AudioBranch(nn.Module):
    """Conv1d-BN-ReLU-MaxPool x3 over time (mels as channels), global average pool -> [B, 128]."""

    def __init__(self, n_mels: int = N_MELS, dim: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv1d_block(n_mels, 64),  # 100 -> 50
            _conv1d_block(64, 128),     # 50 -> 25
            _conv1d_block(128, dim),    # 25 -> 12
        )
        self.pool = nn.AdaptiveAvgPool1d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class LateFusionModel(nn.Module):
    def __init__(self, dim: int = 128, hidden: int = 256, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.image = ImageBranch(dim)
        self.text = TextBranch(dim=dim)
        self.audio = AudioBranch(dim=dim)
        self.head = nn.Sequential(
            nn.Linear(3 * dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                input_features: torch.Tensor) -> torch.Tensor:
        fused = torch.cat(
            [self.image(pixel_values), self.text(input_ids), self.audio(input_features)], dim=-1
        )
        return self.head(fused)


def _randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    # Non-trivial running stats / affine params so BN folding is actually exercised.
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def build_model() -> nn.Module:
    """Seeded, randomly initialised model in eval mode."""
    torch.manual_seed(SEED)
    model = LateFusionModel()
    _randomize_batchnorm(model, torch.Generator().manual_seed(SEED + 1))
    return model.eval()


def example_inputs(batch: int = 1) -> dict[str, torch.Tensor]:
    """Deterministic example inputs; keys match forward() argument names."""
    g = torch.Generator().manual_seed(SEED + 2)
    return {
        "pixel_values": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
        "input_ids": torch.randint(0, VOCAB_SIZE, (batch, SEQ_LEN), generator=g, dtype=torch.int64),
        "input_features": torch.randn(batch, N_MELS, N_FRAMES, generator=g),
    }


if __name__ == "__main__":
    m = build_model()
    print(f"{type(m).__name__}: {sum(p.numel() for p in m.parameters()):,} parameters")
    with torch.no_grad():
        print({k: tuple(v.shape) for k, v in example_inputs(2).items()}, "->", tuple(m(**example_inputs(2)).shape))
