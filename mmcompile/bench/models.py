"""The suite's own torch modules (CLIP and late fusion come from ``examples/``).

Sizes are chosen so that one forward pass at batch 1 costs tens to a few hundred MFLOPs: large
enough that kernels, not Python, dominate, small enough for a 2-core machine. Transformers
models use eager attention, which exports to plain MatMul/Softmax whatever attention kernels
the installed transformers prefers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _conv_block(cin: int, cout: int, kernel: int, stride: int = 1, pool: bool = True,
                norm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU())
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def _encoder_layer(dim: int, heads: int, ffn: int) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(dim, heads, ffn, dropout=0.0, activation="gelu",
                                      batch_first=True)


class AVMnist(nn.Module):
    """AV-MNIST (MMBench): LeNet-style CNNs on the digit image and on the spoken digit's
    spectrogram, global-average pooled, concatenated, MLP -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(_conv_block(1, 16, 5), _conv_block(16, 32, 5),
                                   _conv_block(32, 64, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.audio = nn.Sequential(_conv_block(1, 16, 5), _conv_block(16, 32, 5),
                                   _conv_block(32, 64, 3), _conv_block(64, 64, 3),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(128, 100), nn.ReLU(), nn.Linear(100, 10))

    def forward(self, image: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.image(image), self.audio(audio)], dim=1))


class MMImdb(nn.Module):
    """MM-IMDb (MMBench): poster CNN + BERT-style plot encoder (pooled [CLS]), concatenated,
    MLP -> 23 genre logits (multi-label)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel
        self.image = nn.Sequential(_conv_block(3, 32, 3, 2, pool=False, norm=True),
                                   _conv_block(32, 64, 3, 2, pool=False, norm=True),
                                   _conv_block(64, 128, 3, 2, pool=False, norm=True),
                                   _conv_block(128, 128, 3, 2, pool=False, norm=True),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten())
        config = BertConfig(vocab_size=2000, hidden_size=128, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=512,
                            max_position_embeddings=64)
        config._attn_implementation = "eager"
        self.text = BertModel(config)
        self.head = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 23))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        text = self.text(input_ids=input_ids).pooler_output
        return self.head(torch.cat([self.image(pixel_values), text], dim=1))


class _SequenceEncoder(nn.Module):
    """[B, T, F] features -> Linear -> one transformer layer -> mean over time -> Linear."""

    def __init__(self, features: int, dim: int, heads: int, out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(features, dim)
        self.encoder = nn.TransformerEncoder(_encoder_layer(dim, heads, 2 * dim), num_layers=1,
                                             enable_nested_tensor=False)
        self.out = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(self.proj(x)).mean(dim=1))


class MoseiTFN(nn.Module):
    """CMU-MOSEI with Tensor Fusion (Zadeh et al. 2017): each modality vector gets a constant 1
    appended, the three are combined by an outer product (33 x 17 x 17 = 9537 features, which
    keeps every uni-, bi- and tri-modal interaction), flattened and regressed to sentiment.

    The features are GloVe text (300), COVAREP audio (74) and FACET vision (35) per step.
    """

    def __init__(self, steps: int = 50) -> None:
        super().__init__()
        self.text = _SequenceEncoder(300, 64, 4, 32)
        self.audio = _SequenceEncoder(74, 32, 4, 16)
        self.vision = _SequenceEncoder(35, 32, 4, 16)
        self.head = nn.Sequential(nn.Linear(33 * 17 * 17, 128), nn.ReLU(), nn.Linear(128, 128),
                                  nn.ReLU(), nn.Linear(128, 1))

    def forward(self, text: torch.Tensor, audio: torch.Tensor,
                vision: torch.Tensor) -> torch.Tensor:
        t = F.pad(self.text(text), (0, 1), value=1.0)
        a = F.pad(self.audio(audio), (0, 1), value=1.0)
        v = F.pad(self.vision(vision), (0, 1), value=1.0)
        # Broadcast products, not einsum/bmm: the same outer product in ops every engine has.
        fused = t[:, :, None, None] * a[:, None, :, None] * v[:, None, None, :]
        return self.head(fused.flatten(1))


class _LastHidden(nn.Module):
    """[B, T, F] -> LSTM -> the last hidden state -> Linear: a TFN modality sub-network."""

    def __init__(self, features: int, hidden: int, out: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.out = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(x)
        return self.out(h[-1])


class MoseiLSTM(MoseiTFN):
    """CMU-MOSEI Tensor Fusion with LSTM sub-networks over the steps, as the original TFN
    and MMBench's MOSEI models have them (text 300 -> 128 hidden, audio 74 -> 32, vision
    35 -> 32), the same fusion and head as :class:`MoseiTFN`."""

    def __init__(self, steps: int = 50) -> None:
        super().__init__(steps)
        self.text = _LastHidden(300, 128, 32)
        self.audio = _LastHidden(74, 32, 16)
        self.vision = _LastHidden(35, 32, 16)


class WhisperText(nn.Module):
    """A Whisper encoder (WhisperConfig, 80 mels x 100 frames -> 50 positions) and a small text
    transformer, each mean-pooled, concatenated, MLP -> 10 classes (audio-text classification)."""

    def __init__(self, vocab: int = 1000, seq_len: int = 16) -> None:
        super().__init__()
        from transformers import WhisperConfig, WhisperModel
        config = WhisperConfig(d_model=128, encoder_layers=2, encoder_attention_heads=4,
                               encoder_ffn_dim=256, decoder_layers=1, decoder_attention_heads=4,
                               decoder_ffn_dim=128, num_mel_bins=80, max_source_positions=50,
                               vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               decoder_start_token_id=1)
        config._attn_implementation = "eager"
        self.audio = WhisperModel(config).get_encoder()
        self.tok = nn.Embedding(vocab, 128)
        self.pos = nn.Parameter(torch.randn(1, seq_len, 128) * 0.02)
        self.text = nn.TransformerEncoder(_encoder_layer(128, 4, 256), num_layers=2,
                                          enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 10))

    def forward(self, input_features: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        audio = self.audio(input_features=input_features).last_hidden_state.mean(dim=1)
        text = self.text(self.tok(input_ids) + self.pos).mean(dim=1)
        return self.head(torch.cat([audio, text], dim=1))


# -- real architectures written out (MobileNetV3, YOLOv8): the layer kinds deployed vision models
# use (depthwise convolutions, hard activations, squeeze-excitation, SiLU, upsampling, the DFL
# box head), which the MMBench-style models above do not have

def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
             act: type[nn.Module] | None = nn.Hardswish) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups,
                                         bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = max(8, (channels // 4 + 4) // 8 * 8)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))


class _InvertedResidual(nn.Module):
    """MobileNetV3's block: 1x1 expansion, depthwise k x k, squeeze-excitation, 1x1 projection."""

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, se: bool, hard: bool,
                 stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if hard else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(_conv_bn(cin, expanded, 1, act=act))
        layers.append(_conv_bn(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if se:
            layers.append(_SqueezeExcite(expanded))
        layers.append(_conv_bn(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


# MobileNetV3-Small (Howard et al. 2019, table 2): kernel, expansion, out, SE, hard-swish, stride
MOBILENET_V3_SMALL = [(3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2),
                      (3, 88, 24, False, False, 1), (5, 96, 40, True, True, 2),
                      (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
                      (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1),
                      (5, 288, 96, True, True, 2), (5, 576, 96, True, True, 1),
                      (5, 576, 96, True, True, 1)]


class MobileNetText(nn.Module):
    """Visual question answering on a phone: a MobileNetV3-Small image branch (the paper's
    layer table: depthwise 3x3 / 5x5 convolutions, squeeze-excitation, HardSwish /
    HardSigmoid, batch norms folded at export) and a small text transformer over the question,
    concatenated, MLP -> 100 answers."""

    def __init__(self, vocab: int = 2000, seq_len: int = 16) -> None:
        super().__init__()
        blocks, cin = [_conv_bn(3, 16, 3, 2)], 16
        for kernel, expanded, cout, se, hard, stride in MOBILENET_V3_SMALL:
            blocks.append(_InvertedResidual(cin, kernel, expanded, cout, se, hard, stride))
            cin = cout
        blocks += [_conv_bn(cin, 576, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                   nn.Linear(576, 256), nn.Hardswish()]
        self.image = nn.Sequential(*blocks)
        self.tok = nn.Embedding(vocab, 128)
        self.pos = nn.Parameter(torch.randn(1, seq_len, 128) * 0.02)
        self.text = nn.TransformerEncoder(_encoder_layer(128, 4, 256), num_layers=2,
                                          enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(256 + 128, 256), nn.ReLU(), nn.Linear(256, 100))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        text = self.text(self.tok(input_ids) + self.pos).mean(dim=1)
        return self.head(torch.cat([self.image(pixel_values), text], dim=1))


class _Bottleneck(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(channels, channels, 3, act=nn.SiLU)
        self.conv2 = _conv_bn(channels, channels, 3, act=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class _C2f(nn.Module):
    """YOLOv8's C2f: a 1x1 conv split in two, bottlenecks on one half, all concatenated."""

    def __init__(self, cin: int, cout: int, blocks: int = 1) -> None:
        super().__init__()
        self.hidden = cout // 2
        self.conv1 = _conv_bn(cin, 2 * self.hidden, 1, act=nn.SiLU)
        self.blocks = nn.ModuleList(_Bottleneck(self.hidden) for _ in range(blocks))
        self.conv2 = _conv_bn((2 + blocks) * self.hidden, cout, 1, act=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.conv1(x).split(self.hidden, dim=1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.conv2(torch.cat(parts, dim=1))


class _DetectHead(nn.Module):
    """YOLOv8's anchor-free head at one scale: box distributions over 16 bins (softmax, then
    their expectation: the DFL projection) and class scores (sigmoid)."""

    def __init__(self, channels: int, classes: int, bins: int = 16) -> None:
        super().__init__()
        self.bins = bins
        self.box = nn.Sequential(_conv_bn(channels, 64, 3, act=nn.SiLU),
                                 nn.Conv2d(64, 4 * bins, 1))
        self.cls = nn.Sequential(_conv_bn(channels, 64, 3, act=nn.SiLU),
                                 nn.Conv2d(64, classes, 1))
        self.register_buffer("project", torch.arange(bins, dtype=torch.float32).view(1, bins, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        box = self.box(x).flatten(2).view(b, 4, self.bins, -1).transpose(1, 2).softmax(1)
        distance = (box * self.project).sum(1)  # [b, 4, anchors]
        return torch.cat([distance, self.cls(x).flatten(2).sigmoid()], dim=1)


class YoloAudio(nn.Module):
    """Audio-visual event detection: a YOLOv8-style detector on the camera frame (stride-2
    convolutions, C2f blocks with SiLU, a top-down neck with nearest upsampling and concat, the
    DFL box head at two scales) and an LSTM over audio frames (64 mel bands); the event
    classifier reads the pooled neck features and the audio's last state. Outputs the
    detections [B, 4 + 10, anchors] and the event logits [B, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 16, 3, 2, act=nn.SiLU),
                                  _conv_bn(16, 32, 3, 2, act=nn.SiLU), _C2f(32, 32))
        self.p3 = nn.Sequential(_conv_bn(32, 64, 3, 2, act=nn.SiLU), _C2f(64, 64))
        self.p4 = nn.Sequential(_conv_bn(64, 128, 3, 2, act=nn.SiLU), _C2f(128, 128))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.neck = _C2f(128 + 64, 64)
        self.head3, self.head4 = _DetectHead(64, 10), _DetectHead(128, 10)
        self.audio = nn.LSTM(64, 96, batch_first=True)
        self.event = nn.Sequential(nn.Linear(128 + 96, 128), nn.SiLU(), nn.Linear(128, 8))

    def forward(self, pixel_values: torch.Tensor,
                input_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p3 = self.p3(self.stem(pixel_values))
        p4 = self.p4(p3)
        n3 = self.neck(torch.cat([self.up(p4), p3], dim=1))
        detections = torch.cat([self.head3(n3), self.head4(p4)], dim=2)
        _, (h, _) = self.audio(input_features)
        scene = F.adaptive_avg_pool2d(p4, 1).flatten(1)
        return detections, self.event(torch.cat([scene, h[-1]], dim=1))
