"""deploy/kuberay/rayservice.yaml: valid against KubeRay's RayService schema (deploy/kuberay/rayservice-v1.schema.json,
with unknown fields refused as `kubectl apply --validate=strict` does), serving deploy/gpu.yaml as it is, and its
gRPC Service, probes and node count consistent with that config."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from server.config import load_deploy_file

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"


def strict(schema):
    """An OpenAPI object schema that lists its properties refuses others, unless it says to keep unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: ({name: strict(s) for name, s in value.items()} if key == "properties" else strict(value))
           for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


VALIDATOR = jsonschema.Draft7Validator(strict(json.loads((KUBERAY / "rayservice-v1.schema.json").read_text())))


def manifest() -> tuple[dict, dict]:
    service, grpc_service = yaml.safe_load_all((KUBERAY / "rayservice.yaml").read_text())
    return service, grpc_service


def errors(document: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(document)]


def pod_templates(service: dict) -> list[dict]:
    cluster = service["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def test_the_rayservice_is_valid_against_kuberays_schema():
    service, _ = manifest()
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert errors(service) == []


@pytest.mark.parametrize("path, key", [
    (("spec", "rayClusterConfig"), "workerGroupSpec"),  # a typo of workerGroupSpecs
    (("spec",), "serveConfig"),  # the old field name
])
def test_the_schema_check_refuses_an_unknown_field(path, key):
    service, _ = manifest()
    broken = copy.deepcopy(service)
    node = broken
    for part in path:
        node = node[part]
    node[key] = {}
    assert any(f"'{key}' was unexpected" in e for e in errors(broken)), errors(broken)


def test_it_serves_deploy_gpu_yaml_as_it_is(tmp_path):
    service, _ = manifest()
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert served == yaml.safe_load((ROOT / "deploy" / "gpu.yaml").read_text())
    (tmp_path / "served.yaml").write_text(service["spec"]["serveConfigV2"])
    load_deploy_file(tmp_path / "served.yaml")  # Chorus's own checks of the config


def test_the_grpc_service_reaches_the_front_end_of_every_pod_that_is_serving():
    service, grpc_service = manifest()
    frontend = load_deploy_file(ROOT / "deploy" / "gpu.yaml").chorus.frontend
    assert (grpc_service["apiVersion"], grpc_service["kind"]) == ("v1", "Service")
    [port] = grpc_service["spec"]["ports"]
    assert port["port"] == frontend.port and frontend.host == "0.0.0.0"
    for template in pod_templates(service):
        assert grpc_service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
        [container] = template["spec"]["containers"]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert named[port["targetPort"]] == frontend.port
        # kubelet's gRPC probe speaks no TLS: it asks the plaintext health port.
        assert frontend.tls is not None and container["readinessProbe"]["grpc"]["port"] == frontend.health_port
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        secrets = {v["name"]: v["secret"]["secretName"] for v in template["spec"]["volumes"] if "secret" in v}
        for path in (frontend.tls.certificate, frontend.tls.key, frontend.auth.tokens_file):
            assert secrets[mounts[str(Path(path).parent)]], f"{path} comes from a Secret mounted on every pod"


def test_there_are_nodes_for_every_front_end_and_gpus_for_the_group():
    service, _ = manifest()
    cluster = service["spec"]["rayClusterConfig"]
    deployments = {d["name"]: d for d in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0][
        "deployments"]}
    front_ends = deployments["frontend"]
    assert front_ends["max_replicas_per_node"] == 1
    fewest_nodes = 1 + sum(g["minReplicas"] for g in cluster["workerGroupSpecs"])
    assert front_ends["num_replicas"] <= fewest_nodes
    [gpu_group] = cluster["workerGroupSpecs"]
    gpus = int(gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    group = deployments["group-qwen7b"]
    assert gpu_group["maxReplicas"] * gpus >= group["autoscaling_config"]["max_replicas"] * \
        group["ray_actor_options"]["num_gpus"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
