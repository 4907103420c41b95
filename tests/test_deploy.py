"""deploy/'s manifests against the schemas the cluster enforces, offline: Kubernetes' own for the core
kinds (kubernetes-validate) and KubeRay's RayJob CRD (deploy/schemas/, its version in the file name),
both strict about unknown fields, as `kubectl apply --validate=strict` is."""

import copy
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
KUBERNETES = "1.33.0"
RAYJOB_SCHEMA = DEPLOY / "schemas" / "kuberay-v1.7.0-rayjob-v1.schema.json"


def strict(schema):
    """A CRD schema that rejects unknown fields (the API server prunes them silently by default)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        return schema
    return [strict(v) for v in schema] if isinstance(schema, list) else schema


def manifests() -> list[dict]:
    """Every Kubernetes object in deploy/ (job.yaml is camlabel's own config)."""
    return [d for path in sorted(DEPLOY.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text())
            if d and "apiVersion" in d]


def pod_templates(rayjob: dict) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]


def check_rayjob(rayjob: dict) -> None:
    jsonschema.validate(rayjob, strict(json.loads(RAYJOB_SCHEMA.read_text())["schema"]))
    for template in pod_templates(rayjob):  # the CRD leaves pod templates to Kubernetes' own schema
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": template}, KUBERNETES, strict=True)


def test_every_manifest_validates_against_its_schema():
    kinds = []
    for document in manifests():
        kinds.append(document["kind"])
        if document["kind"] == "RayJob":
            check_rayjob(document)
        else:
            kubernetes_validate.validate(document, KUBERNETES, strict=True)
    assert sorted(kinds) == ["CronJob", "PersistentVolumeClaim", "RayJob", "Role", "RoleBinding", "ServiceAccount"]


def test_the_validation_catches_a_misspelt_field_and_a_wrong_type():
    rayjob = next(d for d in manifests() if d["kind"] == "RayJob")
    misspelt = copy.deepcopy(rayjob)
    misspelt["spec"]["ttlSecondsAfterFinish"] = misspelt["spec"].pop("ttlSecondsAfterFinished")
    with pytest.raises(jsonschema.ValidationError, match="ttlSecondsAfterFinish"):
        check_rayjob(misspelt)
    wrong = copy.deepcopy(rayjob)
    wrong["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        check_rayjob(wrong)
    in_pod = copy.deepcopy(rayjob)
    in_pod["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError), match="volumeMount"):
        check_rayjob(in_pod)
    cron = copy.deepcopy(next(d for d in manifests() if d["kind"] == "CronJob"))
    cron["spec"]["concurrency"] = "Forbid"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, KUBERNETES, strict=True)
