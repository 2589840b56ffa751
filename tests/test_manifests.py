"""The cluster manifests in infra/ and the Dockerfile, checked offline against vendored schemas.

- ``infra/kuberay-rayjob.yaml`` against the RayJob CRD's ``openAPIV3Schema`` (KubeRay v1.7.0, closed
  the way ``kubectl apply``'s strict field validation closes it), then its autoscaling, token auth,
  GPU tolerations, ``backoffLimit``, Secrets, image and entrypoint (parsed by ``jobs.finetune``);
- ``infra/ray-cluster.yaml`` against Ray's cluster-launcher schema, then ``ray[default]``, the head's
  instance profile, GPU workers and token auth;
- ``infra/runtime_env.yaml`` through Ray's own ``RuntimeEnv`` parser;
- the Dockerfile's base tag and what it copies; and that every dependency list is what
  ``scripts/sync_deps.py`` writes from pyproject.toml now (and that a drift is caught).
Each schema test also feeds a broken copy and expects it rejected, so it can fail.
Where the vendored schemas come from: ``infra/schemas/README.md``. No network, no Docker.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
SCHEMAS = INFRA / "schemas"


def _load_sync_deps():
    spec = importlib.util.spec_from_file_location("sync_deps", ROOT / "scripts/sync_deps.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("sync_deps", module)
    spec.loader.exec_module(module)
    return module


sync_deps = _load_sync_deps()
VERSION, DEPS = sync_deps.read_project(ROOT / "pyproject.toml")
RAY = sync_deps.ray_pin(DEPS)


def _closed(node):
    """The CRD schema as the API server applies it with strict field validation: unknown fields fail.

    Structural CRD schemas prune unknown fields; ``kubectl apply`` (``--validate=strict``, its default)
    rejects them instead. An object that lists ``properties`` without ``additionalProperties`` (or
    ``x-kubernetes-preserve-unknown-fields``) is closed here the same way.
    """
    if isinstance(node, list):
        return [_closed(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _closed(v) for k, v in node.items()}
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


# OpenAPI v3.0's schema objects are JSON Schema draft 4's keywords (plus x-* keys, which it ignores).
CRD = jsonschema.Draft4Validator(_closed(json.loads((SCHEMAS / "ray.io_rayjobs.v1.openapi.json").read_text())))
LAUNCHER_SCHEMA = json.loads((SCHEMAS / "ray-schema.json").read_text())
LAUNCHER = jsonschema.validators.validator_for(LAUNCHER_SCHEMA)(LAUNCHER_SCHEMA)


def _errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def _rayjob() -> dict:
    return yaml.safe_load((INFRA / "kuberay-rayjob.yaml").read_text())


def _launcher() -> dict:
    return yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


# --- one dependency source --------------------------------------------------------------------------


def test_generated_files_match_pyproject():
    behind = [str(p.relative_to(ROOT)) for p in sync_deps.stale(ROOT)]
    assert not behind, f"{behind} differ from pyproject.toml: run python scripts/sync_deps.py"


def _copy_tree(dst: Path) -> None:
    for rel in (
        "pyproject.toml",
        "Dockerfile",
        "infra/requirements.txt",
        "infra/runtime_env.yaml",
        "infra/ray-cluster.yaml",
        "infra/kuberay-rayjob.yaml",
    ):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, dst / rel)


def _edit_ray_pin(pyproject: Path, new: str) -> None:
    text = pyproject.read_text()
    (line,) = [line for line in text.splitlines() if re.match(r'\s*"ray[\[=]', line)]
    pyproject.write_text(text.replace(line, line.replace(f"=={RAY}", new)))


def test_a_drift_is_caught_and_synced(tmp_path, capsys):
    _copy_tree(tmp_path)
    assert sync_deps.stale(tmp_path) == []
    pyproject = tmp_path / "pyproject.toml"
    _edit_ray_pin(pyproject, "==9.8.7")
    text = pyproject.read_text().replace("dependencies = [", 'dependencies = [\n  "newdep>=1.2",', 1)
    pyproject.write_text(text.replace(f'version = "{VERSION}"', 'version = "7.7.7"', 1))

    assert sync_deps.main(["--check", "--root", str(tmp_path)]) == 1
    stale = sorted(p.relative_to(tmp_path).as_posix() for p in sync_deps.stale(tmp_path))
    assert stale == [
        "Dockerfile",
        "infra/kuberay-rayjob.yaml",
        "infra/ray-cluster.yaml",
        "infra/requirements.txt",
        "infra/runtime_env.yaml",
    ]
    assert "infra/runtime_env.yaml: out of date with pyproject.toml" in capsys.readouterr().err

    assert sync_deps.main(["--root", str(tmp_path)]) == 0
    assert sync_deps.stale(tmp_path) == []
    assert "FROM rayproject/ray:9.8.7-py311-gpu" in (tmp_path / "Dockerfile").read_text()
    rayjob = (tmp_path / "infra/kuberay-rayjob.yaml").read_text()
    assert 'rayVersion: "9.8.7"' in rayjob
    assert rayjob.count("/clman:7.7.7") >= 3 and f"/clman:{VERSION}" not in rayjob  # images and the build line
    env = yaml.safe_load((tmp_path / "infra/runtime_env.yaml").read_text())
    assert env["pip"]["packages"][0] == "newdep>=1.2"
    launcher = yaml.safe_load((tmp_path / "infra/ray-cluster.yaml").read_text())
    assert "'newdep>=1.2'" in launcher["setup_commands"][-1]
    reqs = [
        Requirement(r)
        for r in (tmp_path / "infra/requirements.txt").read_text().splitlines()
        if r and not r.startswith("#")
    ]
    assert str(next(r for r in reqs if r.name == "ray").specifier) == "==9.8.7" and reqs[0].name == "newdep"


def test_sync_refuses_a_loose_ray_pin_and_a_lost_marker(tmp_path, capsys):
    _copy_tree(tmp_path)
    _edit_ray_pin(tmp_path / "pyproject.toml", ">=2.50")
    assert sync_deps.main(["--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Ray must be pinned exactly" in err and "'>=2.50'" in err, err

    _copy_tree(tmp_path)
    env = tmp_path / "infra/runtime_env.yaml"
    env.write_text(env.read_text().replace(sync_deps.END, "# end"))
    assert sync_deps.main(["--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: infra/runtime_env.yaml: no generated block"), err


def test_cluster_lists_are_pyprojects_with_ray_default():
    cluster = [Requirement(r) for r in sync_deps.cluster_requirements(DEPS)]
    assert [r.name for r in cluster] == [r.name for r in DEPS]
    ray = next(r for r in cluster if r.name == "ray")
    assert {"default", "train", "tune"} <= ray.extras and str(ray.specifier) == f"=={RAY}"
    assert "ray" not in [Requirement(r).name for r in sync_deps.runtime_env_packages(DEPS)]


# --- KubeRay RayJob ---------------------------------------------------------------------------------


def test_rayjob_matches_the_kuberay_crd():
    doc = _rayjob()
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert _errors(CRD, doc) == []


def _misspelt(doc):
    spec = doc["spec"]["rayClusterSpec"]
    spec["enableInTreeAutoscalling"] = spec.pop("enableInTreeAutoscaling")


def _backoff_text(doc):
    doc["spec"]["backoffLimit"] = "two"


def _auth_mode(doc):
    doc["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"


def _toleration_key(doc):
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["tolerations"][0]["efect"] = "NoSchedule"


def _env_from(doc):
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    _containers(head)[0]["envFrom"] = [{"secretRef": "clman-s3"}]


@pytest.mark.parametrize(
    "breaks, where",
    [
        (_misspelt, "'enableInTreeAutoscalling' was unexpected"),
        (_backoff_text, "'two' is not of type 'integer'"),
        (_auth_mode, "'tokens' is not one of ['disabled', 'token']"),
        (_toleration_key, "'efect' was unexpected"),
        (_env_from, "'clman-s3' is not of type 'object'"),
    ],
    ids=["misspelt-field", "wrong-type", "bad-enum", "misspelt-pod-field", "secretRef-not-object"],
)
def test_crd_schema_rejects_a_broken_rayjob(breaks, where):
    doc = _rayjob()
    breaks(doc)
    errors = _errors(CRD, doc)
    assert any(where in e for e in errors), errors


def test_rayjob_autoscales_authenticates_tolerates_gpus_and_retries():
    spec = _rayjob()["spec"]
    cluster = spec["rayClusterSpec"]
    # In-tree autoscaling, else minReplicas: 0 workers never appear.
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    assert cluster["rayVersion"] == RAY
    # Token auth from a Secret of ours (KubeRay wants rayVersion >= 2.52.0 for it).
    assert cluster["authOptions"] == {"mode": "token", "secretName": "clman-ray-token"}
    assert Version(cluster["rayVersion"]) >= Version("2.52.0")
    assert spec["backoffLimit"] >= 1 and spec["shutdownAfterJobFinishes"] is True
    assert not spec.get("clusterSelector")  # backoffLimit is refused with a clusterSelector

    (group,) = cluster["workerGroupSpecs"]
    assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    pod = group["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    (worker,) = pod["containers"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1

    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    images = set()
    for container in _containers(head["template"]) + [worker]:
        # S3 credentials from the Secret, never written here.
        assert {"secretRef": {"name": "clman-s3"}} in container["envFrom"], container["name"]
        assert not [e for e in container.get("env", []) if e["name"].startswith("AWS_") and "value" in e]
        images.add(container["image"])
    (image,) = images
    assert image.endswith(f"/clman:{VERSION}"), image  # docker build -t <registry>/clman:<version> .


def test_rayjob_header_creates_the_secrets_it_names():
    text = (INFRA / "kuberay-rayjob.yaml").read_text()
    created = re.findall(r"^#\s+kubectl create secret generic (\S+)", text, re.M)
    assert created == ["clman-s3", "clman-ray-token"]
    assert re.search(r"^#\s+kubectl create secret generic clman-ray-token --from-literal=auth_token=", text, re.M)
    assert re.search(r"^#\s+kubectl apply -f infra/kuberay-rayjob.yaml", text, re.M)


def test_rayjob_entrypoint_is_a_job_its_workers_fit():
    from clman import cli
    from clman import config as C
    from jobs import finetune
    from ray.runtime_env import RuntimeEnv

    spec = _rayjob()["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.finetune"]
    args = finetune.parse(argv[3:])
    cfg = C.load("finetune", args.config, cli.overrides(args))  # the preset and every --set load
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus, cpus = int(limits["nvidia.com/gpu"]), float(limits["cpu"])
    workers_per_pod = min(gpus // cfg.scale.gpus_per_worker, cpus // cfg.scale.cpus_per_worker)
    assert cfg.scale.num_workers <= workers_per_pod * group["maxReplicas"], (cfg.scale, limits)

    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env.pop("working_dir") == "/app"  # the Dockerfile's copy of this repository
    assert "pip" not in env and "conda" not in env  # the image holds the dependencies
    RuntimeEnv(**env)  # Ray's own validation of the rest


# --- Ray cluster launcher ---------------------------------------------------------------------------


def test_cluster_yaml_matches_the_launcher_schema():
    doc = _launcher()
    assert _errors(LAUNCHER, doc) == []
    assert doc["head_node_type"] in doc["available_node_types"]


@pytest.mark.parametrize(
    "breaks, where",
    [
        (lambda d: d.update(max_worker=d.pop("max_workers")), "'max_worker' was unexpected"),
        (lambda d: d["available_node_types"]["gpu_worker"].pop("resources"), "'resources' is a required property"),
        (
            lambda d: d["available_node_types"]["gpu_worker"]["resources"].update(GPU="1"),
            "'1' is not of type 'integer'",
        ),
        (lambda d: d.update(setup_commands="pip install ray"), "'pip install ray' is not of type 'array'"),
    ],
    ids=["misspelt-field", "missing-field", "wrong-type", "commands-not-a-list"],
)
def test_launcher_schema_rejects_a_broken_cluster_yaml(breaks, where):
    doc = _launcher()
    breaks(doc)
    errors = _errors(LAUNCHER, doc)
    assert any(where in e for e in errors), errors


def test_cluster_yaml_installs_ray_default_and_has_a_head_role_gpus_and_token_auth():
    doc = _launcher()
    (install,) = [c for c in doc["setup_commands"] if " install " in c]
    words = shlex.split(install)
    assert words[:3] == ["~/clman-env/bin/pip", "install", "-q"]
    assert sorted(words[3:]) == sorted(sync_deps.cluster_requirements(DEPS))
    ray = next(Requirement(w) for w in words[3:] if Requirement(w).name == "ray")
    assert "default" in ray.extras and str(ray.specifier) == f"=={RAY}"  # `ray job submit` needs the job server

    nodes = doc["available_node_types"]
    head = nodes[doc["head_node_type"]]
    assert head["node_config"]["IamInstanceProfile"]["Name"], "the head needs a role (workers, S3)"
    assert head["resources"] == {"CPU": 0}
    gpu = [n for name, n in nodes.items() if name != doc["head_node_type"] and n["resources"].get("GPU", 0) >= 1]
    assert gpu and all(n["max_workers"] >= 1 and "IamInstanceProfile" in n["node_config"] for n in gpu)

    assert doc["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    for cmd in doc["head_start_ray_commands"][1:] + doc["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token ray start" in cmd, cmd
    assert not re.search(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY)\s*[=:]", (INFRA / "ray-cluster.yaml").read_text())


def test_vendored_launcher_schema_is_the_pinned_rays():
    import ray

    if ray.__version__ != RAY:
        pytest.skip(f"installed Ray {ray.__version__} is not the pinned {RAY}")
    installed = Path(ray.__file__).parent / "autoscaler/ray-schema.json"
    assert json.loads(installed.read_text()) == LAUNCHER_SCHEMA, "re-vendor it: infra/schemas/README.md"


# --- runtime env --------------------------------------------------------------------------------------


def test_runtime_env_parses_as_ray_reads_it(monkeypatch):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    # What tests/test_cluster.py and the README's `ray job submit --working-dir .` rely on.
    assert env["working_dir"] == "." and {".venv", ".git", "*.mp4", "*.parquet"} <= set(env["excludes"])
    assert env["env_vars"] == {"RAY_TRAIN_V2_ENABLED": "1"}  # no credentials here
    assert env["pip"]["packages"] == sync_deps.runtime_env_packages(DEPS)
    monkeypatch.chdir(ROOT)
    parsed = RuntimeEnv(**env)
    assert parsed.pip_config()["packages"] == env["pip"]["packages"]


# --- Dockerfile --------------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/")) for p in prefixes for pat in patterns
    )


def test_dockerfile_builds_from_the_pinned_ray_with_the_generated_list():
    steps = _instructions()
    (base,) = [arg for op, arg in steps if op == "FROM"]
    found = re.fullmatch(r"rayproject/ray:(?P<ray>[^-]+)-py(?P<py>\d)(?P<minor>\d+)-gpu", base)
    assert found and found["ray"] == RAY, base
    project = sync_deps.tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requires = SpecifierSet(project["requires-python"])
    assert f"{found['py']}.{found['minor']}" in requires, (base, requires)

    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert "-r /tmp/clman/requirements.txt" in runs and "-c /tmp/clman/requirements.lock" in runs
    assert "pip install --no-cache-dir --no-deps /app" in runs  # the code itself, its deps already in
    assert ("WORKDIR", "/app") in steps

    patterns = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    copied = [
        "infra/requirements.txt",
        "requirements.lock",
        "pyproject.toml",
        "README.md",
        "jobs/finetune.py",
        "jobs/configs/paper.yaml",
        "clman/__init__.py",
    ]
    for rel in copied:
        assert (ROOT / rel).is_file(), rel
        assert not _ignored(rel, patterns), f"{rel} is left out of the build context by .dockerignore"
    assert _ignored(".venv/bin/python", patterns) and _ignored("runs/x/model.pt", patterns)
