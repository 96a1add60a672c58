"""The plots a run and a comparison write: loss.png of a fine-tuning run (minipeft/finetune.py) and the
compare plots, accuracy and bits/token against trainable parameters (minipeft/compare.py).

matplotlib's object API (`matplotlib.figure.Figure`, not pyplot), imported when a plot is drawn: it
leaves a notebook's backend and its plots alone, and importing minipeft never imports matplotlib.
"""
from __future__ import annotations

import math
from pathlib import Path

from .safetensors_io import atomic_write


# ----------------------------------------------------------------------------- a run's loss curve

def loss_plot_series(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """What loss.png draws, as (step, value) pairs: train bits/token per step, test bits/token at each
    evaluation (the base model's at step 0), the final test point, and the learning rate per step."""
    kinds = lambda *k: [r for r in records if r["kind"] in k]
    return dict(train=[(r["step"], r["loss_bpt"]) for r in kinds("train")],
                test=[(r["step"], r["test_bpt"]) for r in kinds("baseline", "eval")],
                final=[(r["step"], r["test_bpt"]) for r in kinds("final")],
                lr=[(r["step"], r["lr"]) for r in kinds("train")])


def plot_losses(records: list[dict], path: Path, title: str) -> None:
    """Train bits/token per step (and its running mean), test bits/token at each evaluation and after
    training (the final evaluation), and the learning rate on a second axis."""
    from matplotlib.figure import Figure  # not pyplot: leaves a notebook's backend (and its plots) alone
    series = loss_plot_series(records)
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    if series["train"]:
        steps, bits = zip(*series["train"])
        ax.plot(steps, bits, color="tab:blue", alpha=0.3, lw=0.8)
        k = max(1, len(bits) // 25)
        smooth = [sum(bits[max(0, i - k + 1):i + 1]) / len(bits[max(0, i - k + 1):i + 1]) for i in range(len(bits))]
        ax.plot(steps, smooth, color="tab:blue", label=f"train (running mean of {k} steps)" if k > 1 else "train")
    if series["test"]:
        ax.plot(*zip(*series["test"]), "o-", color="tab:orange", label="test")
    if series["final"]:
        ax.plot(*zip(*series["final"]), "*", color="tab:red", ms=12, label="test, final evaluation")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy (bits per answer token)")
    ax.set_title(f"{title}: train and test loss, learning rate")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if series["lr"]:
        lr_ax = ax.twinx()
        lr_ax.plot(*zip(*series["lr"]), color="gray", ls=":", lw=1.2, label="learning rate (right axis)")
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_ylim(bottom=0)
        h2, l2 = lr_ax.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110)


# ----------------------------------------------------------------------------- methods against trainable parameters

def write_plots(rows: list[dict], out: Path, settings: dict) -> None:
    """compare_accuracy.png and compare_bpt.png in `out` (also from a saved compare.json's rows and settings)."""
    n = len(settings["seeds"])
    title = f"{settings['base']}, {settings['data']}: " + (
        "one seed, no spread" if n < 2 else f"{n} seeds, mean ± std")
    plot_vs_params(rows, out / "compare_accuracy.png", "accuracy", "test accuracy (%)", 100, title)
    plot_vs_params(rows, out / "compare_bpt.png", "test_bpt", "test cross-entropy (bits per answer token, log scale)",
                   1, title, logy=True)


# The plots' panels: related methods side by side (a method not listed here goes to "other methods").
PLOT_FAMILIES = {
    "LoRA and its variants": ("lora", "dora", "simple_dora", "adalora", "dylora", "adamix_lora"),
    "tied and shared low-rank factors": ("tied_lora", "partially_tied_lora", "tied_lora_extra", "tensor_embedding"),
    "(IA)³: scaling vectors": ("ia3", "ia3pp"),
    "prompts, prefixes and gated prompts": ("prompt_tuning", "prefix_tuning", "infix_tuning", "pasta",
                                            "llama_adapter"),
    "bottleneck adapters": ("bottleneck_adapter", "adamix"),
    "biases, sparse and full fine-tuning": ("bitfit", "sparse_ft", "spiel", "diff_pruning", "full"),
}


MARKERS = "os^DvP<hX>*"  # 11 shapes, neighbours unlike each other; with tab10's 10 colours, 110 distinct pairs


def plot_family(entry: str) -> str:
    """The panel of a compare entry: its method's PLOT_FAMILIES name."""
    method = entry.split("+")[0]
    return next((name for name, methods in PLOT_FAMILIES.items() if method in methods), "other methods")


def dodge(points: list[tuple[float, float]], span: float, logy: bool, dx: float = 8.0) -> list[float]:
    """Sideways offsets (in points) that keep markers at (nearly) the same place from hiding each other:
    points within 15% in x (a log axis) and 3% of the y axis' `span` (in log10 units when `logy`) are
    spread dx apart, centred on their place. A drawing offset: the data stay as they are."""
    v = [math.log10(y) if logy else y for _, y in points]
    clusters: list[list[int]] = []
    for i, (x, _) in enumerate(points):
        near = lambda k: max(x, points[k][0]) <= 1.15 * min(x, points[k][0]) and abs(v[i] - v[k]) < 0.03 * span
        home = next((c for c in clusters if any(near(k) for k in c)), None)
        if home is None:
            clusters.append([i])
        else:
            home.append(i)
    offsets = [0.0] * len(points)
    for c in clusters:
        for rank, i in enumerate(c):
            offsets[i] = dx * (rank - (len(c) - 1) / 2)
    return offsets


def family_panels(rows: list[dict], key: str, logy: bool = False) -> dict[str, list[dict]]:
    """The plotted entries (trainable, with a figure) by PLOT_FAMILIES panel, each by parameter count."""
    order = [*PLOT_FAMILIES, "other methods"]
    pts = [r for r in rows if r["trainable_params"] and r[key] == r[key] and (r[key] > 0 or not logy)]
    panels: dict[str, list[dict]] = {}
    for r in sorted(pts, key=lambda r: (order.index(plot_family(r["method"])), r["trainable_params"])):
        panels.setdefault(plot_family(r["method"]), []).append(r)
    return panels


def vs_params_figure(rows: list[dict], key: str, ylabel: str, scale: float, title: str,
                     logy: bool = False):
    """`key` against trainable parameters (log x, ±1 std error bars), one panel per family of methods
    with its own legend (every other entry a grey dot behind, for context), the base model as a dashed
    line (cf. LoRA, Fig. 2). Entries are numbered family by family and entry j is drawn as a hollow
    MARKERS[j % 11] in tab10 colour j % 10: distinct pairs for up to 110 entries, a distinct shape and
    colour for each entry of a panel (up to 10), and points at one place are spread sideways (dodge)."""
    from matplotlib.figure import Figure  # not pyplot: leaves a notebook's backend (and its plots) alone
    from matplotlib import colormaps
    from matplotlib.transforms import ScaledTranslation
    panels = family_panels(rows, key, logy) or {"no finished runs": []}
    pts = [r for group in panels.values() for r in group]
    base = next((r for r in rows if r["method"] == "base model" and r[key] == r[key]), None)
    ys = [math.log10(r[key]) if logy else r[key] for r in pts + ([base] if base else [])]
    span = (max(ys) - min(ys) if ys else 0.0) or 1.0  # the y axis' extent, roughly
    cols = min(2, len(panels))
    fig = Figure(figsize=(6.4 * cols + 0.4, 3.0 * math.ceil(len(panels) / cols) + 0.8), layout="constrained")
    axes = fig.subplots(math.ceil(len(panels) / cols), cols, sharex=True, sharey=True, squeeze=False).flatten()
    j = 0
    for ax, (family, group) in zip(axes, panels.items()):
        ax.plot([r["trainable_params"] for r in pts], [scale * r[key] for r in pts], ".", color="0.82", ms=5, zorder=0)
        for r, dx in zip(group, dodge([(r["trainable_params"], r[key]) for r in group], span, logy)):
            std = r.get(key + "_std")
            x, y, err = r["trainable_params"], scale * r[key], scale * std if std is not None and std == std else 0.0
            ax.update_datalim([(x, y - err), (x, y + err)])  # autoscale skips offset bars
            ax.errorbar(x, y, yerr=err or None, fmt=MARKERS[j % len(MARKERS)], color=colormaps["tab10"](j % 10),
                        mfc="none", mew=1.6, ms=7, capsize=3, label=r["method"],
                        transform=ax.transData + ScaledTranslation(dx / 72, 0, fig.dpi_scale_trans))
            j += 1
        if base is not None:
            ax.axhline(scale * base[key], color="gray", ls="--", lw=1, label="base model" if ax is axes[0] else None)
        ax.set_title(family, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    for i in range(len(panels), len(axes)):  # an empty slot of the grid: the panel above shows the x ticks
        axes[i].set_visible(False)
        axes[i - cols].xaxis.set_tick_params(labelbottom=True)
    set_scales(axes[0], [r["trainable_params"] for r in pts], logy, span)
    fig.supxlabel("trainable parameters (log scale)", fontsize=10)
    fig.supylabel(ylabel, fontsize=10)
    fig.suptitle(title, fontsize=11)
    return fig


def set_scales(ax, params: list[int], logy: bool, span: float) -> None:
    """Log x over at least two decades (ticks at powers of ten); log y with plain tick labels (0.1, not
    10^-1), the ticks between powers of ten labelled too where the data span under 1.5 decades."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter
    ax.set_xscale("log")
    if params:
        lo, hi = min(params), max(params)
        pad = max(1.5, math.sqrt(100 * lo / hi))
        ax.set_xlim(lo / pad, hi * pad)
    if logy:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g") if span < 1.5 else NullFormatter())


def plot_vs_params(rows: list[dict], path: Path, key: str, ylabel: str, scale: float, title: str,
                   logy: bool = False) -> None:
    """vs_params_figure, written to `path` as a PNG."""
    fig = vs_params_figure(rows, key, ylabel, scale, title, logy)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110)
