"""The helm chart's `values.schema.json`, generated so that it cannot drift from the typed config.

The chart's `serve:` values are exactly `cluster.config.ServeConfig` (the same config as
`gptoss serve`); their schema is pydantic's, embedded as is. The rest of the values (image,
head, workers, ...) are Kubernetes concerns with no Python model, so they are described here
by hand. Regenerate after changing either (a test fails when the checked-in file is stale):

    python -c "from cluster.helm_values import write_values_schema; write_values_schema()"
"""

from __future__ import annotations

import json
from pathlib import Path

from cluster.config import ServeConfig

CHART_DIR = Path(__file__).resolve().parents[1] / "helm" / "gptoss"
SCHEMA_PATH = CHART_DIR / "values.schema.json"


def serve_schema() -> dict:
    """JSON schema (draft 2020-12, `$defs` + `$ref`) of the `serve:` values."""
    return ServeConfig.model_json_schema()


def _t(type_: str, description: str, **kw) -> dict:
    return {"type": type_, "description": description, **kw}


def _obj(description: str, properties: dict | None = None, closed: bool = True, **kw) -> dict:
    """An object; `closed` rejects unknown keys (typos) where the chart reads every key itself."""
    d = {"type": "object", "description": description, **kw}
    if properties is not None:
        d["properties"] = properties
        if closed:
            d["additionalProperties"] = False
    return d


_K8S = "passed through to the pod spec as is (Kubernetes schema)"
_REPLICAS = {"type": ["integer", "null"], "minimum": 0}


def _pod(role: str, extra: dict) -> dict:
    """Settings shared by the head and the worker pods."""
    return {
        "rayStartParams": _obj(f"`ray start` flags for the {role} (strings), merged over the chart's "
                               "(metrics-export-port 8080, ...)", additionalProperties={"type": "string"}),
        "resources": _obj(f"requests/limits of the {role} container; {_K8S}"),
        "env": _t("array", f"extra env vars of the {role} container; {_K8S}", items={"type": "object"}),
        "nodeSelector": _obj(_K8S, additionalProperties={"type": "string"}),
        "tolerations": _t("array", _K8S, items={"type": "object"}),
        "affinity": _obj(_K8S),
        "podLabels": _obj("extra pod labels", additionalProperties={"type": "string"}),
        "podAnnotations": _obj("extra pod annotations", additionalProperties={"type": "string"}),
        "readinessProbe": _obj("replaces the chart's readiness probe; " + _K8S),
        "livenessProbe": _obj("replaces the chart's liveness probe; " + _K8S),
        **extra,
    }


def hand_properties() -> dict:
    """The non-Serve values, described by hand."""
    return {
        "global": _obj("helm globals (when used as a subchart)"),
        "nameOverride": _t("string", "replaces the chart name in object names"),
        "fullnameOverride": _t("string", "replaces the release-chart name of all objects"),
        "image": _obj("the serving image: this repository installed, with Ray = rayVersion", {
            "repository": _t("string", "image repository", minLength=1),
            "tag": _t("string", "image tag; empty: the chart's appVersion"),
            "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"], "description": "imagePullPolicy"},
        }),
        "imagePullSecrets": _t("array", "pull secrets, [{name: ...}]", items={"type": "object"}),
        "rayVersion": _t("string", "Ray version inside the image, >= 2.53 (the probes use the dashboard "
                         "agent's /api/healthz); KubeRay adapts flags to it", minLength=1),
        "upgradeStrategy": {"enum": ["NewCluster", "None"], "description":
                            "NewCluster: a changed cluster spec starts a new Ray cluster and switches "
                            "traffic once its Serve app is healthy (zero downtime); None: never"},
        "autoscaler": _obj("Ray's in-tree autoscaler (enableInTreeAutoscaling): adds worker pods when "
                           "Serve's replica groups do not fit, removes idle ones", {
                               "enabled": _t("boolean", "run the autoscaler; off: worker pods fixed at maxReplicas"),
                               "idleTimeoutSeconds": _t("integer", "idle seconds before a worker pod is removed",
                                                        minimum=0),
                               "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"],
                                                 "description": "how fast the autoscaler adds pods"},
                               "resources": _obj("autoscaler sidecar requests/limits; " + _K8S),
                           }),
        "head": _obj("the Ray head pod (GCS, dashboard, Serve controller; no model ranks by default)",
                     _pod("head", {"serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"],
                                                   "description": "type of the head Service (dashboard 8265)"}})),
        "workers": _obj("the GPU worker group: pods that host the model ranks", _pod("workers", {
            "groupName": _t("string", "KubeRay worker group name", pattern="^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
            "gpusPerNode": _t("integer", "GPUs per worker pod (nvidia.com/gpu); 0: CPU ranks, one rank "
                              "per pod for sizing", minimum=0),
            "minReplicas": {**_REPLICAS, "description": "override of the computed minimum worker pods "
                            "(null: sum over models of ceil(world x min_replicas / gpusPerNode))"},
            "maxReplicas": {**_REPLICAS, "description": "override of the computed maximum worker pods "
                            "(null: sum over models of ceil(world x max_replicas / gpusPerNode))"},
            "shmSize": _t("string", "size of /dev/shm (NCCL and torch use shared memory); empty: none"),
        })),
        "service": _obj("the OpenAI API Service (KubeRay keeps its selector on the serving cluster)", {
            "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"], "description": "Service type"},
            "port": _t("integer", "Service port (to the pods' serve port)", minimum=1, maximum=65535),
            "annotations": _obj("Service annotations", additionalProperties={"type": "string"}),
        }),
        "ingress": _obj("optional Ingress to the API Service", {
            "enabled": _t("boolean", "create the Ingress"),
            "className": _t("string", "ingressClassName; empty: the cluster default"),
            "annotations": _obj("Ingress annotations (e.g. long timeouts, no buffering for streaming)",
                                additionalProperties={"type": "string"}),
            "host": _t("string", "host name; empty: any host"),
            "path": _t("string", "path prefix", pattern="^/"),
            "tls": _obj("TLS termination at the Ingress", {
                "enabled": _t("boolean", "serve HTTPS for host"),
                "secretName": _t("string", "kubernetes.io/tls Secret; empty: <fullname>-tls"),
            }),
        }),
        "apiKeys": _obj("API keys, given to the pods as env GPTOSS_API_KEYS (comma-separated)", {
            "keys": _t("array", "keys to put in a chart-made Secret; `key:flex` or `key:default` caps the service "
                                "tier the key's requests run on", items={"type": "string", "minLength": 1}),
            "existingSecret": _t("string", "use this Secret instead of keys"),
            "secretKey": _t("string", "key inside the Secret", minLength=1),
        }),
        "reasoningKey": _obj("the Fernet key sealing reasoning for include reasoning.encrypted_content, given to "
                             "the pods as env GPTOSS_REASONING_KEY (`gptoss reasoning-key` makes one); empty: "
                             "one per deploy", {
            "key": _t("string", "a key to put in a chart-made Secret", pattern="^([A-Za-z0-9_=-]{44})?$"),
            "existingSecret": _t("string", "use this Secret instead of key"),
            "secretKey": _t("string", "key inside the Secret", minLength=1),
        }),
        "storage": _obj("where the weights come from, mounted in every Ray pod", {
            "mountPath": _t("string", "mount path of the weights volume", pattern="^/"),
            "pvc": _obj("a PersistentVolumeClaim; disabled: an emptyDir (per pod, lost on restart)", {
                "enabled": _t("boolean", "mount a PVC"),
                "existingClaim": _t("string", "use this claim; empty: the chart creates <fullname>-models"),
                "size": _t("string", "size of the created claim", pattern="^[0-9]+(\\.[0-9]+)?([KMGTPE]i?)?$"),
                "storageClass": _t("string", "storageClassName of the created claim; empty: the default"),
                "accessModes": _t("array", "access modes; ReadWriteMany to share across worker pods",
                                  items={"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany",
                                                  "ReadWriteOncePod"]}, minItems=1),
            }),
            "download": _obj("an init container in each worker pod that downloads the weights when absent", {
                "enabled": _t("boolean", "run the download init container"),
                "image": _t("string", "image with python and pip (or hf) in it", minLength=1),
                "repo": _t("string", "Hugging Face repo, e.g. openai/gpt-oss-120b"),
                "revision": _t("string", "branch, tag or commit; empty: main"),
                "localDir": _t("string", "target directory under mountPath: the model's `path`", pattern="^(/.*)?$"),
                "exclude": _t("array", "file patterns not to download (hf download --exclude)",
                              items={"type": "string"}),
                "hfTokenSecret": _obj("Secret holding a Hugging Face token (env HF_TOKEN)", {
                    "name": _t("string", "Secret name; empty: no token"),
                    "key": _t("string", "key inside the Secret"),
                }),
                "command": _t("array", "replaces the default command", items={"type": "string"}),
                "resources": _obj("requests/limits of the init container; " + _K8S),
            }),
        }),
        "monitoring": _obj("Prometheus Operator scraping of Ray's metrics (port `metrics`, 8080)", {
            "enabled": _t("boolean", "create the ServiceMonitor (head) and PodMonitor (workers)"),
            "interval": _t("string", "scrape interval", pattern="^[0-9]+(ms|s|m|h)$"),
            "labels": _obj("labels on the monitors (match your Prometheus' selector, e.g. release: ...)",
                           additionalProperties={"type": "string"}),
            "grafanaHost": _t("string", "Grafana URL for the Ray dashboard's embedded panels "
                                        "(RAY_GRAFANA_HOST); empty: none"),
            "prometheusHost": _t("string", "Prometheus URL for the Ray dashboard (RAY_PROMETHEUS_HOST)"),
        }),
        "alerts": _obj("a PrometheusRule with the alerting rules of alerts/gptoss-alerts.yaml", {
            "enabled": _t("boolean", "create the PrometheusRule (needs the Prometheus Operator's CRDs)"),
            "labels": _obj("labels on the rule (match your Prometheus' ruleSelector, e.g. release: ...)",
                           additionalProperties={"type": "string"}),
        }),
        "dashboards": _obj("one ConfigMap per dashboards/*.json, for Grafana's dashboard sidecar", {
            "enabled": _t("boolean", "create the ConfigMaps"),
            "labels": _obj("labels the sidecar looks for", additionalProperties={"type": "string"}),
            "annotations": _obj("e.g. the sidecar's folder annotation", additionalProperties={"type": "string"}),
        }),
    }


def values_schema() -> dict:
    serve = serve_schema()
    defs = serve.pop("$defs", {})  # at the root: pydantic's `#/$defs/...` refs resolve from there
    serve["description"] = ("the Serve config, exactly cluster.config.ServeConfig (the config of "
                            "`gptoss serve`); rendered into the RayService's serveConfigV2")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "gptoss helm values",
        "type": "object",
        "additionalProperties": False,
        "properties": {"serve": serve, **hand_properties()},
        "$defs": defs,
    }


def write_values_schema(path: str | Path = SCHEMA_PATH) -> Path:
    path = Path(path)
    path.write_text(json.dumps(values_schema(), indent=2) + "\n")
    return path
