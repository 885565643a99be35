{{/*
Names and labels.
*/}}
{{- define "fedsilo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. Kept to 40 characters: the longest name built from it,
"<fullname>-silo-<rank>" plus the pod suffix the Job controller adds, must stay a valid
DNS label (63), and the Indexed Job's pod hostnames are "<fullname>-silos-<index>".
*/}}
{{- define "fedsilo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fedsilo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fedsilo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedsilo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fedsilo.labels" -}}
helm.sh/chart: {{ include "fedsilo.chart" . }}
{{ include "fedsilo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The pods of the federation itself (aggregator and silos, not MLflow): what the headless Service
and the NetworkPolicy select.
*/}}
{{- define "fedsilo.memberLabels" -}}
{{ include "fedsilo.selectorLabels" . }}
fedsilo.dev/member: "true"
{{- end }}

{{/* The `helm test` pod, which the NetworkPolicies admit to the aggregator's port and MLflow. */}}
{{- define "fedsilo.helmTestLabels" -}}
{{ include "fedsilo.selectorLabels" . }}
app.kubernetes.io/component: helm-test
{{- end }}

{{/*
Wiring shared by several templates.
*/}}
{{- define "fedsilo.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The pods' ServiceAccount: the one the chart creates, a named one, or the namespace's default. */}}
{{- define "fedsilo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fedsilo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The aggregator's port's name: the rendezvous (collective) or its one TLS port (tls). */}}
{{- define "fedsilo.portName" -}}
{{- ternary "tls" "rendezvous" (eq .Values.transport "tls") }}
{{- end }}

{{/* transport tls: the Service in front of the aggregator's TLS port (expose, Ingress). */}}
{{- define "fedsilo.exposeName" -}}
{{- printf "%s-aggregator" (include "fedsilo.fullname" .) }}
{{- end }}

{{/* transport tls: the aggregator's Secret (tls.crt, tls.key, ca.crt). */}}
{{- define "fedsilo.aggregatorTlsSecret" -}}
{{- default (printf "%s-aggregator-tls" (include "fedsilo.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/* transport tls: in-cluster silo R's Secret. Called with a dict: root, rank. */}}
{{- define "fedsilo.siloTlsSecret" -}}
{{- $template := default (printf "%s-silo-{rank}-tls" (include "fedsilo.fullname" .root)) .root.Values.tls.siloSecretName }}
{{- replace "{rank}" (toString .rank) $template }}
{{- end }}

{{- define "fedsilo.tokenSecretName" -}}
{{- default (printf "%s-token" (include "fedsilo.fullname" .)) .Values.joinToken.existingSecret }}
{{- end }}

{{- define "fedsilo.mlflowName" -}}
{{- printf "%s-mlflow" (include "fedsilo.fullname" .) }}
{{- end }}

{{/* The aggregator's stable DNS name: hostname "aggregator" under the headless Service. */}}
{{- define "fedsilo.aggregatorHost" -}}
{{- printf "aggregator.%s.%s.svc.%s" (include "fedsilo.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "fedsilo.trackingUri" -}}
{{- if .Values.mlflow.server.enabled }}
{{- printf "http://%s.%s.svc.%s:%d" (include "fedsilo.mlflowName" .) .Release.Namespace .Values.clusterDomain (int .Values.mlflow.server.service.port) }}
{{- else }}
{{- .Values.mlflow.trackingUri }}
{{- end }}
{{- end }}

{{/*
The Host headers the bundled MLflow server answers (--allowed-hosts): its Service's names (and
with them its full in-cluster name, which the aggregator uses), port-forwards to localhost,
the Ingress host and mlflow.server.allowedHosts. NodePort and LoadBalancer need allowedHosts
(fedsilo.validate says so): browsers then send a node's or the load balancer's address.
*/}}
{{- define "fedsilo.mlflowAllowedHosts" -}}
{{- $name := include "fedsilo.mlflowName" . }}
{{- $m := .Values.mlflow.server }}
{{- $hosts := list (printf "%s:*" $name) (printf "%s.*" $name) "localhost:*" "127.0.0.1:*" }}
{{- if $m.ingress.enabled }}
{{- $hosts = concat $hosts (list $m.ingress.host (printf "%s:*" $m.ingress.host)) }}
{{- end }}
{{- concat $hosts $m.allowedHosts | uniq | join "," }}
{{- end }}

{{/* basic_auth.ini of MLflow's basic-auth app. Its database is sqlite on the server's volume
(relative to the working directory, /var/lib/mlflow), unless mlflow.server.auth.databaseUri. */}}
{{- define "fedsilo.mlflowAuthIni" -}}
{{- $a := .Values.mlflow.server.auth -}}
[mlflow]
default_permission = {{ $a.defaultPermission }}
database_uri = {{ default "sqlite:///basic_auth.db" $a.databaseUri }}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
{{- end }}

{{/* backend "auto" is resolved here so that render-time checks see the real choice. */}}
{{- define "fedsilo.backend" -}}
{{- if eq .Values.backend "auto" }}
{{- if and .Values.gpu.enabled .Values.gpu.aggregator }}nccl{{ else }}gloo{{ end }}
{{- else }}
{{- .Values.backend }}
{{- end }}
{{- end }}

{{/*
Illegal combinations. Included by every template, so `helm template` and `helm install` stop
with one of these messages before anything is applied. values.schema.json catches type and
range errors first; these are the checks a schema cannot express.
*/}}
{{- define "fedsilo.validate" -}}
{{- $silos := int .Values.silos }}
{{- if lt $silos 1 }}
{{- fail (printf "silos must be at least 1 (got %v): a federation needs a silo besides the aggregator" .Values.silos) }}
{{- end }}
{{- $external := int .Values.externalSilos }}
{{- if gt $external $silos }}
{{- fail (printf "externalSilos (%d) cannot exceed silos (%d)" $external $silos) }}
{{- end }}
{{- $inCluster := sub $silos $external }}
{{- range $rank, $_ := .Values.siloOverrides }}
{{- if not (regexMatch "^[1-9][0-9]*$" $rank) }}
{{- fail (printf "siloOverrides: key %q is not a silo rank" $rank) }}
{{- end }}
{{- if gt (atoi $rank) $inCluster }}
{{- fail (printf "siloOverrides: rank %s has no pod in this cluster (in-cluster silos are ranks 1..%d: silos=%d, externalSilos=%d)" $rank $inCluster $silos $external) }}
{{- end }}
{{- end }}
{{- $podConfigs := dict "aggregator.config" .Values.aggregator.config "silo.config" .Values.silo.config }}
{{- range $rank, $override := .Values.siloOverrides }}
{{- $_ := set $podConfigs (printf "siloOverrides.%s.config" $rank) (default dict $override.config) }}
{{- end }}
{{- if ne (default "iid" .Values.config.partition) "none" }}
{{- if not .Values.config.dataset }}
{{- fail (printf "config.dataset is required with config.partition=%s: every rank reads the shared dataset" (default "iid" .Values.config.partition)) }}
{{- end }}
{{- range $where, $cfg := $podConfigs }}
{{- range $key := list "dataset" "test_dataset" }}
{{- if hasKey (default dict $cfg) $key }}
{{- fail (printf "%s.%s: with config.partition=%s every rank shares one dataset; per-pod data paths need config.partition=none" $where $key (default "iid" $.Values.config.partition)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $backend := include "fedsilo.backend" . }}
{{- if and (eq $backend "nccl") (not .Values.gpu.enabled) }}
{{- fail "backend=nccl needs GPUs: set gpu.enabled=true or use backend=gloo" }}
{{- end }}
{{- if and (eq $backend "nccl") (not .Values.gpu.aggregator) }}
{{- fail "backend=nccl needs a GPU on every rank, the aggregator included: set gpu.aggregator=true or use backend=gloo" }}
{{- end }}
{{- if and .Values.mlflow.server.enabled .Values.mlflow.trackingUri }}
{{- fail "set either mlflow.trackingUri (an external server) or mlflow.server.enabled=true (the bundled one), not both" }}
{{- end }}
{{- if not (or .Values.mlflow.server.enabled .Values.mlflow.trackingUri) }}
{{- fail "no MLflow: set mlflow.trackingUri or mlflow.server.enabled=true (fedsilo's default sqlite file would vanish with the aggregator's pod)" }}
{{- end }}
{{- if and .Values.joinToken.existingSecret .Values.joinToken.value }}
{{- fail "set either joinToken.existingSecret or joinToken.value, not both" }}
{{- end }}
{{- if and (not .Values.checkpoints.enabled) (gt (int .Values.restart.maxFederationRestarts) 0) }}
{{- fail "restart.maxFederationRestarts > 0 needs checkpoints.enabled=true: a restarted aggregator resumes from its checkpoint volume, without it every restart begins again at round 1" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled .Values.networkPolicy.egress.enabled .Values.mlflow.trackingUri (not .Values.networkPolicy.egress.extraEgress) }}
{{- fail (printf "networkPolicy.egress.enabled with the external MLflow server %s needs networkPolicy.egress.extraEgress: a rule to its address and port, or the aggregator cannot log" .Values.mlflow.trackingUri) }}
{{- end }}
{{- include "fedsilo.validateMlflow" . }}
{{- if and .Values.caBundle.configMap .Values.caBundle.secret }}
{{- fail "set either caBundle.configMap or caBundle.secret, not both" }}
{{- end }}
{{- if and .Values.modelCache.enabled (not .Values.modelCache.existingClaim) (has "ReadWriteOnce" .Values.modelCache.accessModes) (gt (len .Values.modelCache.accessModes) 0) (eq (len .Values.modelCache.accessModes) 1) }}
{{- fail "modelCache.accessModes [ReadWriteOnce]: every member mounts the cache, on different nodes; use ReadWriteMany (or ReadOnlyMany with modelCache.readOnly and a pre-filled existingClaim)" }}
{{- end }}
{{- include "fedsilo.validateTransport" . }}
{{- end }}

{{/* The checks of the bundled MLflow server (part of fedsilo.validate). */}}
{{- define "fedsilo.validateMlflow" -}}
{{- $m := .Values.mlflow.server }}
{{- if $m.enabled }}
{{- if and (ne $m.service.type "ClusterIP") (not $m.allowedHosts) (not $m.ingress.enabled) }}
{{- fail (printf "mlflow.server.service.type=%s needs mlflow.server.allowedHosts: the Host headers browsers will send (a node's or the load balancer's address or name, e.g. 203.0.113.10:*, or * for any). MLflow answers other hosts with 403" $m.service.type) }}
{{- end }}
{{- if and $m.service.nodePort (eq $m.service.type "ClusterIP") }}
{{- fail "mlflow.server.service.nodePort needs mlflow.server.service.type NodePort or LoadBalancer" }}
{{- end }}
{{- if and $m.ingress.enabled (not $m.ingress.host) }}
{{- fail "mlflow.server.ingress.enabled needs mlflow.server.ingress.host" }}
{{- end }}
{{- if and $m.auth.enabled (not $m.auth.existingSecret) }}
{{- fail "mlflow.server.auth.enabled needs mlflow.server.auth.existingSecret: a Secret with the admin's username and password (the aggregator logs as that user)" }}
{{- end }}
{{- if and $m.artifacts.s3.existingSecret (not $m.artifacts.s3.bucket) }}
{{- fail "mlflow.server.artifacts.s3.existingSecret needs mlflow.server.artifacts.s3.bucket" }}
{{- end }}
{{- if and $m.ingress.enabled .Values.networkPolicy.enabled (not $m.ingress.allowFrom) }}
{{- fail "mlflow.server.ingress.enabled with networkPolicy.enabled needs mlflow.server.ingress.allowFrom: the ingress controller's pods, which the MLflow NetworkPolicy must admit" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The checks of transport, tls, certManager, expose and ingress (part of fedsilo.validate). */}}
{{- define "fedsilo.validateTransport" -}}
{{- $tls := eq .Values.transport "tls" }}
{{- $external := int .Values.externalSilos }}
{{- if not $tls }}
{{- if gt $external 0 }}
{{- fail (printf "externalSilos=%d needs transport=tls: a silo outside the cluster dials out to the aggregator's one TLS port with its own certificate (no VPN). Set transport=tls and tls.existingSecret or certManager.enabled=true; see docs/deploy.md" $external) }}
{{- end }}
{{- if .Values.ingress.enabled }}
{{- fail "ingress.enabled needs transport=tls: the Ingress passes the aggregator's TLS port through, and transport collective has none" }}
{{- end }}
{{- if ne .Values.expose.type "ClusterIP" }}
{{- fail (printf "expose.type=%s needs transport=tls: never expose the collective transport's rendezvous port (clear text) outside the cluster" .Values.expose.type) }}
{{- end }}
{{- if .Values.certManager.enabled }}
{{- fail "certManager.enabled needs transport=tls: the certificates are for the TLS transport" }}
{{- end }}
{{- else }}
{{- if and (not .Values.tls.existingSecret) (not .Values.certManager.enabled) }}
{{- fail "transport=tls needs the aggregator's certificate: set tls.existingSecret (a Secret with tls.crt, tls.key and ca.crt; see docs/certificates.md) or certManager.enabled=true" }}
{{- end }}
{{- if and .Values.tls.existingSecret .Values.certManager.enabled }}
{{- fail "set either tls.existingSecret or certManager.enabled=true (cert-manager writes the aggregator's Secret itself), not both" }}
{{- end }}
{{- if and .Values.certManager.enabled (not .Values.certManager.issuerRef.name) }}
{{- fail "certManager.enabled needs certManager.issuerRef.name: a CA issuer backed by the federation CA (see docs/deploy.md)" }}
{{- end }}
{{- if or .Values.joinToken.existingSecret .Values.joinToken.value }}
{{- fail "joinToken is not used with transport=tls (each member's certificate is its identity): unset joinToken.existingSecret and joinToken.value" }}
{{- end }}
{{- if and .Values.ingress.enabled (not .Values.ingress.host) }}
{{- fail "ingress.enabled needs ingress.host: the name external silos dial, which the controller routes on (SNI) and the aggregator's certificate must carry" }}
{{- end }}
{{- if and .Values.ingress.enabled .Values.networkPolicy.enabled (not .Values.ingress.allowFrom) }}
{{- fail "ingress.enabled with networkPolicy.enabled needs ingress.allowFrom: the ingress controller's pods, which connect to the aggregator on the silos' behalf" }}
{{- end }}
{{- if and (gt $external 0) .Values.networkPolicy.enabled (not .Values.externalSiloCidrs) (not .Values.ingress.enabled) (not .Values.networkPolicy.extraIngress) }}
{{- fail (printf "externalSilos=%d with networkPolicy.enabled needs externalSiloCidrs: the external silos' source addresses, the only ones the NetworkPolicy admits to the aggregator's TLS port (or expose it through ingress.enabled)" $external) }}
{{- end }}
{{- end }}
{{- if and .Values.expose.nodePort (eq .Values.expose.type "ClusterIP") }}
{{- fail "expose.nodePort needs expose.type NodePort or LoadBalancer" }}
{{- end }}
{{- if and .Values.expose.loadBalancerSourceRanges (ne .Values.expose.type "LoadBalancer") }}
{{- fail (printf "expose.loadBalancerSourceRanges needs expose.type=LoadBalancer (got %s); the NetworkPolicy's externalSiloCidrs restrict the other types" .Values.expose.type) }}
{{- end }}
{{- end }}

{{/*
Environment shared by the aggregator and every silo. The experiment itself comes from the
ConfigMap (FEDSILO_CONFIG); the env vars carry what depends on where the pod runs.
*/}}
{{- define "fedsilo.commonEnv" -}}
- name: FEDSILO_CONFIG
  value: /etc/fedsilo/fedsilo.yaml
- name: FEDSILO_AGGREGATOR
  value: {{ printf "%s:%d" (include "fedsilo.aggregatorHost" .) (int .Values.comm.rendezvousPort) | quote }}
{{- if eq .Values.transport "tls" }}
# This member's certificate and key, and the federation CA, from its own Secret.
- name: FEDSILO_TLS_CERT
  value: /var/run/secrets/fedsilo-tls/tls.crt
- name: FEDSILO_TLS_KEY
  value: /var/run/secrets/fedsilo-tls/tls.key
- name: FEDSILO_TLS_CA
  value: /var/run/secrets/fedsilo-tls/ca.crt
{{- else }}
- name: FEDSILO_TOKEN_FILE
  value: /var/run/secrets/fedsilo/{{ .Values.joinToken.key }}
{{- with .Values.comm.socketIfname }}
# gloo and NCCL bind their collective sockets to this interface (the pod network).
- name: GLOO_SOCKET_IFNAME
  value: {{ . | quote }}
- name: NCCL_SOCKET_IFNAME
  value: {{ . | quote }}
{{- end }}
{{- if eq (include "fedsilo.backend" .) "nccl" }}
- name: NCCL_DEBUG
  value: {{ .Values.comm.nccl.debug | quote }}
- name: NCCL_IB_DISABLE
  value: {{ ternary "1" "0" .Values.comm.nccl.ibDisable | quote }}
# A stalled collective becomes an error (and the pod fails) instead of a hang.
- name: TORCH_NCCL_ASYNC_ERROR_HANDLING
  value: "1"
{{- end }}
{{- end }}
{{- if .Values.modelCache.enabled }}
# Models and datasets from the shared cache volume (modelCache).
- name: HF_HOME
  value: {{ .Values.modelCache.mountPath | quote }}
{{- else }}
# Caches on the writable emptyDir: the root filesystem is read-only.
- name: HF_HOME
  value: /tmp/huggingface
{{- end }}
{{- if .Values.offline }}
# Air-gapped: never try the hub; models and datasets come from HF_HOME or local paths.
- name: HF_HUB_OFFLINE
  value: "1"
- name: HF_DATASETS_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
{{- end }}
{{- include "fedsilo.caBundleEnv" . }}
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: PYTHONUNBUFFERED
  value: "1"
{{- with .Values.comm.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
caBundle: the env vars that make Python's HTTPS clients (requests, httpx, boto3) trust the
bundle instead of the image's roots. fedsilo's own TLS transport trusts only the federation CA
and ignores them.
*/}}
{{- define "fedsilo.caBundleEnv" -}}
{{- if or .Values.caBundle.configMap .Values.caBundle.secret }}
{{- $file := printf "/etc/fedsilo-ca/%s" .Values.caBundle.key }}
# HTTPS to the hub, MLflow and object stores trusts this bundle (caBundle).
- name: SSL_CERT_FILE
  value: {{ $file | quote }}
- name: REQUESTS_CA_BUNDLE
  value: {{ $file | quote }}
- name: AWS_CA_BUNDLE
  value: {{ $file | quote }}
{{- end }}
{{- end }}

{{/* caBundle: the volume and the mount (called with the key "volume" or "mount"). */}}
{{- define "fedsilo.caBundleVolume" -}}
{{- $v := .root.Values.caBundle }}
{{- if or $v.configMap $v.secret }}
{{- if eq .part "mount" }}
- name: ca-bundle
  mountPath: /etc/fedsilo-ca
  readOnly: true
{{- else }}
- name: ca-bundle
  {{- if $v.configMap }}
  configMap:
    name: {{ $v.configMap }}
  {{- else }}
  secret:
    secretName: {{ $v.secret }}
  {{- end }}
    items:
      - key: {{ $v.key }}
        path: {{ $v.key }}
{{- end }}
{{- end }}
{{- end }}

{{/* The writable scratch emptyDir at /tmp (caches, the working directory), bounded. */}}
{{- define "fedsilo.scratchVolume" -}}
- name: tmp
  {{- with .Values.scratch.sizeLimit }}
  emptyDir:
    sizeLimit: {{ . }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- end }}

{{/*
Pod-level settings shared by every pod of the chart.
*/}}
{{- define "fedsilo.podCommon" -}}
{{- with include "fedsilo.serviceAccountName" . }}
serviceAccountName: {{ . }}
{{- end }}
# fedsilo never calls the Kubernetes API.
automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The pod template of a federation member (aggregator or silo).
Called with a dict:
  root       the chart's top context
  component  "aggregator" or "silo"
  rank       the rank as a string; "" for the aggregator and the Indexed Job (rank =
             JOB_COMPLETION_INDEX + 1, which fedsilo derives itself); always set for a silo with
             transport tls, whose Secret binds its rank
  spec       the merged per-pod settings: nodeSelector, affinity, tolerations, dataVolume,
             config, env, resources
*/}}
{{- define "fedsilo.memberPod" -}}
{{- $root := .root }}
{{- $spec := .spec }}
{{- $gpu := and $root.Values.gpu.enabled (or (eq .component "silo") $root.Values.gpu.aggregator) -}}
{{- $tls := eq $root.Values.transport "tls" -}}
metadata:
  labels:
    {{- include "fedsilo.memberLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with .rank }}
    fedsilo.dev/rank: {{ . | quote }}
    {{- end }}
    {{- with $root.Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    {{- with $root.Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  # Never: the Job controller replaces a failed pod (counted by backoffLimit, filtered by the
  # podFailurePolicy); a kubelet restart in place would hide failures from both.
  restartPolicy: Never
  {{- if eq .component "aggregator" }}
  hostname: aggregator
  {{- else if .rank }}
  hostname: {{ printf "silo-%s" .rank }}
  {{- end }}
  # With the headless Service as subdomain every member gets a DNS name, the aggregator
  # "aggregator.<service>.<namespace>.svc.<clusterDomain>".
  subdomain: {{ include "fedsilo.fullname" $root }}
  {{- include "fedsilo.podCommon" $root | nindent 2 }}
  {{- if and $gpu $root.Values.gpu.runtimeClassName }}
  runtimeClassName: {{ $root.Values.gpu.runtimeClassName }}
  {{- end }}
  {{- with $root.Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $root.Values.schedulerName }}
  schedulerName: {{ . }}
  {{- end }}
  {{- with $spec.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $affinity := $spec.affinity }}
  {{- $preset := $root.Values.silo.podAntiAffinity }}
  {{- if and (not $affinity) (eq .component "silo") (ne $preset "none") }}
  {{- /* Silos on different nodes: one node's failure then takes one silo, and they do not
         share its CPUs, memory bandwidth or network. affinity, when set, replaces this. */}}
  {{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (merge (include "fedsilo.memberLabels" $root | fromYaml) (dict "app.kubernetes.io/component" "silo"))) }}
  {{- if eq $preset "hard" }}
  {{- $affinity = dict "podAntiAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (list $term)) }}
  {{- else }}
  {{- $affinity = dict "podAntiAffinity" (dict "preferredDuringSchedulingIgnoredDuringExecution" (list (dict "weight" 100 "podAffinityTerm" $term))) }}
  {{- end }}
  {{- end }}
  {{- with $affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $tolerations := default list $spec.tolerations }}
  {{- if $gpu }}
  {{- /* GPU nodes are commonly tainted so that only GPU pods land there. */}}
  {{- $tolerations = concat $tolerations $root.Values.gpu.tolerations | uniq }}
  {{- end }}
  {{- with $tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: fedsilo
      image: {{ include "fedsilo.image" $root | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command: ["fedsilo"]
      args: [{{ .component | quote }}]
      # The writable emptyDir: the root filesystem is read-only.
      workingDir: /tmp
      {{- if eq .component "aggregator" }}
      ports:
        - name: {{ include "fedsilo.portName" $root }}
          containerPort: {{ $root.Values.comm.rendezvousPort }}
          protocol: TCP
      {{- end }}
      env:
        {{- include "fedsilo.commonEnv" $root | nindent 8 }}
        {{- if .rank }}
        - name: FEDSILO_RANK
          value: {{ .rank | quote }}
        {{- end }}
        - name: FEDSILO_DEVICE
          value: {{ ternary "cuda" "cpu" $gpu | quote }}
        {{- if eq .component "aggregator" }}
        - name: FEDSILO_TRACKING_URI
          value: {{ include "fedsilo.trackingUri" $root | quote }}
        {{- $auth := $root.Values.mlflow.server.auth }}
        {{- if and $root.Values.mlflow.server.enabled $auth.enabled }}
        # The bundled server's basic auth: the aggregator logs as the admin of its Secret.
        - name: MLFLOW_TRACKING_USERNAME
          valueFrom:
            secretKeyRef:
              name: {{ $auth.existingSecret }}
              key: {{ $auth.usernameKey }}
        - name: MLFLOW_TRACKING_PASSWORD
          valueFrom:
            secretKeyRef:
              name: {{ $auth.existingSecret }}
              key: {{ $auth.passwordKey }}
        {{- end }}
        - name: FEDSILO_CHECKPOINT_DIR
          value: /var/lib/fedsilo/checkpoints
        {{- if and $tls $root.Values.tls.revoked.configMap }}
        - name: FEDSILO_TLS_REVOKED
          value: {{ printf "/etc/fedsilo-revoked/%s" $root.Values.tls.revoked.key | quote }}
        {{- end }}
        {{- else if and $tls $root.Values.tls.serverName }}
        - name: FEDSILO_TLS_SERVER_NAME
          value: {{ $root.Values.tls.serverName | quote }}
        {{- end }}
        # fedsilo settings of this pod only; env vars win over the ConfigMap's file.
        {{- range $key, $value := $spec.config }}
        - name: {{ printf "FEDSILO_%s" (upper $key) }}
          value: {{ $value | toString | quote }}
        {{- end }}
        {{- with $spec.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- $resources := deepCopy (default dict $spec.resources) }}
      {{- with $root.Values.scratch.ephemeralStorageRequest }}
      {{- $_ := set $resources "requests" (merge (default dict $resources.requests) (dict "ephemeral-storage" .)) }}
      {{- end }}
      {{- if $gpu }}
      {{- $limits := merge (dict $root.Values.gpu.resourceName (int $root.Values.gpu.perPod)) (default dict $resources.limits) }}
      {{- $_ := set $resources "limits" $limits }}
      {{- end }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/fedsilo
          readOnly: true
        {{- if $tls }}
        - name: tls
          mountPath: /var/run/secrets/fedsilo-tls
          readOnly: true
        {{- if and (eq .component "aggregator") $root.Values.tls.revoked.configMap }}
        - name: revoked
          mountPath: /etc/fedsilo-revoked
          readOnly: true
        {{- end }}
        {{- else }}
        - name: token
          mountPath: /var/run/secrets/fedsilo
          readOnly: true
        {{- end }}
        - name: tmp
          mountPath: /tmp
        - name: shm
          mountPath: /dev/shm
        {{- if $root.Values.modelCache.enabled }}
        - name: model-cache
          mountPath: {{ $root.Values.modelCache.mountPath }}
          readOnly: {{ $root.Values.modelCache.readOnly }}
        {{- end }}
        {{- include "fedsilo.caBundleVolume" (dict "root" $root "part" "mount") | nindent 8 }}
        {{- if eq .component "aggregator" }}
        - name: checkpoints
          mountPath: /var/lib/fedsilo/checkpoints
        {{- end }}
        {{- if $spec.dataVolume }}
        - name: data
          mountPath: {{ $root.Values.dataMountPath }}
          readOnly: true
        {{- end }}
        {{- with $root.Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "fedsilo.fullname" $root }}-config
    {{- if $tls }}
    # This member's own certificate and key (a silo's binds its rank) and the federation CA.
    - name: tls
      secret:
        secretName: {{ if eq .component "aggregator" }}{{ include "fedsilo.aggregatorTlsSecret" $root }}{{ else }}{{ include "fedsilo.siloTlsSecret" (dict "root" $root "rank" .rank) }}{{ end }}
        items:
          - key: tls.crt
            path: tls.crt
          - key: tls.key
            path: tls.key
          - key: ca.crt
            path: ca.crt
        # Readable by the pod's fsGroup only.
        defaultMode: 0440
    {{- if and (eq .component "aggregator") $root.Values.tls.revoked.configMap }}
    - name: revoked
      configMap:
        name: {{ $root.Values.tls.revoked.configMap }}
        items:
          - key: {{ $root.Values.tls.revoked.key }}
            path: {{ $root.Values.tls.revoked.key }}
    {{- end }}
    {{- else }}
    - name: token
      secret:
        secretName: {{ include "fedsilo.tokenSecretName" $root }}
        items:
          - key: {{ $root.Values.joinToken.key }}
            path: {{ $root.Values.joinToken.key }}
        # Readable by the pod's fsGroup only.
        defaultMode: 0440
    {{- end }}
    {{- include "fedsilo.scratchVolume" $root | nindent 4 }}
    {{- if $root.Values.modelCache.enabled }}
    # The shared model and dataset cache (HF_HOME).
    - name: model-cache
      persistentVolumeClaim:
        claimName: {{ default (printf "%s-model-cache" (include "fedsilo.fullname" $root)) $root.Values.modelCache.existingClaim }}
        readOnly: {{ $root.Values.modelCache.readOnly }}
    {{- end }}
    {{- include "fedsilo.caBundleVolume" (dict "root" $root "part" "volume") | nindent 4 }}
    # PyTorch's DataLoader workers pass batches through shared memory; the runtime's default
    # /dev/shm is 64 MiB.
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $root.Values.sharedMemorySize }}
    {{- if eq .component "aggregator" }}
    - name: checkpoints
      {{- if $root.Values.checkpoints.enabled }}
      persistentVolumeClaim:
        claimName: {{ default (printf "%s-checkpoints" (include "fedsilo.fullname" $root)) $root.Values.checkpoints.existingClaim }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    {{- end }}
    {{- with $spec.dataVolume }}
    - name: data
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $root.Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/*
The merged per-pod settings of the aggregator, as JSON for fromJson.
*/}}
{{- define "fedsilo.aggregatorSpec" -}}
{{- $a := .Values.aggregator }}
{{- toJson (dict "nodeSelector" $a.nodeSelector "affinity" $a.affinity "tolerations" $a.tolerations "topologySpreadConstraints" $a.topologySpreadConstraints "dataVolume" $a.dataVolume "config" $a.config "env" $a.env "resources" $a.resources) }}
{{- end }}

{{/*
The merged per-pod settings of a silo, as JSON for fromJson. Called with a dict: root, rank (a
string; "" for the silo defaults, which the Indexed Job's one pod template uses). A silo's
override replaces the default of each field it sets (nodeSelector, affinity, tolerations,
dataVolume, topologySpreadConstraints, resources, env) and adds to config.
*/}}
{{- define "fedsilo.siloSpec" -}}
{{- $s := .root.Values.silo }}
{{- $defaults := dict "nodeSelector" $s.nodeSelector "affinity" $s.affinity "tolerations" $s.tolerations "topologySpreadConstraints" $s.topologySpreadConstraints "dataVolume" $s.dataVolume "config" $s.config "env" $s.env "resources" $s.resources }}
{{- $override := dict }}
{{- if .rank }}
{{- $override = default dict (index .root.Values.siloOverrides .rank) }}
{{- end }}
{{- $spec := dict }}
{{- range $field := list "nodeSelector" "affinity" "tolerations" "topologySpreadConstraints" "dataVolume" "env" "resources" }}
{{- $_ := set $spec $field (default (index $defaults $field) (index $override $field)) }}
{{- end }}
{{- $_ := set $spec "config" (merge (deepCopy (default dict $override.config)) (deepCopy (default dict $defaults.config))) }}
{{- toJson $spec }}
{{- end }}

{{/*
"true" when the in-cluster silos share one pod template (an Indexed Job, rank = index + 1): no
siloOverrides, and transport collective (with tls each silo mounts its own certificate).
*/}}
{{- define "fedsilo.indexedSilos" -}}
{{- if and (not .Values.siloOverrides) (ne .Values.transport "tls") }}true{{ end }}
{{- end }}

{{/*
Labels and annotations of a Job or JobSet: the chart's labels, the component, the Kueue queue
and workloadLabels / workloadAnnotations (for a queue or a gang scheduler such as Volcano).
Called with a dict: root, component ("" for the JobSet itself), rank, child (true for a Job
inside the JobSet: the queue and the extra labels are the JobSet's, or Kueue would admit each
Job on its own).
*/}}
{{- define "fedsilo.workloadMeta" -}}
{{- $v := .root.Values -}}
labels:
  {{- include "fedsilo.labels" .root | nindent 2 }}
  {{- with .component }}
  app.kubernetes.io/component: {{ . }}
  {{- end }}
  {{- with .rank }}
  fedsilo.dev/rank: {{ . | quote }}
  {{- end }}
  {{- if not .child }}
  {{- with $v.queueName }}
  kueue.x-k8s.io/queue-name: {{ . | quote }}
  {{- end }}
  {{- with $v.workloadLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- end }}
{{- if not .child }}
{{- with $v.workloadAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Job-level restart behaviour shared by the aggregator's and the silos' Jobs.
Called with a dict: root, pods (how many pods the Job runs), jobset (true inside a JobSet, which
owns the restart budget and the TTL).

A torch.distributed group cannot lose a member: when any rank fails, every other rank fails
too (connection reset, or a timeout), and each Job replaces its pods. The new pods form a new
group and the aggregator resumes from its last checkpoint. One federation restart therefore
costs every Job one failure per pod, hence backoffLimit = restarts x pods.
*/}}
{{- define "fedsilo.jobRestart" -}}
{{- $r := .root.Values.restart -}}
{{- if .jobset -}}
# Any failed pod fails its Job, and the JobSet restarts every Job (failurePolicy.maxRestarts).
backoffLimit: 0
{{- else -}}
backoffLimit: {{ mul (int $r.maxFederationRestarts) (int .pods) }}
{{- end }}
{{- if or $r.failFastExitCodes $r.ignoreDisruptions }}
podFailurePolicy:
  rules:
    {{- if $r.failFastExitCodes }}
    # Errors a retry cannot fix (78: bad settings, data or a refused join; 2: bad flags):
    # fail the Job at once.
    - action: FailJob
      onExitCodes:
        containerName: fedsilo
        operator: In
        values: {{ toJson $r.failFastExitCodes }}
      # Empty, not absent: the OpenAPI schemas before Kubernetes 1.31 mark it required.
      onPodConditions: []
    {{- end }}
    {{- if $r.ignoreDisruptions }}
    # Evictions, preemption and node drains are not the run's fault: replace the pod without
    # spending a restart.
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
    {{- end }}
{{- end }}
{{- with $r.activeDeadlineSeconds }}
activeDeadlineSeconds: {{ . }}
{{- end }}
{{- if not .jobset }}
{{- with $r.ttlSecondsAfterFinished }}
ttlSecondsAfterFinished: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The part of every cert-manager Certificate that is the same for all members: lifetime, an EC
P-256 key (fedsilo's own choice, in PKCS#8 as `fedsilo certs` writes it) made anew at every
renewal, and the issuer.
*/}}
{{- define "fedsilo.certificateCommon" -}}
{{- $cm := .Values.certManager -}}
duration: {{ $cm.duration | quote }}
{{- with $cm.renewBefore }}
renewBefore: {{ . | quote }}
{{- end }}
privateKey:
  algorithm: ECDSA
  size: 256
  encoding: PKCS8
  rotationPolicy: Always
issuerRef:
  name: {{ $cm.issuerRef.name | quote }}
  kind: {{ $cm.issuerRef.kind }}
  group: {{ $cm.issuerRef.group }}
{{- end }}
