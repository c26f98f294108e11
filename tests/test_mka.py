"""MKA (Liu et al., 2024): the merged layer is lambda_A W_A + (1 - lambda_A) W_B for every
tensor, lambda_A = sigmoid(s_A / (s_A + s_B)), s the layers' mean NPIB similarity."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import corpus, tiny_model

from come import CompressConfig, compress
from come.methods import get_method
from come.methods.mka import diffusion_embedding, fusion_weight, layer_similarity, npib_matrix
from come.models.adapters import AttnShape, LayerWeights, get_adapter
from come.models.data import token_windows
from come.scoring.pair_scoring import PairToMerge, no_units

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(seed: int) -> LayerWeights:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return LayerWeights(q=r(8, 6), k=r(4, 6), v=r(4, 6), o=r(6, 8), gate=r(5, 6), up=r(5, 6), down=r(6, 5),
                        attn_norm=r(6), ffn_norm=r(6), q_bias=r(8), k_bias=r(4), v_bias=r(4))


def test_fusion_weight_is_the_sigmoid_of_the_similarity_share():
    r = 0.3 / (0.3 + 0.9)
    assert fusion_weight(0.3, 0.9) == pytest.approx(math.exp(r) / (1 + math.exp(r)), abs=1e-15)
    assert fusion_weight(1.0, 0.0) == pytest.approx(math.exp(1) / (1 + math.exp(1)))
    assert fusion_weight(0.0, 0.0) == fusion_weight(2.0, 2.0)  # undefined share: 0.5


def test_merge_is_the_weighted_sum_of_every_tensor():
    lam = math.exp(0.7 / 1.2) / (1 + math.exp(0.7 / 1.2))
    a, b = _layer(0), _layer(1)
    merged = get_method("mka").merge(PairToMerge(a, b, [1], [2], replace(no_units(), r_a=lam), AttnShape(2, 1, 4),
                                                 None, None))
    for name in ("q", "k", "v", "o", "gate", "up", "down", "attn_norm", "ffn_norm", "q_bias", "k_bias", "v_bias"):
        torch.testing.assert_close(getattr(merged, name), lam * getattr(a, name) + (1 - lam) * getattr(b, name),
                                   rtol=0, atol=1e-12)


def test_diffusion_embedding_ranks_and_npib_is_symmetric():
    x = np.random.default_rng(0).normal(size=(64, 16))
    e = diffusion_embedding(x)
    assert e.shape == (64, 2) and sorted(e[:, 0] * 64) == list(range(64))
    sim = npib_matrix([e, diffusion_embedding(x ** 3), diffusion_embedding(x[::-1].copy())])
    assert np.allclose(sim, sim.T) and np.isfinite(sim).all()


def test_compressed_layer_equals_the_hand_formula(tokenizer):
    dense = tiny_model("llama")
    calib = token_windows(corpus(), tokenizer, 8, 32, seed=0)
    cfg = CompressConfig(method="mka", sparsity=0.05, device="cpu")
    out, plan = compress(copy.deepcopy(dense), tokenizer, cfg, calib=calib)
    (merge,) = plan.merges
    k = merge.position
    s = layer_similarity(dense, calib, cfg.resolved())
    lam = fusion_weight(s[k], s[k + 1])
    assert merge.operator == "weighted-sum" and merge.r_a == pytest.approx(lam) and 0.5 <= lam <= 0.75
    adapter = get_adapter(dense.config)
    wa, wb = (adapter.read_layer(adapter.decoder_layers(dense)[i]).map(torch.Tensor.double) for i in (k, k + 1))
    got = adapter.read_layer(adapter.decoder_layers(out)[k])
    for name in ("q", "o", "down", "attn_norm", "ffn_norm"):
        want = lam * getattr(wa, name) + (1 - lam) * getattr(wb, name)
        torch.testing.assert_close(getattr(got, name).double(), want, rtol=0, atol=1e-6)
    assert plan.layer_forwards == 6 + 6  # the profile, and the similarity pass
