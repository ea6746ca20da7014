{{- define "neo.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 54 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "neo.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "neo.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "neo.serviceAccountName" -}}
{{- default (printf "%s-operator" (include "neo.fullname" .)) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "neo.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{- /* The operator's rights over NeoServices and their children, in each namespace it serves. */ -}}
{{- define "neo.workloadRules" -}}
- apiGroups: [neo.serving.io]
  resources: [neoservices]
  verbs: [get, list, watch, patch]
- apiGroups: [neo.serving.io]
  resources: [neoservices/status]
  verbs: [get, update, patch]
- apiGroups: [neo.serving.io]
  resources: [neoservices/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [services]
  verbs: [get, create, update]
# one immutable ConfigMap per configuration: the operator deletes the ones too old to roll back to
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, create, update, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, update]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, update, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, create, update, delete]
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get]
# hf:// models: the model-inspection Job (config.json, before sizing) and its pod's termination message;
# the engine pods watched for a failing init container (model download or check: PodsInitialized)
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, create, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create]
{{- end -}}

{{- /* Namespaces the operator serves, comma-separated; empty: all (operator.clusterWide). */ -}}
{{- define "neo.watchNamespaces" -}}
{{- if not .Values.operator.clusterWide -}}
{{- join "," (.Values.operator.watchNamespaces | default (list .Release.Namespace)) -}}
{{- end -}}
{{- end -}}
