"""Bar charts of per-layer scores (a `LayerProfile`), the chosen layers marked."""

from __future__ import annotations

import os
from typing import Sequence


def plot_profile(profile, path: str | os.PathLike, groups: Sequence[str] | None = None, title: str | None = None) -> str:
    """Write a PNG: one bar chart per group (default: the selection group first, then the rest),
    bars = per-layer scores, chosen layers in red with their rank written above. Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    groups = list(groups) if groups is not None else [profile.select_group] + [
        g for g in profile.scores if g != profile.select_group
    ]
    missing = [g for g in groups if g not in profile.scores]
    if missing:
        raise ValueError(f"the profile has no scores for groups {missing}; it has {sorted(profile.scores)}")
    L = len(profile.layers)
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(6.0, 0.28 * L + 2), 2.4 * len(groups) + 0.6), squeeze=False)
    x = list(range(L))
    for ax, g in zip(axes[:, 0], groups):
        s = profile.scores[g]
        chosen = profile.chosen if g == profile.select_group else ()
        colors = ["tab:red" if n in chosen else "tab:blue" for n in profile.layers]
        ax.bar(x, s, color=colors)
        for rank, n in enumerate(chosen, 1):
            i = profile.layers.index(n)
            ax.annotate(f"#{rank}", (i, s[i]), ha="center", va="bottom", fontsize=8, color="tab:red")
        ax.set_ylabel(g)
        ax.set_xticks(x)
        ax.set_xticklabels(profile.layers, rotation=90, fontsize=7)
        ax.axhline(0.0, color="black", linewidth=0.5)
    head = title or f"{profile.model} - {profile.method} / {profile.scorer} ({profile.part})"
    axes[0, 0].set_title(f"{head}; chosen: {', '.join(profile.chosen)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
