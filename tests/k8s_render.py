"""A small kustomize renderer for the tests, limited to what deploy/k8s/ uses.

No kustomize binary (nor a pure-Python kustomize on PyPI) is available, so
tests/unit/test_k8s_manifests.py renders the kustomizations with this. It implements, with
kustomize's semantics:

- `resources`: files inside the kustomization's directory, and other kustomization
  directories (anywhere, as kustomize's default load restrictor allows);
- `configMapGenerator`, `secretGenerator`: `literals` and `files` (`key=path` too), behaviour
  `create`, `replace`, `merge`, only with `generatorOptions.disableNameSuffixHash: true`;
- `patches`: strategic merge (maps merged, `null` deletes, lists of `containers`,
  `initContainers`, `env`, `volumes` merged by `name`, `volumeMounts` by `mountPath`, other
  lists replaced) and JSON6902 (`add`, `remove`, `replace`, `test`), targeted by kind and name;
- `namespace`, `labels` (`pairs`, `includeTemplates`), `images`, `replicas`.

Anything else (another field, `$patch`, name hashes, `includeSelectors`, a list of maps with
an unknown merge key) raises `KustomizeError` instead of being rendered wrongly.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "generatorOptions",
    "configMapGenerator",
    "secretGenerator",
    "patches",
    "replicas",
    "images",
}
GENERATOR_FIELDS = {"name", "behavior", "literals", "files", "type"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
SCALABLE = {"Deployment", "StatefulSet", "ReplicaSet"}
# Strategic merge keys of the lists this renderer merges (the Kubernetes API's patchMergeKey).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}


class KustomizeError(Exception):
    """A kustomization this renderer cannot render (or kustomize would refuse)."""


def load_documents(path: Path) -> list[Obj]:
    """The non-empty YAML documents of a file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _inside(root: Path, relative: str) -> Path:
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise KustomizeError(f"{relative} is outside {root} (kustomize's load restrictor)")
    return path


def _identity(obj: Obj) -> tuple[str, str, str | None, str]:
    group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
    meta = obj["metadata"]
    return group, obj["kind"], meta.get("namespace"), meta["name"]


def _find(objs: list[Obj], kind: str, name: str, namespace: str | None = None) -> list[Obj]:
    return [
        o
        for o in objs
        if o["kind"] == kind
        and o["metadata"]["name"] == name
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]


# ---------------------------------------------------------------------------------------------
# patches


def strategic_merge(target: Any, patch: Any, field: str = "") -> Any:
    """`patch` applied to `target` as a strategic merge patch (the subset described above)."""
    if isinstance(patch, dict):
        if any(k.startswith("$") for k in patch):
            raise KustomizeError(f"strategic merge directive in {sorted(patch)} not supported")
        if not isinstance(target, dict):
            return copy.deepcopy(patch)
        out = dict(target)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(patch, list) and any(isinstance(item, dict) for item in patch):
        if field not in MERGE_KEYS:
            raise KustomizeError(f"no merge key known for the list {field!r}")
        key = MERGE_KEYS[field]
        out_list = [copy.deepcopy(item) for item in (target or [])]
        for item in patch:
            match = [i for i, existing in enumerate(out_list) if existing.get(key) == item[key]]
            if match:
                out_list[match[0]] = strategic_merge(out_list[match[0]], item, field)
            else:
                out_list.append(copy.deepcopy(item))
        return out_list
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def json6902(target: Obj, operations: list[Obj]) -> Obj:
    """`operations` (RFC 6902: add, remove, replace, test) applied to a copy of `target`."""
    doc = copy.deepcopy(target)
    for op in operations:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(index, copy.deepcopy(op["value"]))
            elif kind == "remove":
                del node[index]
            elif kind == "replace":
                node[index] = copy.deepcopy(op["value"])
            elif kind == "test":
                if node[index] != op["value"]:
                    raise KustomizeError(f"test failed at {op['path']}")
            else:
                raise KustomizeError(f"JSON6902 op {kind!r} not supported")
            continue
        if kind == "add":
            node[last] = copy.deepcopy(op["value"])
        elif kind in ("remove", "replace"):
            if last not in node:
                raise KustomizeError(f"{kind} of missing {op['path']}")
            if kind == "remove":
                del node[last]
            else:
                node[last] = copy.deepcopy(op["value"])
        elif kind == "test":
            if node.get(last) != op["value"]:
                raise KustomizeError(f"test failed at {op['path']}")
        else:
            raise KustomizeError(f"JSON6902 op {kind!r} not supported")
    return doc


def _apply_patch(objs: list[Obj], root: Path, entry: Obj) -> None:
    unknown = set(entry) - {"path", "patch", "target"}
    if unknown:
        raise KustomizeError(f"patch fields {sorted(unknown)} not supported")
    text = _inside(root, entry["path"]).read_text() if "path" in entry else entry["patch"]
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    target = entry.get("target")
    if target is not None and set(target) - {"kind", "name"}:
        raise KustomizeError(f"patch target fields {sorted(target)} not supported")
    if len(docs) == 1 and isinstance(docs[0], list):
        if target is None:
            raise KustomizeError("a JSON6902 patch needs a target")
        matches = _find(objs, target["kind"], target["name"])
        if len(matches) != 1:
            raise KustomizeError(f"patch target {target} matches {len(matches)} objects")
        objs[objs.index(matches[0])] = json6902(matches[0], docs[0])
        return
    for doc in docs:
        kind = target["kind"] if target else doc["kind"]
        name = target["name"] if target else doc["metadata"]["name"]
        matches = _find(objs, kind, name, doc.get("metadata", {}).get("namespace"))
        if len(matches) != 1:
            raise KustomizeError(f"patch for {kind}/{name} matches {len(matches)} objects")
        patch = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}
        patch["metadata"] = {k: v for k, v in doc["metadata"].items() if k != "name"}
        objs[objs.index(matches[0])] = strategic_merge(matches[0], patch)


# ---------------------------------------------------------------------------------------------
# generators


def _generate(objs: list[Obj], root: Path, kind: str, spec: Obj, namespace: str | None) -> None:
    unknown = set(spec) - GENERATOR_FIELDS
    if unknown:
        raise KustomizeError(f"{kind} generator fields {sorted(unknown)} not supported")
    data: dict[str, str] = {}
    for literal in spec.get("literals", []):
        key, sep, value = literal.partition("=")
        if not sep:
            raise KustomizeError(f"literal {literal!r} is not KEY=VALUE")
        data[key] = value
    for item in spec.get("files", []):
        key, sep, relative = item.partition("=")
        if not sep:
            key, relative = Path(item).name, item
        data[key] = _inside(root, relative).read_text()
    behavior = spec.get("behavior", "create")
    existing = _find(objs, kind, spec["name"], namespace)
    if behavior == "create":
        if existing:
            raise KustomizeError(f"{kind} {spec['name']} exists already (use behavior merge)")
        meta: Obj = {"name": spec["name"]}
        if namespace:
            meta["namespace"] = namespace
        obj: Obj = {"apiVersion": "v1", "kind": kind, "metadata": meta}
        if kind == "Secret":
            obj["type"] = spec.get("type", "Opaque")
        objs.append(obj)
        target = obj
        merged: dict[str, str] = {}
    elif behavior in ("replace", "merge"):
        if len(existing) != 1:
            raise KustomizeError(f"{behavior} of {kind} {spec['name']}: not found in {namespace}")
        target = existing[0]
        merged = _decoded(target) if behavior == "merge" else {}
    else:
        raise KustomizeError(f"generator behavior {behavior!r} unknown")
    merged.update(data)
    if kind == "Secret":
        target["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in merged.items()}
    else:
        target["data"] = merged


def _decoded(obj: Obj) -> dict[str, str]:
    if obj["kind"] == "Secret":
        return {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
    return dict(obj.get("data", {}))


def secret_data(obj: Obj) -> dict[str, str]:
    """A rendered Secret's data, decoded."""
    return _decoded(obj)


# ---------------------------------------------------------------------------------------------
# transformers


def _pod_specs(obj: Obj) -> list[Obj]:
    if obj["kind"] in WORKLOADS:
        return [obj["spec"]["template"]["spec"]]
    return []


def _set_image(image: str, rule: Obj) -> str:
    name, tag = image, ""
    if "@" in name:
        name, tag = name.split("@", 1)
        tag = "@" + tag
    elif ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
        tag = ":" + tag
    if name != rule["name"]:
        return image
    if "digest" in rule:
        tag = "@" + rule["digest"]
    elif "newTag" in rule:
        tag = ":" + str(rule["newTag"])
    return rule.get("newName", name) + tag


def _transform(objs: list[Obj], spec: Obj) -> None:
    namespace = spec.get("namespace")
    if namespace:
        for obj in objs:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    for rule in spec.get("labels", []):
        unknown = set(rule) - {"pairs", "includeTemplates", "includeSelectors"}
        if unknown or rule.get("includeSelectors"):
            raise KustomizeError(f"labels options {sorted(rule)} not supported")
        for obj in objs:
            obj["metadata"].setdefault("labels", {}).update(rule["pairs"])
            if rule.get("includeTemplates") and obj["kind"] in WORKLOADS:
                template_meta = obj["spec"]["template"].setdefault("metadata", {})
                template_meta.setdefault("labels", {}).update(rule["pairs"])
    for rule in spec.get("images", []):
        if set(rule) - {"name", "newName", "newTag", "digest"}:
            raise KustomizeError(f"images fields {sorted(rule)} not supported")
        for obj in objs:
            for pod in _pod_specs(obj):
                for container in pod.get("containers", []) + pod.get("initContainers", []):
                    container["image"] = _set_image(container["image"], rule)
    for rule in spec.get("replicas", []):
        matches = [
            o for o in objs if o["kind"] in SCALABLE and o["metadata"]["name"] == rule["name"]
        ]
        if not matches:
            raise KustomizeError(f"replicas: no workload named {rule['name']}")
        for obj in matches:
            obj["spec"]["replicas"] = int(rule["count"])


# ---------------------------------------------------------------------------------------------


def render(root: Path) -> list[Obj]:
    """The objects `kustomize build root` would print (for the supported subset)."""
    spec = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(spec) - KUSTOMIZATION_FIELDS
    if unknown:
        raise KustomizeError(f"{root}: kustomization fields {sorted(unknown)} not supported")
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{root}: kind {spec['kind']!r}")
    objs: list[Obj] = []
    for entry in spec.get("resources", []):
        path = (root / entry).resolve()
        if path.is_dir():
            objs.extend(render(path))
        else:
            objs.extend(load_documents(_inside(root, entry)))
    generators = spec.get("configMapGenerator", []) + spec.get("secretGenerator", [])
    if generators and not spec.get("generatorOptions", {}).get("disableNameSuffixHash"):
        raise KustomizeError(f"{root}: name suffix hashes are not implemented")
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for generator in spec.get(key, []):
            _generate(objs, root, kind, generator, spec.get("namespace"))
    for entry in spec.get("patches", []):
        _apply_patch(objs, root, entry)
    _transform(objs, spec)
    seen: set[tuple[str, str, str | None, str]] = set()
    for obj in objs:
        identity = _identity(obj)
        if identity in seen:
            raise KustomizeError(f"{root}: {identity} is defined twice")
        seen.add(identity)
    return objs
