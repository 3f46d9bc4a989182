"""Figures: trajectory staircases, per-head 6x6 matrices, the layer x head score map."""

from __future__ import annotations

from pathlib import Path

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_trajectory(traj: torch.Tensor, path: str | Path, *, title: str = "", targets: list[int] | None = None,
                    schedule=None) -> Path:
    """[steps, R] -> a panel x step heat map (the staircase), with the steered target marked."""
    plt = _plt()
    t = traj.float()
    t = t / t.sum(-1, keepdim=True).clamp_min(1e-12)
    fig, ax = plt.subplots(figsize=(max(4, t.shape[0] * 0.12 + 2), 2.6))
    ax.imshow(t.T.numpy(), aspect="auto", cmap="magma", origin="upper", interpolation="nearest")
    ax.set_yticks(range(t.shape[1]), [f"P{k + 1}" for k in range(t.shape[1])])
    ax.set_xlabel("generated token")
    if targets is not None and schedule is not None:
        ks = [schedule.targets[i].k - 1 for i in targets[: t.shape[0]] if hasattr(schedule.targets[i], "k")]
        if ks:
            ax.plot(range(len(ks)), ks, color="cyan", lw=1, ls="--", label="target")
            ax.legend(loc="upper right", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_score_map(scores: torch.Tensor, path: str | Path, title: str = "gaze score") -> Path:
    """[layers, heads] -> heat map."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(3, scores.shape[1] * 0.25 + 1.5), max(2.5, scores.shape[0] * 0.2 + 1)))
    im = ax.imshow(scores.numpy(), aspect="auto", cmap="viridis", origin="upper", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_matrices(matrices: torch.Tensor, heads: list[tuple[int, int]], path: str | Path) -> Path:
    """Each head's [R queried x R attended] matrix side by side."""
    plt = _plt()
    n = max(1, len(heads))
    fig, axes = plt.subplots(1, n, figsize=(2.1 * n, 2.3), squeeze=False)
    for ax, (l, h) in zip(axes[0], heads):
        m = matrices[l, h].numpy()
        ax.imshow(m, cmap="Blues", vmin=0, interpolation="nearest")
        ax.set_title(f"L{l} H{h}  {m.diagonal().mean():.2f}", fontsize=8)
        ax.set_xlabel("attended", fontsize=7)
        ax.set_ylabel("queried", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
