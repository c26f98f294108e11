"""Running single decoder layers and building reference outputs for the identity tests."""

from __future__ import annotations

import copy
import inspect

import torch


def rope(model, h, layer):
    """`layer`'s rotary embeddings (Gemma 3's depend on the layer's attention type)."""
    pos = torch.arange(h.shape[1]).unsqueeze(0)
    kind = getattr(layer.self_attn, "layer_type", None)
    extra = (kind,) if "layer_type" in inspect.signature(model.model.rotary_emb.forward).parameters else ()
    return model.model.rotary_emb(h, pos, *extra), pos


def run_layer(model, layer, h):
    pe, pos = rope(model, h, layer)
    out = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
    return out[0] if isinstance(out, tuple) else out


def attn_out(model, layer, x):
    """Attention output of `layer` on normed input (no residual)."""
    pe, pos = rope(model, x, layer)
    return layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=pe, attention_mask=None)[0]


def masked(layer, keep_heads: list[int], keep_channels: list[int], head_dim: int):
    """A copy of `layer` whose unkept heads / channels write nothing (output columns zeroed)."""
    layer = copy.deepcopy(layer)
    with torch.no_grad():
        o, down = layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight
        head_mask = torch.zeros(o.shape[1], dtype=o.dtype)
        for h in keep_heads:
            head_mask[h * head_dim:(h + 1) * head_dim] = 1
        ch_mask = torch.zeros(down.shape[1], dtype=down.dtype)
        ch_mask[keep_channels] = 1
        o.mul_(head_mask)
        down.mul_(ch_mask)
    return layer


def parallel(model, layers, x):
    """x1 = x + m sum_l attn_l(x); y = x1 + m sum_l mlp_l(x1): what a concatenated layer
    computes (m: Granite's residual multiplier, 1 elsewhere)."""
    m = getattr(model.config, "residual_multiplier", 1.0)
    x1 = x + m * sum(attn_out(model, lay, x) for lay in layers)
    return x1 + m * sum(lay.mlp(lay.post_attention_layernorm(x1)) for lay in layers)


def rel_err(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def reload_equal(model, tokenizer, plan, out_dir, ids):
    """Save the compressed model, reload it with plain transformers and check it gives the
    same logits on `ids` and the saved config the Plan's layer count; returns the reloaded
    model and the output directory."""
    import transformers

    from come.models.checkpoint import save_checkpoint

    with torch.no_grad():
        logits = model(ids).logits
    out = save_checkpoint(model, tokenizer, plan, out_dir)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == plan.num_layers_after
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
    return reloaded, out
