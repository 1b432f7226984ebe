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

{{/* The MLflow server image; an empty tag is the chart's appVersion (images/mlflow/Dockerfile). */}}
{{- define "caopd.mlflowImage" -}}
{{- printf "%s:%s" .Values.mlflow.image.repository (.Values.mlflow.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The Host headers the MLflow server answers (it refuses others against DNS rebinding; /health is exempt): its
Service's names in the cluster, localhost (kubectl port-forward), and mlflow.allowedHosts. */}}
{{- define "caopd.mlflowAllowedHosts" -}}
{{- $service := printf "%s-mlflow" (include "caopd.fullname" .) -}}
{{- $hosts := list "localhost" "localhost:*" "127.0.0.1" "127.0.0.1:*" -}}
{{- range $name := list $service (printf "%s.%s" $service .Release.Namespace) (printf "%s.%s.svc" $service .Release.Namespace) (printf "%s.%s.svc.cluster.local" $service .Release.Namespace) -}}
{{- $hosts = append $hosts $name -}}
{{- $hosts = append $hosts (printf "%s:%d" $name (int $.Values.mlflow.port)) -}}
{{- end -}}
{{- concat $hosts .Values.mlflow.allowedHosts | join "," -}}
{{- end -}}

{{/* The URI of MLflow's auth database (users and permissions) as an env var's source: the tracking store's own
database unless mlflow.auth.databaseSecret names another; the password only ever by reference. */}}
{{- define "caopd.authDatabaseEnv" -}}
- name: CAOPD_AUTH_DATABASE_URI
{{- if .Values.mlflow.auth.databaseSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.mlflow.auth.databaseSecret }}
      key: uri
{{- else if .Values.postgresql.enabled }}
  value: {{ include "caopd.postgresqlUri" . | quote }}
{{- else }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: uri
{{- end }}
{{- end -}}

{{/* The chart's PostgreSQL as a URI; Kubernetes expands $(DB_PASSWORD) from the Secret, so the spec never holds it. */}}
{{- define "caopd.postgresqlUri" -}}
{{- printf "postgresql://%s:$(DB_PASSWORD)@%s-postgresql:5432/%s" .Values.postgresql.user (include "caopd.fullname" .) .Values.postgresql.database -}}
{{- end -}}

{{/* Selector labels of one component's pods. */}}
{{- define "caopd.selector" -}}
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The authenticated server's settings, every credential by reference: the auth config file, the auth database,
the admin, the sign-up page's CSRF key (MLflow's auth app refuses to start without it: a pod without the key stays in
CreateContainerConfigError) and the aliases only MANAGE may move. */}}
{{- define "caopd.mlflowAuthEnv" -}}
- name: MLFLOW_AUTH_CONFIG_PATH
  value: /etc/caopd/mlflow-auth/basic_auth.ini
{{ include "caopd.authDatabaseEnv" . }}
- name: MLFLOW_AUTH_ADMIN_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .Values.mlflow.auth.adminSecret }}
      key: username
- name: MLFLOW_AUTH_ADMIN_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.mlflow.auth.adminSecret }}
      key: password
- name: MLFLOW_FLASK_SERVER_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.mlflow.auth.adminSecret }}
      key: flask-secret-key
- name: CAOPD_PROTECTED_ALIASES
  value: {{ join "," .Values.mlflow.auth.protectedAliases | quote }}
{{- end -}}
