"""Small random-weight transformers models (CLIP, BLIP, Whisper encoder) for end-to-end tests.

Built from configs, nothing downloaded; each wrapper returns plain tensors so the dynamo
exporter sees a flat output signature.
"""

from __future__ import annotations

import torch
from torch import nn

_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


class _DualEncoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, pixel_values):
        out = self.model(input_ids=input_ids, pixel_values=pixel_values)
        return out.logits_per_image, out.text_embeds, out.image_embeds


class _Encoder(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_features):
        return self.encoder(input_features=input_features).last_hidden_state


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class ResNetSmall(nn.Module):
    """torchvision's ResNet-18 layout at reduced width and depth (torchvision has no CPU wheel
    here, so the structure is written out)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.layers = nn.Sequential(_BasicBlock(16, 16, 1), _BasicBlock(16, 32, 2),
                                    _BasicBlock(32, 64, 2))
        self.fc = nn.Linear(64, classes)

    def forward(self, pixel_values):
        x = self.layers(self.stem(pixel_values))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(module in eval mode, example inputs) for 'clip', 'blip', 'whisper_encoder', 'resnet'."""
    torch.manual_seed(0)
    if name == "resnet":
        return ResNetSmall().eval(), {"pixel_values": torch.randn(1, 3, 64, 64)}
    import transformers as tf
    if name == "clip":
        config = tf.CLIPConfig(
            text_config=dict(_TINY, vocab_size=1000, max_position_embeddings=16),
            vision_config=dict(_TINY, image_size=32, patch_size=8), projection_dim=32)
        module = _DualEncoder(tf.CLIPModel(config))
    elif name == "blip":
        config = tf.BlipConfig(
            text_config=dict(_TINY, vocab_size=1000, max_position_embeddings=32,
                             encoder_hidden_size=64, bos_token_id=1, pad_token_id=0,
                             eos_token_id=2, sep_token_id=3),
            vision_config=dict(_TINY, image_size=32, patch_size=8), projection_dim=32)
        module = _DualEncoder(tf.BlipModel(config))
    elif name == "whisper_encoder":
        config = tf.WhisperConfig(
            d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
            max_source_positions=50, vocab_size=1000, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, decoder_start_token_id=1)
        module = _Encoder(tf.WhisperModel(config).encoder)
        return module.eval(), {"input_features": torch.randn(1, 80, 100)}
    else:
        raise KeyError(name)
    inputs = {"input_ids": torch.randint(0, 1000, (1, 16)),
              "pixel_values": torch.randn(1, 3, 32, 32)}
    return module.eval(), inputs
