"""The subset of kustomize that k8s/ uses, in Python, so the manifest tests need no kustomize
binary: `resources` (files and kustomization directories), `patches` with a `target` and a JSON 6902
body (inline `patch` or `path`), and `images`. Anything else is refused, never skipped; where
`kubectl` is installed the tests compare this with `kubectl kustomize`."""
from pathlib import Path

import jsonpatch
import yaml

_KEYS = {"apiVersion", "kind", "resources", "patches", "images"}
_TARGET_KEYS = {"group", "version", "kind", "name", "namespace"}


def render(directory: Path) -> list[dict]:
    """The resources `kubectl kustomize directory` would print, as dicts."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _KEYS
    if unknown:
        raise NotImplementedError(f"{directory}/kustomization.yaml: {sorted(unknown)} not supported by {__name__}")
    resources = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        resources += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kustomization.get("patches", []):
        resources = _apply(patch, resources, directory)
    for image in kustomization.get("images", []):
        for resource in resources:
            _set_image(resource, image)
    return resources


def _apply(patch: dict, resources: list[dict], directory: Path) -> list[dict]:
    body = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
    ops = yaml.safe_load(body)
    target = patch.get("target", {})
    if not isinstance(ops, list) or not target or set(target) - _TARGET_KEYS:
        raise NotImplementedError(f"{directory}: only JSON 6902 patches with a target of {sorted(_TARGET_KEYS)}")
    matched = [i for i, r in enumerate(resources) if _matches(r, target)]
    if not matched:
        raise LookupError(f"{directory}: patch target {target} matches no resource")
    out = list(resources)
    for i in matched:
        out[i] = jsonpatch.apply_patch(resources[i], ops)
    return out


def _matches(resource: dict, target: dict) -> bool:
    group, _, version = resource["apiVersion"].rpartition("/")
    actual = {"group": group, "version": version, "kind": resource["kind"],
              "name": resource["metadata"]["name"], "namespace": resource["metadata"].get("namespace")}
    return all(actual[key] == value for key, value in target.items())


def _set_image(node, image: dict) -> None:
    """kustomize's image transformer: every `image` of a container whose name (less tag or digest)
    is `image["name"]`, anywhere in the resource."""
    if isinstance(node, list):
        for item in node:
            _set_image(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                container["image"] = _new_image(container.get("image", ""), image)
        _set_image(value, image)


def _new_image(current: str, image: dict) -> str:
    name, at, digest = current.partition("@")
    tag = ""
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    if name != image["name"]:
        return current
    name = image.get("newName", name)
    if "digest" in image:
        return f"{name}@{image['digest']}"
    if "newTag" in image:
        return f"{name}:{image['newTag']}"
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if at else "")
