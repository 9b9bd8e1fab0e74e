"""Figures: interactive plotly (Jupyter, HTML) and static matplotlib PNGs, one module per analysis."""
