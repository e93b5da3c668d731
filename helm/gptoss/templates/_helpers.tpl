{{/* Names and labels. */}}
{{- define "gptoss.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Kept short: KubeRay derives pod and Service names (<name>-<cluster hash>-head-xxxxx) from it. */}}
{{- define "gptoss.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "gptoss.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "gptoss.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Pod labels: not app.kubernetes.io/name, which KubeRay sets on Ray pods and uses in its
     head Service selector; part-of + instance identify this release's pods instead. */}}
{{- define "gptoss.podSelector" -}}
app.kubernetes.io/part-of: {{ include "gptoss.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gptoss.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Checks the schema cannot express (ServeConfig's model validators, cross-key rules). */}}
{{- define "gptoss.validate" -}}
{{- $names := list -}}
{{- range .Values.serve.models -}}
{{- $n := .name | default "gpt-oss" -}}
{{- if not (regexMatch "^[A-Za-z0-9._:/-]{1,128}$" $n) -}}{{- fail (printf "serve.models: invalid model name %q" $n) -}}{{- end -}}
{{- if has $n $names -}}{{- fail (printf "serve.models: model names must be unique, %q repeats" $n) -}}{{- end -}}
{{- $names = append $names $n -}}
{{- $a := .autoscaling | default dict -}}
{{- if gt (int (dig "min_replicas" 1 $a)) (int (dig "max_replicas" 1 $a)) -}}
{{- fail (printf "serve.models[%s].autoscaling: min_replicas exceeds max_replicas" $n) -}}
{{- end -}}
{{- end -}}
{{- if not $names -}}{{- fail "serve.models: at least one model" -}}{{- end -}}
{{- if ne .Values.serve.host "0.0.0.0" -}}
{{- fail "serve.host must be 0.0.0.0 in a cluster (the Serve proxies must accept traffic from other pods)" -}}
{{- end -}}
{{- $d := .Values.storage.download -}}
{{- if and $d.enabled (not $d.command) -}}
{{- if not (and $d.repo $d.localDir) -}}{{- fail "storage.download: set repo and localDir (or command)" -}}{{- end -}}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.storage.mountPath)) $d.localDir) -}}
{{- fail (printf "storage.download.localDir %s is not under storage.mountPath %s" $d.localDir .Values.storage.mountPath) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Worker pods, as YAML {min, max}. A replica group of model m takes world(m) = max(tp, ep)
ranks, one GPU each (use_gpu) and PACKed: for each model, ceil(world x groups / gpusPerNode)
pods, summed over models, with groups = min_replicas for min and max_replicas for max.
E.g. 120b EP8 on 4-GPU pods, 1..2 groups: min ceil(8x1/4) = 2, max ceil(8x2/4) = 4.
gpusPerNode 0 (CPU ranks) counts one rank per pod. workers.minReplicas/maxReplicas override.
*/}}
{{- define "gptoss.workerSizing" -}}
{{- $perPod := max 1 (int .Values.workers.gpusPerNode) -}}
{{- $lo := 0 -}}
{{- $hi := 0 -}}
{{- range .Values.serve.models -}}
{{- $world := max (int (dig "tp" 1 .)) (int (dig "ep" 1 .)) -}}
{{- $a := .autoscaling | default dict -}}
{{- $lo = add $lo (div (add (mul $world (int (dig "min_replicas" 1 $a))) (sub $perPod 1)) $perPod) -}}
{{- $hi = add $hi (div (add (mul $world (int (dig "max_replicas" 1 $a))) (sub $perPod 1)) $perPod) -}}
{{- end -}}
{{- if not (kindIs "invalid" .Values.workers.minReplicas) -}}{{- $lo = int .Values.workers.minReplicas -}}{{- end -}}
{{- if not (kindIs "invalid" .Values.workers.maxReplicas) -}}{{- $hi = int .Values.workers.maxReplicas -}}{{- end -}}
{{- if gt (int $lo) (int $hi) -}}{{- fail (printf "workers: minReplicas %d exceeds maxReplicas %d" (int $lo) (int $hi)) -}}{{- end -}}
min: {{ $lo }}
max: {{ $hi }}
{{- end -}}

{{/*
serveConfigV2: the same document as `ServeConfig(**serve).serve_yaml()` (cluster/config.py);
tests/helm asserts the two are equal. Keep them in step.
*/}}
{{- define "gptoss.serveConfig" -}}
{{- $s := .Values.serve -}}
{{- $app := dict "name" $s.app_name "route_prefix" "/" "import_path" "deployments.serve_app:app_builder" "args" (dict "config" $s) -}}
{{- toYaml (dict "proxy_location" "EveryNode" "http_options" (dict "host" $s.host "port" $s.port) "applications" (list $app)) -}}
{{- end -}}

{{- define "gptoss.reasoningKeySecret" -}}
{{- .Values.reasoningKey.existingSecret | default (printf "%s-reasoning-key" (include "gptoss.fullname" .)) -}}
{{- end -}}

{{- define "gptoss.apiKeysSecret" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "gptoss.fullname" .)) -}}
{{- end -}}

{{/* Env of a Ray container (dict root, extra, head). GPTOSS_API_KEYS: comma-separated keys
     for the API server; GPTOSS_REASONING_KEY: the key sealing reasoning items;
     RAY_GRAFANA/PROMETHEUS_HOST: the head's dashboard embeds Grafana. */}}
{{- define "gptoss.env" -}}
{{- $v := .root.Values -}}
{{- if or $v.apiKeys.keys $v.apiKeys.existingSecret }}
- name: GPTOSS_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "gptoss.apiKeysSecret" .root }}
      key: {{ $v.apiKeys.secretKey }}
{{- end }}
{{- if or $v.reasoningKey.key $v.reasoningKey.existingSecret }}
- name: GPTOSS_REASONING_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "gptoss.reasoningKeySecret" .root }}
      key: {{ $v.reasoningKey.secretKey }}
{{- end }}
{{- if .head }}
{{- with $v.monitoring.grafanaHost }}
- {name: RAY_GRAFANA_HOST, value: {{ . | quote }}}
{{- end }}
{{- with $v.monitoring.prometheusHost }}
- {name: RAY_PROMETHEUS_HOST, value: {{ . | quote }}}
{{- end }}
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "gptoss.modelsClaim" -}}
{{- .Values.storage.pvc.existingClaim | default (printf "%s-models" (include "gptoss.fullname" .)) -}}
{{- end -}}

{{- define "gptoss.modelsVolume" -}}
- name: models
{{- if .Values.storage.pvc.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "gptoss.modelsClaim" . }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}

{{/* Ray node health (raylet, and GCS on the head) from the dashboard agent. */}}
{{- define "gptoss.rayHealth" -}}
httpGet:
  path: /api/healthz
  port: {{ int (get .params "dashboard-agent-listen-port" | default 52365) }}
{{- end -}}
