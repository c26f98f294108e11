"""Architecture adapters: the ONLY module that knows a model family's module names.

Everything else sees a decoder layer as a `LayerWeights` record of plain tensors
(transformers' [out_features, in_features] layout, fused projections split) and asks the
adapter for the modules it must hook or rewrite. Adding a family is one `Adapter(...)`
entry below and one tiny-config test.

What the families differ in, and where it is handled:
- module paths and fused projections (Phi-3's qkv_proj, gate_up_proj): `Adapter.tensors`,
  split on read and fused on write, so unit selection never sees a fused tensor;
- norms that scale by 1 + w (Gemma): `LayerWeights.norm_offset`, read by the folding;
- norms after a block (Gemma 2/3: before AND after; OLMo-2: after only) and Granite's
  residual multiplier: how a block's output projection reaches the residual stream,
  `BlockOutput`, read by the unit scores and the refit;
- per-layer attention types (sliding / full): `keep_layers` cuts the config's lists, so
  each kept layer keeps its type (a merged layer, in A's slot, takes A's);
- logit soft-capping (Gemma 2) and Granite's logits scaling: `lm_head` returns the map from
  final-normed states to the model's logits;
- Mixture-of-Experts FFNs (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): the experts' fused
  [E, ...] parameters split into `gate` / `up` / `down` along their rows, the router's
  [E, hidden] rows in `router`, Qwen2-MoE's shared expert and its sigmoid gate in `shared_*`;
  an MoE layer's FFN units are its experts (`LayerWeights.ffn_units`, `experts`), and
  `keep_layers` keeps which layers are MoE (Qwen-MoE's `mlp_only_layers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import ComeError
from .mapped import file_mapped


@dataclass
class LayerWeights:
    """One decoder layer as tensors. Optional fields are None where a family has none.

    attn_norm / ffn_norm are the norms BEFORE attention / the FFN, attn_post_norm /
    ffn_post_norm the ones AFTER them (Gemma 2/3, OLMo-2). A norm scales by
    `norm_offset + weight`."""

    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    gate: Tensor
    up: Tensor
    down: Tensor
    attn_norm: Tensor | None = None
    ffn_norm: Tensor | None = None
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    v_bias: Tensor | None = None
    o_bias: Tensor | None = None
    down_bias: Tensor | None = None
    q_norm: Tensor | None = None
    k_norm: Tensor | None = None
    attn_post_norm: Tensor | None = None
    ffn_post_norm: Tensor | None = None
    # MoE layers: gate / up [E, ff, hidden] and down [E, hidden, ff] hold the routed experts
    router: Tensor | None = None  # [E, hidden]: one logit row per expert
    shared_gate: Tensor | None = None  # Qwen2-MoE's shared expert, a dense MLP beside the experts
    shared_up: Tensor | None = None
    shared_down: Tensor | None = None
    shared_expert_gate: Tensor | None = None  # [1, hidden]: sigmoid(. x) scales the shared expert's output

    norm_offset: ClassVar[float] = 0.0

    @property
    def ffn_units(self) -> int:
        """The FFN's units: its experts in an MoE layer, its channels otherwise."""
        return self.router.shape[0] if self.router is not None else self.down.shape[1]

    def map(self, fn) -> "LayerWeights":
        """Apply `fn` to every present tensor (dtype casts, device moves)."""
        return replace(self, **{f.name: fn(t) for f in fields(self) if (t := getattr(self, f.name)) is not None})

    def gain(self, norm: Tensor | None) -> Tensor | None:
        """What a norm weight multiplies the normalized stream by, in float64 (None: no such
        norm): Gemma's 1 + w added in bf16 would round."""
        if norm is None:
            return None
        return norm.double() + self.norm_offset if self.norm_offset else norm.double()


@dataclass
class OnePlusNormWeights(LayerWeights):
    """Gemma's RMSNorm multiplies by 1 + w (its weights start at zero)."""

    norm_offset: ClassVar[float] = 1.0


@dataclass(frozen=True)
class BlockOutput:
    """How a block's output projection u (o_proj's, down_proj's) enters the residual stream
    when it is not plainly x + u: x + gain * u, or with a post-norm x + gain * u / rms(u).
    The post-norm makes a block non-linear in its units (rms couples them all)."""

    gain: Tensor  # float64: per channel (a post-norm's gain) or a scalar (Granite's residual multiplier)
    eps: float | None = None  # the post-norm's epsilon; None: no post-norm

    def token_scale(self, u: Tensor) -> Tensor | None:
        """1 / rms(u) per token ([..., 1], float32 as the norms compute it); None without a post-norm."""
        if self.eps is None:
            return None
        return torch.rsqrt(u.float().pow(2).mean(-1, keepdim=True) + self.eps)

    def __call__(self, u: Tensor) -> Tensor:
        """The block's contribution to the residual stream."""
        s = self.token_scale(u)
        return self.gain.to(u.device) * (u if s is None else u.float() * s)


@dataclass(frozen=True)
class AttnShape:
    """Head layout of a layer; query head h uses KV head h // n_rep (transformers' GQA)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads


# attribute path inside a decoder layer -> the LayerWeights field(s) it holds (several: a
# fused projection, its rows split in that order). Paths a layer lacks read as None.
_PROJECTIONS = {
    "self_attn.q_proj.weight": ("q",),
    "self_attn.k_proj.weight": ("k",),
    "self_attn.v_proj.weight": ("v",),
    "self_attn.o_proj.weight": ("o",),
    "mlp.gate_proj.weight": ("gate",),
    "mlp.up_proj.weight": ("up",),
    "mlp.down_proj.weight": ("down",),
    "self_attn.q_proj.bias": ("q_bias",),
    "self_attn.k_proj.bias": ("k_bias",),
    "self_attn.v_proj.bias": ("v_bias",),
    "self_attn.o_proj.bias": ("o_bias",),
    "mlp.down_proj.bias": ("down_bias",),
    "self_attn.q_norm.weight": ("q_norm",),
    "self_attn.k_norm.weight": ("k_norm",),
}
_LLAMA = MappingProxyType({**_PROJECTIONS, "input_layernorm.weight": ("attn_norm",),
                           "post_attention_layernorm.weight": ("ffn_norm",)})
_GEMMA = MappingProxyType({**_PROJECTIONS, "input_layernorm.weight": ("attn_norm",),
                           "post_attention_layernorm.weight": ("attn_post_norm",),
                           "pre_feedforward_layernorm.weight": ("ffn_norm",),
                           "post_feedforward_layernorm.weight": ("ffn_post_norm",)})
_OLMO2 = MappingProxyType({**_PROJECTIONS, "post_attention_layernorm.weight": ("attn_post_norm",),
                           "post_feedforward_layernorm.weight": ("ffn_post_norm",)})  # no pre-norms: blocks read x
_FUSED = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "mlp.gate_proj.", "mlp.up_proj.")
_PHI3 = MappingProxyType({**{p: f for p, f in _LLAMA.items() if not p.startswith(_FUSED)},
                          "self_attn.qkv_proj.weight": ("q", "k", "v"), "mlp.gate_up_proj.weight": ("gate", "up")})
# MoE: the dense paths stay (Qwen-MoE's `mlp_only_layers` are dense); a field is written by
# whichever of its paths the layer has
_MOE = MappingProxyType({**_LLAMA, "mlp.experts.gate_up_proj": ("gate", "up"), "mlp.experts.down_proj": ("down",),
                         "mlp.gate.weight": ("router",),
                         "mlp.shared_expert.gate_proj.weight": ("shared_gate",),
                         "mlp.shared_expert.up_proj.weight": ("shared_up",),
                         "mlp.shared_expert.down_proj.weight": ("shared_down",),
                         "mlp.shared_expert_gate.weight": ("shared_expert_gate",)})


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _module_path(tensors: Mapping[str, tuple[str, ...]], name: str) -> str | None:
    """The module holding LayerWeights field `name` (its parameter's path without `.weight`)."""
    return next((p.rpartition(".")[0] for p, names in tensors.items() if name in names), None)


def _out_dim(t: Tensor) -> int:
    """The output-feature dimension: 0 of a [out, in] weight, 1 of fused experts' [E, out, in]."""
    return max(t.dim() - 2, 0)


def _eps(norm: nn.Module) -> float:
    return norm.eps if hasattr(norm, "eps") else norm.variance_epsilon


class _LogitHead(nn.Module):
    """The LM head followed by what the model does to its logits (Granite divides them by
    `logits_scaling`, Gemma 2 soft-caps them), in the model's own order."""

    def __init__(self, head: nn.Linear, scaling: float | None, softcap: float | None):
        super().__init__()
        self.head, self.scaling, self.softcap = head, scaling, softcap
        self.out_features = head.out_features

    def forward(self, x: Tensor) -> Tensor:
        logits = self.head(x)
        if self.scaling is not None:
            logits = logits / self.scaling
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@dataclass(frozen=True)
class ExpertUnits:
    """What stands for down_proj in an MoE layer: its FFN units are the experts (`in_features`,
    what the Plan's ffn_a / ffn_b list), each writing the hidden size (`out_features`)."""

    experts: nn.Module  # the module holding their fused [E, ...] parameters
    in_features: int
    out_features: int


@dataclass(frozen=True)
class Adapter:
    """Module names and layout of one model family (LLaMA-style decoders: attention then FFN,
    each added to the residual stream)."""

    family: str
    model_types: tuple[str, ...]
    qk_norm: bool = False
    tensors: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _LLAMA, hash=False)  # path -> field(s)
    weights: type[LayerWeights] = LayerWeights  # its norm convention

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
        """The map from final-normed states to the model's logits: the LM head, and where the
        model scales or soft-caps its logits, that too."""
        cfg = model.config
        scaling, softcap = getattr(cfg, "logits_scaling", None), getattr(cfg, "final_logit_softcapping", None)
        if scaling is None and softcap is None:
            return model.lm_head
        return _LogitHead(model.lm_head, scaling, softcap)

    def attn_shape(self, config) -> AttnShape:
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return AttnShape(n_heads, n_kv, head_dim)

    # ---- per-layer access ----------------------------------------------------------
    def attn_output_proj(self, layer: nn.Module) -> nn.Linear:
        """o_proj: its INPUT is the concatenated per-head attention output z."""
        return layer.self_attn.o_proj

    def ffn_output_proj(self, layer: nn.Module) -> nn.Linear | ExpertUnits:
        """down_proj: its INPUT is the FFN activation a = act(gate x) * (up x); in an MoE layer
        the experts (`ExpertUnits`)."""
        experts = self.experts(layer)
        if experts is None:
            return layer.mlp.down_proj
        e, d, _ = experts.down_proj.shape
        return ExpertUnits(experts, e, d)

    def unit_output_weights(self, layer: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
        """The parameters whose input columns are the units' outputs: o_proj's weight [hidden,
        heads * head_dim], and down_proj's [hidden, ff] or an MoE layer's fused experts' down
        [E, hidden, ff] (`--sensitivity taylor` takes their gradients)."""
        experts = self.experts(layer)
        return self.attn_output_proj(layer).weight, (layer.mlp.down_proj.weight if experts is None
                                                     else experts.down_proj)

    def experts(self, layer: nn.Module) -> nn.Module | None:
        """The routed experts of an MoE layer (None: a dense FFN). Their forward takes (x,
        top-k expert ids, top-k routing weights); the statistics hook it (engine/runner.py)."""
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None and (getattr(experts, "is_transposed", False)
                                    or not getattr(experts, "is_concatenated", True)):
            raise ComeError(f"{type(experts).__name__}: come reads experts stored as [E, 2 ff, hidden] gate | up "
                            "and [E, hidden, ff] down only")
        return experts

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def ffn_input(self, layer: nn.Module) -> nn.Module:
        """The module whose INPUT is the residual stream after attention: the FFN's pre-norm,
        or the MLP itself where there is none (OLMo-2)."""
        return _get(layer, _module_path(self.tensors, "ffn_norm") or "mlp")

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def attn_output(self, layer: nn.Module, config) -> BlockOutput | None:
        """How o_proj's output enters the residual stream (None: added as it is)."""
        return self._block_output(layer, config, "attn_post_norm")

    def ffn_output(self, layer: nn.Module, config) -> BlockOutput | None:
        """How down_proj's output enters the residual stream (None: added as it is)."""
        return self._block_output(layer, config, "ffn_post_norm")

    def _block_output(self, layer: nn.Module, config, post_norm: str) -> BlockOutput | None:
        path = _module_path(self.tensors, post_norm)
        scale = getattr(config, "residual_multiplier", None)  # Granite: x + m * block(x)
        if path is None and scale is None:
            return None
        gain = torch.tensor(1.0 if scale is None else scale, dtype=torch.float64)
        if path is None:
            return BlockOutput(gain)
        norm = _get(layer, path)
        w = norm.weight.detach().double()
        return BlockOutput(gain * (w + self.weights.norm_offset), _eps(norm))

    def read_layer(self, layer: nn.Module, copy: bool = True) -> LayerWeights:
        """`layer`'s parameters (fused ones split into their fields), in their own dtype: a copy,
        or with `copy=False` views of them (nothing allocated: a mapped checkpoint's pages stay
        the file's; they change when the layer is written)."""
        vals = {}
        for path, names in self.tensors.items():
            t = _get(layer, path)
            if t is not None:
                rows = self._rows(layer, names, t.shape[_out_dim(t)])
                t = t.detach().clone() if copy else t.detach()
                vals.update(zip(names, t.split(rows, dim=_out_dim(t))))
        return self.weights(**vals)

    def write_layer(self, layer: nn.Module, w: LayerWeights) -> None:
        """Copy `w` into `layer`'s existing parameters (shapes must match, dtype is cast); a
        parameter mapped from a file gets new memory instead (models/mapped.py)."""
        params = {path: p for path in self.tensors if (p := _get(layer, path)) is not None}
        held = {n for path in params for n in self.tensors[path]}
        for f in fields(w):
            if (f.name in held) != (getattr(w, f.name) is not None):
                raise ComeError(f"layer field {f.name!r} present on one side only; family {self.family} mismatch")
        for (path, param), on_file in zip(params.items(), file_mapped(list(params.values()))):
            names = self.tensors[path]
            parts, name = [getattr(w, n) for n in names], "+".join(names)
            new = parts[0] if len(parts) == 1 else torch.cat(parts, dim=_out_dim(param))
            if param.shape != new.shape:
                raise ComeError(f"{name}: merged shape {tuple(new.shape)} != layer shape {tuple(param.shape)}")
            with torch.no_grad():
                if on_file:  # fresh memory: written, a mapped checkpoint's pages would stay anonymous (mapped.py)
                    param.data = new.to(param.dtype, copy=True, memory_format=torch.contiguous_format)
                else:
                    param.copy_(new.to(param.dtype))

    def _rows(self, layer: nn.Module, names: tuple[str, ...], rows: int) -> list[int]:
        """Row counts of the fields a (fused) parameter holds: q, k, v by their heads (the
        query rows are o_proj's inputs), gate | up in halves."""
        if len(names) == 1:
            return [rows]
        if names == ("q", "k", "v"):
            q = self.attn_output_proj(layer).in_features
            return [q, (rows - q) // 2, (rows - q) // 2]
        return [rows // len(names)] * len(names)

    # ---- structural edits ------------------------------------------------------------
    def keep_layers(self, model: nn.Module, keep: list[int]) -> None:
        """Keep only decoder layers `keep` (in order); renumber them and cut per-layer config.

        Renumbering matters: the KV cache is indexed by `self_attn.layer_idx`, and config
        lists such as `layer_types` pick each layer's attention mask (and Gemma 3's rotary
        base). Each kept layer keeps its own entry, so its attention type: a merged layer,
        written into A's slot, takes A's type.
        """
        layers = self.decoder_layers(model)
        n_old = len(layers)
        cfg = model.config
        if isinstance(getattr(cfg, "mlp_only_layers", None), list):  # Qwen-MoE: which layers are dense, by index
            cfg.mlp_only_layers = [new for new, old in enumerate(keep) if self.experts(layers[old]) is None]
            cfg.decoder_sparse_step = 1  # every other layer MoE: the stride no longer says which
        _backbone(model).layers = nn.ModuleList([layers[i] for i in keep])
        for key, value in list(vars(cfg).items()):
            if isinstance(value, list) and len(value) == n_old and key not in ("architectures", "mlp_only_layers"):
                setattr(cfg, key, [value[i] for i in keep])
        if isinstance(getattr(cfg, "max_window_layers", None), int):  # Qwen2: layers >= it slide
            cfg.max_window_layers = sum(1 for i in keep if i < cfg.max_window_layers)
        cfg.num_hidden_layers = len(keep)
        for new_idx, layer in enumerate(self.decoder_layers(model)):
            _renumber(layer, new_idx)


def _renumber(layer: nn.Module, idx: int) -> None:
    """Give a kept layer the index a model built with it at `idx` gives it (the KV cache's key)."""
    layer.self_attn.layer_idx = idx
    if hasattr(layer, "layer_idx"):  # Gemma 3 keeps one on the decoder layer too
        layer.layer_idx = idx


def _backbone(model: nn.Module) -> nn.Module:
    return model.model if hasattr(model, "model") else model


ADAPTERS = (
    Adapter("llama", ("llama",)),
    Adapter("mistral", ("mistral",)),
    Adapter("qwen2", ("qwen2",)),
    Adapter("qwen3", ("qwen3",), qk_norm=True),
    Adapter("gemma2", ("gemma2",), tensors=_GEMMA, weights=OnePlusNormWeights),
    Adapter("gemma3", ("gemma3_text",), qk_norm=True, tensors=_GEMMA, weights=OnePlusNormWeights),
    Adapter("phi3", ("phi3",), tensors=_PHI3),
    Adapter("olmo2", ("olmo2",), qk_norm=True, tensors=_OLMO2),
    Adapter("granite", ("granite",)),
    Adapter("mixtral", ("mixtral",), tensors=_MOE),
    Adapter("qwen2_moe", ("qwen2_moe",), tensors=_MOE),
    Adapter("qwen3_moe", ("qwen3_moe",), qk_norm=True, tensors=_MOE),
    Adapter("olmoe", ("olmoe",), qk_norm=True, tensors=_MOE),
)


def get_adapter(config) -> Adapter:
    """The adapter for `config.model_type`, or a one-line error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise ComeError(
        f"unsupported architecture {model_type!r}: come supports {supported} (LLaMA-2/3, Vicuna, Mistral, "
        "Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 text, Phi-3/Phi-4, OLMo-2, Granite, Mixtral, Qwen1.5/2-MoE, "
        "Qwen3-MoE, OLMoE checkpoints)"
    )
