{{/* Names are fixed (DESIGN.md): one mesh per cluster, and sidecars, the webhook and the
     leader Lease find the operator by these names. */}}
{{- define "skein.labels" -}}
app.kubernetes.io/name: skein-operator
app.kubernetes.io/part-of: skein
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "skein.selector" -}}
app.kubernetes.io/name: skein-operator
app.kubernetes.io/part-of: skein
{{- end }}

{{- define "skein.tag" -}}
{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "skein.operatorImage" -}}
{{ printf "%s/skein-operator:%s" .Values.image.registry (include "skein.tag" .) }}
{{- end }}

{{- define "skein.proxyImage" -}}
{{ .Values.proxy.image | default (printf "%s/skein-proxy:%s" .Values.image.registry (include "skein.tag" .)) }}
{{- end }}
