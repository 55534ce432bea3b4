"""bench/run.py's --set: a deploy file changed for one benchmark run, which the server's own config check reads."""

from __future__ import annotations

import pytest

from bench.run import config_with
from server.config import load_deploy_file
from server.errors import ConfigError
from tests.strategy_cases import REPO


def test_set_changes_one_key_of_the_chorus_args_and_keeps_the_rest(tmp_path):
    path = config_with(str(REPO / "deploy" / "local.yaml"),
                       ["groups.smollm2.max_step_tokens=64", "frontend.limits.max_tokens=512"], tmp_path / "c.yaml")
    changed, original = load_deploy_file(path).chorus, load_deploy_file(REPO / "deploy" / "local.yaml").chorus
    assert changed.groups["smollm2"].max_step_tokens == 64
    assert changed.frontend.limits.max_tokens == 512
    assert changed.groups["smollm2"].guides == original.groups["smollm2"].guides
    assert changed.models == original.models


def test_bad_settings_are_refused_here_or_by_the_config_check(tmp_path):
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        config_with(str(REPO / "deploy" / "local.yaml"), ["max_step_tokens"], tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="default_model is not a mapping"):
        config_with(str(REPO / "deploy" / "local.yaml"), ["default_model.x=1"], tmp_path / "c.yaml")
    path = config_with(str(REPO / "deploy" / "local.yaml"), ["groups.smollm2.max_stepp_tokens=64"], tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="max_stepp_tokens"):
        load_deploy_file(path)
