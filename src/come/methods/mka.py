"""MKA (Liu et al., EMNLP 2024, "Pruning via Merging: Compressing LLMs via Manifold Alignment
Based Layer Merging", arXiv 2406.16330; code: github.com/SempraETY/Pruning-via-Merging,
pipeline.py, and the CoMe authors' re-implementation, WangFei-2019/CoMe, methods/mka.py):
the pair becomes ONE layer whose every tensor is the similarity-weighted sum of the two
layers' tensors, the "WeightSum" merge the CoMe paper argues against.

The rule, as both codes run it (the paper writes theta = lambda theta_A + (1 - lambda) theta_B
with lambda from the layers' similarity; the code fixes how):
  1. The dense model's output state of every layer at N calibration tokens is embedded by a
     diffusion map (`diffusionKernel`: K = exp(-sqrt(||x_i - x_j|| / 8)), alpha = 0.5
     normalization, top-3 singular vectors of the normalized kernel, the 2 after the first
     divided by it) and each of the 2 coordinates replaced by its rank / N.
  2. NPIB(i, j) = mean over the 2 x 2 coordinate pairs of the KSG mutual information
     (sklearn's mutual_info_regression, 5 neighbours) / sqrt(H_i H_j), H the k-nearest
     neighbour entropy estimate with k = 50 (`compute_similarity_matrix_npib_global`).
  3. s_l = mean_j NPIB(l, j); r = s_A / (s_A + s_B); lambda_A = exp(beta r) / (1 + exp(beta r)),
     beta = 1 (`compute_fusion_ratios`), so lambda_A lies in [0.5, 0.73]: A always weighs more.
  4. merged = lambda_A W_A + (1 - lambda_A) W_B. The Plan records lambda_A as the merge's r_a.
A merged side's similarity is that of its first original layer: what both codes look up,
since they index the similarity matrix by current position and only ever merge at the end.

Where come differs, and why:
- The pair. Both codes always merge the LAST two layers (layer L-2 with L-1, then L-3 with
  the result, ...). No come pair score expresses that, so mka chooses pairs as every
  weight-space peer here does, by the last-token angular score (`--pair-score`, default
  angular): the operator and its weight are MKA's, the order is not.
- The tensors. Every tensor is weighted, norms and biases included (come's
  `linear_combination`). The CoMe authors' port weights the linear weights and the norms
  too, so LLaMA, Mistral and Qwen3 merges are theirs exactly; for Qwen2's q/k/v biases it
  adds them unweighted (b_A + b_B). The original weights only the 7 projection matrices
  (and, through a `state_dict()` copy, writes none of them: its output is the model with
  the last layer dropped).
- The points. Both codes embed per calibration SAMPLE the first 512 positions, then their
  kernel compares the first few tokens of samples (a reshape bug). Here the N = 512 points
  are tokens evenly spaced over all calibration windows, each layer's raw output (the
  codes' last entry is after the final norm), in float64. k for the entropy and the MI
  neighbours are capped at N - 1; the MI's jitter is seeded (random_state=0) so runs repeat;
  the kernel's condition-number regularization (only for an infinite condition number)
  is left out; a non-finite NPIB reads as 0.
One extra pass of the dense model over the calibration computes the states; it counts into
the Plan's layer_forwards.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import TYPE_CHECKING

from .base import MergeMethod, MergeSteps, register

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger("come")

N_POINTS = 512  # calibration tokens embedded per layer (MKA keeps 512 positions a sample)
SIGMA, ALPHA, DIMS = 8.0, 0.5, 2  # diffusionKernel(sigmaK=8, alpha=0.5, d=2)
MI_NEIGHBORS, ENTROPY_NEIGHBORS = 5, 50  # compute_similarity_matrix_npib_global's defaults
BETA = 1.0  # compute_fusion_ratios(beta=1.0)


def fusion_weight(s_a: float, s_b: float, beta: float = BETA) -> float:
    """lambda_A = exp(beta r) / (1 + exp(beta r)), r = s_A / (s_A + s_B) (0.5 if undefined)."""
    total = s_a + s_b
    r = s_a / total if total != 0 and math.isfinite(total) else 0.5
    return 1.0 / (1.0 + math.exp(-beta * r))


def diffusion_embedding(x: np.ndarray) -> np.ndarray:
    """[N, DIMS] rank-normalized diffusion-map coordinates of the N points `x` ([N, hidden])."""
    import numpy as np

    sq = (x * x).sum(axis=1)
    dist = np.sqrt(np.abs(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)))
    np.fill_diagonal(dist, 0.0)
    kernel = np.exp(-np.sqrt(dist / SIGMA))
    p = kernel.sum(axis=0)
    k1 = kernel / np.outer(p, p) ** ALPHA
    v = np.sqrt(k1.sum(axis=0))
    a = np.nan_to_num(k1 / np.outer(v, v))
    a[np.abs(a) < 1e-12] = 1e-12
    u = np.linalg.svd(a, full_matrices=False)[0][:, :DIMS + 1]
    u[:, 0] = np.where(u[:, 0] == 0, 1e-8, u[:, 0])
    y = np.nan_to_num(u[:, 1:] / u[:, :1], nan=0.0, posinf=0.0, neginf=0.0)
    return np.argsort(np.argsort(y, axis=0), axis=0) / len(y)


def knn_entropy(e: np.ndarray, k: int) -> float:
    """-mean log(k / (N d_k^dim)), d_k the distance to the k-th neighbour (entropy_estimator_knn)."""
    import numpy as np
    from sklearn.neighbors import NearestNeighbors

    n, dim = e.shape
    d_k = NearestNeighbors(n_neighbors=k + 1).fit(e).kneighbors(e)[0][:, -1]
    return float(-np.mean(np.log(k / (n * d_k ** dim))))


def npib_matrix(embeddings: list[np.ndarray]) -> np.ndarray:
    """NPIB(i, j) = mean MI(emb_i, emb_j[:, d]) / sqrt(H_i H_j) for every pair of layers."""
    import numpy as np
    from sklearn.feature_selection import mutual_info_regression

    n = len(embeddings[0])
    entropy = [knn_entropy(e, min(ENTROPY_NEIGHBORS, n - 1)) for e in embeddings]
    sim = np.zeros((len(embeddings), len(embeddings)))
    for i, e_i in enumerate(embeddings):
        for j in range(i, len(embeddings)):
            mi = np.mean([mutual_info_regression(e_i, embeddings[j][:, d], discrete_features=False,
                                                 n_neighbors=min(MI_NEIGHBORS, n - 1), random_state=0).mean()
                          for d in range(DIMS)])
            with np.errstate(invalid="ignore"):
                sim[i, j] = sim[j, i] = mi / np.sqrt(entropy[i] * entropy[j])
    return np.nan_to_num(sim, nan=0.0, posinf=0.0, neginf=0.0)


def layer_states(model, calib: torch.Tensor, cfg) -> list[np.ndarray]:
    """Every layer's output at N_POINTS calibration tokens evenly spaced over all windows,
    [N, hidden] float64 per layer (layers run one at a time on the compute device)."""
    import torch

    from ..engine.runner import LayerRunner
    from ..models.adapters import get_adapter
    from ..settings.device import resolve_device

    adapter = get_adapter(model.config)
    runner = LayerRunner(model, adapter, resolve_device(cfg.device), torch.device("cpu"))
    flat = torch.linspace(0, calib.numel() - 1, min(N_POINTS, calib.numel())).round().long()
    where = [(int(t) // calib.shape[1], int(t) % calib.shape[1]) for t in flat]
    states = []
    with torch.no_grad():
        h = runner.embed(list(calib.split(cfg.batch_size)))
        for k, layer in enumerate(adapter.decoder_layers(model)):
            h, _ = runner.run(layer, h, False, position=k)
            rows = [h[w // cfg.batch_size][w % cfg.batch_size, p] for w, p in where]
            states.append(torch.stack(rows).double().numpy())
    return states


def layer_similarity(model, calib: torch.Tensor, cfg) -> list[float]:
    """s_l = mean_j NPIB(l, j) of every layer of the (dense) model."""
    return npib_matrix([diffusion_embedding(x) for x in layer_states(model, calib, cfg)]).mean(axis=1).tolist()


class MKASteps(MergeSteps):
    """An MKA run's steps: the dense model's layer similarities, measured once before the
    first merge (one extra pass over the calibration, counted into the Plan's layer_forwards,
    so a smaller level's Plan counts it too), and each merge's weight from them."""

    def __init__(self, method, run, cfg):
        import torch

        super().__init__(method, run, cfg)
        self.similarity = layer_similarity(run.model, torch.cat(run.cache.token_batches), cfg)
        run.cache.forwards += len(self.similarity)
        log.info("mka: layer similarity %s", ", ".join(f"{s:.4f}" for s in self.similarity))

    def merge_pair(self, k, pair):
        lam = fusion_weight(self.similarity[pair.group_a[0]], self.similarity[pair.group_b[0]])
        choice = replace(pair.choice, r_a=lam)  # recorded in the Plan as side A's share
        return self.method.merge(replace(pair, choice=choice)), choice, {}


@register
class MKA(MergeMethod):
    name = "mka"
    summary = "the similarity-weighted sum of the two layers' weights (MKA's NPIB of diffusion-map embeddings)"
    order = 45
    compared_by_default = False
    default_pair_score = "angular"  # MKA's own order (always the last two layers) is no come pair score
    operator = "weighted-sum"

    def steps(self, run, cfg):
        return MKASteps(self, run, cfg)

    def merge(self, pair):
        """lambda_A W_A + (1 - lambda_A) W_B, lambda_A = `pair.choice.r_a` (MKASteps sets it)."""
        from ..merging.merge import linear_combination

        lam = pair.choice.r_a
        return linear_combination([pair.a, pair.b], [lam, 1.0 - lam])
