import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import load_deploy_file, parse_chorus_config
from server.engines.vllm_engine import check_engine_args
from server.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

GOOD = {
    "models": {"m": {"path": "embedded:smollm2-135m-instruct"}},
    "groups": {"g": {"base": "m"}},
}


def with_(**changes):
    args = {k: dict(v) if isinstance(v, dict) else v for k, v in GOOD.items()}
    args.update(changes)
    return args


def test_local_deploy_file_loads_and_port_override_applies():
    deploy = load_deploy_file(ROOT / "deploy" / "local.yaml", port=6000)
    assert deploy.chorus.default_model == "smollm2-135m-instruct"
    assert deploy.chorus.frontend.port == 6000
    assert deploy.chorus.groups["smollm2"].deployment_name == "group-smollm2"
    deployments = {d["name"] for d in deploy.serve_config["applications"][0]["deployments"]}
    assert deployments == {"frontend", "group-smollm2"}


def test_defaults():
    config = parse_chorus_config(GOOD)
    assert config.default_model == "m"
    assert config.frontend.host == "127.0.0.1" and config.frontend.port == 50051
    assert config.groups["g"].max_batch_size == 16


@pytest.mark.parametrize("args, message", [
    (with_(models={}), "models: at least one"),
    (with_(groups={}), "groups: at least one"),
    (with_(groups={"g": {"base": "nope"}}), "groups.g.base: 'nope' is not a configured model"),
    (with_(models={"m": {"path": "x", "engine": "tgi"}}), "models.m.engine"),
    (with_(models={"m": {"path": "x", "dtype": "int3"}}), "models.m.dtype"),
    (with_(models={"m": {"path": "x", "colour": "red"}}), "models.m: unknown key(s) ['colour']"),
    (with_(groups={"g": {"base": "m", "max_batch_size": 0}}), "groups.g"),
    (with_(default_model="other"), "default_model: 'other'"),
    (with_(extra=1), "args: unknown key(s) ['extra']"),
    (with_(groups={"g": {"base": "m"}, "h": {"base": "m"}}), "already the base of group"),
    (with_(frontend={"drain_grace_s": -1}), "frontend.drain_grace_s: seconds >= 0"),
    (with_(frontend={"drain_grace_s": "soon"}), "frontend.drain_grace_s"),
])
def test_bad_configs_are_refused_with_the_field(args, message):
    with pytest.raises(ConfigError) as info:
        parse_chorus_config(args)
    assert message in str(info.value)


def test_vllm_deploy_files_validate_their_engine_arguments():
    local = load_deploy_file(ROOT / "deploy" / "local-vllm.yaml").chorus
    assert local.models["smollm2-135m-instruct"].engine == "vllm"
    gpu = load_deploy_file(ROOT / "deploy" / "gpu.yaml")
    model = gpu.chorus.models[gpu.chorus.default_model]
    assert (model.engine, model.device, model.dtype) == ("vllm", "cuda", "bfloat16")
    group = gpu.serve_config["applications"][0]["deployments"][1]
    assert group["ray_actor_options"]["num_gpus"] == 1 and group["autoscaling_config"]["max_replicas"] > 1


def test_vllm_arguments_clashing_with_the_model_fields_are_refused():
    with pytest.raises(ConfigError, match=re.escape("set ['dtype'] as the model's own fields")):
        parse_chorus_config(with_(models={"m": {"path": "x", "engine": "vllm", "vllm": {"dtype": "float16"}}}))


def test_unknown_vllm_arguments_are_refused_by_the_engine_check():
    config = parse_chorus_config(with_(models={"m": {"path": "x", "engine": "vllm", "vllm": {"no_such_arg": 1}}}))
    with pytest.raises(ConfigError, match=re.escape("unknown engine argument(s) ['no_such_arg']")):
        check_engine_args(config.models["m"])
    for deploy in ("local-vllm.yaml", "gpu.yaml"):
        for spec in load_deploy_file(ROOT / "deploy" / deploy).chorus.models.values():
            if spec.engine == "vllm":
                check_engine_args(spec)


def test_the_config_imports_no_engine():
    """The front end validates configs and serves the API without importing vLLM or an engine."""
    code = ("import sys; import server.config, server.service; "
            "engines = [m for m in sys.modules if m.startswith(('vllm', 'server.engines.vllm', "
            "'server.engines.transformers'))]; assert not engines, engines")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_vllm_arguments_on_a_transformers_model_are_refused():
    with pytest.raises(ConfigError, match="the engine is 'transformers'"):
        parse_chorus_config(with_(models={"m": {"path": "x", "vllm": {"enforce_eager": True}}}))


def test_local_config_declares_guides_and_refusal_prefixes():
    group = load_deploy_file(ROOT / "deploy" / "local.yaml").chorus.groups["smollm2"]
    assert [g.name for g in group.guides_with_role("amateur")] == ["exit8"]
    assert {t for g in group.guides.values() for t in g.expert_tasks} == {"concise", "french"}
    assert group.refusal.prefixes["refuse"][0] == "I'm sorry"


def test_pair_config_declares_the_small_model_as_every_guide_and_serves_every_strategy():
    from server.strategies.registry import availability

    config = load_deploy_file(ROOT / "deploy" / "local-pair.yaml").chorus
    group = config.groups["qwen"]
    assert config.default_model == group.base == "qwen2.5-coder-1.5b-instruct"
    small = "qwen2.5-coder-0.5b-instruct"
    assert [(g.name, g.model) for g in group.guides_with_role("amateur")] == [("small", small)]
    assert [(g.name, g.model) for g in group.guides_with_role("small_base")] == [("small", small)]
    assert [(g.name, g.model) for g in group.guides_with_role("small")] == [("small", small)]
    assert {t: g.model for g in group.guides.values() for t in g.expert_tasks} == {"stepwise": small}
    assert availability(group) == {name: None for name in availability(group)}


@pytest.mark.parametrize("config, target", [("local.yaml", "install"), ("local-pair.yaml", "install"),
                                            ("local-vllm.yaml", "install-cpu"), ("gpu.yaml", "install-cpu")])
def test_make_serve_installs_what_the_deploy_files_engines_need(config, target):
    out = subprocess.run([sys.executable, "-m", "chorus.cli", "install-target", "--config", f"deploy/{config}"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == target


TWO_MODELS = {"m": {"path": "x"}, "small": {"path": "y", "early_exit_layers": 4}}


@pytest.mark.parametrize("group, message", [
    ({"base": "m", "guides": {"a": {"model": "nope", "roles": ["amateur"]}}}, "groups.g.guides.a.model: 'nope'"),
    ({"base": "m", "guides": {"a": {"model": "small", "roles": ["teacher"]}}}, "groups.g.guides.a.roles: 'teacher'"),
    ({"base": "m", "guides": {"a": {"model": "small", "roles": ["expert:"]}}}, "groups.g.guides.a.roles"),
    ({"base": "m", "guides": {"a": {"model": "small"}}}, "groups.g.guides.a"),
    ({"base": "m", "guides": {"a": {"model": "small", "roles": ["amateur"], "temp": 1}}}, "unknown key(s) ['temp']"),
    ({"base": "m", "guides": {"r": {"model": "small", "roles": ["reranker"]}}}, "a reranker runs on the group's base"),
    ({"base": "m", "guides": {"j": {"model": "small", "roles": ["judge"]}}}, "a judge runs on the group's base"),
    ({"base": "m", "rerank": {"max_passages": 0}}, "groups.g.rerank.max_passages: a whole number >= 1"),
    ({"base": "m", "rerank": {"windows": 3}}, "groups.g.rerank: unknown key(s) ['windows']"),
    ({"base": "m", "best_of_n": {"max_n": True}}, "groups.g.best_of_n.max_n: a whole number >= 1"),
    ({"base": "m", "refusal": {}}, "groups.g.refusal: give either `tokens`"),
    ({"base": "m", "refusal": {"tokens": {"refuse": "[refuse]"}}}, "with `respond_token` set"),
    ({"base": "m", "refusal": {"prefixes": {"refuse": []}}}, "non-empty list of prefix strings"),
])
def test_bad_guides_and_refusal_configs_are_refused(group, message):
    with pytest.raises(ConfigError) as info:
        parse_chorus_config({"models": TWO_MODELS, "groups": {"g": group}})
    assert message in str(info.value)


def test_early_exit_needs_transformers_and_positive_layers():
    with pytest.raises(ConfigError, match="early_exit_layers: must be >= 1"):
        parse_chorus_config({"models": {"m": {"path": "x", "early_exit_layers": 0}}, "groups": {"g": {"base": "m"}}})


def test_a_rerank_call_without_a_model_goes_to_the_group_with_a_reranker():
    models = {"m": {"path": "x"}, "n": {"path": "y"}}
    plain = {"g": {"base": "m"}, "h": {"base": "n"}}
    assert parse_chorus_config({"models": models, "groups": plain}).default_reranker == "m"
    ranked = {"g": {"base": "m"}, "h": {"base": "n", "rerank": {"max_passages": 200},
                                        "guides": {"r": {"model": "n", "roles": ["reranker"]}}}}
    config = parse_chorus_config({"models": models, "groups": ranked})
    assert config.default_reranker == "n" and config.default_model == "m"
    assert config.groups["h"].rerank.max_passages == 200 and config.groups["h"].rerank.max_permutations == 8


def test_a_drain_longer_than_serve_waits_for_the_front_end_is_refused(tmp_path):
    import yaml
    raw = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    app = raw["applications"][0]
    app["args"]["frontend"]["drain_grace_s"] = 25  # Serve's default graceful_shutdown_timeout_s is 20 s
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="drain_grace_s .25 s. must be shorter than .* graceful_shutdown_timeout_s "
                                          r".20 s."):
        load_deploy_file(path)
    next(d for d in app["deployments"] if d["name"] == "frontend")["graceful_shutdown_timeout_s"] = 40
    path.write_text(yaml.safe_dump(raw))
    assert load_deploy_file(path).chorus.frontend.drain_grace_s == 25


def test_where_a_group_runs_its_base_on_other_contexts():
    import dataclasses

    from server.service import other_contexts

    local = load_deploy_file(ROOT / "deploy" / "local.yaml").chorus
    assert other_contexts(local, next(iter(local.groups.values()))) == "rows"
    on_vllm = load_deploy_file(ROOT / "deploy" / "local-vllm.yaml").chorus
    group = next(iter(on_vllm.groups.values()))
    assert {other_contexts(on_vllm, dataclasses.replace(group, vllm_companions=c)) for c in (False, True)} == {
        "transformers copy", "vllm companions"}


def test_vllm_companions_need_a_vllm_base():
    args = {"models": {"m": {"path": "x", "engine": "transformers"}},
            "groups": {"g": {"base": "m", "vllm_companions": True}}}
    with pytest.raises(ConfigError, match="groups.g.vllm_companions: companion requests need a vLLM base"):
        parse_chorus_config(args)
