"""Figures and dashboards: static PNGs (matplotlib, no pyplot state) and interactive plotly / HTML views."""
