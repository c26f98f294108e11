"""Run a model one decoder layer at a time over calibration batches, with statistics hooks.

The sequential pipeline of llm-compressor: the model stays where it was loaded (host
memory for big models); each layer visits the compute device for its pass over all
calibration batches, so device memory holds one layer plus one batch of activations.
Statistics come from forward hooks on the stock modules (no forked modeling code).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor, nn

from .adapters import Adapter
from .errors import ComeError
from .refit import NormalEquations
from .selection import token_cosines


@dataclass
class LayerStats:
    """What one pass of a layer over the calibration set tells us."""

    attn_abs_mean: Tensor  # E_t |z_c|, o_proj input channels
    ffn_abs_mean: Tensor  # E_t |a_j|, down_proj input channels
    head_out_l1: Tensor | None  # E_t ||W_o[:, cols(i)] z_i||_1 per query head (exact head score)
    bi: float  # block influence: 1 - mean over all tokens of cos(in, out)


def resolve_device(name: str) -> torch.device:
    """The compute device layers visit: `auto` takes CUDA when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ComeError("--device cuda requested but CUDA is not available; use --device cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise ComeError(f"--device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


class _Stop(Exception):
    pass


@contextmanager
def _on(module: nn.Module, device: torch.device):
    """Temporarily move `module` to `device` (no-op when it is already there)."""
    tensor = next(chain(module.parameters(), module.buffers()), None)
    home = tensor.device if tensor is not None else device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def _to(obj, device):
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    return obj


class LayerRunner:
    """Embeds calibration batches once, then runs any decoder layer over cached inputs.

    `cache_device` holds hidden states between layers (host memory by default);
    `device` runs the layer. The layer kwargs the model would pass (rotary position
    embeddings, causal mask) are captured once per batch from the model itself.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, device: torch.device, cache_device: torch.device):
        self.model, self.adapter = model, adapter
        self.device, self.cache_device = device, cache_device
        self.layer_kwargs: list[dict] = []
        self.shape = adapter.attn_shape(model.config)

    @torch.no_grad()
    def embed(self, batches: list[Tensor]) -> list[Tensor]:
        """Hidden states entering layer 0 for each batch of token ids; records layer kwargs."""
        layer0 = self.adapter.decoder_layers(self.model)[0]
        captured: dict = {}

        def catch(_module, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            captured["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _Stop

        hook = layer0.register_forward_pre_hook(catch, with_kwargs=True)
        out, self.layer_kwargs = [], []
        try:
            with ExitStack() as stack:
                for part in self.adapter.input_modules(self.model):
                    stack.enter_context(_on(part, self.device))
                for ids in batches:
                    try:
                        self.model(input_ids=ids.to(self.device), use_cache=False)
                    except _Stop:
                        pass
                    out.append(captured["h"].to(self.cache_device))
                    self.layer_kwargs.append(captured["kw"])
        finally:
            hook.remove()
        return out

    @torch.no_grad()
    def run(self, layer: nn.Module, inputs: list[Tensor], want_stats: bool, head_score: str = "channel") -> tuple[list[Tensor], LayerStats | None]:
        """Outputs of `layer` on every cached input batch, and its statistics if asked."""
        o_proj = self.adapter.attn_output_proj(layer)
        down = self.adapter.ffn_output_proj(layer)
        acc = {"z": 0.0, "a": 0.0, "head": 0.0, "cos": 0.0, "n": 0}

        # |.| in the activations' dtype, sums in float64: a float64 copy of every batch's
        # activations cost a fifth of a profiling layer pass
        def on_o(mod, args):
            z = args[0]
            acc["z"] = acc["z"] + z.abs().sum(dim=(0, 1), dtype=torch.float64)
            if head_score == "exact":
                z = z.double()
                zh = z.reshape(*z.shape[:2], self.shape.n_heads, self.shape.head_dim)
                w = mod.weight.double().T.reshape(self.shape.n_heads, self.shape.head_dim, -1)
                acc["head"] = acc["head"] + torch.stack(
                    [(zh[:, :, h] @ w[h]).abs().sum() for h in range(self.shape.n_heads)]
                )

        def on_down(_mod, args):
            acc["a"] = acc["a"] + args[0].abs().sum(dim=(0, 1), dtype=torch.float64)

        hooks = [o_proj.register_forward_pre_hook(on_o), down.register_forward_pre_hook(on_down)] if want_stats else []
        outputs = []
        try:
            with _on(layer, self.device):
                for h, kw in zip(inputs, self.layer_kwargs):
                    h_dev = h.to(self.device)
                    y = layer(h_dev, **kw)
                    y = y[0] if isinstance(y, tuple) else y
                    if want_stats:
                        acc["cos"] += float(token_cosines(h_dev, y).sum(dtype=torch.float64))
                        acc["n"] += h.shape[0] * h.shape[1]
                    outputs.append(y.to(self.cache_device))
        finally:
            for hk in hooks:
                hk.remove()
        if not want_stats:
            return outputs, None
        n = acc["n"]
        stats = LayerStats(
            attn_abs_mean=(acc["z"] / n).cpu(),
            ffn_abs_mean=(acc["a"] / n).cpu(),
            head_out_l1=(acc["head"] / n).cpu() if head_score == "exact" else None,
            bi=1.0 - acc["cos"] / n,
        )
        return outputs, stats

    @torch.no_grad()
    def collect_refit(self, layer: nn.Module, inputs: list[Tensor], targets: list[Tensor], held_out: list[bool],
                      features: str = "channels") -> tuple[NormalEquations, NormalEquations]:
        """Least-squares statistics for refitting `layer`'s down projection so that its output
        on `inputs` matches `targets` (the original group's output), split train / held-out.

        features="channels": the FFN activations feeding down_proj (our refit);
        features="mlp_out": the FFN output itself (ReplaceMe's hidden x hidden map).
        """
        down = self.adapter.ffn_output_proj(layer)
        seen: dict[str, Tensor] = {}
        hooks = [self.adapter.ffn_norm(layer).register_forward_pre_hook(lambda _m, a: seen.__setitem__("x1", a[0]))]
        if features == "channels":
            hooks.append(down.register_forward_pre_hook(lambda _m, a: seen.__setitem__("f", a[0])))
        else:
            hooks.append(down.register_forward_hook(lambda _m, _a, out: seen.__setitem__("f", out)))
        n_f = down.in_features if features == "channels" else down.out_features
        eqs = (NormalEquations.empty(n_f, down.out_features, self.device),
               NormalEquations.empty(n_f, down.out_features, self.device))
        try:
            with _on(layer, self.device):
                for h, y, kw, hold in zip(inputs, targets, self.layer_kwargs, held_out):
                    layer(h.to(self.device), **kw)
                    y = y.to(self.device)
                    target = y - seen["x1"]
                    if features == "channels" and down.bias is not None:
                        target = target - down.bias
                    eqs[int(hold)].add(seen["f"], target, y)
        finally:
            for hk in hooks:
                hk.remove()
        return eqs
