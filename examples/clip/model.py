"""Small randomly initialised CLIP (dual text/vision encoder) built from transformers.CLIPConfig.

No downloads: the config is constructed in code and weights are random (seeded).

Inputs (batch B):
  input_ids     int64   [B, 16]         text tokens in [0, VOCAB_SIZE)
  pixel_values  float32 [B, 3, 64, 64]  image (already normalised)
Outputs (plain tensors, not a ModelOutput):
  logits_per_image  float32 [B, B]
  logits_per_text   float32 [B, B]
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel

SEED = 0
VOCAB_SIZE = 1000
SEQ_LEN = 16
IMAGE_SIZE = 64
PATCH_SIZE = 8  # -> 8x8 = 64 patches + CLS = 65 vision tokens
PAD_ID = 0
BOS_ID = VOCAB_SIZE - 2
EOS_ID = VOCAB_SIZE - 1

OUTPUT_NAMES: tuple[str, ...] = ("logits_per_image", "logits_per_text")

MODALITIES: dict[str, str] = {
    "input_ids": "text",
    "pixel_values": "image",
}


def make_config() -> CLIPConfig:
    text_config = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=SEQ_LEN,
        hidden_act="quick_gelu",
        # Like OpenAI CLIP, BOS/EOS are the two highest ids. The text embedding is pooled
        # at the first EOS position (eos_token_id != 2 selects transformers' non-legacy path).
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    vision_config = dict(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_act="quick_gelu",
    )
    cfg = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=64)
    # Eager attention exports to plain MatMul/Softmax; sdpa would also work but eager
    # keeps the graph independent of the installed transformers' attention dispatch.
    cfg._attn_implementation = "eager"
    return cfg


class CLIPWrapper(nn.Module):
    """Returns plain tensors so torch.onnx.export(dynamo=True) sees a simple output tuple."""

    def __init__(self, clip: CLIPModel) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.clip(input_ids=input_ids, pixel_values=pixel_values, return_dict=True)
        return out.logits_per_image, out.logits_per_text


def build_model() -> nn.Module:
    """Seeded, randomly initialised CLIP wrapper in eval mode."""
    torch.manual_seed(SEED)
    clip = CLIPModel(make_config())
    return CLIPWrapper(clip).eval()


def example_inputs(batch: int = 1) -> dict[str, torch.Tensor]:
    """Deterministic example inputs; keys match forward() argument names.

    Token ids are BOS, random ids in [1, BOS_ID), then EOS as the last token, mimicking a
    tokenised, unpadded prompt (CLIP pools the text embedding at the EOS position).
    """
    g = torch.Generator().manual_seed(SEED + 2)
    ids = torch.randint(1, BOS_ID, (batch, SEQ_LEN), generator=g, dtype=torch.int64)
    ids[:, 0] = BOS_ID
    ids[:, -1] = EOS_ID
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
    }


if __name__ == "__main__":
    m = build_model()
    print(f"CLIP: {sum(p.numel() for p in m.parameters()):,} parameters")
    with torch.no_grad():
        outs = m(**example_inputs(2))
    print({k: tuple(v.shape) for k, v in example_inputs(2).items()}, "->", [tuple(o.shape) for o in outs])
