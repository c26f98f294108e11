"""The adapter contract: every family in conftest.FAMILIES passes the same checks.

src/come/models/adapters.py is the only module that knows a family's module names; everything
else trusts what it returns. Adding a family is one `Adapter(...)` entry plus its tiny
config in conftest.FAMILIES, and then every test here runs on it. Each check compares the
adapter's answer with what the transformers model really holds or computes, so a wrong
module name, a parameter the adapter does not see, or a stale layer index fails here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from come.errors import ComeError
from come.models.adapters import ADAPTERS, AttnShape, get_adapter

from conftest import FAMILIES, MOE_FAMILIES, tiny_config, tiny_model

SEQ = 12


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=sorted(FAMILIES) + sorted(MOE_FAMILIES))
def family(request):
    """Every family, Mixture-of-Experts ones included: the contract is the same."""
    return request.param


def _ids(model, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(1, model.config.vocab_size, (batch, seq), generator=gen)  # 1..: no eos (= 0) in the prompt


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _out(output) -> torch.Tensor:
    """A module's main output: decoder layers and attention return a tuple in some versions."""
    return output[0] if isinstance(output, tuple) else output


# ---- registry ------------------------------------------------------------------------------------


def test_every_adapter_has_a_tiny_config_and_vice_versa():
    """Adding a family without its tiny config (or the reverse) leaves it untested: refuse."""
    assert sorted(a.family for a in ADAPTERS) == sorted(FAMILIES | MOE_FAMILIES)
    types = [t for a in ADAPTERS for t in a.model_types]
    assert len(types) == len(set(types)), "a model_type claimed by two adapters"


def test_get_adapter(family):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    assert adapter.family == family and model.config.model_type in adapter.model_types
    attn = adapter.decoder_layers(model)[0].self_attn
    assert adapter.qk_norm == (hasattr(attn, "q_norm") and hasattr(attn, "k_norm"))


@pytest.mark.parametrize("config", [transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2),
                                    transformers.PretrainedConfig()], ids=["gpt2", "no-model-type"])
def test_unsupported_config_is_a_one_line_come_error(config):
    with pytest.raises(ComeError) as e:
        get_adapter(config)
    msg = str(e.value)
    assert "\n" not in msg and "unsupported architecture" in msg
    assert repr(getattr(config, "model_type", None)) in msg
    assert all(t in msg for a in ADAPTERS for t in a.model_types)  # names what IS supported


# ---- structure -----------------------------------------------------------------------------------


def test_decoder_layers_are_the_models_layers_in_order(family):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    layers = adapter.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers == 6
    owned = {id(m) for m in model.modules()}
    assert all(id(layer) in owned for layer in layers)
    order = []
    handles = [layer.register_forward_hook(lambda m, i, o, k=k: order.append(k)) for k, layer in enumerate(layers)]
    _logits(model, _ids(model))
    for h in handles:
        h.remove()
    assert order == list(range(6))


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 16), (4, 1, 32), (8, 8, 8)],
                         ids=["gqa", "mqa-wide-heads", "mha"])
def test_attn_shape_matches_the_modules(family, heads, kv_heads, head_dim):
    """head_dim * heads != hidden (64) in the second case: the config's head_dim must win."""
    model = tiny_model(family, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    adapter = get_adapter(model.config)
    shape = adapter.attn_shape(model.config)
    assert shape == AttnShape(heads, kv_heads, head_dim) and shape.n_rep == heads // kv_heads
    for layer in adapter.decoder_layers(model):
        attn, w = layer.self_attn, adapter.read_layer(layer)
        assert attn.head_dim == shape.head_dim and attn.num_key_value_groups == shape.n_rep
        assert w.q.shape[0] == w.o.shape[1] == shape.n_heads * shape.head_dim
        assert w.k.shape[0] == w.v.shape[0] == shape.n_kv_heads * shape.head_dim


def _enters(block, u: torch.Tensor) -> torch.Tensor:
    """What a block whose output projection gives `u` adds to the residual stream."""
    return u if block is None else block(u).to(u.dtype)


def test_module_accessors_are_the_modules_the_forward_uses(family):
    """Forward hooks on what the adapter returns fire once per forward, and their inputs and
    outputs chain as the decoder computes: embedding -> layers (x + attn, then + mlp, the
    attention's output being o_proj's, each block's output entering the stream as
    attn_output / ffn_output say, ffn_input receiving the stream after attention, the MLP's
    output down_proj's) -> final norm -> lm_head gives the logits; the backbone gives the
    final norm's output."""
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    shape, cfg = adapter.attn_shape(model.config), model.config
    seen: dict[tuple, list] = {}

    def hook(key, module):
        def record(m, args, kwargs, out):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_ids"))
            seen.setdefault(key, []).append((x, _out(out)))
        return module.register_forward_hook(record, with_kwargs=True)

    handles = [hook(("input", j), m) for j, m in enumerate(adapter.input_modules(model))]
    handles += [hook(("final_norm",), adapter.final_norm(model))]
    layers = adapter.decoder_layers(model)
    per_layer = {"layer": lambda lay: lay, "attention": adapter.attention, "o_proj": adapter.attn_output_proj,
                 "ffn_input": adapter.ffn_input, "mlp": adapter.mlp,
                 "down_proj": lambda lay: adapter.experts(lay) or adapter.ffn_output_proj(lay)}
    for k, layer in enumerate(layers):
        handles += [hook((name, k), get(layer)) for name, get in per_layer.items()]
    ids = _ids(model)
    logits = _logits(model, ids)
    for h in handles:
        h.remove()

    assert len(adapter.input_modules(model)) >= 1
    expected = {("input", j) for j in range(len(adapter.input_modules(model)))} | {("final_norm",)}
    expected |= {(name, k) for k in range(len(layers)) for name in per_layer}
    assert set(seen) == expected, f"never ran: {sorted(expected - set(seen))}"
    # each ran once; the rotary embedding once per attention type (Gemma 3's differ)
    assert {key: len(calls) for key, calls in seen.items() if len(calls) != 1 and key[0] != "input"} == {}
    assert len(seen[("input", 0)]) == 1

    def io(*key) -> tuple[torch.Tensor, torch.Tensor]:
        return seen[key][0]

    h = io("layer", 0)[0]
    assert h.shape == (*ids.shape, cfg.hidden_size)  # the token embeddings, Granite's multiplier applied by the model
    torch.testing.assert_close(h, io("input", 0)[1] * getattr(cfg, "embedding_multiplier", 1.0), rtol=0, atol=0)
    for k, layer in enumerate(layers):
        x, y = io("layer", k)
        assert torch.equal(x, h)  # its input is the embedding's / the previous layer's output
        _, attn_out = io("attention", k)
        z, o_out = io("o_proj", k)
        assert z.shape[-1] == shape.n_heads * shape.head_dim and torch.equal(attn_out, o_out)
        x1, ffn_in = io("ffn_input", k)
        torch.testing.assert_close(x1, h + _enters(adapter.attn_output(layer, cfg), attn_out))  # after attention
        mlp_in, mlp_out = io("mlp", k)
        a, down_out = io("down_proj", k)
        assert torch.equal(mlp_in, x1 if adapter.ffn_input(layer) is adapter.mlp(layer) else ffn_in)
        if adapter.experts(layer) is None:
            assert torch.equal(mlp_out, down_out) and a.shape[-1] == cfg.intermediate_size
        else:
            units = adapter.ffn_output_proj(layer)
            assert torch.equal(a, mlp_in.reshape(a.shape)) and units.in_features == _n_experts(cfg)
            if adapter.read_layer(layer).shared_down is None:
                assert torch.equal(mlp_out, down_out.reshape(mlp_out.shape))
        torch.testing.assert_close(y, x1 + _enters(adapter.ffn_output(layer, cfg), mlp_out))  # after the MLP
        h = y
    final_in, final_out = io("final_norm")
    assert torch.equal(final_in, h)
    with torch.no_grad():
        assert torch.equal(adapter.lm_head(model)(final_out), logits)
        hidden = adapter.backbone(model)(input_ids=ids).last_hidden_state
    assert torch.equal(hidden, final_out)


def _n_experts(cfg) -> int:
    return getattr(cfg, "num_local_experts", None) or cfg.num_experts


# ---- weights -------------------------------------------------------------------------------------


def test_read_write_round_trip_is_bit_identical(family):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    ids = _ids(model)
    before, logits = _state(model), _logits(model, ids)
    for layer in adapter.decoder_layers(model):
        adapter.write_layer(layer, adapter.read_layer(layer))
    after = _state(model)
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert torch.equal(_logits(model, ids), logits)


def test_layer_weights_cover_every_parameter_of_the_layer(family):
    """read_layer sees every parameter (none silently left out of a merge), returns copies,
    and write_layer writes every one of them, casting the dtype, into that layer only."""
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    layers = adapter.decoder_layers(model)
    layer = layers[2]
    w = adapter.read_layer(layer)
    present = [t for f in dataclasses.fields(w) if (t := getattr(w, f.name)) is not None]
    assert sum(t.numel() for t in present) == sum(p.numel() for p in layer.parameters())

    ids = _ids(model)
    before, logits = _state(model), _logits(model, ids)
    for t in present:  # copies: the layer is untouched
        t.add_(1.0)
    assert all(torch.equal(v, _state(model)[k]) for k, v in before.items())
    params = dict(layer.named_parameters())
    old = {n: p.detach().clone() for n, p in params.items()}
    shifted = w.map(lambda t: t.double() + 0.25)
    adapter.write_layer(layer, shifted)
    unchanged = [n for n, p in params.items() if torch.equal(p, old[n])]
    assert unchanged == [], f"write_layer left these parameters alone: {unchanged}"
    assert all(p.dtype == torch.float32 for p in params.values())
    back = adapter.read_layer(layer)
    for f in dataclasses.fields(back):
        got, want = getattr(back, f.name), getattr(shifted, f.name)
        assert (got is None) == (want is None)
        assert got is None or torch.equal(got, want.float())
    prefix = next(n for n, m in model.named_modules() if m is layer) + "."
    after = _state(model)
    assert [k for k in before if not k.startswith(prefix) and not torch.equal(before[k], after[k])] == []
    assert not torch.allclose(_logits(model, ids), logits)


def test_write_layer_refuses_a_mismatched_record(family):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    layer = adapter.decoder_layers(model)[0]
    w = adapter.read_layer(layer)
    toggled = dataclasses.replace(w, q_bias=None if w.q_bias is not None else torch.zeros(w.q.shape[0]))
    with pytest.raises(ComeError, match="present on one side only") as e:
        adapter.write_layer(layer, toggled)
    assert "\n" not in str(e.value)
    with pytest.raises(ComeError, match="shape") as e:
        adapter.write_layer(layer, dataclasses.replace(w, down=w.down[:, :-1]))
    assert "\n" not in str(e.value)
    post = dataclasses.replace(w, ffn_post_norm=None if w.ffn_post_norm is not None else torch.ones(w.down.shape[0]))
    with pytest.raises(ComeError, match="present on one side only"):  # a post-norm the layer lacks, or the reverse
        adapter.write_layer(layer, post)


# ---- structural edits ----------------------------------------------------------------------------


def _layer_type_overrides(family) -> dict:
    """Families whose config lists a per-layer attention type get a MIXED list (sliding window
    8 < the sequence), so cutting the list wrongly changes the masks and the cache."""
    if not hasattr(tiny_config(family), "layer_types"):
        return {}
    return {"layer_types": ["full_attention", "sliding_attention"] * 3, "sliding_window": 8,
            "use_sliding_window": True}


@pytest.mark.parametrize("keep", [[0, 2, 3, 5], [1, 4]], ids=["drop-2", "drop-4"])
def test_keep_layers_leaves_a_consistent_model(family, keep):
    overrides = _layer_type_overrides(family)
    model = tiny_model(family, **overrides)
    adapter = get_adapter(model.config)
    old_layers = list(adapter.decoder_layers(model))
    old_types = getattr(model.config, "layer_types", None)
    adapter.keep_layers(model, keep)

    layers = adapter.decoder_layers(model)
    assert [id(lay) for lay in layers] == [id(old_layers[i]) for i in keep]
    assert model.config.num_hidden_layers == len(layers) == len(keep)
    assert [lay.self_attn.layer_idx for lay in layers] == list(range(len(keep)))
    if old_types is not None:
        assert model.config.layer_types == [old_types[i] for i in keep]

    # the same weights in a model built natively with len(keep) layers compute the same logits
    native_overrides = dict(overrides, layer_types=[old_types[i] for i in keep]) if old_types else overrides
    native = transformers.AutoModelForCausalLM.from_config(
        tiny_config(family, layers=len(keep), **native_overrides)).eval()
    native.load_state_dict(model.state_dict())  # strict: the renumbered layers have the native names
    # and every kept layer carries the records (index, attention type, window) the native one has
    for lay, nat in zip(layers, adapter.decoder_layers(native), strict=True):
        for mine, theirs in ((lay, nat), (lay.self_attn, nat.self_attn)):
            for attr in ("layer_idx", "layer_type", "sliding_window", "is_sliding", "attention_type"):
                assert getattr(mine, attr, None) == getattr(theirs, attr, None), attr
    ids = _ids(model, seq=16)
    torch.testing.assert_close(_logits(model, ids), _logits(native, ids), rtol=0, atol=1e-6)

    with torch.no_grad():
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False)
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert cached.shape == (ids.shape[0], ids.shape[1] + 8)
    assert torch.equal(cached, uncached)
