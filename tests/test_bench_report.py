"""The benchmark's throughput plot: kinds of rows, skipped loaders, ratios."""

from __future__ import annotations

from zarrdali.bench.report import BASELINE, plot_throughput, row_kind


def _row(store: str, name: str, median: float | None, status: str = "ok", error=None) -> dict:
    rate = {"median": median, "min": median and median * 0.9, "max": median and median * 1.1}
    return {
        "store_label": store,
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
