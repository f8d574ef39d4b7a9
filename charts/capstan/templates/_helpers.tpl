{{/*
Chart name, truncated to 63 characters (DNS label limit).
*/}}
{{- define "capstan.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: the release name, or "<release>-<chart>" when the release name does not
contain the chart name. Truncated so that suffixed names ("-webhook-tls") stay within 63.
*/}}
{{- define "capstan.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "capstan.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "capstan.labels" -}}
helm.sh/chart: {{ include "capstan.chart" . }}
{{ include "capstan.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: capstan
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels of the control-plane pods (immutable once installed: never add to them).
*/}}
{{- define "capstan.selectorLabels" -}}
app.kubernetes.io/name: {{ include "capstan.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end }}

{{/*
The control plane's ServiceAccount.
*/}}
{{- define "capstan.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "capstan.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Names shared between the objects and the control plane's environment (the contract).
*/}}
{{- define "capstan.xdsServiceName" -}}
{{- include "capstan.fullname" . }}
{{- end }}

{{- define "capstan.webhookServiceName" -}}
{{- include "capstan.fullname" . }}-webhook
{{- end }}

{{- define "capstan.webhookConfigName" -}}
{{- include "capstan.fullname" . }}-injector
{{- end }}

{{- define "capstan.webhookSecretName" -}}
{{- default (printf "%s-webhook-tls" (include "capstan.fullname" .)) .Values.webhook.secretName }}
{{- end }}

{{- define "capstan.injectorConfigMapName" -}}
{{- include "capstan.fullname" . }}-injector
{{- end }}

{{- define "capstan.leaseName" -}}
{{- default (printf "%s-control-plane" (include "capstan.fullname" .)) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
"repository:tag" or "repository@digest"; the tag defaults to the chart's appVersion.
Usage: include "capstan.image" (dict "image" .Values.controlPlane.image "root" .)
*/}}
{{- define "capstan.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/*
The proxy's xDS address: values, or the control plane's Service in the release namespace.
*/}}
{{- define "capstan.xdsAddress" -}}
{{- default (printf "%s.%s.svc:18000" (include "capstan.xdsServiceName" .) .Release.Namespace) .Values.proxy.xdsAddress }}
{{- end }}

{{/*
Value checks that would otherwise fail only at run time.
*/}}
{{- define "capstan.validate" -}}
{{- if not (has .Values.webhook.failurePolicy (list "Ignore" "Fail")) }}
{{- fail (printf "webhook.failurePolicy must be Ignore or Fail, not %q" .Values.webhook.failurePolicy) }}
{{- end }}
{{- $t := int .Values.webhook.timeoutSeconds }}
{{- if or (lt $t 1) (gt $t 30) }}
{{- fail "webhook.timeoutSeconds must be between 1 and 30" }}
{{- end }}
{{- if or (lt (int .Values.leaderElection.renewSeconds) 1) (ge (int .Values.leaderElection.renewSeconds) (int .Values.leaderElection.leaseDurationSeconds)) }}
{{- fail "leaderElection.renewSeconds must be positive and less than leaderElection.leaseDurationSeconds" }}
{{- end }}
{{- if not (has .Values.controlPlane.logFormat (list "json" "text")) }}
{{- fail (printf "controlPlane.logFormat must be json or text, not %q" .Values.controlPlane.logFormat) }}
{{- end }}
{{- if eq (int .Values.proxy.runAsUser) 0 }}
{{- fail "proxy.runAsUser must not be 0: the proxy runs as non-root" }}
{{- end }}
{{- end }}
