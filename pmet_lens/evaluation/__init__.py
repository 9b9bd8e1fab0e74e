"""Scoring and the papers' evaluations: CounterFact and zsRE metrics, text metrics, consistency references, the papers' reference tables."""
