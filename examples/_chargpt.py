"""Shared pieces of the character-level GPT examples: text, data, model, schedule, live report.

The text is the Python standard library's own source, so the examples run offline anywhere.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # other characters become "?"
BLOCK = 64
N_LAYER, N_HEAD, N_EMBD = 2, 4, 96
PEAK_LR, WARMUP_FRACTION, MIN_LR_FRACTION = 3e-3, 0.05, 0.1


def parse_args(description: str, steps: int, log_dir: str | None = None) -> argparse.Namespace:
    """Command-line options shared by the examples (``--log-dir`` when ``log_dir`` is given)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--steps", type=int, default=steps, help=f"optimizer steps (default {steps})"
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="sequences per step (default 32)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    if log_dir is not None:
        parser.add_argument(
            "--log-dir",
            default=log_dir,
            help=f"TensorBoard folder; empty for none (default {log_dir})",
        )
    return parser.parse_args()


def load_text(max_chars: int = 3_000_000) -> np.ndarray:
    """The standard library's top-level ``*.py`` files, encoded as vocabulary indices."""
    lut = np.full(256, VOCAB.index("?"), dtype=np.int64)
    for i, ch in enumerate(VOCAB):
        lut[ord(ch)] = i
    chunks, size = [], 0
    for path in sorted(Path(os.path.dirname(os.__file__)).glob("*.py")):
        raw = path.read_bytes()
        chunks.append(raw)
        size += len(raw)
        if size >= max_chars:
            break
    return lut[np.frombuffer(b"".join(chunks)[:max_chars], dtype=np.uint8)]


class CharWindows(torch.utils.data.Dataset):
    """``n`` windows of ``BLOCK`` characters at seeded random offsets (inputs are also labels)."""

    def __init__(self, text: np.ndarray, n: int, seed: int) -> None:
        self.text = torch.from_numpy(text)
        rng = np.random.default_rng(seed)
        self.offsets = rng.integers(0, len(text) - BLOCK, size=n)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = self.text[self.offsets[i] : self.offsets[i] + BLOCK]
        return {"input_ids": window, "labels": window}


class CharGPT(nn.Module):
    """A small decoder-only transformer; ``forward`` returns the next-character loss."""

    def __init__(self, vocab: int = len(VOCAB)) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, N_EMBD)
        self.pos = nn.Embedding(BLOCK, N_EMBD)
        layer = nn.TransformerEncoderLayer(
            N_EMBD, N_HEAD, 4 * N_EMBD, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, N_LAYER, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(N_EMBD)
        self.head = nn.Linear(N_EMBD, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(BLOCK))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        h = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        logits = self.head(self.norm(h))[:, :-1]
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )


def gpt2_config():
    """A Hugging Face ``GPT2Config`` the size of :class:`CharGPT` (built, not downloaded)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(VOCAB),
        n_positions=BLOCK,
        n_embd=N_EMBD,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def warmup_cosine(total: int):
    """LR multiplier per step: linear warmup, then cosine down to ``MIN_LR_FRACTION``."""
    warmup = max(int(WARMUP_FRACTION * total), 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Report:
    """Prints the live forecast now and then; the end-of-run summary is lossforecast's own
    scorecard (the forecasts made at 10/25/50/75/90% of training against the loss reached)."""

    def __init__(self, total: int, every: int) -> None:
        self.total = total
        self.every = max(every, 1)

    def live(self, step: int, loss: float, forecast) -> None:
        """One line every ``every`` steps: the recent loss and the forecast of the final one."""
        if step % self.every:
            return
        if forecast is None:
            print(
                f"step {step:5d}/{self.total}  loss {loss:.3f}  forecast: needs data after warmup"
            )
            return
        print(
            f"step {step:5d}/{self.total}  loss {loss:.3f}  forecast final {forecast.loss:.3f} "
            f"[{forecast.low:.3f}, {forecast.high:.3f}]"
        )
