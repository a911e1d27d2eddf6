{{/* The release's full name, at most 63 characters. */}}
{{- define "kubetune.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Names of cluster-scoped objects: unique per release and namespace. */}}
{{- define "kubetune.clusterName" -}}
{{- printf "%s-%s" (include "kubetune.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: kubetune-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kubetune.labels" -}}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/part-of: kubetune
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/*
Annotations on every object the chart installs (CRDs excepted: they are plain copies).
Argo CD syncs lower waves first; the CRDs carry no wave (0) and so exist before the
operator, its RBAC and anything that names the kinds.
*/}}
{{- define "kubetune.annotations" -}}
argocd.argoproj.io/sync-wave: "1"
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The namespaces a namespaced-mode operator watches, as a JSON list. */}}
{{- define "kubetune.watchNamespaces" -}}
{{- if .Values.scope.namespaces -}}
{{- toJson .Values.scope.namespaces -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The Lease the replicas elect a leader with; its name is fixed in the operator. */}}
{{- define "kubetune.leaseName" -}}
kubetune-operator
{{- end -}}

{{/*
What the operator does in the namespaces it watches: a ClusterRole's rules in cluster
mode, a Role's in namespaced mode. Derived from operator/src (grep `Api<`): nothing
here that the code does not call.
*/}}
{{- define "kubetune.watchRules" -}}
# FineTuneJobs and AdapterDeployments are the operator's input: the controllers list
# and watch them, and read one before each reconcile.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs", "adapterdeployments"]
  verbs: ["get", "list", "watch"]
# Status is all the operator writes to them, as a merge patch of the status
# subresource; the spec stays the user's.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/status", "adapterdeployments/status"]
  verbs: ["patch"]
# One batch/v1 Job per attempt: created (its pod template is immutable), watched as
# the FineTuneJob's child, suspended and resumed with a patch, deleted to restart a
# failed gang or stop a suspended or over-budget one.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The attempt's training spec (a ConfigMap) and a gang's headless Service, written
# with server-side apply: a patch, which needs create when the object is new. Never
# read back or deleted: they are owned by the FineTuneJob and garbage-collected.
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["create", "patch"]
# Trainer pods, listed and watched to see scheduling and starts before the Job
# shows them. The operator never creates or deletes pods: the Job controller does.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# The claims a FineTuneJob names (base model, dataset, output), checked to exist.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
# Events on every transition: kube-runtime's Recorder creates events.k8s.io/v1
# Events and patches a repeated one's series.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
