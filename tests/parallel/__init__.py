"""Tests of the worker pool (pmet_lens.parallel); a package so that its conftest does not shadow tests/conftest.py."""
