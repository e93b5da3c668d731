"""bench.engine_overhead measures the engine's host time per decode step; a short run on CPU."""

from bench.engine_overhead import measure


def test_measure_reports_each_part():
    r = measure(batch=4, context=24, steps=3)
    parts = [r[k] for k in ("schedule_ms", "build_ms", "sampling_batch_ms", "update_ms")]
    assert all(p > 0 for p in parts)
    assert abs(sum(parts) - r["host_ms_per_step"]) < 1e-6
    assert r["wall_ms_per_step"] > r["host_ms_per_step"]


def test_ranks_table_measures_both_ways(capsys):
    from bench.engine_overhead import ranks_table
    ranks_table(tp=1, ep=2, batches=[2], steps=2, rounds=1)
    row = capsys.readouterr().out.strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "2" and all(float(c) > 0 for c in cells[1:4])
    logits_bytes, token_bytes = (int(x.replace(",", "")) for x in cells[5].split(" / "))
    assert logits_bytes > 2 * 201088 * 4 and token_bytes < 2000  # [2, vocab] fp32 vs two token ids


def test_combine_table_measures_both_combines(capsys):
    import pytest

    from bench.engine_overhead import combine_table, main
    combine_table(tp=1, ep=2, batches=[2], steps=2, rounds=1)
    row = capsys.readouterr().out.strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "2" and float(cells[1]) > 0 and float(cells[2]) > 0
    assert float(cells[3].rstrip("x")) == pytest.approx(float(cells[1]) / float(cells[2]), rel=0.05)
    with pytest.raises(SystemExit):
        main(["--combine"])  # needs --ranks
    assert "--combine needs --ranks" in capsys.readouterr().err
