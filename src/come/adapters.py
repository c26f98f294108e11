"""Architecture adapters: the ONLY module that knows a model family's module names.

Everything else sees a decoder layer as a `LayerWeights` record of plain tensors
(transformers' [out_features, in_features] layout) and asks the adapter for the
modules it must hook or rewrite. Adding a family is one `Adapter(...)` entry below and
one tiny-config test.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn

from .errors import ComeError


@dataclass
class LayerWeights:
    """One decoder layer as tensors. Optional fields are None where a family has none."""

    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    gate: Tensor
    up: Tensor
    down: Tensor
    attn_norm: Tensor
    ffn_norm: Tensor
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    v_bias: Tensor | None = None
    o_bias: Tensor | None = None
    down_bias: Tensor | None = None
    q_norm: Tensor | None = None
    k_norm: Tensor | None = None

    def map(self, fn) -> "LayerWeights":
        """Apply `fn` to every present tensor (dtype casts, device moves)."""
        return replace(self, **{f.name: fn(t) for f in fields(self) if (t := getattr(self, f.name)) is not None})


@dataclass(frozen=True)
class AttnShape:
    """Head layout of a layer; query head h uses KV head h // n_rep (transformers' GQA)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads


# (LayerWeights field, attribute path inside a decoder layer)
_TENSORS = {
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
    "attn_norm": "input_layernorm.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o_bias": "self_attn.o_proj.bias",
    "down_bias": "mlp.down_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
}


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclass(frozen=True)
class Adapter:
    """Module names and layout of one model family (LLaMA-style pre-norm decoders)."""

    family: str
    model_types: tuple[str, ...]
    qk_norm: bool = False

    # ---- model-level structure -------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return _backbone(model).layers

    def input_modules(self, model: nn.Module) -> list[nn.Module]:
        """What runs before layer 0: token embeddings and the rotary embedding."""
        backbone = _backbone(model)
        return [m for m in (backbone.embed_tokens, getattr(backbone, "rotary_emb", None)) if m is not None]

    def backbone(self, model: nn.Module) -> nn.Module:
        """The decoder stack without the LM head (distillation runs it, then the head in chunks)."""
        return _backbone(model)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return _backbone(model).norm

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def attn_shape(self, config) -> AttnShape:
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return AttnShape(n_heads, n_kv, head_dim)

    # ---- per-layer access ----------------------------------------------------------
    def attn_output_proj(self, layer: nn.Module) -> nn.Linear:
        """o_proj: its INPUT is the concatenated per-head attention output z."""
        return layer.self_attn.o_proj

    def ffn_output_proj(self, layer: nn.Module) -> nn.Linear:
        """down_proj: its INPUT is the FFN activation a = act(gate x) * (up x)."""
        return layer.mlp.down_proj

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def ffn_norm(self, layer: nn.Module) -> nn.Module:
        return layer.post_attention_layernorm

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def read_layer(self, layer: nn.Module) -> LayerWeights:
        vals = {name: _get(layer, path) for name, path in _TENSORS.items()}
        return LayerWeights(**{k: v.detach().clone() for k, v in vals.items() if v is not None})

    def write_layer(self, layer: nn.Module, w: LayerWeights) -> None:
        """Copy `w` into `layer`'s existing parameters (shapes must match, dtype is cast)."""
        for name, path in _TENSORS.items():
            param, new = _get(layer, path), getattr(w, name)
            if (param is None) != (new is None):
                raise ComeError(f"layer field {name!r} present on one side only; family {self.family} mismatch")
            if param is None:
                continue
            if param.shape != new.shape:
                raise ComeError(f"{name}: merged shape {tuple(new.shape)} != layer shape {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(new.to(param.dtype))

    # ---- structural edits ------------------------------------------------------------
    def keep_layers(self, model: nn.Module, keep: list[int]) -> None:
        """Keep only decoder layers `keep` (in order); renumber them and cut per-layer config.

        Renumbering matters: the KV cache is indexed by `self_attn.layer_idx`, and config
        lists such as `layer_types` pick each layer's attention mask.
        """
        layers = self.decoder_layers(model)
        n_old = len(layers)
        _backbone(model).layers = nn.ModuleList([layers[i] for i in keep])
        for new_idx, layer in enumerate(self.decoder_layers(model)):
            layer.self_attn.layer_idx = new_idx
        cfg = model.config
        for key, value in list(vars(cfg).items()):
            if isinstance(value, list) and len(value) == n_old and key != "architectures":
                setattr(cfg, key, [value[i] for i in keep])
        if isinstance(getattr(cfg, "max_window_layers", None), int):  # Qwen2: layers >= it slide
            cfg.max_window_layers = sum(1 for i in keep if i < cfg.max_window_layers)
        cfg.num_hidden_layers = len(keep)


def _backbone(model: nn.Module) -> nn.Module:
    return model.model if hasattr(model, "model") else model


ADAPTERS = (
    Adapter("llama", ("llama",)),
    Adapter("mistral", ("mistral",)),
    Adapter("qwen2", ("qwen2",)),
    Adapter("qwen3", ("qwen3",), qk_norm=True),
)


def get_adapter(config) -> Adapter:
    """The adapter for `config.model_type`, or a one-line error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise ComeError(
        f"unsupported architecture {model_type!r}: come supports {supported} "
        "(LLaMA-2/3, Vicuna, Mistral, Qwen2/2.5, Qwen3 checkpoints)"
    )
