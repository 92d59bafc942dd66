"""A small kustomize for tests/test_kubernetes.py (no tests here): renders deploy/k8s overlays as
``kubectl apply -k`` would, without kubectl, for the kustomization fields the overlays use and no
others. A field it does not implement is an error, never silently skipped, so what the tests
validate is what a user applies.

Implemented: ``resources`` (files and kustomization directories, recursively), ``images``
(``name`` -> ``newName``/``newTag``), ``labels`` (``pairs`` onto ``metadata.labels``, without
selectors or templates, kustomize's default), and ``patches`` by ``path`` as strategic merge
patches, matched to their target by apiVersion, kind and name. The merge follows the Kubernetes
API's patch strategies for the lists these manifests patch (containers, env and volumes by
``name``, ports by ``containerPort``, volumeMounts by ``mountPath``); any other list is replaced,
as the API does for lists without a merge key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "images", "patches", "labels"}
# Strategic-merge keys of the lists (``patchMergeKey`` in the Kubernetes API) these manifests patch.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "ports": "containerPort", "volumeMounts": "mountPath"}


class KustomizeError(Exception):
    pass


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def render(directory: Path) -> list[dict]:
    """The objects ``kubectl apply -k directory`` would send to the API server."""
    files = [directory / name for name in ("kustomization.yaml", "kustomization.yml", "Kustomization")]
    found = [f for f in files if f.exists()]
    if len(found) != 1:
        raise KustomizeError(f"{directory}: expected exactly one kustomization file, found {len(found)}")
    kustomization = yaml.safe_load(found[0].read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{found[0]}: fields this renderer does not implement: {sorted(unknown)}")
    if kustomization.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{found[0]}: not a Kustomization")

    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += render(path)
        elif path.is_file():
            objects += _documents(path)
        else:
            raise KustomizeError(f"{found[0]}: resource {entry} does not exist")

    for patch_entry in kustomization.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise KustomizeError(f"{found[0]}: only `path` patches are implemented, got {sorted(patch_entry)}")
        for patch in _documents(directory / patch_entry["path"]):
            targets = [o for o in objects if _identity(o) == _identity(patch)]
            if len(targets) != 1:
                raise KustomizeError(f"{patch_entry['path']}: patch target {_identity(patch)} matched {len(targets)}")
            index = objects.index(targets[0])
            objects[index] = merge(targets[0], patch)

    for image in kustomization.get("images", []):
        if set(image) - {"name", "newName", "newTag"}:
            raise KustomizeError(f"{found[0]}: image fields not implemented: {sorted(image)}")
        hits = 0
        for container in _containers(objects):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
                hits += 1
        if not hits:
            raise KustomizeError(f"{found[0]}: image {image['name']} is used by no container")

    for label_entry in kustomization.get("labels", []):
        if set(label_entry) != {"pairs"}:
            raise KustomizeError(f"{found[0]}: only plain `pairs` labels are implemented, got {sorted(label_entry)}")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label_entry["pairs"])
    return objects


def _identity(obj: dict) -> tuple[str, str, str]:
    return obj.get("apiVersion", ""), obj.get("kind", ""), obj.get("metadata", {}).get("name", "")


def _containers(objects: list[dict]) -> list[dict]:
    out = []
    for obj in objects:
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        out += spec.get("containers", []) + spec.get("initContainers", [])
    return out


def merge(base: Any, patch: Any, key: str | None = None) -> Any:
    """Strategic merge of ``patch`` into ``base`` (a new object; neither is modified)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for name, value in patch.items():
            if value is None:  # null deletes, as in a strategic merge patch
                out.pop(name, None)
            elif name in out:
                out[name] = merge(out[name], value, name)
            else:
                out[name] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        merge_key = MERGE_KEYS[key]
        out = copy.deepcopy(base)
        for item in patch:
            match = next((i for i, old in enumerate(out) if old.get(merge_key) == item.get(merge_key)), None)
            if match is None:
                out.append(copy.deepcopy(item))
            else:
                out[match] = merge(out[match], item)
        return out
    return copy.deepcopy(patch)
