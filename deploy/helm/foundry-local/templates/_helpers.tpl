{{- define "foundry-local.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "foundry-local.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "foundry-local.selectorLabels" -}}
app.kubernetes.io/name: {{ include "foundry-local.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "foundry-local.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "foundry-local.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "foundry-local.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "foundry-local.secretName" -}}
{{- default (printf "%s-api-key" (include "foundry-local.fullname" .)) .Values.apiKey.existingSecret -}}
{{- end -}}

{{- define "foundry-local.useApiKey" -}}
{{- if or .Values.apiKey.existingSecret .Values.apiKey.value (not .Values.allowUnauthenticatedRemote) -}}true{{- end -}}
{{- end -}}

{{/* The environment shared by the server and the download init container. */}}
{{- define "foundry-local.env" -}}
- name: FOUNDRY_LOCAL_CACHE
  value: {{ .Values.cache.mountPath | quote }}
- name: HOME
  value: /tmp/home
- name: HF_HOME
  value: {{ printf "%s/hf" .Values.cache.mountPath | quote }}
- name: FOUNDRY_LOCAL_DEFAULT_MODEL
  value: {{ .Values.model | quote }}
{{- end -}}
