"""The quality benchmarks' scoring (bench/quality.py: the refusal string match, the interval;
bench/entropy_switch.py: the threshold points, the agreement with large-only output, a resumed sweep)."""

import json
import math

import pytest

from bench.quality import is_refusal, rows, wilson
from bench.run import resumed


def test_refusal_string_match():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I’m sorry")                    # typographic apostrophe
    assert is_refusal("As an AI language model, I ...")
    assert not is_refusal("To kill a Python process, run `kill <pid>`.")


def test_wilson_interval():
    low, high = wilson(45, 50)
    assert low < 0.9 < high and high <= 1.0
    assert wilson(0, 40)[0] == 0.0 and 0 < wilson(0, 40)[1] < 0.1
    assert wilson(50, 50) == (pytest.approx(0.9287, abs=1e-3), 1.0)
    assert all(math.isnan(v) for v in wilson(0, 0))


def test_every_row_has_a_unique_name_and_a_known_task():
    names = [r.name for r in rows()]
    assert len(names) == len(set(names)) and {r.task for r in rows()} == {"gsm8k", "refusal"}


def test_resume_keeps_rows_of_the_same_settings_and_refuses_others(tmp_path):
    settings = {"config": "deploy/local-pair.yaml", "limit": 50, "gsm8k_tokens": 256}
    path = tmp_path / "quality.json"
    assert resumed(path, settings, "rows") == []
    path.write_text(json.dumps(settings | {"rows": [{"row": "plain-1.5b"}], "run_s": 1.0}))
    assert resumed(path, settings, "rows") == [{"row": "plain-1.5b"}]
    with pytest.raises(SystemExit, match=r"other settings.*'limit': \(50, 20\)"):
        resumed(path, settings | {"limit": 20}, "rows")


def test_entropy_switch_bench_points_and_agreement():
    from bench.entropy_switch import agreement, points

    sweep = points([0.5, 2.0], [], default=0.8)
    assert [p["name"] for p in sweep] == ["large-only", "tau=0.4", "tau=1.6", "small-only"]
    assert sweep[0]["knobs"] == {"threshold": -math.inf, "min_span": 0, "start": "START_LARGE"}
    assert [p["threshold"] for p in points([], [1.0], default=None)] == [-math.inf, 1.0, math.inf]
    # Shares of each reference reply before the first difference: 2/4 and 3/3; one exact match.
    assert agreement([[1, 2, 9, 9], [5, 6, 7]], [[1, 2, 3, 4], [5, 6, 7]]) == (0.75, 0.5)
    with pytest.raises(SystemExit, match="--thresholds"):
        points([1.0], [], default=None)


def _sweep_point(name: str, threshold: float, tokens_per_s: float, token_ids: list[list[int]]) -> dict:
    return {"point": name, "threshold": threshold, "wall_s": 10.0, "completion_tokens": 8,
            "tokens_per_s": tokens_per_s, "large_fraction": 0.5, "switches_per_request": 1.0, "compute_saved": 0.3,
            "parameter_ratio": 0.32, "accuracy": 0.5, "ci95": [0.1, 0.9], "n": 2, "prompts": ["q1", "q2"],
            "token_ids": token_ids, "measured": "2000-01-01 00:00 UTC"}


def test_entropy_switch_bench_resumes_a_sweep_from_its_replies(tmp_path, monkeypatch):
    """With every point of the sweep already in <name>-replies.json, --resume starts no server and writes the report:
    points in sweep order, speed-ups and agreement against the kept large-only point, a point outside the sweep
    dropped; other settings are refused."""
    import bench.entropy_switch as bench_entropy

    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test_shared.jsonl").write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(1, 3)))
    settings = {"config": "deploy/local.yaml", "group": "smollm2", "limit": 2, "tokens": 4, "concurrency": 2}
    large = [[1, 2, 3, 4], [5, 6, 7, 8]]
    points = [_sweep_point("small-only", math.inf, 8.0, [[1, 9, 9, 9], [5, 6, 7, 8]]),
              _sweep_point("large-only", -math.inf, 2.0, large),
              _sweep_point("tau=3", 3.0, 1.0, large),   # not in this run's sweep
              _sweep_point("tau=1", 1.0, 3.0, [[1, 2, 3, 9], [5, 6, 7, 8]])]
    (tmp_path / "es-replies.json").write_text(json.dumps(settings | {"points": points}))
    monkeypatch.setattr(bench_entropy, "with_server", lambda *a, **k: pytest.fail("started a server"))
    argv = ["entropy_switch", "--config", "deploy/local.yaml", "--data", str(tmp_path), "--out", str(tmp_path),
            "--name", "es", "--limit", "2", "--tokens", "4", "--concurrency", "2", "--thresholds", "1",
            "--no-loglik", "--resume"]
    monkeypatch.setattr("sys.argv", argv)
    assert bench_entropy.main() == 0
    report = json.loads((tmp_path / "es.json").read_text())
    assert [p["point"] for p in report["points"]] == ["large-only", "tau=1", "small-only"]
    assert [p["speedup"] for p in report["points"]] == [1.0, 1.5, 4.0]
    assert [p["agreement_prefix"] for p in report["points"]] == [1.0, 0.875, 0.625]
    assert [p["agreement_exact"] for p in report["points"]] == [1.0, 0.5, 0.5]
    assert report["run_s"] == 30.0 and "token_ids" not in report["points"][0]
    assert "2000-01-01 00:00 UTC" in (tmp_path / "es.md").read_text()
    monkeypatch.setattr("sys.argv", [a if a != "4" else "8" for a in argv])  # --tokens 8
    with pytest.raises(SystemExit, match=r"'tokens': \(4, 8\)"):
        bench_entropy.main()


def test_a_resumed_sweep_runs_only_its_missing_points_and_keeps_every_earlier_one(tmp_path, monkeypatch):
    """The point missing from the replies file runs (through `run_point`, the server's part replaced), and the file
    then holds it beside every earlier point, those of another sweep included."""
    import bench.entropy_switch as bench_entropy

    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test_shared.jsonl").write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(1, 3)))
    settings = {"config": "deploy/local.yaml", "group": "smollm2", "limit": 2, "tokens": 4, "concurrency": 2}
    large = [[1, 2, 3, 4], [5, 6, 7, 8]]
    earlier = [_sweep_point("large-only", -math.inf, 2.0, large), _sweep_point("tau=3", 3.0, 1.0, large),
               _sweep_point("small-only", math.inf, 8.0, large)]
    (tmp_path / "es-replies.json").write_text(json.dumps(settings | {"points": earlier}))
    ran = []

    def run_point(stub, point, model, problems, tokens, concurrency, progress):
        ran.append(point["name"])
        return {k: v for k, v in _sweep_point(point["name"], point["threshold"], 4.0, large).items()
                if k != "measured"}

    monkeypatch.setattr(bench_entropy, "run_point", run_point)
    monkeypatch.setattr(bench_entropy, "with_server", lambda config, log, measure, progress: measure("unused:1"))
    monkeypatch.setattr("sys.argv", ["entropy_switch", "--config", "deploy/local.yaml", "--data", str(tmp_path),
                                     "--out", str(tmp_path), "--name", "es", "--limit", "2", "--tokens", "4",
                                     "--concurrency", "2", "--thresholds", "1", "--no-loglik", "--resume"])
    assert bench_entropy.main() == 0
    assert ran == ["tau=1"]
    saved = json.loads((tmp_path / "es-replies.json").read_text())
    assert sorted(p["point"] for p in saved["points"]) == ["large-only", "small-only", "tau=1", "tau=3"]
    assert saved["points"][-1]["measured"] != "2000-01-01 00:00 UTC"  # stamped when it ran
    report = json.loads((tmp_path / "es.json").read_text())
    assert [p["point"] for p in report["points"]] == ["large-only", "tau=1", "small-only"]
    assert report["points"][1]["speedup"] == 2.0


def test_mean_interval_against_the_t_table():
    from bench.quality import mean_interval

    mean, low, high = mean_interval([1.0, 2.0, 3.0, 4.0])  # sd 1.291, t(0.975, 3) = 3.182
    assert mean == 2.5 and high - mean == pytest.approx(3.182446 * 1.290994 / 2, rel=1e-5) and low == 5.0 - high
    assert math.isnan(mean_interval([0.7])[1])


def test_rerank_rows_from_a_rerank_report(tmp_path):
    """Rows per order on the queries both modes ran, each mode's paired difference from BM25."""
    from bench.quality import rerank_rows

    data = tmp_path / "data" / "dl20"
    data.mkdir(parents=True)
    runs = [{"query": f"q{i}", "hits": [{"qid": i, "docid": f"{i}-{j}", "content": ""} for j in range(3)]}
            for i in range(3)]
    (data / "retrieve_results_dl20.json").write_text(json.dumps(runs))
    # the last hit of each query is the only relevant one
    (data / "qrels.dl20-passage.txt").write_text("".join(f"{i} 0 {i}-2 1\n" for i in range(3)))
    out = tmp_path / "out"
    out.mkdir()
    assert rerank_rows(out, tmp_path / "data") == []  # no report: no rows
    report = {"model": "m", "generate_queries": 2, "window_size": 2, "stride": 1, "command": "python -m bench.rerank",
              "first": {"rankings": [[2, 0, 1], [2, 1, 0], [0, 1, 2]]},  # the third query only in the first pass
              "generate": {"rankings": [[0, 1, 2], [1, 2, 0]]}}
    (out / "rerank.json").write_text(json.dumps(report))
    rows = {r["order"]: r for r in rerank_rows(out, tmp_path / "data")}
    bm25 = 1 / math.log2(4)  # the relevant passage at rank 3
    assert rows["BM25 order"]["n"] == 2 and rows["BM25 order"]["ndcg10"] == pytest.approx(bm25)
    assert "minus_bm25" not in rows["BM25 order"]
    assert rows["MODE_FIRST_TOKEN"]["ndcg10"] == pytest.approx(1.0)
    assert rows["MODE_FIRST_TOKEN"]["minus_bm25"][0] == pytest.approx(1 - bm25)
    assert rows["MODE_GENERATE"]["ndcg10"] == pytest.approx((bm25 + 1 / math.log2(3)) / 2)
    assert all(r["source"] == "rerank.json" and r["model"] == "m" for r in rows.values())
