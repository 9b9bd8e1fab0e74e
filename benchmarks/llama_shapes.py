"""Llama-shaped model sizes for the memory benchmarks, and random checkpoints of them built locally.

``SHAPES`` are the points :mod:`bench_memory` measures: random Llama checkpoints of about 0.5B, 1.2B
and 2.5B parameters with Llama-3's vocabulary (128,256 tokens) and ``d_mlp`` up to 8192, written by
transformers' ``save_pretrained`` (real checkpoints, loaded through ``pmet_lens.load_model(path)``).
``TARGETS`` are the shapes of real models the memory model predicts (GPT-J-6B, Llama-3-8B,
Qwen-2.5-14B; from their published ``config.json``). Any benchmark may import this module
(``benchmarks/`` is on ``sys.path`` when a script there runs).

Random weights: every matrix N(0, 0.02²) (transformers' ``initializer_range``), norms 1. The
tokenizer saved beside them is the default model's (SmolLM2, 49,152 tokens): its ids are valid rows
of the larger embedding, and the shapes, not the tokenizer, decide memory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["SHAPES", "TARGETS", "LlamaShape", "build_checkpoint", "checkpoint_root"]


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a decoder that decide its memory.

    Attributes:
        name: label of the point.
        d_model: residual width.
        d_mlp: FFN width (the key width d_k of W_out, so C and P are ``d_mlp²``).
        n_layers: blocks.
        n_heads: query heads (``d_head = d_model / n_heads``).
        n_kv_heads: key/value heads (grouped-query attention).
        d_vocab: vocabulary.
        gated: gated FFN (three matrices: gate, up, down) or a plain one (two: in, out).
        tied: input and output embeddings shared (counted once).
    """

    name: str
    d_model: int
    d_mlp: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_vocab: int = 128_256
    gated: bool = True
    tied: bool = False

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def params(self) -> int:
        """Parameter count (attention without biases, norms included)."""
        attn = 2 * self.d_model * self.n_heads * self.d_head + 2 * self.d_model * self.n_kv_heads * self.d_head
        ffn = (3 if self.gated else 2) * self.d_model * self.d_mlp
        per_layer = attn + ffn + 2 * self.d_model
        embed = self.d_vocab * self.d_model * (1 if self.tied else 2)
        return self.n_layers * per_layer + embed + self.d_model

    def llama_config(self):
        """The transformers ``LlamaConfig`` of this shape."""
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.d_vocab, hidden_size=self.d_model, intermediate_size=self.d_mlp,
                           num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
                           num_key_value_heads=self.n_kv_heads, max_position_embeddings=2048,
                           tie_word_embeddings=self.tied, rope_theta=500_000.0, bos_token_id=1, eos_token_id=2)


SHAPES: dict[str, LlamaShape] = {
    s.name: s for s in (
        LlamaShape("llama-0.5b", d_model=1024, d_mlp=4096, n_layers=16, n_heads=16, n_kv_heads=8),
        LlamaShape("llama-1.2b", d_model=2048, d_mlp=8192, n_layers=12, n_heads=32, n_kv_heads=8),
        LlamaShape("llama-2.5b", d_model=2560, d_mlp=8192, n_layers=24, n_heads=32, n_kv_heads=8),
    )
}
"""The measured points (about 0.5B, 1.2B and 2.5B parameters)."""

TARGETS: dict[str, LlamaShape] = {
    s.name: s for s in (
        LlamaShape("GPT-J-6B", d_model=4096, d_mlp=16384, n_layers=28, n_heads=16, n_kv_heads=16, d_vocab=50_400,
                   gated=False),
        LlamaShape("Llama-3-8B", d_model=4096, d_mlp=14336, n_layers=32, n_heads=32, n_kv_heads=8),
        LlamaShape("Qwen-2.5-14B", d_model=5120, d_mlp=13824, n_layers=48, n_heads=40, n_kv_heads=8, d_vocab=152_064),
    )
}
"""Real models the memory model predicts (shapes from their published configs; GPT-J's FFN is not gated
and its attention has no grouped heads; Qwen-2.5's attention biases are left out of the count)."""


def checkpoint_root() -> Path:
    """Where the random checkpoints are written: ``default_cache_dir() / "bench_memory"``."""
    from pmet_lens.core.models import default_cache_dir

    return default_cache_dir() / "bench_memory"


def build_checkpoint(shape: LlamaShape, root: Path | None = None, seed: int = 0) -> Path:
    """A random bfloat16 checkpoint of ``shape`` under ``root`` (default :func:`checkpoint_root`),
    built once: the directory holds ``config.json``, ``model.safetensors`` and the tokenizer, and a
    ``shape.json`` recording the shape and seed it was made from (a mismatch rebuilds it)."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from pmet_lens.core.models import default_gguf_path

    root = root if root is not None else checkpoint_root()
    path = root / f"{shape.name}-seed{seed}"
    record = {**asdict(shape), "seed": seed}
    marker = path / "shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == record:
        return path
    tmp = root / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    config = shape.llama_config()
    config.torch_dtype = torch.bfloat16
    model = LlamaForCausalLM._from_config(config, torch_dtype=torch.bfloat16)
    model.save_pretrained(tmp)
    del model
    gguf = default_gguf_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    (tmp / "shape.json").write_text(json.dumps(record))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path
