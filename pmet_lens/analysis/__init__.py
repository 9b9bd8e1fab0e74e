"""Analyses of an unedited model: PMET Fig. 2 component similarity, causal tracing, averaged traces and the critical layers R."""
