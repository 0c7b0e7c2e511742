"""The report's figures: matplotlib (Agg, no pyplot state) rendered to base64 PNG strings.

Every function takes plain arrays or small frames and returns the PNG as base64 text for a
``data:image/png`` URI. Figures are built with ``matplotlib.figure.Figure`` (not pyplot), so
nothing is registered globally and each figure is freed as soon as it is rendered; text never
goes through mathtext (labels come from user-written study files).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
TREATED = "#1f77b4"
COMPARATOR = "#e6550d"
PASSED = "#08306b"
FAILED = "#9e9e9e"
RC = {
    "text.parse_math": False, "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
    "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8,
    "axes.spines.top": False, "axes.spines.right": False,
}
HR_TICKS = [0.1, 0.25, 0.5, 1, 2, 4, 10]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    fig.clear()
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _hr_range(values: np.ndarray) -> tuple[float, float]:
    """A hazard-ratio axis covering the finite positive values and 0.5-2, within 0.1-10."""
    finite = values[np.isfinite(values) & (values > 0)]
    low = min(0.5, float(finite.min())) if finite.size else 0.5
    high = max(2.0, float(finite.max())) if finite.size else 2.0
    return max(0.1, low / 1.3), min(10.0, high * 1.3)


def _hr_axis(ax, low: float, high: float) -> None:
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ticks = [t for t in HR_TICKS if low <= t <= high]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(mpl.ticker.NullLocator())


def forest_plot(rows: pd.DataFrame, title: str) -> str:
    """Rows (outcome, label, hr, ci_low, ci_high, passed, calibrated, ok): one line each."""
    with mpl.rc_context(RC):
        lines: list[tuple[str, pd.Series | None]] = []
        for outcome, group in rows.groupby("outcome", sort=False):
            lines.append((str(outcome), None))
            lines += [(str(row.label), row) for _, row in group.iterrows()]
        height = 0.9 + 0.24 * len(lines)
        fig = _figure(10.0, height)
        ax = fig.add_axes((0.17, 0.55 / height, 0.55, 1 - 0.95 / height))
        low, high = _hr_range(rows.loc[rows["ok"], ["ci_low", "ci_high"]].to_numpy(float))
        y = np.arange(len(lines))[::-1]
        for yi, (label, row) in zip(y, lines, strict=True):
            if row is None:
                ax.text(-0.02, yi, label, transform=ax.get_yaxis_transform(), ha="right",
                        va="center", fontweight="bold")
                continue
            ax.text(-0.02, yi, label, transform=ax.get_yaxis_transform(), ha="right",
                    va="center")
            if not row.ok or not np.isfinite(row.hr):
                ax.text(1.0, yi, "estimate failed", ha="center", va="center", color=FAILED,
                        style="italic")
                continue
            color = PASSED if row.passed else FAILED
            lo, hi = np.clip([row.ci_low, row.ci_high], low, high)
            ax.plot([lo, hi], [yi, yi], color=color, lw=1.4)
            ax.plot([np.clip(row.hr, low, high)], [yi], "s", color=color, ms=5,
                    mfc=color if row.calibrated else "white")
            text = f"{row.hr:.2f} ({row.ci_low:.2f}-{row.ci_high:.2f})"
            ax.text(1.02, yi, text + ("" if row.passed else "  fails diagnostics"),
                    transform=ax.get_yaxis_transform(), va="center", color=color)
        ax.axvline(1.0, color="black", lw=0.8, ls="--")
        _hr_axis(ax, low, high)
        ax.set_ylim(-0.7, len(lines) - 0.3)
        ax.set_yticks([])
        ax.spines["left"].set_visible(False)
        ax.set_xlabel("hazard ratio (log scale)")
        ax.set_title(title, loc="left")
        return _png(fig)


def volcano_plot(rows: pd.DataFrame, title: str) -> str:
    """Rows (hr, p, passed, ok): log hazard ratio against -log10 p, one point per estimate."""
    with mpl.rc_context(RC):
        fig = _figure(7.0, 4.0)
        ax = fig.add_axes((0.1, 0.13, 0.62, 0.77))
        ok = rows[rows["ok"] & np.isfinite(rows["hr"]) & (rows["hr"] > 0)
                  & np.isfinite(rows["p"])]
        p = np.clip(ok["p"].to_numpy(dtype=float), 1e-300, 1.0)
        hr = ok["hr"].to_numpy(dtype=float)
        low, high = _hr_range(hr)
        for passed, color, label in ((False, FAILED, "fails a diagnostic"),
                                     (True, PASSED, "passes every diagnostic")):
            pick = (ok["passed"] == passed).to_numpy()
            ax.scatter(np.clip(hr[pick], low, high), -np.log10(p[pick]), s=9, color=color,
                       alpha=0.6 if not passed else 0.9, linewidths=0,
                       label=f"{label} ({int(pick.sum()):,})")
        ax.axvline(1.0, color="black", lw=0.8, ls="--")
        ax.axhline(-math.log10(0.05), color="black", lw=0.6, ls=":")
        _hr_axis(ax, low, high)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("hazard ratio (log scale; outside the axis: drawn at its edge)")
        ax.set_ylabel("-log10 p")
        ax.set_title(title, loc="left")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        return _png(fig)


def attrition_plot(steps: Sequence[str], treated: Sequence[float],
                   comparator: Sequence[float], min_cell_count: int,
                   labels: tuple[str, str]) -> str:
    """Horizontal bars of persons remaining per step; counts below the threshold are drawn as
    hatched bars up to it, labelled "<N" (their true size is not shown)."""
    with mpl.rc_context(RC):
        n = len(steps)
        height = 0.8 + 0.42 * n
        fig = _figure(7.2, height)
        ax = fig.add_axes((0.27, 0.5 / height, 0.6, 1 - 0.7 / height))
        y = np.arange(n)[::-1]
        values = np.array([treated, comparator], dtype=float)
        top = max(np.nanmax(np.maximum(values, min_cell_count)) if values.size else 1, 1)
        for k, (arm, color, offset) in enumerate(((labels[0], TREATED, 0.19),
                                                  (labels[1], COMPARATOR, -0.19))):
            for yi, value in zip(y, values[k], strict=True):
                masked = 0 < value < min_cell_count
                width = min_cell_count if masked else (0 if np.isnan(value) else value)
                ax.barh(yi + offset, width, height=0.36, color="white" if masked else color,
                        edgecolor=color, hatch="///" if masked else None,
                        label=arm if yi == y[0] else None)
                text = f"<{min_cell_count}" if masked else (
                    "-" if np.isnan(value) else f"{int(value):,}")
                ax.text(width + top * 0.01, yi + offset, text, va="center", fontsize=7)
        ax.set_yticks(y)
        ax.set_yticklabels(list(steps))
        ax.set_xlim(0, top * 1.15)
        ax.set_xlabel("persons remaining")
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, frameon=False)
        return _png(fig)


def preference_plot(treated: tuple[np.ndarray, np.ndarray] | None,
                    comparator: tuple[np.ndarray, np.ndarray] | None, labels: tuple[str, str],
                    equipoise: float | None) -> str:
    """Preference-score densities of both arms, each (edges, density) or None (not drawn),
    with the 0.3-0.7 equipoise band shaded."""
    with mpl.rc_context(RC):
        fig = _figure(6.2, 3.2)
        ax = fig.add_axes((0.1, 0.15, 0.62, 0.75))
        ax.axvspan(0.3, 0.7, color="#e0e0e0", zorder=0, label="equipoise 0.3-0.7")
        for arm, label, color in ((treated, labels[0], TREATED),
                                  (comparator, labels[1], COMPARATOR)):
            if arm is None:
                continue
            edges, density = arm
            ax.stairs(density, edges, fill=True, color=color, alpha=0.35)
            ax.stairs(density, edges, color=color, lw=1.2, label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("preference score")
        ax.set_ylabel("density")
        title = "preference score"
        if equipoise is not None and math.isfinite(equipoise):
            title += f" (in equipoise: {equipoise:.0%})"
        ax.set_title(title, loc="left")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        return _png(fig)


def balance_plot(before: np.ndarray, after: np.ndarray, threshold: float,
                 adjustment: str) -> str:
    """|SMD| before vs after adjustment per covariate, with the threshold lines."""
    with mpl.rc_context(RC):
        fig = _figure(4.2, 3.8)
        ax = fig.add_axes((0.15, 0.13, 0.8, 0.78))
        before, after = np.abs(before), np.abs(after)
        ok = np.isfinite(before) & np.isfinite(after)
        top = max(float(np.max(before[ok], initial=0)), float(np.max(after[ok], initial=0)),
                  threshold) * 1.08
        over = after[ok] > threshold
        ax.scatter(before[ok][~over], after[ok][~over], s=8, alpha=0.5, color=TREATED,
                   linewidths=0)
        ax.scatter(before[ok][over], after[ok][over], s=12, alpha=0.8, color="#d62728",
                   linewidths=0, label=f"|SMD| after > {threshold:g}")
        ax.plot([0, top], [0, top], color="black", lw=0.6, ls=":")
        ax.axhline(threshold, color="#d62728", lw=0.8, ls="--")
        ax.axvline(threshold, color="#888888", lw=0.6, ls="--")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_xlabel("|SMD| before adjustment")
        ax.set_ylabel(f"|SMD| after {adjustment}")
        ax.set_title(f"covariate balance ({int(ok.sum()):,} covariates)", loc="left")
        if over.any():
            ax.legend(loc="upper left", frameon=False)
        return _png(fig)


def calibration_plot(negative: pd.DataFrame, positive: pd.DataFrame, null_mean: float,
                     null_sd: float, estimator: str) -> str:
    """Negative (and positive) controls' log HR against SE over the empirical null's funnel.

    As EmpiricalCalibration's plotCalibrationEffect: the shaded area is where an estimate's
    calibrated p-value is >= 0.05 under the null N(null_mean, null_sd); the dashed lines bound
    the uncalibrated p >= 0.05 region. Positive controls are coloured by their true effect.
    """
    with mpl.rc_context(RC):
        fig = _figure(7.8, 3.8)
        ax = fig.add_axes((0.09, 0.13, 0.55, 0.78))
        frames = [negative, positive]
        se_all = np.concatenate([f["se"].to_numpy(dtype=float) for f in frames])
        ymax = float(min(max(np.nanquantile(se_all, 0.98) * 1.15, 0.25), 1.5))
        estimates = np.concatenate([f["estimate"].to_numpy(dtype=float) for f in frames])
        low, high = (0.1 if np.nanmin(estimates) < 0.25 else 0.25), 10.0
        grid = np.linspace(0, ymax, 200)
        half = 1.959964 * np.sqrt(null_sd ** 2 + grid ** 2)
        ax.fill_betweenx(grid, np.exp(null_mean - half), np.exp(null_mean + half),
                         color="#fde0c5", zorder=0, label="calibrated p >= 0.05")
        ax.plot(np.exp(-1.959964 * grid), grid, color="#555555", lw=0.8, ls="--")
        ax.plot(np.exp(1.959964 * grid), grid, color="#555555", lw=0.8, ls="--",
                label="uncalibrated p = 0.05")
        ax.axvline(math.exp(null_mean), color="#e6550d", lw=0.8,
                   label=f"null mean HR {math.exp(null_mean):.2f}")
        if len(positive):
            effects = sorted(positive["true_effect_size"].dropna().unique())
            colors = mpl.colormaps["viridis"](np.linspace(0.25, 0.85, max(len(effects), 1)))
            for effect, color in zip(effects, colors, strict=False):
                mine = positive[positive["true_effect_size"] == effect]
                ax.scatter(np.clip(mine["estimate"], low, high), np.clip(mine["se"], 0, ymax),
                           s=12, color=color, alpha=0.7, linewidths=0,
                           label=f"positive control, true HR {effect:g}")
                ax.axvline(effect, color=color, lw=0.7, ls=":")
        ax.scatter(np.clip(negative["estimate"], low, high), np.clip(negative["se"], 0, ymax),
                   s=16, color="#08306b", alpha=0.85, linewidths=0,
                   label=f"negative control ({len(negative)})")
        _hr_axis(ax, low, high)
        ax.set_ylim(0, ymax)
        ax.set_xlabel(f"{estimator} hazard ratio (log scale)")
        ax.set_ylabel("standard error of log HR")
        ax.set_title(f"empirical null: mean {null_mean:.3f}, SD {null_sd:.3f}", loc="left")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        return _png(fig)


def km_plot(panels: list[tuple[str, pd.DataFrame]], labels: tuple[str, str],
            adjustments: Sequence[str]) -> str:
    """Small multiples of Kaplan-Meier curves: per outcome, crude (dashed) and IPTW (solid)."""
    with mpl.rc_context(RC):
        columns = min(3, max(len(panels), 1))
        rows = max(1, math.ceil(len(panels) / columns))
        legend_rows = 1 if columns >= 3 else 2
        height = 0.4 + 0.2 * legend_rows + 2.5 * rows
        width = max(3.6 * columns, 6.0)
        fig = _figure(width, height)
        axes = fig.subplots(rows, columns, squeeze=False)
        fig.subplots_adjust(left=0.75 / width, right=1 - 0.15 / width, bottom=0.5 / height,
                            top=1 - (0.45 + 0.2 * legend_rows) / height,
                            wspace=0.75 / 2.7, hspace=0.85 / 1.7)
        for k, ax in enumerate(axes.flat):
            if k >= len(panels):
                ax.set_visible(False)
                continue
            outcome, curves = panels[k]
            ax.set_title(outcome, loc="left")
            if curves.empty:
                ax.text(0.5, 0.5, "no events in either arm", ha="center", va="center",
                        transform=ax.transAxes, color=FAILED)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            for (adjustment, arm), curve in curves.groupby(["adjustment", "arm"]):
                crude = adjustment == "crude"
                curve = curve.sort_values("day")
                day = np.concatenate([[0.0], curve["day"].to_numpy(dtype=float)])
                surv = np.concatenate([[1.0], curve["survival"].to_numpy(dtype=float)])
                ax.step(day, surv, where="post", lw=0.9 if crude else 1.4,
                        ls="--" if crude else "-", alpha=0.75 if crude else 1.0,
                        color=TREATED if arm == "treated" else COMPARATOR)
            ax.set_xlim(left=0)
            ax.set_xlabel("days since time zero")
            ax.set_ylabel("survival")
        handles = []
        for adjustment in adjustments:
            crude = adjustment == "crude"
            for label, color in zip(labels, (TREATED, COMPARATOR), strict=True):
                handles.append(mpl.lines.Line2D(
                    [], [], color=color, lw=0.9 if crude else 1.4, ls="--" if crude else "-",
                    label=f"{label} ({'crude' if crude else adjustment.upper()})"))
        fig.legend(handles=handles, loc="upper center", ncol=4 // legend_rows,
                   frameon=False)
        return _png(fig)
