"""The run directory's plot: one panel per metric, a tuple of metrics shares a panel, absent ones left out."""

from __future__ import annotations

import json
import struct

from alfred_train.metrics import plot_metrics


def _png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])  # IHDR width, height


def test_plot_panels_share_tuples_and_skip_metrics_never_logged(tmp_path):
    rows = [{"step": s, "score": 0.1 * s, "time_generate": 1.0, "time_score": 0.5, "time_train": 0.7 + s}
            for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    two = plot_metrics(tmp_path, ["score", ("time_generate", "time_score", "time_train"), "never_logged",
                                  ("also_never",)], "two.png")
    four = plot_metrics(tmp_path, ["score", "time_generate", "time_score", "time_train"], "four.png")
    # panels in rows of 3, 4 inches wide and 2.8 high each, at 90 dpi
    assert _png_size(two) == (2 * 4 * 90, round(2.8 * 90))
    assert _png_size(four) == (3 * 4 * 90, 2 * round(2.8 * 90))
    assert plot_metrics(tmp_path, ["never_logged"], "none.png") is None
    assert not (tmp_path / "none.png").exists()
