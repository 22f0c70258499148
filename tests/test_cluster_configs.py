"""The cluster configs in cluster/ against the schemas that will read them.

- cluster/launcher-aws-gpu.yaml: the JSON schema the installed ray ships
  (ray/autoscaler/ray-schema.json) and Ray's own offline loader (prepare_config, validate_config).
- cluster/kuberay/*.yaml: the v1 openAPIV3Schema of KubeRay's CRDs, vendored and trimmed in
  tests/data/kuberay/ (source commit in each file's header), validated as JSON Schema draft 7
  with int32/int64 range checks, plus the field-name check that `kubectl apply` does.
- cluster/runtime_env.yaml and the RayJob's runtimeEnvYAML: what `ray job submit` builds from
  them (Ray's RuntimeEnv validation), and pins equal to pyproject.toml's dependencies.

No network, no Ray cluster.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "launcher-aws-gpu.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
KUBERAY = CLUSTER / "kuberay"
SCHEMAS = ROOT / "tests" / "data" / "kuberay"

FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def pins(requirements: list[str]) -> dict[str, tuple[tuple[str, ...], str]]:
    """name → (sorted extras, specifier); a repeated name is an error."""
    out: dict[str, tuple[tuple[str, ...], str]] = {}
    for line in requirements:
        req = Requirement(line)
        name = req.name.lower().replace("_", "-")
        assert name not in out, f"{name} listed twice"
        out[name] = (tuple(sorted(req.extras)), str(req.specifier))
    return out


def pin_drift(found: list[str]) -> list[str]:
    """How a requirement list differs from pyproject.toml's runtime dependencies."""
    want = pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    got = pins(found)
    return ([f"missing {n}" for n in want.keys() - got.keys()]
            + [f"not in pyproject: {n}" for n in got.keys() - want.keys()]
            + [f"{n}: {got[n]} != pyproject {want[n]}" for n in want.keys() & got.keys()
               if got[n] != want[n]])


def ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(str(r.specifier).lstrip("=") for r in map(Requirement, deps) if r.name == "ray")


# ----------------------------------------------------------------- cluster launcher


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def launcher_errors(cfg: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(ray_schema())
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(cfg)]


def setup_pins(commands: list[str]) -> list[str]:
    """The requirements of every `pip install` in a list of shell commands."""
    out = []
    for cmd in commands:
        words = shlex.split(cmd)
        if words[:2] == ["pip", "install"]:
            out += [w for w in words[2:] if not w.startswith("-")]
    return out


def test_launcher_matches_ray_schema():
    import ray

    assert ray.__version__ == ray_pin(), "the schema must come from the pinned ray"
    assert launcher_errors(load(LAUNCHER)) == []


def test_launcher_schema_rejects_broken_fields():
    cfg = load(LAUNCHER)
    bad = copy.deepcopy(cfg)
    bad["max_workers"] = "8"
    assert any("max_workers" in e for e in launcher_errors(bad))
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_l40s"]["resources"]["GPU"] = 0.5
    assert launcher_errors(bad)
    bad = copy.deepcopy(cfg)
    bad["head_start_ray_command"] = bad.pop("head_start_ray_commands")
    assert launcher_errors(bad)


def test_launcher_passes_rays_loader():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(load(LAUNCHER))  # fills the AWS defaults; no credentials needed
    validate_config(cfg)
    assert cfg["available_node_types"][cfg["head_node_type"]]["max_workers"] == 0
    bad = load(LAUNCHER)
    bad["head_node_type"] = "head-typo"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(bad))


def test_launcher_layout():
    cfg = load(LAUNCHER)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] >= 1
    gpus = {k: v for k, v in types.items() if v["resources"].get("GPU", 0) > 0}
    assert gpus and all(v["min_workers"] == 0 < v["max_workers"] for v in gpus.values())
    assert sum(v["max_workers"] for v in gpus.values()) >= cfg["max_workers"]
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=" in head_start
    assert "RAY_AUTH_MODE=" in " ".join(cfg["worker_start_ray_commands"])
    for skipped in ("results", ".venv", "activations"):
        assert skipped in cfg["rsync_exclude"]
    assert ".gitignore" in cfg["rsync_filter"]
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray_pin()}-")
    assert "/mnt/shared:/mnt/shared" in " ".join(cfg["docker"]["run_options"])


def test_launcher_pins_match_pyproject():
    cfg = load(LAUNCHER)
    assert pin_drift(setup_pins(cfg["setup_commands"])) == []
    drifted = [c.replace("numpy==2.4.6", "numpy==2.4.5") for c in cfg["setup_commands"]]
    assert pin_drift(setup_pins(drifted)) == ["numpy: ((), '==2.4.5') != pyproject ((), '==2.4.6')"]
    extra = setup_pins(cfg["head_setup_commands"] + cfg["worker_setup_commands"])
    assert not {Requirement(r).name for r in extra} & {Requirement(r).name for r in
                                                        setup_pins(cfg["setup_commands"])}


# ----------------------------------------------------------------- runtime env


def test_runtime_env_pins_match_pyproject():
    env = load(RUNTIME_ENV)
    assert pin_drift(env["pip"]) == []
    assert pin_drift([p for p in env["pip"] if not p.startswith("scipy")]) == ["missing scipy"]
    others = [p for p in env["pip"] if not p.startswith("accelerate")]
    assert pin_drift([*others, "accelerate==1.14.0"]) != []


def test_runtime_env_loads_like_ray_job_submit(monkeypatch):
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    monkeypatch.chdir(ROOT)  # `ray job submit` runs from the repository root
    env = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV.relative_to(ROOT)), working_dir=".")
    parsed = RuntimeEnv(**env)
    assert parsed.working_dir() == "." and parsed.has_pip()
    assert parsed.env_vars()["RAY_TRAIN_ENABLE_STATE_TRACKING"] == "1"
    for skipped in ("results/", ".venv/", "activations/", "*.parquet", "*.safetensors", ".git/"):
        assert skipped in env["excludes"]
    with pytest.raises(TypeError):
        RuntimeEnv(**{**env, "excludes": "results/"})


# ----------------------------------------------------------------- KubeRay


def pod_templates(spec: dict) -> list[dict]:
    """The head's and every worker group's pod template of a RayClusterSpec."""
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def crd_schema(kind: str) -> dict:
    return load(SCHEMAS / f"{kind}-v1.schema.yaml")


def unknown_fields(instance, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not name (the API server drops or, strict, rejects them)."""
    out: list[str] = []
    if isinstance(instance, dict):
        if "properties" in schema:
            for key, value in instance.items():
                if key in schema["properties"]:
                    out += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
                else:
                    out.append(f"{path}.{key}")
        elif isinstance(schema.get("additionalProperties"), dict):
            for key, value in instance.items():
                out += unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(instance, list) and "items" in schema:
        for i, value in enumerate(instance):
            out += unknown_fields(value, schema["items"], f"{path}[{i}]")
    return out


def manifest_errors(manifest: dict, kind: str) -> list[str]:
    schema = crd_schema(kind)
    validator = jsonschema.Draft7Validator(schema, format_checker=FORMATS)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(manifest)]
    errors += [f"unknown field {p}" for p in unknown_fields(manifest, schema)]
    if manifest.get("apiVersion") != "ray.io/v1" or manifest.get("kind", "").lower() != kind:
        errors.append(f"not a ray.io/v1 {kind}")
    name = manifest.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
        errors.append(f"metadata.name {name!r} is not a DNS-1123 label")
    return errors


@pytest.mark.parametrize("kind", ["raycluster", "rayjob"])
def test_kuberay_manifest_matches_crd(kind):
    assert manifest_errors(load(KUBERAY / f"{kind}.yaml"), kind) == []


def test_kuberay_schema_rejects_broken_manifests():
    job = load(KUBERAY / "rayjob.yaml")
    bad = copy.deepcopy(job)
    del bad["spec"]["entrypoint"]
    assert any("'entrypoint' is a required property" in e for e in manifest_errors(bad, "rayjob"))
    bad = copy.deepcopy(job)
    del bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]
    assert any("rayStartParams" in e for e in manifest_errors(bad, "rayjob"))
    cluster = load(KUBERAY / "raycluster.yaml")

    def group(manifest: dict) -> dict:
        return manifest["spec"]["workerGroupSpecs"][0]

    bad = copy.deepcopy(cluster)
    group(bad)["maxReplicas"] = "8"
    assert any("maxReplicas" in e for e in manifest_errors(bad, "raycluster"))
    bad = copy.deepcopy(cluster)
    group(bad)["maxReplicas"] = 2**31
    assert any("int32" in e for e in manifest_errors(bad, "raycluster"))
    bad = copy.deepcopy(cluster)
    group(bad)["minReplica"] = group(bad).pop("minReplicas")
    errors = manifest_errors(bad, "raycluster")
    assert "unknown field .spec.workerGroupSpecs[0].minReplica" in " ".join(errors)
    bad = copy.deepcopy(cluster)
    group(bad)["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "48 GiB"
    assert manifest_errors(bad, "raycluster")
    bad = copy.deepcopy(cluster)
    bad["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    assert manifest_errors(bad, "raycluster")


def test_rayjob_runs_the_study_with_the_clusters_spec():
    job, cluster = load(KUBERAY / "rayjob.yaml")["spec"], load(KUBERAY / "raycluster.yaml")["spec"]
    assert job["rayClusterSpec"] == cluster
    words = shlex.split(job["entrypoint"])
    assert words[:2] == ["python", "experiments/scaling.py"] and words[2] == "--config"
    assert (ROOT / words[3]).is_file()
    assert job["shutdownAfterJobFinishes"] is True and job["submissionMode"] == "K8sJobMode"
    assert cluster["enableInTreeAutoscaling"] is True and cluster["rayVersion"] == ray_pin()
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    for pod in pod_templates(cluster):
        for container in pod["spec"]["containers"]:
            assert container["image"].startswith(f"rayproject/ray:{ray_pin()}-")
            assert {"name": "RAY_AUTH_MODE", "value": "disabled"} in container["env"]


def test_rayjob_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(load(KUBERAY / "rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert pin_drift(env["pip"]) == []
    assert env["env_vars"] == load(RUNTIME_ENV)["env_vars"]
    assert re.match(r"(https|s3|gs)://.+\.zip$", env["working_dir"])  # no local dir in a pod
    RuntimeEnv(**env)


def test_shared_volume_is_where_the_configs_write():
    pvc = load(KUBERAY / "shared-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    cluster = load(KUBERAY / "raycluster.yaml")["spec"]
    for pod in pod_templates(cluster):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
        shared = volumes[mounts["/mnt/shared"]]
        assert shared["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    study = load(ROOT / "experiments/configs/scaling/gemma2-2b-layer1.yaml")
    assert study["out"].startswith("/mnt/shared/")
    assert study["data"]["extract"]["out"].startswith("/mnt/shared/")
