{{/* The release's full name, a DNS label. */}}
{{- define "caopd.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "caopd.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "caopd.serviceAccountName" -}}
{{- default (include "caopd.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The tracking URI every client uses: the chart's server, or the existing one. */}}
{{- define "caopd.trackingUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s-mlflow.%s.svc.cluster.local:%d" (include "caopd.fullname" .) .Release.Namespace (int .Values.mlflow.port) -}}
{{- else -}}
{{- .Values.mlflow.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* Containers run unprivileged, read-only root, no added capabilities. */}}
{{- define "caopd.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* The S3 credentials and endpoint, from the user's Secret. */}}
{{- define "caopd.s3Env" -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: AWS_SECRET_ACCESS_KEY
{{- if .Values.s3.endpoint }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ .Values.s3.endpoint | quote }}
{{- end }}
{{- end -}}
