{{/* The chart name. */}}
{{- define "custody.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every resource name. */}}
{{- define "custody.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "custody.controlName" -}}
{{- printf "%s-control" (include "custody.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "custody.agentName" -}}
{{- printf "%s-agent" (include "custody.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "custody.webhookName" -}}
{{- printf "%s-injector" (include "custody.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels. */}}
{{- define "custody.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "custody.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: custody
{{- end }}

{{/* Selector labels of one component: include with (list $ "control"). */}}
{{- define "custody.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "custody.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* An image reference: include with (list $ "custody-control"). */}}
{{- define "custody.image" -}}
{{- $root := index . 0 -}}
{{- printf "%s/%s:%s" $root.Values.image.registry (index . 1) (default $root.Chart.AppVersion $root.Values.image.tag) }}
{{- end }}

{{- define "custody.serviceAccountName" -}}
{{- if .Values.controlPlane.serviceAccount.create }}
{{- default (include "custody.controlName" .) .Values.controlPlane.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.controlPlane.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the admin and node tokens. */}}
{{- define "custody.tokenSecret" -}}
{{- default (printf "%s-tokens" (include "custody.fullname" .)) .Values.tokens.existingSecret }}
{{- end }}

{{/*
A generated token, the same in every template of one render, and kept from
the existing Secret on upgrade. Include with (list $ "admin-token").
*/}}
{{- define "custody.generatedToken" -}}
{{- $root := index . 0 -}}
{{- $key := index . 1 -}}
{{- $cache := $root.Values.tokens -}}
{{- $cacheKey := printf "_generated_%s" $key -}}
{{- if not (hasKey $cache $cacheKey) -}}
{{- $value := randAlphaNum 48 -}}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace (include "custody.tokenSecret" $root) -}}
{{- if and $existing $existing.data (hasKey $existing.data $key) -}}
{{- $value = index $existing.data $key | b64dec -}}
{{- end -}}
{{- $_ := set $cache $cacheKey $value -}}
{{- end -}}
{{- index $cache $cacheKey -}}
{{- end }}

{{/* The control plane's gRPC address as sidecars reach it. */}}
{{- define "custody.grpcUrl" -}}
{{- printf "http://%s.%s.svc:%v" (include "custody.controlName" .) .Release.Namespace .Values.controlPlane.ports.grpc }}
{{- end }}

{{/* The webhook's TLS Secret. */}}
{{- define "custody.webhookTlsSecret" -}}
{{- if eq .Values.injection.tls.mode "existingSecret" }}
{{- required "injection.tls.existingSecret is required with mode existingSecret" .Values.injection.tls.existingSecret }}
{{- else }}
{{- printf "%s-tls" (include "custody.webhookName" .) }}
{{- end }}
{{- end }}

{{/*
mode generate: a CA and a serving certificate, made once per render and
kept from the existing Secret on upgrade. Returns YAML: crt, key, ca (base64).
*/}}
{{- define "custody.generatedCert" -}}
{{- $cache := .Values.injection.tls -}}
{{- if not (hasKey $cache "_generated") -}}
{{- $svc := include "custody.controlName" . -}}
{{- $ns := .Release.Namespace -}}
{{- $existing := lookup "v1" "Secret" $ns (include "custody.webhookTlsSecret" .) -}}
{{- if and $existing $existing.data (hasKey $existing.data "ca.crt") -}}
{{- $_ := set $cache "_generated" (dict "crt" (index $existing.data "tls.crt") "key" (index $existing.data "tls.key") "ca" (index $existing.data "ca.crt")) -}}
{{- else -}}
{{- $days := int .Values.injection.tls.validityDays -}}
{{- $ca := genCA (printf "%s-ca" $svc) $days -}}
{{- $dns := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) -}}
{{- $cert := genSignedCert (printf "%s.%s.svc" $svc $ns) nil $dns $days $ca -}}
{{- $_ := set $cache "_generated" (dict "crt" ($cert.Cert | b64enc) "key" ($cert.Key | b64enc) "ca" ($ca.Cert | b64enc)) -}}
{{- end -}}
{{- end -}}
{{- toYaml (index $cache "_generated") -}}
{{- end }}

{{/* The ConfigMap holding the service-account issuer's JWKS (workloadAuth). */}}
{{- define "custody.workloadJwksConfigMap" -}}
{{- if .Values.workloadAuth.existingConfigMap -}}
{{- .Values.workloadAuth.existingConfigMap -}}
{{- else -}}
{{- printf "%s-workload-jwks" (include "custody.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end }}
