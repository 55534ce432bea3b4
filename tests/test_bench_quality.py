"""The quality benchmarks' scoring (bench/quality.py: the refusal string match, the interval;
bench/entropy_switch.py: the threshold points and the agreement with large-only output)."""

import json
import math

import pytest

from bench.quality import is_refusal, resumed_rows, rows, wilson


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
    assert resumed_rows(path, settings) == []
    path.write_text(json.dumps(settings | {"rows": [{"row": "plain-1.5b"}], "run_s": 1.0}))
    assert resumed_rows(path, settings) == [{"row": "plain-1.5b"}]
    with pytest.raises(SystemExit, match=r"other settings.*'limit': \(50, 20\)"):
        resumed_rows(path, settings | {"limit": 20})


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
