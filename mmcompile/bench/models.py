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
