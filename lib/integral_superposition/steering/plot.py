"""The sweep plot: effect against perplexity, one line per latent and control."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

__all__ = ["plot_sweep"]


# -- the plot ---------------------------------------------------------------------------------------
_STYLE = {"steer": "-", "random": "--", "own_label": ":", "alpha0": "none"}


def plot_sweep(table: pd.DataFrame, ppl_ratio_max: float | None = 2.0) -> Figure:
    """Effect against perplexity: classifier share (left) and target-vocabulary mass (right)
    against perplexity under the unsteered model, one line per latent and per control
    (strengths annotated; each line starts at its unsteered point, a black star). The dashed
    line marks ``ppl_ratio_max`` x the unsteered perplexity of the neutral prompts; error bars
    are the shares' 95% Wilson intervals."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    from integral_superposition.viz.figures import label_color, new_figure

    fig = new_figure(figsize=(11.0, 4.6))
    axes = fig.subplots(1, 2)
    cols = ("share", "vocab_mass")
    labels = list(dict.fromkeys(table["label"].astype(str)))
    for (lat, control), g in table.groupby(["latent", "control"], sort=False):
        if control == "unsteered":
            continue
        sub = table[table["latent"] == lat]
        start = sub[
            sub["control"].isin(["unsteered", "own_label"])
            & sub["strength"].isna()
            & (sub["prompts"] == g["prompts"].iloc[0])
        ]
        g = g[g["strength"].notna()].sort_values("strength")
        if g.empty:  # a control that never ran steered (no fluent strength)
            continue
        pts = g if control == "alpha0" else pd.concat([start, g])
        label = str(g["label"].iloc[0])
        name = f"{lat} ({label})" + ("" if control == "steer" else f" {control}")
        style = dict(
            linestyle=_STYLE.get(control, "-"), marker="x" if control == "alpha0" else "o",
            markersize=7 if control == "alpha0" else 4, color=label_color(labels.index(label)),
            label=name, alpha=0.9,
        )  # fmt: skip
        for ax, col in zip(axes, cols, strict=True):
            ax.plot(pts["perplexity"], pts[col], **style)
            if col == "share" and {"share_lo", "share_hi"} <= set(pts.columns):
                ax.errorbar(
                    pts["perplexity"], pts["share"],
                    yerr=[pts["share"] - pts["share_lo"], pts["share_hi"] - pts["share"]],
                    fmt="none", ecolor=style["color"], elinewidth=0.8, capsize=2, alpha=0.6,
                )  # fmt: skip
            if control == "steer":
                for x, y, s in zip(g["perplexity"], g[col], g["strength"], strict=True):
                    ax.annotate(
                        f"{s:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                    )
    base = table[table["control"] == "unsteered"]
    for ax, col in zip(axes, cols, strict=True):
        if col == "share" and {"share_lo", "share_hi"} <= set(base.columns) and len(base):
            ax.errorbar(
                base["perplexity"], base["share"],
                yerr=[base["share"] - base["share_lo"], base["share_hi"] - base["share"]],
                fmt="none", ecolor="black", elinewidth=0.8, capsize=2,
            )  # fmt: skip
        ax.plot(
            base["perplexity"],
            base[col],
            marker="*",
            markersize=11,
            color="black",
            linestyle="none",
        )
        if ppl_ratio_max and len(base):
            ax.axvline(
                ppl_ratio_max * base["perplexity"].iloc[0], color="grey", linestyle="--", lw=1
            )
        ax.set_xlabel("perplexity under the unsteered model")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("classifier share of the target label")
    axes[1].set_ylabel("next-token mass on the target vocabulary")
    axes[0].set_ylim(-0.02, 1.02)
    handles, names = axes[0].get_legend_handles_labels()
    uniq = dict(zip(names, handles, strict=True))
    fig.legend(
        uniq.values(),
        uniq.keys(),
        loc="lower center",
        ncol=min(4, len(uniq)),
        fontsize=7,
        frameon=False,
    )
    title = "Steering sweep (star: unsteered; numbers: strength; bars: 95% intervals"
    title += f"; dashed: {ppl_ratio_max:g}x unsteered perplexity)" if ppl_ratio_max else ")"
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(bottom=0.18 + 0.03 * ((len(uniq) - 1) // 4), wspace=0.25)
    return fig
