"""`--reprofile window`: after a merge only a window of layers re-runs; the later layers keep
their statistics unless the state leaving the window drifted. Equal to `full` when the
window covers the model or the drift threshold is 0; fewer layer-forwards, honestly counted;
the refit always reads the current model's true states."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from come import CompressConfig, ComeError, compress
from come.engine.cache import ActivationCache, relative_change
from come.models.data import token_windows

from conftest import corpus, tiny_model

LAYERS = 10
BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _calib(tokenizer, n=8, seqlen=32):
    return token_windows(corpus(), tokenizer, n, seqlen, seed=0)


def _compress(tokenizer, n=8, **cfg):
    model = tiny_model("llama", layers=LAYERS)
    cfg = CompressConfig(**{"sparsity": 0.45, "device": "cpu", "batch_size": 4, **cfg})
    return compress(model, tokenizer, cfg, calib=_calib(tokenizer, n))


# merges early in the model, so that windows end before it does (a tiny model's own picks
# are its last layers, where every window reaches the end)
EARLY = dict(protect=[7, 8, 9], sparsity=0.3)
# 4 batches of 4 x 32 tokens, hidden 64, fp32, at 11 boundaries: the dense states of 2 batches
# fill half of this budget, the layer inputs of every 2nd boundary the rest
STRIDE_2 = dict(n=16, max_cache_gb=2 * 2 * (LAYERS + 1) * 4 * 32 * 64 * 4 / 2**30)


@pytest.fixture
def caches(monkeypatch):
    """Every ActivationCache a run makes, to read its drift checks afterwards."""
    made = []
    init = ActivationCache.__init__

    def record(self, *args, **kw):
        init(self, *args, **kw)
        made.append(self)

    monkeypatch.setattr(ActivationCache, "__init__", record)
    return made


def _decisions(plan):
    """Every merge's choices and numbers (the refit's timings aside), and the groups."""
    untimed = [m.refit and {k: v for k, v in m.refit.items() if "seconds" not in k} for m in plan.merges]
    return [(m.position, m.group_a, m.group_b, m.kv_a, m.kv_b, m.ffn_a, m.ffn_b, m.pair_scores, r)
            for m, r in zip(plan.merges, untimed)], plan.groups


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("window, early", [(dict(reprofile_window=LAYERS), {}),
                                           (dict(reprofile_window=1, reprofile_drift=0.0), EARLY)],
                         ids=["window-covers-model", "drift-0"])
@pytest.mark.parametrize("pair_score", ["bi-all-tokens", "angular"])
def test_window_equals_full_when_it_must(tokenizer, caches, window, early, pair_score):
    """A window as long as the model, or a drift threshold of 0 (every check re-runs all), is
    `full`: the same Plan decisions, the same weights byte for byte, the same layer-forwards."""
    full_model, full = _compress(tokenizer, pair_score=pair_score, reprofile="full", **early)
    model, plan = _compress(tokenizer, pair_score=pair_score, reprofile="window", **window, **early)
    assert len(plan.merges) >= 3
    assert _decisions(plan) == _decisions(full)
    assert _same_weights(model, full_model)
    assert plan.layer_forwards == full.layer_forwards
    checks = caches[-1].drifts
    if "reprofile_drift" in window:
        assert checks and all(rerun for *_, rerun in checks)  # the checks ran, and each re-ran everything
    else:
        assert not checks  # no window ended before the model did


def _count_layer_passes(monkeypatch) -> list[int]:
    """Counts every pass of a decoder layer over the calibration batches, through the runner
    or the refit's statistics pass (each checked to call the layer): what `layer_forwards`
    must add up to."""
    from come.engine.runner import LayerRunner

    passes = [0]
    for name in ("run", "collect_refit"):
        real = getattr(LayerRunner, name)

        def counted(self, layer, inputs, *args, _real=real, **kw):
            calls = []
            hook = layer.register_forward_pre_hook(lambda *_: calls.append(1))
            try:
                return _real(self, layer, inputs, *args, **kw)
            finally:
                hook.remove()
                assert calls
                passes[0] += 1

        monkeypatch.setattr(LayerRunner, name, counted)
    return passes


@pytest.mark.parametrize("refit", ["ls", "none"])
def test_window_counts_its_forwards_and_needs_fewer(tokenizer, caches, monkeypatch, refit):
    """layer_forwards = the layer passes actually made (each over the 2 calibration batches),
    in both modes; the window, with a threshold its drifts stay under, makes fewer."""
    passes = _count_layer_passes(monkeypatch)
    _, full = _compress(tokenizer, refit=refit, reprofile="full")
    assert passes[0] == full.layer_forwards
    passes[0] = 0
    _, plan = _compress(tokenizer, refit=refit, reprofile="window", reprofile_window=1, reprofile_drift=10.0)
    assert passes[0] == plan.layer_forwards
    assert plan.layer_forwards < full.layer_forwards
    checks = caches[-1].drifts
    assert checks and not any(rerun for *_, rerun in checks)  # windows did end early: stale layers existed
    assert all(0.0 < d < 10.0 for _, _, d, _ in checks)
    assert len(plan.merges) == len(full.merges) and plan.num_layers_after == full.num_layers_after


@pytest.mark.parametrize("threshold", [0.0, 10.0])
def test_strided_cache_window(tokenizer, caches, monkeypatch, threshold):
    """With a strided cache the window grows until a boundary whose state it can compare with
    (the refit's inputs past it run anew): the count stays honest, the windows save passes,
    and threshold 0 is `full`."""
    passes = _count_layer_passes(monkeypatch)
    full_model, full = _compress(tokenizer, reprofile="full", **EARLY, **STRIDE_2)
    assert passes[0] == full.layer_forwards
    passes[0] = 0
    model, plan = _compress(tokenizer, **EARLY, reprofile="window", reprofile_window=1, reprofile_drift=threshold,
                            **STRIDE_2)
    assert passes[0] == plan.layer_forwards
    cache = caches[-1]
    assert cache.stride == 2 and len(cache.dense[0]) == 2
    assert cache.drifts and all(exit_ > pos for pos, exit_, _, _ in cache.drifts)
    if threshold:
        assert plan.layer_forwards < full.layer_forwards
    else:
        assert _decisions(plan) == _decisions(full) and _same_weights(model, full_model)
        assert plan.layer_forwards == full.layer_forwards


@pytest.mark.parametrize("budget", [{}, STRIDE_2], ids=["every-boundary", "stride-2"])
def test_refit_reads_true_inputs_in_window_mode(tokenizer, caches, monkeypatch, budget):
    """Past a window the later layers' statistics are stale, but the refit of a later merge
    reads the states entering its layer in the CURRENT model: checked at every refit against
    the stock model's own forward (output_hidden_states)."""
    import come.merging.layer_refit as layer_refit

    real = layer_refit.refit_layer  # what the loop's refit step (layer_refit.refit_step) calls
    seen = []

    def checked(cache, k, group, inputs, *args, **kw):
        used = cache.inputs_at(k)  # what the refit reads (memoized: the same tensors)
        with torch.no_grad():
            true = [cache.model(input_ids=ids, output_hidden_states=True).hidden_states[k]
                    for ids in cache.token_batches]
        for u, t in zip(used, true, strict=True):
            torch.testing.assert_close(u, t, rtol=1e-5, atol=1e-5)
        seen.append(k)
        return real(cache, k, group, inputs, *args, **kw)

    monkeypatch.setattr(layer_refit, "refit_layer", checked)
    _, plan = _compress(tokenizer, **EARLY, reprofile="window", reprofile_window=1, reprofile_drift=10.0,
                        **budget)
    assert plan.merges and all(m.refit is not None for m in plan.merges)
    assert len(seen) == len(plan.merges)
    stale = [d for _, _, d, rerun in caches[-1].drifts if not rerun]
    assert stale and max(stale) > 1e-3  # stale states were around, and far from the true ones


@pytest.mark.parametrize("bad, match", [
    (dict(reprofile="window", reprofile_window=0), "--reprofile-window must be >= 1, got 0"),
    (dict(reprofile="window", reprofile_drift=-0.1), "--reprofile-drift must be a finite number >= 0"),
    (dict(reprofile="window", reprofile_drift=math.nan), "--reprofile-drift must be a finite number >= 0"),
    (dict(reprofile="window", reprofile_drift=math.inf), "--reprofile-drift must be a finite number >= 0"),
    (dict(reprofile="sometimes"), "--reprofile must be one of full, window"),
    (dict(reprofile="full", reprofile_window=3), "add --reprofile window"),
    (dict(method="laco", reprofile_drift=0.1), "add --reprofile window"),
])
def test_bad_values_are_one_line(bad, match):
    with pytest.raises(ComeError, match=match) as e:
        CompressConfig(**bad).resolved()
    assert "\n" not in str(e.value)


def test_relative_change():
    old = [torch.ones(2, 3, 4), 2 * torch.ones(1, 3, 4)]
    new = [o * 1.1 for o in old]
    assert relative_change(new, old) == pytest.approx(0.1)
    assert relative_change(old, old) == 0.0
    assert relative_change([torch.ones(1, 2)], [torch.zeros(1, 2)]) == math.inf


def test_drift_benchmark_quick():
    out = subprocess.run([sys.executable, str(BENCH / "reprofile_drift.py"), "--quick"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| d | merges |" in out.stdout and "| window W=1, drift 0.05 |" in out.stdout


def test_dense_targets_survive_a_merge_at_position_0(tokenizer, caches, monkeypatch):
    """After a merge at position 0 every statistic is missing, as before the first pass; the
    re-run must not take the compressed model's states for the dense ones (the refit's
    targets, by original boundary). Regression: it did, in full mode."""
    import copy

    import come.engine.pipeline as pipeline

    picks = []

    def first_at_zero(scores, eligible):
        picks.append(0 if not picks else choose(scores, eligible))
        return picks[-1]

    choose = pipeline.choose_pair
    monkeypatch.setattr(pipeline, "choose_pair", first_at_zero)
    model = tiny_model("llama", layers=LAYERS)
    dense = copy.deepcopy(model)
    calib = _calib(tokenizer)
    compress(model, tokenizer, CompressConfig(sparsity=0.3, device="cpu", batch_size=4, reprofile="full"), calib=calib)
    assert picks[0] == 0 and len(picks) >= 2  # later merges (and their refits) came after the merge at 0
    cache = caches[-1]
    with torch.no_grad():
        for i, batch in enumerate(calib.split(4)[:len(cache.dense[0])]):
            hs = dense(batch, output_hidden_states=True).hidden_states
            for k in range(1, LAYERS):  # the last entry has the final norm applied
                torch.testing.assert_close(cache.dense[k][i], hs[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reprofile", ["window", "full"])
def test_the_refit_pass_stands_in_for_the_merged_layers_profiling(tokenizer, monkeypatch, reprofile):
    """The refit's pass over a merged layer, kept (profile.KeptPass), saves the re-profiling
    pass over that layer after every merge but the last, and changes nothing: the same
    decisions and the same weights as a run with no room to keep it."""
    model, plan = _compress(tokenizer, reprofile=reprofile)
    monkeypatch.setattr(ActivationCache, "has_room", lambda self, nbytes: False)
    rerun_model, rerun = _compress(tokenizer, reprofile=reprofile)
    assert _decisions(plan) == _decisions(rerun) and _same_weights(model, rerun_model)
    assert rerun.layer_forwards - plan.layer_forwards == len(plan.merges) - 1 > 0
