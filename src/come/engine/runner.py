"""Run a model one decoder layer at a time over calibration batches, with statistics hooks.

The sequential pipeline of llm-compressor: the model stays where it was loaded (host
memory for big models); each layer visits the compute device for its pass over all
calibration batches, so device memory holds one layer plus one batch of activations.
Statistics come from forward hooks on the stock modules (no forked modeling code).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ComeError
from ..merging.refit import NormalEquations
from ..models.adapters import Adapter, BlockOutput, ExpertUnits
from ..models.placement import on_device
from ..scoring.selection import token_cosines
from ..scoring.sensitivity import channel_abs_sum, routed_expert_l1


@dataclass
class LayerStats:
    """What one pass of a layer over the calibration set tells us."""

    attn_abs_mean: Tensor  # E_t |z_c|, o_proj input channels
    ffn_abs_mean: Tensor  # E_t |a_j|, down_proj input channels (empty in an MoE layer)
    head_out_l1: Tensor | None  # E_t ||W_o[:, cols(i)] z_i||_1 per query head (exact head score)
    bi: float  # block influence: 1 - mean over all tokens of cos(in, out)
    expert_out_l1: Tensor | None = None  # MoE: E_t ||w_e expert_e(x)||_1 per routed expert (its unit score)
    # --sensitivity taylor (backprop.unit_taylor, all layers after each profiling): signed
    # sum_i W[i, j] dL/dW[i, j] per o_proj input channel, per down_proj input channel / expert
    attn_taylor: Tensor | None = None
    ffn_taylor: Tensor | None = None


class _Stop(Exception):
    pass


def _to(obj, device):
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    return obj


def _per_token_scaled(x: Tensor, block: BlockOutput | None, u: Tensor) -> Tensor:
    """`x` times the block's per-token 1 / rms(u) where a post-norm divides the block's output
    `u` by it (what each unit then writes scales with it); `x` itself otherwise."""
    s = block.token_scale(u) if block is not None else None
    return x if s is None else x * s


def _linear_in_gain(block: BlockOutput, features: str, a: Tensor, u: Tensor, target: Tensor,
                    bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(features, target) of the refit when the FFN adds block(u) = gain * u * s, u = W a + b:
    with each token's post-norm scale s = 1 / rms(u) held at its current value, block(u) =
    (a s) (gain W)^T + gain b s, linear in gain * W. EXACT at the current W (so the error
    before a refit is the layer's true error); a refit moves rms(u), so its fit is
    approximate for post-norm families (layer_refit.py checks it on the true output).
    Granite (no post-norm, s = 1) is exact. "mlp_out": the features are block(u) itself."""
    if features != "channels":
        return block(u), target
    s = block.token_scale(u)
    s = 1.0 if s is None else s
    return a * s, target if bias is None else target - block.gain.to(u.device) * bias * s


def layer_type(config, position: int) -> str | None:
    """The attention type the model gives the layer at current `position` (which mask, and
    for Gemma 3 which rotary embeddings): `layer_types` of the CURRENT config, which
    `Adapter.keep_layers` cuts as layers go; None for configs with one type."""
    types = getattr(config, "layer_types", None)
    return types[position] if types else None


def _same(a, b) -> bool:
    """The very objects (tensors) or equal plain values: layers of one type share their kwargs."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(map(_same, a, b))
    return a is b or (isinstance(a, (bool, int, float, str)) and a == b)


class _Catch(nn.Module):
    """Stands in for decoder layer `index` during the embedding pass: the model's own loop
    hands it that layer's real kwargs; it records them per layer type and passes the hidden
    states on untouched. The last one stops the model before its final norm and LM head."""

    def __init__(self, index: int, kind: str | None, last: bool, seen: dict):
        super().__init__()
        self.index, self.kind, self.last, self.seen = index, kind, last, seen

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.seen["h"] = h
        kinds = self.seen["kw"]
        if self.kind in kinds and not _same(kinds[self.kind], kwargs):
            raise ComeError(f"decoder layer {self.index} gets other kwargs than the earlier layers of its type "
                            f"{self.kind!r}: this model needs per-layer kwargs, which come does not keep")
        kinds.setdefault(self.kind, kwargs)
        self.seen["n"] += 1
        if self.last:
            raise _Stop
        return h


class _UnitStats:
    """The statistics hooks of one layer pass (LayerStats), as a context: `run` profiles with
    them, and so does a refit pass that keeps its activations (KeptPass), so the layer need
    not run again after the refit. `active=False`: no hooks, nothing summed."""

    def __init__(self, runner: "LayerRunner", layer: nn.Module, head_score: str, active: bool = True):
        self.runner, self.layer, self.head_score, self.active = runner, layer, head_score, active
        self.acc = {"z": 0.0, "a": 0.0, "experts": 0.0, "head": 0.0, "cos": 0.0, "n": 0}
        self.hooks: list = []

    def __enter__(self) -> "_UnitStats":
        if not self.active:
            return self
        adapter, config, acc, shape = self.runner.adapter, self.runner.model.config, self.acc, self.runner.shape
        o_proj, experts = adapter.attn_output_proj(self.layer), adapter.experts(self.layer)
        attn_out, ffn_out = adapter.attn_output(self.layer, config), adapter.ffn_output(self.layer, config)
        self.moe = experts is not None

        # |.| in the activations' dtype, sums in float64 (channel_abs_sum): a float64 copy of
        # every batch's activations cost a fifth of a profiling layer pass
        def on_o(mod, args, out):
            z = _per_token_scaled(args[0], attn_out, out)
            acc["z"] = acc["z"] + channel_abs_sum(z)
            if self.head_score == "exact":
                z = z.double()
                zh = z.reshape(*z.shape[:2], shape.n_heads, shape.head_dim)
                w = mod.weight.double()
                if attn_out is not None:
                    w = attn_out.gain.to(w.device).reshape(-1, 1) * w
                w = w.T.reshape(shape.n_heads, shape.head_dim, -1)
                acc["head"] = acc["head"] + torch.stack([(zh[:, :, h] @ w[h]).abs().sum() for h in range(shape.n_heads)])

        def on_down(_mod, args, out):
            acc["a"] = acc["a"] + channel_abs_sum(_per_token_scaled(args[0], ffn_out, out))

        def on_experts(mod, args, _out):
            acc["experts"] = acc["experts"] + routed_expert_l1(*args[:3], mod.gate_up_proj, mod.down_proj, mod.act_fn)

        ffn, on_ffn = (experts, on_experts) if self.moe else (adapter.ffn_output_proj(self.layer), on_down)
        self.hooks = [o_proj.register_forward_hook(on_o), ffn.register_forward_hook(on_ffn)]
        return self

    def __exit__(self, *exc) -> None:
        for hk in self.hooks:
            hk.remove()
        self.hooks = []

    def add_tokens(self, h: Tensor, y: Tensor) -> None:
        """One batch's block influence terms: cos(layer input, layer output) per token."""
        if self.active:
            self.acc["cos"] += float(token_cosines(h, y).sum(dtype=torch.float64))
            self.acc["n"] += h.shape[0] * h.shape[1]

    def stats(self) -> LayerStats:
        acc, n = self.acc, self.acc["n"]
        return LayerStats(
            attn_abs_mean=(acc["z"] / n).cpu(),
            ffn_abs_mean=(acc["a"] / n).cpu() if not self.moe else torch.zeros(0, dtype=torch.float64),
            head_out_l1=(acc["head"] / n).cpu() if self.head_score == "exact" else None,
            bi=1.0 - acc["cos"] / n,
            expert_out_l1=(acc["experts"] / n).cpu() if self.moe else None,
        )


@dataclass
class KeptPass:
    """A refit pass over current layer `position` that kept what the layer's output is made
    of: out = x1 + down(a) (x1 the stream after attention, a the FFN activations), plus the
    unit statistics, which a refit does not change. The refit writes only the down
    projection, so the re-profiling after it gets the layer's outputs and statistics from
    `finish` for one small matmul instead of a layer pass (the same values, bit for bit).
    Only for a layer whose FFN output adds as it is (no post-norm, not MoE)."""

    position: int
    inputs: list[Tensor]
    x1: list[Tensor]
    a: list[Tensor]
    unit_stats: _UnitStats

    def holds_for(self, position: int, inputs: list[Tensor]) -> bool:
        """Whether this pass ran layer `position` on these very states."""
        return position == self.position and len(inputs) == len(self.inputs) and all(
            h is g or torch.equal(h, g) for h, g in zip(inputs, self.inputs))

    @torch.no_grad()
    def finish(self, runner: "LayerRunner", layer: nn.Module) -> tuple[list[Tensor], LayerStats]:
        """The layer's outputs with its current down projection, and its statistics."""
        down, outputs = runner.adapter.ffn_output_proj(layer), []
        with on_device(down, runner.device):
            for h, x1, a in zip(self.inputs, self.x1, self.a):
                y = x1.to(runner.device) + down(a.to(runner.device))
                self.unit_stats.add_tokens(h.to(runner.device), y)
                outputs.append(y.to(runner.cache_device))
        return outputs, self.unit_stats.stats()


class LayerRunner:
    """Embeds calibration batches once, then runs any decoder layer over cached inputs.

    `cache_device` holds hidden states between layers (host memory by default);
    `device` runs the layer. The layer kwargs the model would pass (rotary position
    embeddings, causal mask) are captured once per batch from the model itself, one set
    per layer type: models that mix sliding and full attention give each type its mask.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, device: torch.device, cache_device: torch.device):
        self.model, self.adapter = model, adapter
        self.device, self.cache_device = device, cache_device
        self.layer_kwargs: list[dict[str | None, dict]] = []  # per batch: layer type -> kwargs
        self.shape = adapter.attn_shape(model.config)

    @torch.no_grad()
    def embed(self, batches: list[Tensor]) -> list[Tensor]:
        """Hidden states entering layer 0 for each batch of token ids; records the kwargs the
        model passes each layer type. The decoder layers are swapped for `_Catch` modules for
        the pass (so none of them runs) and put back whatever happens."""
        layers = self.adapter.decoder_layers(self.model)
        real = list(layers)
        seen: dict = {}
        out, self.layer_kwargs = [], []
        try:
            for i in range(len(real)):
                layers[i] = _Catch(i, layer_type(self.model.config, i), i == len(real) - 1, seen)
            with ExitStack() as stack:
                for part in self.adapter.input_modules(self.model):
                    stack.enter_context(on_device(part, self.device))
                for ids in batches:
                    seen.update(kw={}, n=0)
                    try:
                        self.model(input_ids=ids.to(self.device), use_cache=False)
                    except _Stop:
                        pass
                    if seen["n"] != len(real):
                        raise ComeError(f"the model ran {seen['n']} of its {len(real)} decoder layers")
                    out.append(seen["h"].to(self.cache_device))
                    self.layer_kwargs.append(seen["kw"])
        finally:
            for i, layer in enumerate(real):
                layers[i] = layer
        return out

    def kwargs_at(self, position: int | None) -> list[dict]:
        """Per batch, the kwargs the model passes the layer at current `position`; None is
        allowed only when every layer gets the same ones."""
        if position is not None:
            kind = layer_type(self.model.config, position)
        else:
            kinds = {k for per_type in self.layer_kwargs for k in per_type}
            if len(kinds) > 1:
                raise ComeError(f"this model mixes attention types {sorted(kinds)}: say which position a layer runs at")
            kind = next(iter(kinds), None)
        return [per_type[kind] for per_type in self.layer_kwargs]

    @torch.no_grad()
    def run(self, layer: nn.Module, inputs: list[Tensor], want_stats: bool, head_score: str = "channel", *,
            position: int | None = None) -> tuple[list[Tensor], LayerStats | None]:
        """Outputs of `layer`, run as the model runs current layer `position`, on every cached
        input batch, and its statistics if asked."""
        outputs = []
        with _UnitStats(self, layer, head_score, want_stats) as acc, on_device(layer, self.device):
            for h, kw in zip(inputs, self.kwargs_at(position)):
                h_dev = h.to(self.device)
                y = layer(h_dev, **kw)
                y = y[0] if isinstance(y, tuple) else y
                acc.add_tokens(h_dev, y)
                outputs.append(y.to(self.cache_device))
        return outputs, acc.stats() if want_stats else None

    @torch.no_grad()
    def collect_attn_refit(self, layer: nn.Module, inputs: list[Tensor], targets: list[Tensor], held_out: list[bool],
                           *, position: int | None = None) -> tuple[NormalEquations, NormalEquations]:
        """Least-squares statistics for refitting `layer`'s attention output projection (o_proj)
        so that its output on `inputs` matches `targets`, the FFN's output u held as it is:
        features z (o_proj's input, the heads' outputs), target y - h - u (- o_proj's bias).
        Only for a layer whose attention output adds as it is (adapter.attn_output is None)."""
        o_proj = self.adapter.attn_output_proj(layer)
        down = self.adapter.ffn_output_proj(layer)
        out_of = self.adapter.mlp(layer) if isinstance(down, ExpertUnits) else down
        seen: dict[str, Tensor] = {}
        hooks = [o_proj.register_forward_pre_hook(lambda _m, a: seen.__setitem__("z", a[0])),
                 out_of.register_forward_hook(lambda _m, a, out: seen.__setitem__("u", out))]
        eqs = (NormalEquations.empty(o_proj.in_features, o_proj.out_features, self.device),
               NormalEquations.empty(o_proj.in_features, o_proj.out_features, self.device))
        try:
            with on_device(layer, self.device):
                for h, y, kw, hold in zip(inputs, targets, self.kwargs_at(position), held_out):
                    h = h.to(self.device)
                    layer(h, **kw)
                    y = y.to(self.device)
                    target = y - h - seen["u"].reshape(y.shape)
                    if o_proj.bias is not None:
                        target = target - o_proj.bias
                    eqs[int(hold)].add(seen["z"], target, y)
        finally:
            for hk in hooks:
                hk.remove()
        return eqs

    @torch.no_grad()
    def collect_refit(self, layer: nn.Module, inputs: list[Tensor], targets: list[Tensor], held_out: list[bool],
                      features: str = "channels", *, position: int | None = None, keep: bool = False,
                      head_score: str = "channel", store: Callable[[list[Tensor]], list[Tensor]] | None = None,
                      ) -> tuple[NormalEquations, NormalEquations, KeptPass | None]:
        """Least-squares statistics for refitting `layer`'s down projection so that its output
        on `inputs` matches `targets` (the original group's output), split train / held-out.
        `layer` runs as the model runs current layer `position` (its attention type's mask).

        features="channels": the FFN activations feeding down_proj (our refit);
        features="mlp_out": the FFN output itself (ReplaceMe's hidden x hidden map; an MoE
        layer's only refit, layer_refit.py).
        Where the FFN output does not add as it is (adapter.ffn_output), the problem is posed
        for gain * W instead of W (`_linear_in_gain`; layer_refit.py converts back).
        keep=True (the caller checked KeptPass's conditions and its memory): the pass also
        profiles the layer and keeps x1 and a of every batch, returned as a KeptPass; `store`
        says where they go (the cache's `keep_states`: memory, or --cache-dir's files).
        """
        down = self.adapter.ffn_output_proj(layer)
        moe = isinstance(down, ExpertUnits)
        if moe and features == "channels":
            raise ValueError("an MoE layer has no single down projection to refit: use features='mlp_out'")
        block = self.adapter.ffn_output(layer, self.model.config)
        seen: dict[str, Tensor] = {}
        out_of = self.adapter.mlp(layer) if moe else down  # the FFN's output (an MoE layer's experts + shared)
        hooks = [self.adapter.ffn_input(layer).register_forward_pre_hook(lambda _m, a: seen.__setitem__("x1", a[0])),
                 out_of.register_forward_hook(lambda _m, a, out: seen.update(a=a[0], u=out))]
        n_f = down.in_features if features == "channels" else down.out_features
        eqs = (NormalEquations.empty(n_f, down.out_features, self.device),
               NormalEquations.empty(n_f, down.out_features, self.device))
        unit_stats = _UnitStats(self, layer, head_score, active=keep)
        kept = KeptPass(position, list(inputs), [], [], unit_stats) if keep else None
        try:
            with on_device(layer, self.device), unit_stats:
                for h, y, kw, hold in zip(inputs, targets, self.kwargs_at(position), held_out):
                    layer(h.to(self.device), **kw)
                    if keep:
                        x1, a = seen["x1"].to(self.cache_device), seen["a"].to(self.cache_device)
                        x1, a = store([x1, a]) if store else (x1, a)
                        kept.x1.append(x1)
                        kept.a.append(a)
                    y = y.to(self.device)
                    target = y - seen["x1"]
                    f = seen["a"] if features == "channels" else seen["u"]
                    if block is not None:
                        f, target = _linear_in_gain(block, features, seen["a"], seen["u"], target,
                                                    None if moe else down.bias)
                    elif features == "channels" and down.bias is not None:
                        target = target - down.bias
                    eqs[int(hold)].add(f, target, y)
        finally:
            for hk in hooks:
                hk.remove()
        return (*eqs, kept)
