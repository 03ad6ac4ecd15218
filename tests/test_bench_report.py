"""The benchmark's throughput plot: kinds of rows, skipped loaders, ratios."""

from __future__ import annotations

import pytest

from zarrdali.bench.main import FILE_CEILING, LOADERS, verdict
from zarrdali.bench.report import (
    BASELINE,
    MAIN_ROW,
    line_colors,
    plot_batch_sizes,
    plot_throughput,
    row_kind,
)


def _row(
    store: str, name: str, median: float | None, status: str = "ok", error=None, batch=None
) -> dict:
    rate = {"median": median, "min": median and median * 0.9, "max": median and median * 1.1}
    return {
        "store_label": store,
        "batch_size": batch,
        "summary": {"name": name, "status": status, "error": error, "samples_per_s": rate},
    }


def test_rows_are_told_apart_by_kind():
    assert row_kind("zarrdali[cpu] whole chunks") == "zarrdali"
    assert row_kind("zarrdali[cuda]") == "zarrdali"
    assert row_kind("numcodecs decode ceiling") == "ceiling"
    assert row_kind(BASELINE) == "peer"
    assert row_kind("xbatcher + torch DataLoader") == "peer"


def test_plot_has_a_panel_per_store_and_names_skipped_loaders(tmp_path, monkeypatch):
    import matplotlib.axes

    texts: list[str] = []
    real = matplotlib.axes.Axes.text

    def recording(self, x, y, s, *args, **kwargs):
        texts.append(s)
        return real(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "text", recording)
    rows = [
        _row("plain", "zarrdali[cpu]", 120.0),
        _row("plain", BASELINE, 30.0),
        _row("plain", "zarrdali[cuda]", None, "skipped", "the GPU path needs CuPy"),
        _row("sharded", "zarrdali[cpu]", 400.0),
        _row("sharded", "numcodecs decode ceiling", 600.0),
    ]
    assert plot_throughput(tmp_path / "t.png", rows)
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert any("4.0× torch" in t for t in texts), texts  # 120 / 30 on the same store
    assert any("skipped: the GPU path needs CuPy" in t for t in texts)
    assert any("(baseline)" in t for t in texts)
    # no baseline on the sharded store: no ratio invented there
    assert not any("13.3×" in t or "20.0×" in t for t in texts)


def test_no_plot_without_a_measured_row(tmp_path):
    assert not plot_throughput(tmp_path / "t.png", [_row("plain", "x", None, "failed", "boom")])


def test_every_loader_has_its_own_colour():
    names = [name for name, _ in LOADERS.values()]
    colors = line_colors(names)
    assert len(set(colors.values())) == len(names) == 17
    assert colors[MAIN_ROW] == line_colors([MAIN_ROW, *names])[MAIN_ROW]  # the same in any run


@pytest.fixture
def kept_figures(monkeypatch):
    """The figures a plot function made, kept open to be inspected."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    yield figures
    for fig in figures:
        real_close(fig)


def test_batch_size_plot_keeps_the_legend_off_the_data(tmp_path, kept_figures):
    names = [name for name, _ in LOADERS.values()]
    rows = [
        _row(store, name, 100.0 + 10 * i + b, batch=b)
        for store in ("plain", "sharded")
        for i, name in enumerate(names)
        for b in (8, 64)
    ]
    assert plot_batch_sizes(tmp_path / "t.png", rows)
    (fig,) = kept_figures
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent(renderer))
    lines = {bars.get_label(): bars.lines[0] for bars in fig.axes[0].containers}
    assert len(lines) == len(names)
    assert len({line.get_color() for line in lines.values()}) == len(names)  # none twice
    widths = {label: line.get_linewidth() for label, line in lines.items()}
    assert widths[MAIN_ROW] == max(widths.values())  # zarrdali's row stands out


def test_verdict_compares_zarrdali_with_the_ceiling_the_best_peer_and_torch():
    rows = [
        _row("sharded", "zarrdali[cpu]", 600.0, batch=8),
        _row("sharded", FILE_CEILING, 450.0, batch=8),
        _row("sharded", "TensorStore", 400.0, batch=8),
        _row("sharded", "zarr-python + zarrs, async", 300.0, batch=8),
        _row("sharded", BASELINE, 30.0, batch=8),
        _row("sharded", "zarrdali[cuda]", None, "skipped", "no GPU", batch=8),
        _row("plain", "zarrdali[cpu]", 200.0, batch=8),
        _row("plain", BASELINE, None, "failed", "boom", batch=8),
    ]
    assert verdict(rows) == [
        "sharded, batch 8: zarrdali[cpu] 600 samples/s: 1.33x the ceiling (450/s), "
        "1.50x the best peer, TensorStore (400/s), 20.00x the torch DataLoader (30/s)",
        "plain, batch 8: zarrdali[cpu] 200 samples/s",  # nothing measured to compare with
    ]
