"""KubeRay manifests (k8s/): the base and every overlay render, match the RayService CRD schema,
carry a Serve config that Ray Serve accepts and that builds the app, and size the worker pods so
that one pod holds one TP group. CPU only, no cluster: overlays are rendered by
tests/k8s/kustomize.py, checked against `kubectl kustomize` where kubectl is installed."""
import copy
import functools
import importlib
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from serve_apps.args import AppArgs
from tests.k8s.kustomize import render

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
TREES = ["base"] + [f"overlays/{name}" for name in OVERLAYS]
GPU = "nvidia.com/gpu"
TP_KEYS = {"tp_size", "min_replicas", "max_replicas"}      # what an overlay's serve config may change


@functools.cache
def _rendered(tree: str) -> dict:
    docs = render(K8S / tree)
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [("ray.io/v1", "RayService")], tree
    return docs[0]


def rayservice(tree: str) -> dict:
    return copy.deepcopy(_rendered(tree))


def serve_config(service: dict) -> dict:
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def the_app(service: dict) -> dict:
    apps = serve_config(service)["applications"]
    assert len(apps) == 1, [a["name"] for a in apps]
    return apps[0]


def the_worker_group(service: dict) -> dict:
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert len(groups) == 1, [g["groupName"] for g in groups]
    return groups[0]


def ray_container(group: dict) -> dict:
    """KubeRay runs Ray in the pod template's first container."""
    return group["template"]["spec"]["containers"][0]


def cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def serve_bounds(app: dict) -> tuple[int, int]:
    """min/max replicas: the app arguments, unless a `deployments:` override in the config sets them."""
    args = AppArgs.parse(app["args"])
    low, high = args.min_replicas, args.max_replicas
    for deployment in app.get("deployments", []):
        scaling = deployment.get("autoscaling_config") or {}
        low, high = scaling.get("min_replicas", low), scaling.get("max_replicas", high)
        if "num_replicas" in deployment:
            low = high = deployment["num_replicas"]
    return low, high


# -- the CRD schema -----------------------------------------------------------------------------

def _kuberay_dir() -> Path | None:
    for root in (REPO.parent / "shared" / "kuberay", REPO / "shared" / "kuberay"):
        if (root / "ray.io_rayservices.yaml").exists():
            return root
    return None


def strict(node):
    """The CRD's OpenAPI schema as kubectl's default strict field validation applies it: a field the
    schema does not name is an error (the API server would reject it, not prune it), and an
    x-kubernetes-int-or-string field takes an integer or a string."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: ({name: strict(s) for name, s in value.items()} if key == "properties" else strict(value))
           for key, value in node.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    root = _kuberay_dir()
    if root is None:
        pytest.skip("KubeRay CRDs not found: shared/kuberay/ray.io_rayservices.yaml beside or inside the checkout")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((root / "ray.io_rayservices.yaml").read_text(), Loader=loader)
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))


def schema_errors(validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("tree", TREES)
def test_manifest_matches_the_kuberay_crd(tree, validator):
    assert schema_errors(validator, rayservice(tree)) == []


def test_schema_check_catches_unknown_fields_and_wrong_types(validator):
    service = rayservice("base")
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 4
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0
    errors = schema_errors(validator, service)
    assert len(errors) == 2, errors
    cluster = "spec/rayClusterConfig"
    assert errors[0].startswith(f"{cluster}/headGroupSpec/rayStartParams/num-gpus: 0 is not of type 'string'")
    assert errors[1].startswith(f"{cluster}/workerGroupSpecs/0: Additional properties") and "maxReplica" in errors[1]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_renderer_matches_kubectl_kustomize(tmp_path):
    tree = shutil.copytree(K8S, tmp_path / "k8s")
    images = tree / "overlays" / "image-check"
    images.mkdir()
    (images / "kustomization.yaml").write_text(
        "resources: [../tp2]\nimages:\n  - name: rayspeed\n    newName: registry.example.com/ml/rayspeed\n"
        "    newTag: v2\n")
    for name in TREES + ["overlays/image-check"]:
        out = subprocess.run(["kubectl", "kustomize", str(tree / name)], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        assert list(yaml.safe_load_all(out)) == render(tree / name), name
    spec = render(images)[0]["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    assert {c["image"] for pod in pods for c in pod["template"]["spec"]["containers"]} == \
        {"registry.example.com/ml/rayspeed:v2"}


# -- the Serve config ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> str:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAYSPEED_CACHE", str(tmp_path_factory.mktemp("rayspeed-cache")))
        from serve_apps.demo_model import demo_checkpoint
        yield demo_checkpoint()


@pytest.mark.parametrize("tree", TREES)
def test_serve_config_validates_and_builds_the_app(tree, demo_model):
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(serve_config(rayservice(tree)))
    for app in config.applications:
        args = AppArgs.parse(app.args)
        assert args.accelerator == "gpu" and args.model, "the manifests name the accelerator and the model"
        module, _, attribute = app.import_path.partition(":")
        builder = getattr(importlib.import_module(module), attribute)
        # This machine has no GPU and no model storage: only the accelerator and the model are
        # replaced, so the builder runs on the manifest's other arguments (tp_size, replicas, CPUs).
        built = builder({**app.args, "accelerator": "cpu", "model": demo_model})
        assert isinstance(built, serve.Application)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_patches_the_base_and_changes_only_tp_keys_of_the_serve_config(overlay):
    directory = K8S / "overlays" / overlay
    resources = yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"]
    assert all((directory / r).is_dir() for r in resources), "overlays patch a kustomization, never copy manifests"

    def without_tp_keys(service: dict) -> dict:
        config = serve_config(service)
        for app in config["applications"]:
            app["args"] = {k: v for k, v in app["args"].items() if k not in TP_KEYS}
        return config
    assert without_tp_keys(rayservice(f"overlays/{overlay}")) == without_tp_keys(rayservice("base"))


# -- pods, GPUs and replicas --------------------------------------------------------------------

@pytest.mark.parametrize("tree", TREES)
def test_a_worker_pod_holds_exactly_one_tp_group(tree):
    service = rayservice(tree)
    args = AppArgs.parse(the_app(service)["args"])
    group = the_worker_group(service)
    resources = ray_container(group)["resources"]
    gpus = int(resources["limits"][GPU])
    assert int(resources["requests"][GPU]) == gpus == args.tp_size

    options = args.deployment_options(True)
    bundles = options["placement_group_bundles"]
    assert options["placement_group_strategy"] == "STRICT_PACK", "a TP group's bundles must share one pod"
    assert sum(b.get("GPU", 0) for b in bundles) == gpus
    ray_cpus = cpus(group.get("rayStartParams", {}).get("num-cpus", resources["limits"]["cpu"]))
    assert sum(b["CPU"] for b in bundles) <= min(cpus(resources["requests"]["cpu"]), ray_cpus)


@pytest.mark.parametrize("tree", TREES)
def test_autoscaler_bounds_cover_the_serve_replicas(tree):
    service = rayservice(tree)
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    app = the_app(service)
    tp_size = AppArgs.parse(app["args"]).tp_size
    low, high = serve_bounds(app)
    group = the_worker_group(service)
    gpus = int(ray_container(group)["resources"]["limits"][GPU])
    assert group["maxReplicas"] * gpus >= high * tp_size
    assert low <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    assert group["minReplicas"] <= high, "idle GPU pods that Serve can never use"


@pytest.mark.parametrize("tree", TREES)
def test_head_has_no_gpus(tree):
    head = rayservice(tree)["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    for container in head["template"]["spec"]["containers"]:
        for kind in ("requests", "limits"):
            assert GPU not in container.get("resources", {}).get(kind, {})


@pytest.mark.parametrize("tree", TREES)
def test_image_and_ray_version_match_the_dockerfile_and_pyproject(tree):
    dockerfile = (K8S / "Dockerfile").read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1)
    assert re.search(r"^ENV HF_HUB_OFFLINE=1\b", dockerfile, re.M)
    try:
        import tomllib
    except ImportError:                                      # Python 3.10
        tomllib = pytest.importorskip("tomli")
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ray = next(Requirement(d) for d in dependencies if Requirement(d).name == "ray")
    assert ray.specifier.contains(ray_version), (str(ray), ray_version)

    spec = rayservice(tree)["spec"]["rayClusterConfig"]
    assert spec["rayVersion"] == ray_version
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    assert len({c["image"] for pod in pods for c in pod["template"]["spec"]["containers"]}) == 1
