"""Visualisation: figures (never shown, returned or written), feature dashboards and the
experiment report."""

from integral_superposition.viz import (
    distributions,
    figures,
    heatmaps,
    maps,
    panels,
    report,
)
from integral_superposition.viz.figures import save_figure
from integral_superposition.viz.panels import DashboardData, write_dashboards
from integral_superposition.viz.report import ReportSection, build_report, markdown_summary

__all__ = [
    "DashboardData",
    "ReportSection",
    "build_report",
    "distributions",
    "figures",
    "heatmaps",
    "maps",
    "markdown_summary",
    "panels",
    "report",
    "save_figure",
    "write_dashboards",
]
