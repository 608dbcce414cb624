"""Hierarchical clustering of experts by their output features (pure functions, SciPy's textbook linkages).

`cut_tree(n_clusters=K)` is used rather than `fcluster(maxclust=K)` because it always yields exactly K clusters,
even when merge distances tie. Labels are renumbered by each cluster's smallest member, so the output is
deterministic and cluster 0 always holds expert 0.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import pdist

LINKAGES = ("average", "single", "complete", "ward")
METRICS = ("euclidean", "cosine")


def hierarchical_groups(
    features: torch.Tensor, k: int, method: str = "average", metric: str = "euclidean"
) -> list[list[int]]:
    """Partition of expert ids 0..N-1 into k groups, each sorted, groups ordered by their first member."""
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    if method not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}")
    if method == "ward" and metric != "euclidean":
        raise ValueError("ward linkage is defined for euclidean distance only")
    if k == n:
        return [[i] for i in range(n)]
    if k == 1:
        return [list(range(n))]
    data = features.detach().double().cpu().numpy()
    # Zero features (never-active experts) have no cosine direction: give them distance 1 to everything.
    dist = np.nan_to_num(pdist(data, "cosine"), nan=1.0) if metric == "cosine" else pdist(data, "euclidean")
    tree = linkage(dist, method=method)
    labels = cut_tree(tree, n_clusters=k).ravel()
    return labels_to_groups(labels)


def labels_to_groups(labels) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(np.asarray(labels).tolist()):
        groups.setdefault(lab, []).append(i)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])
