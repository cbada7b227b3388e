{{- define "k8s-celery.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "k8s-celery.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "k8s-celery.selectorLabels" -}}
app.kubernetes.io/name: {{ include "k8s-celery.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "k8s-celery.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "k8s-celery.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "k8s-celery.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "k8s-celery.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "k8s-celery.taskServiceAccountName" -}}
{{- if .Values.taskServiceAccount.create -}}
{{- default (printf "%s-tasks" (include "k8s-celery.fullname" .)) .Values.taskServiceAccount.name -}}
{{- else -}}
{{- default "default" .Values.taskServiceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "k8s-celery.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag -}}
{{- required "image.repository is required: your Celery app's image with k8s-celery installed" .image.repository -}}:{{ $tag }}
{{- end -}}

{{/*
Deep merge of .override onto .base as YAML: maps merge key by key, everything else
(lists, scalars, null) replaces. Unlike sprig's merge, false, 0 and [] do override.
*/}}
{{- define "k8s-celery.merge" -}}
{{- $merged := deepCopy .base -}}
{{- range $key, $value := .override -}}
{{- $current := index $merged $key -}}
{{- if and (kindIs "map" $value) (kindIs "map" $current) -}}
{{- $_ := set $merged $key (include "k8s-celery.merge" (dict "base" $current "override" $value) | fromYaml) -}}
{{- else -}}
{{- $_ := set $merged $key $value -}}
{{- end -}}
{{- end -}}
{{- toYaml $merged -}}
{{- end -}}

{{/* The Job manifest of one queue: (dict "root" $ "queue" name "override" values). */}}
{{- define "k8s-celery.jobManifest" -}}
{{- $root := .root -}}
{{- $defaults := deepCopy $root.Values.kubernetesJobs -}}
{{- $image := include "k8s-celery.merge" (dict "base" $root.Values.image "override" (default (dict) $defaults.image)) | fromYaml -}}
{{- $_ := set $defaults "image" $image -}}
{{- $job := include "k8s-celery.merge" (dict "base" $defaults "override" (default (dict) .override)) | fromYaml -}}
apiVersion: batch/v1
kind: Job
metadata:
  labels:
    {{- include "k8s-celery.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: task
    {{- with $job.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $job.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- if not (kindIs "invalid" $job.ttlSecondsAfterFinished) }}
  ttlSecondsAfterFinished: {{ int $job.ttlSecondsAfterFinished }}
  {{- end }}
  {{- if not (kindIs "invalid" $job.activeDeadlineSeconds) }}
  activeDeadlineSeconds: {{ int $job.activeDeadlineSeconds }}
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "k8s-celery.selectorLabels" $root | nindent 8 }}
        app.kubernetes.io/component: task
        {{- with $job.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $job.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "k8s-celery.taskServiceAccountName" $root }}
      automountServiceAccountToken: {{ $root.Values.taskServiceAccount.automountToken }}
      {{- with $job.podSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $job.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with $job.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $job.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $job.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: task
          image: {{ include "k8s-celery.image" (dict "root" $root "image" $job.image) | quote }}
          imagePullPolicy: {{ default "IfNotPresent" $job.image.pullPolicy }}
          {{- $env := concat (default (list) $root.Values.env) (default (list) $job.env) }}
          {{- with $env }}
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- $envFrom := concat (default (list) $root.Values.envFrom) (default (list) $job.envFrom) }}
          {{- with $envFrom }}
          envFrom:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $job.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $job.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $job.volumeMounts }}
          volumeMounts:
            {{- toYaml . | nindent 12 }}
          {{- end }}
      {{- with $job.volumes }}
      volumes:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
