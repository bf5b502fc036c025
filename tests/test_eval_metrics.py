"""The paper's summary figures from sweep records."""

import pytest

from gateskip.evaluation.metrics import summarize


def rec(method, budget, value, saving, metric="acc", task="t"):
    return {"task": task, "method": method, "budget": budget, "metric": metric, "value": value, "net_saving": saving}


def test_compute_saved_at_90_and_95_percent_of_the_base_model():
    records = [rec("base", 0.0, 0.80, 0.0)] + [
        rec("gateskip", b, v, s) for b, v, s in [(0.0, 0.82, -0.05), (0.2, 0.77, 0.10), (0.4, 0.73, 0.25), (0.6, 0.50, 0.40)]
    ]
    (base_row, row) = summarize(records)
    assert base_row["method"] == "base" and base_row["saved_at_90"] == 0.0
    assert row["at_0"] == 0.82
    assert row["saved_at_95"] == 0.10  # 0.77 >= 0.76; 0.73 is not
    assert row["saved_at_90"] == 0.25  # 0.73 >= 0.72
    # mean over the budget range: trapezoids of width 0.2 over [0, 0.6]
    assert row["auc"] == pytest.approx(((0.82 + 0.77) + (0.77 + 0.73) + (0.73 + 0.50)) / 2 * 0.2 / 0.6)


def test_no_point_good_enough_gives_none():
    records = [rec("base", 0.0, 0.8, 0.0), rec("random", 0.0, 0.5, 0.0), rec("random", 0.5, 0.3, 0.4)]
    row = [r for r in summarize(records) if r["method"] == "random"][0]
    assert row["saved_at_90"] is None and row["saved_at_95"] is None


def test_perplexity_is_lower_is_better():
    records = [rec("base", 0.0, 20.0, 0.0, "word_perplexity"), rec("gateskip", 0.2, 21.0, 0.1, "word_perplexity"),
               rec("gateskip", 0.4, 23.0, 0.3, "word_perplexity")]
    row = [r for r in summarize(records) if r["method"] == "gateskip"][0]
    assert row["saved_at_95"] == 0.1  # 21 <= 20 / 0.95 = 21.05; 23 is not
    assert row["saved_at_90"] == 0.1  # 23 > 20 / 0.9 = 22.2


def test_primary_metric_is_acc_when_present():
    records = [rec("base", 0.0, 0.7, 0.0, "acc_norm"), rec("base", 0.0, 0.6, 0.0, "acc")]
    (row,) = summarize(records)
    assert row["metric"] == "acc" and row["at_0"] == 0.6


def test_table_and_plot_from_records(tmp_path):
    from gateskip.evaluation.report import markdown_table, plot

    records = [dict(rec("base", 0.0, 20.0, 0.0, "word_perplexity"), stderr=None, skip_fraction=0.0, decode=""),
               dict(rec("gateskip", 0.3, 24.0, 0.2, "word_perplexity"), stderr=None, skip_fraction=0.3, decode="")]
    table = markdown_table(records)
    assert "| t | gateskip | 0.3 | word_perplexity | 24.00 | - | 30.0% | 20.0% |  |" in table
    assert plot(records, tmp_path / "p.png").stat().st_size > 1000
