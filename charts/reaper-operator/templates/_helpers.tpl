{{/* Chart name, truncated to 63 characters (a DNS label). */}}
{{- define "reaper-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: the release name when it already contains the chart
name, otherwise "<release>-<chart>"; truncated to 63 characters.
*/}}
{{- define "reaper-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "reaper-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object of the release carries. */}}
{{- define "reaper-operator.labels" -}}
helm.sh/chart: {{ include "reaper-operator.chart" . }}
{{ include "reaper-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: reaper-operator
{{- end }}

{{/* Labels that select the operator's pods (never change them: selectors are immutable). */}}
{{- define "reaper-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "reaper-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "reaper-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "reaper-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "<repository>@<digest>" when a digest is set (the tag is then not used), else "<repository>:<tag>". */}}
{{- define "reaper-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
REAPER_HTTP_ADDR, a socket address: an IPv6 address goes in brackets ("::" and 8080 give
"[::]:8080"), as the operator parses it, an IPv4 address does not.
*/}}
{{- define "reaper-operator.httpAddr" -}}
{{- $address := .Values.http.address | toString }}
{{- $port := int .Values.http.port }}
{{- if contains ":" $address }}
{{- printf "[%s]:%d" $address $port }}
{{- else }}
{{- printf "%s:%d" $address $port }}
{{- end }}
{{- end }}

{{/*
The Secret holding the database URL. values.schema.json already refuses an empty name;
this message is for installs that skip schema validation.
*/}}
{{- define "reaper-operator.databaseSecret" -}}
{{- required "database.existingSecret is required: create a Secret holding the PostgreSQL URL (kubectl create secret generic reaper-db --from-literal=url='postgres://user:pass@host:5432/db') and pass --set database.existingSecret=reaper-db" .Values.database.existingSecret }}
{{- end }}
