"""Checks deploy/kubernetes; run by deploy/validate, which installs kubernetes-validate first.

Usage: validate_manifests.py REPO_ROOT KUBERNETES_VERSION...

1. Every manifest against the Kubernetes API schemas of each version, strictly: an unknown or
   misspelt field, a wrong type, an unknown kind or a duplicated YAML key fails.
2. kustomization.yaml lists exactly the manifests in the folder.
3. The ConfigMap's proxy.toml parses and uses only keys of the repository's proxy.toml, each
   with the type of its documented default, so the deploy config cannot drift from the schema.
4. The manifests agree with that config: the sidecar is a native sidecar whose ports are the
   configured listeners, the upstream is the dataset server's port on loopback, the journal
   and temp dir are on writable volumes, the Service targets the public port only, and the
   pod's termination grace period outlasts the preStop sleep plus the sidecar's grace period.
"""

import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import yaml
import kubernetes_validate
from kubernetes_validate.utils import VersionNotSupportedError

errors = []


def fail(message):
    errors.append(message)
    print(f"FAIL {message}")


class StrictLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; the API server refuses them. So do we."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_manifests(folder):
    """{file name: [object, ...]} for every YAML file in the folder."""
    manifests = {}
    for path in sorted(folder.glob("*.y*ml")):
        try:
            manifests[path.name] = [o for o in yaml.load_all(path.read_text(), StrictLoader) if o]
        except yaml.YAMLError as e:
            fail(f"{path}: not valid YAML: {e}")
            manifests[path.name] = []
    return manifests


def check_schemas(manifests, versions):
    for name, objects in manifests.items():
        for obj in objects:
            what = f"{name}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            for version in versions:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    path = ".".join(str(p) for p in e.path) or "(top)"
                    fail(f"{what} (Kubernetes {version}): {path}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError as e:
                    fail(f"{what}: {e.message}")
                except VersionNotSupportedError as e:
                    fail(f"kubernetes-validate does not know Kubernetes {e.version}")
                    return
                else:
                    print(f"ok   {what} (Kubernetes {version})")


KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "namespace", "namePrefix", "nameSuffix",
                    "labels", "commonLabels", "commonAnnotations", "images", "patches",
                    "replicas", "configMapGenerator", "secretGenerator", "generatorOptions"}


def check_kustomization(manifests):
    objects = manifests.pop("kustomization.yaml", None)
    if objects is None:
        fail("kustomization.yaml is missing")
        return
    (kustomization,) = objects
    if kustomization.get("kind") != "Kustomization":
        fail("kustomization.yaml: kind is not Kustomization")
    for field in set(kustomization) - KUSTOMIZE_FIELDS:
        fail(f"kustomization.yaml: unknown field {field!r}")
    listed = kustomization.get("resources", [])
    for name in sorted(set(manifests) - set(listed)):
        fail(f"kustomization.yaml: resources does not list {name}")
    for name in sorted(set(listed) - set(manifests)):
        fail(f"kustomization.yaml: resources lists {name}, which is not in the folder")
    if len(listed) != len(set(listed)):
        fail("kustomization.yaml: resources lists a file twice")


def flatten(table, prefix=""):
    """{"section.key": value} for every leaf of a TOML document."""
    leaves = {}
    for key, value in table.items():
        if isinstance(value, dict):
            leaves.update(flatten(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def check_config(objects, reference_path):
    """The ConfigMap's proxy.toml, parsed and checked against the repository's; or None."""
    configs = [o for o in objects if o["kind"] == "ConfigMap" and "proxy.toml" in o.get("data", {})]
    if len(configs) != 1:
        fail(f"expected one ConfigMap with a proxy.toml, found {len(configs)}")
        return None
    try:
        config = tomllib.loads(configs[0]["data"]["proxy.toml"])
    except tomllib.TOMLDecodeError as e:
        fail(f"ConfigMap proxy.toml: not valid TOML: {e}")
        return None
    reference = flatten(tomllib.loads(reference_path.read_text()))
    for key, value in flatten(config).items():
        if key not in reference:
            fail(f"ConfigMap proxy.toml: `{key}` is not a key of {reference_path.name}")
        elif type(value) is not type(reference[key]):
            fail(f"ConfigMap proxy.toml: `{key}` is {type(value).__name__}, "
                 f"{reference_path.name} has {type(reference[key]).__name__}")
    print(f"ok   ConfigMap proxy.toml: keys and types as in {reference_path.name}")
    return {**reference, **flatten(config)}


def port_of(address):
    return int(address.rsplit(":", 1)[1])


def check_consistency(objects, config):
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    if len(deployments) != 1:
        fail(f"expected one Deployment, found {len(deployments)}")
        return
    pod = deployments[0]["spec"]["template"]["spec"]
    sidecars = [c for c in pod.get("initContainers", []) if "export-sidecar" in c["image"]]
    if len(sidecars) != 1 or sidecars[0].get("restartPolicy") != "Always":
        fail("Deployment: export-sidecar must be one initContainer with restartPolicy: Always")
        return
    sidecar = sidecars[0]
    ports = {p.get("name"): p["containerPort"] for p in sidecar.get("ports", [])}
    if ports.get("http") != port_of(config["listen.public"]):
        fail(f"Deployment: sidecar port `http` is not listen.public ({config['listen.public']})")
    if ports.get("internal") != port_of(config["listen.internal"]):
        fail(f"Deployment: sidecar port `internal` is not listen.internal ({config['listen.internal']})")

    upstream = urlsplit(config["upstream.url"])
    dataset_ports = {p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
    if upstream.hostname not in ("127.0.0.1", "localhost") or upstream.port not in dataset_ports:
        fail(f"ConfigMap: upstream.url {config['upstream.url']} is not a container's port on loopback")

    mounts = {m["mountPath"]: m for m in sidecar.get("volumeMounts", [])}
    for key in ("journal.path", "export.temp_dir"):
        path = Path(config[key])
        writable = [m for m in mounts if not mounts[m].get("readOnly")
                    and (path == Path(m) or Path(m) in path.parents)]
        if not path.is_absolute() or not writable:
            fail(f"Deployment: {key} {config[key]!r} is not on a writable volume of the sidecar")

    for service in (o for o in objects if o["kind"] == "Service"):
        for port in service["spec"]["ports"]:
            if port.get("targetPort") not in ("http", ports.get("http")):
                fail(f"Service {service['metadata']['name']}: targets {port.get('targetPort')}, "
                     "not the sidecar's public port")

    sleeps = [c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
              for c in pod["containers"]]
    needed = max(sleeps, default=0) + config["server.grace_period_seconds"]
    if pod.get("terminationGracePeriodSeconds", 30) <= needed:
        fail(f"Deployment: terminationGracePeriodSeconds must exceed {needed} "
             "(preStop sleep + server.grace_period_seconds)")
    print("ok   manifests agree with the ConfigMap's proxy.toml")


def main():
    root = Path(sys.argv[1])
    versions = sys.argv[2:]
    manifests = load_manifests(root / "deploy" / "kubernetes")
    check_kustomization(manifests)
    check_schemas(manifests, versions)
    objects = [o for objs in manifests.values() for o in objs]
    config = check_config(objects, root / "proxy.toml")
    if config is not None and not errors:
        check_consistency(objects, config)
    if errors:
        print(f"deploy/validate: {len(errors)} problem(s) in deploy/kubernetes", file=sys.stderr)
        sys.exit(1)
    print("deploy/validate: deploy/kubernetes is valid")


if __name__ == "__main__":
    main()
