{{/*
Helpers of the Atelier chart. Names are truncated to 63 characters (DNS label limit); the
component helpers leave room for their suffix.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "atelier.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The release's base name: fullnameOverride, else the release name when it already contains the
chart name (`helm install atelier ...` gives `atelier`), else `<release>-<chart>`.
*/}}
{{- define "atelier.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "atelier.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object of the release carries. */}}
{{- define "atelier.labels" -}}
helm.sh/chart: {{ include "atelier.chart" . }}
{{ include "atelier.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: atelier
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels that select the release's pods (immutable in Deployments: never add to these). */}}
{{- define "atelier.selectorLabels" -}}
app.kubernetes.io/name: {{ include "atelier.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels and selector of one component: call with (dict "root" $ "component" "operator"). */}}
{{- define "atelier.componentLabels" -}}
{{ include "atelier.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "atelier.componentSelectorLabels" -}}
{{ include "atelier.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Object names. */}}
{{- define "atelier.operator.fullname" -}}
{{- printf "%s-operator" (include "atelier.fullname" .) -}}
{{- end -}}

{{- define "atelier.api.fullname" -}}
{{- printf "%s-api" (include "atelier.fullname" .) -}}
{{- end -}}

{{- define "atelier.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "atelier.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "atelier.api.serviceAccountName" -}}
{{- if .Values.api.serviceAccount.create -}}
{{- default (include "atelier.api.fullname" .) .Values.api.serviceAccount.name -}}
{{- else -}}
{{- required "api.serviceAccount.name is required when api.serviceAccount.create is false" .Values.api.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The ServiceAccount user names the API server gives the two components. */}}
{{- define "atelier.operator.username" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "atelier.operator.serviceAccountName" .) -}}
{{- end -}}

{{- define "atelier.api.username" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "atelier.api.serviceAccountName" .) -}}
{{- end -}}

{{/*
The ClusterRoles the operator binds in every tenant namespace. With the release name `atelier`
they are `atelier-tenant-admin` and `atelier-tenant-member`, the operator's defaults.
*/}}
{{- define "atelier.tenantAdminRole" -}}
{{- default (printf "%s-tenant-admin" (include "atelier.fullname" .)) .Values.tenants.adminClusterRole -}}
{{- end -}}

{{- define "atelier.tenantMemberRole" -}}
{{- default (printf "%s-tenant-member" (include "atelier.fullname" .)) .Values.tenants.memberClusterRole -}}
{{- end -}}

{{/* `repository:tag`, the tag defaulting to the chart's appVersion; a digest wins over both. */}}
{{- define "atelier.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* RUST_LOG of a component: its own logLevel, else the release's. */}}
{{- define "atelier.rustLog" -}}
{{- default .root.Values.logLevel .component.logLevel -}}
{{- end -}}

{{/* The Secret and key holding the OIDC client secret, or nothing for a public client. */}}
{{- define "atelier.api.clientSecretName" -}}
{{- if .Values.api.oidc.clientSecret.existingSecret -}}
{{- .Values.api.oidc.clientSecret.existingSecret -}}
{{- else if .Values.api.oidc.clientSecret.value -}}
{{- printf "%s-oidc" (include "atelier.api.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
The URL users reach the web page at (OIDC redirects and cookies are built from it): api.publicUrl,
else the ingress host.
*/}}
{{- define "atelier.api.publicUrl" -}}
{{- if .Values.api.publicUrl -}}
{{- .Values.api.publicUrl | trimSuffix "/" -}}
{{- else if .Values.ingress.enabled -}}
{{- printf "%s://%s" (ternary "https" "http" .Values.ingress.tls.enabled) (required "ingress.host is required when the ingress is enabled" .Values.ingress.host) -}}
{{- end -}}
{{- end -}}

{{/* Pod and container security contexts of the restricted Pod Security profile. */}}
{{- define "atelier.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{- define "atelier.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext -}}
{{- end -}}

{{/* imagePullSecrets of every pod. */}}
{{- define "atelier.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* A CEL list literal of strings, e.g. ["a", "b"]. */}}
{{- define "atelier.celStrings" -}}
{{- toJson (default (list) .) -}}
{{- end -}}

{{/* Egress rules of the release's pods when networkPolicy.egress.enabled. */}}
{{- define "atelier.networkPolicy.egress" -}}
{{- $egress := .Values.networkPolicy.egress -}}
# DNS (the OIDC issuer and webhook hosts are resolved by name).
- to:
    - namespaceSelector: {}
      podSelector:
        matchLabels:
          k8s-app: kube-dns
  ports:
    - protocol: UDP
      port: 53
    - protocol: TCP
      port: 53
# The Kubernetes API server.
{{- if $egress.apiServerCidrs }}
- to:
    {{- range $egress.apiServerCidrs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  ports:
    {{- range $egress.apiServerPorts }}
    - protocol: TCP
      port: {{ . }}
    {{- end }}
{{- else }}
- ports:
    {{- range $egress.apiServerPorts }}
    - protocol: TCP
      port: {{ . }}
    {{- end }}
{{- end }}
# Inference and outputs pods of every tenant.
- to:
    - namespaceSelector:
        matchExpressions:
          - key: atelier.dev/tenant
            operator: Exists
  ports:
    - protocol: TCP
      port: 8080
{{- with $egress.extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}
