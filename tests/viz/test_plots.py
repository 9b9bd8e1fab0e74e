"""The static PNG writers: valid files, and no global matplotlib state touched (a notebook's
backend and pyplot's figure list stay as they were)."""

from __future__ import annotations

import matplotlib
import pytest
import torch

from conftest import TINY_VARIANTS, make_tiny_model
from pmet_lens.analysis.averaged import TOKEN_CLASSES, AverageTrace
from pmet_lens.analysis.similarity import component_similarity
from pmet_lens.analysis.tracing import trace
from pmet_lens.viz.similarity import similarity_png
from pmet_lens.viz.tracing import save_average_png, save_severed_png, save_trace_png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def svg_backend():
    """Run under a backend no PNG writer would pick, and put the old one back afterwards."""
    old = matplotlib.get_backend()
    matplotlib.use("svg", force=True)
    yield
    matplotlib.use(old, force=True)


def _average(n_layers: int) -> AverageTrace:
    gen = torch.Generator().manual_seed(0)
    per_class = {k: torch.rand(len(TOKEN_CLASSES), n_layers, generator=gen) for k in ("hidden", "mlp", "attn")}
    curves = {k: torch.rand(n_layers, generator=gen) for k in ("none", "mlp", "attn")}
    return AverageTrace(kinds=("hidden", "mlp", "attn"), mean=per_class,
                        ci={k: 0.1 * v for k, v in per_class.items()},
                        count={k: torch.full((len(TOKEN_CLASSES),), 3) for k in per_class},
                        severed_mean=curves, severed_ci={k: 0.1 * v for k, v in curves.items()},
                        n_facts=3, n_seen=4)


def test_png_writers_leave_matplotlib_alone(svg_backend, tmp_path):
    import matplotlib.pyplot as plt

    model = make_tiny_model(*TINY_VARIANTS["seq-rms-gated"])
    df = component_similarity(model, ["The Eiffel Tower is in", "Paris is the capital of"], k=5, progress=False)
    avg = _average(model.cfg.n_layers)
    written = [
        similarity_png(df, tmp_path / "sub" / "similarity.png"),  # parent folders are made
        save_trace_png(trace(model, "The Eiffel Tower is located in the city of", "Eiffel Tower", samples=2), tmp_path / "trace.png"),
        save_average_png(avg, "mlp", tmp_path / "average.png"),
        save_severed_png(avg, tmp_path / "severed.png", critical=[1, 2]),
    ]
    for path in written:
        assert path.read_bytes().startswith(PNG_MAGIC), path
    assert matplotlib.get_backend() == "svg"
    assert plt.get_fignums() == []
