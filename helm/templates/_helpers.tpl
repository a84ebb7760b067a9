{{/* Names are cut to 40 characters: KubeRay appends "-raycluster-xxxxx" and pod suffixes to them. */}}
{{- define "rayroute.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "rayroute.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "rayroute.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "rayroute.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "rayroute.image" -}}
{{- $repository := required "image.repository is required: build helm/image/Dockerfile, push it, and set image.repository" .Values.image.repository -}}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "rayroute.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "rayroute.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{- define "rayroute.authEnabled" -}}
{{- if or .Values.apiKeys.existingSecret .Values.apiKeys.keys -}}true{{- end -}}
{{- end -}}

{{- define "rayroute.hfSecret" -}}
{{- default (printf "%s-hf-token" (include "rayroute.fullname" .)) .Values.huggingface.existingSecret -}}
{{- end -}}

{{/*
Ray's health endpoints, as KubeRay's own default probes ask them (ray-operator/controllers/ray/utils). Ray's token
authentication leaves these paths open (the dashboard's and its agent's public paths; Serve's proxy takes no Ray
token), so the probes send none; a test checks the paths against the installed Ray's lists.
*/}}
{{- define "rayroute.rayletHealth" -}}
wget --tries 1 -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success
{{- end -}}
{{- define "rayroute.gcsHealth" -}}
wget --tries 1 -T 2 -q -O- http://localhost:8265/api/gcs_healthz | grep success
{{- end -}}
{{- define "rayroute.proxyHealth" -}}
wget --tries 1 -T 2 -q -O- http://localhost:8000/-/healthz | grep success
{{- end -}}

{{/*
The environment of every Ray container: Ray Serve's high-throughput mode, as router/launch.py SERVE_ENV sets it
locally (a test compares them). HAProxy is Serve's HTTP front on every pod: it forwards each request to a router
replica's own HTTP server, where Serve's Python proxy would relay every streamed token as a Ray item of its own. Ray's
template binds its stats page (admin level: it can take servers out) and its metrics page on every interface; the
image's hook (router/haproxy.py, run by every Python process through a .pth file) rebinds them to the pod's loopback
and bounds the time a client has to send its request headers, so slow clients cannot hold every connection slot.
Throughput mode sends router → engine calls over Serve's direct gRPC channel (its 4 MiB message limit raised to
gRPC's maximum: replies are as large as clients ask for); user code keeps its own thread and Serve's logs stay on
stderr, unbuffered (launch.py says why). HF_TOKEN is not here: only the GPU pods get it ("rayroute.engineEnv").
*/}}
{{- define "rayroute.env" -}}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
- name: RAY_SERVE_HAPROXY_NBTHREAD
  value: "1"
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: "1"
- name: RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH
  value: "2147483647"
- name: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD
  value: "1"
- name: RAY_SERVE_LOG_TO_STDERR
  value: "1"
- name: RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE
  value: "1"
- name: RAYROUTE_HAPROXY_PAGES_HOST
  value: "127.0.0.1"
- name: RAYROUTE_HAPROXY_REQUEST_TIMEOUT_S
  value: {{ .Values.haproxy.requestTimeoutSeconds | quote }}
{{- if .Values.modelCache.enabled }}
- name: HF_HOME
  value: {{ .Values.modelCache.mountPath | quote }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
What only the GPU worker pods get: the Hugging Face token, where the engines download weights and adapters. The
router pods parse every client's request and the head runs Ray's control plane; neither needs it.
*/}}
{{- define "rayroute.engineEnv" -}}
{{- if or .Values.huggingface.existingSecret .Values.huggingface.token }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "rayroute.hfSecret" . }}
      key: {{ .Values.huggingface.secretKey }}
{{- end }}
{{- end -}}

{{/*
`env` may not set what the chart sets for security (RESERVED_ENV in deployments/kubernetes/security_values.py):
KubeRay leaves a Ray container's RAY_AUTH_MODE and RAY_AUTH_TOKEN alone when the pod spec has them, so one in `env`
would turn Ray's token authentication off; HF_TOKEN would reach every pod; HAProxy's admin pages would leave the
loopback.
*/}}
{{- define "rayroute.checkEnv" -}}
{{- range .Values.env -}}
{{- if has .name (list "RAY_AUTH_MODE" "RAY_AUTH_TOKEN" "HF_TOKEN" "RAYROUTE_HAPROXY_PAGES_HOST") -}}
{{- fail (printf "env: %s is the chart's to set (Ray's token comes from rayAuth.existingSecret, HF_TOKEN from huggingface.existingSecret)" .name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Whether the router pods download anything: a CPU model's replicas may run there (the head has no CPUs for them and
GPU groups may be absent), python.packages are installed wherever the applications run, and the routers load the
tokenizer of each model placed by kv_cache from its source.
*/}}
{{- define "rayroute.routersDownload" -}}
{{- $download := gt (len .Values.python.packages) 0 -}}
{{- range .Values.serve.models -}}
{{- if eq (dig "accelerator" "gpu" (default dict .resources)) "cpu" }}{{ $download = true }}{{ end -}}
{{- if eq (include "rayroute.replicaChoice" .) "kv_cache" }}{{ $download = true }}{{ end -}}
{{- end -}}
{{- if $download }}true{{ end -}}
{{- end -}}

{{/*
A model entry's replica_choice, `auto` resolved as ModelConfig resolves it (deployments/model_config.py):
kv_cache, or least_loaded where the engine keeps no prefix cache. tests/test_chart.py fails when the two differ.
*/}}
{{- define "rayroute.replicaChoice" -}}
{{- $choice := default "auto" .replica_choice -}}
{{- if eq $choice "auto" -}}
{{- $engineArgs := default dict .engine_args -}}
{{- $pooling := or (eq (toString $engineArgs.runner) "pooling") (not (has (toString (default "auto" $engineArgs.convert)) (list "auto" "none"))) -}}
{{- $choice = ternary "least_loaded" "kv_cache" (or $pooling (eq (toString $engineArgs.enable_prefix_caching) "false")) -}}
{{- end -}}
{{- $choice -}}
{{- end -}}

{{/*
Every model's replica must fit the worker groups, or it would stay pending forever. A replica is one Ray placement
group (deployments/replica_resources.py Resources): tensor_parallel_size x pipeline_parallel_size workers of
gpus_per_worker GPUs. A stage's tensor-parallel workers share a node (without stages, STRICT_PACK keeps the whole
group on one), so one stage must fit on one pod of a group; stages may span pods, so that group's pods, at most
maxReplicas of them, must hold every stage. On `cpu`, vLLM places a replica's workers by a logical GPU resource that
only the local launcher declares (router/launch.py), so a CPU model has one worker here. The defaults below are the
config schema's.
*/}}
{{- define "rayroute.checkPlacement" -}}
{{- $groups := include "rayroute.workerGroups" . | fromYamlArray -}}
{{- range $i, $model := .Values.serve.models -}}
{{- $resources := default dict $model.resources -}}
{{- $tp := int (default 1 $resources.tensor_parallel_size) -}}
{{- $pp := int (default 1 $resources.pipeline_parallel_size) -}}
{{- if eq (default "gpu" $resources.accelerator) "cpu" -}}
{{- if gt (mul $tp $pp) 1 -}}
{{- fail (printf "serve.models[%d] (%s) has %d workers (tensor_parallel_size x pipeline_parallel_size) on accelerator: cpu, which the chart's pods cannot run: vLLM places CPU workers by a logical GPU resource that only the local launcher declares. Serve it on GPUs (accelerator: gpu), or with one worker" $i $model.id (mul $tp $pp)) -}}
{{- end -}}
{{- else -}}
{{- $need := mulf $tp (default 1 $resources.gpus_per_worker) -}}
{{- $type := default "" $resources.accelerator_type -}}
{{- $ofType := ternary (printf " of type %s" $type) "" (ne $type "") -}}
{{- $andType := ternary (printf " and acceleratorType: %s" $type) "" (ne $type "") -}}
{{- $fits := false -}}
{{- $best := dict -}}
{{- range $groups -}}
{{- if and (ge (float64 .gpus) $need) (or (not $type) (eq $type (default "" .acceleratorType))) -}}
{{- $perPod := int (floor (divf .gpus $need)) -}}
{{- $holds := mul $perPod (int .maxReplicas) -}}
{{- if ge $holds $pp -}}
{{- $fits = true -}}
{{- else if gt $holds (int (default 0 $best.holds)) -}}
{{- $best = dict "name" .name "perPod" $perPod "pods" (int .maxReplicas) "holds" $holds -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not $fits -}}
{{- if eq $pp 1 -}}
{{- fail (printf "serve.models[%d] (%s) needs %v GPU(s)%s on one pod, but no workerGroups entry has them: add a group with gpus: %v%s" $i $model.id $need $ofType (ceil $need) $andType) -}}
{{- else if not $best -}}
{{- fail (printf "serve.models[%d] (%s) needs %v GPU(s)%s on one pod for each of its %d pipeline stages, but no workerGroups entry has them: add a group with gpus: %v (or a multiple)%s and maxReplicas: %d" $i $model.id $need $ofType $pp (ceil $need) $andType $pp) -}}
{{- else -}}
{{- fail (printf "serve.models[%d] (%s) needs %d pipeline stages of %v GPU(s)%s, each on one pod, but no workerGroups entry holds them all: workerGroups %s holds %d of them (%d per pod x maxReplicas %d); raise its maxReplicas to %d, or give its pods more GPUs" $i $model.id $pp $need $ofType $best.name $best.holds $best.perPod $best.pods (div (add $pp $best.perPod -1) $best.perPod)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $groups -}}
{{- if eq .name "routers" -}}
{{- fail "workerGroups: routers is the router pods' group (routerPods); give the GPU group another name" -}}
{{- end -}}
{{- if gt (int .minReplicas) (int .maxReplicas) -}}
{{- fail (printf "workerGroups %s: minReplicas (%v) exceeds maxReplicas (%v)" .name .minReplicas .maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- /* Each router replica takes one CPU (Ray Serve's default) on a router pod, the only pods that may hold it. */ -}}
{{- $podCPU := toString (dig "limits" "cpu" (dig "requests" "cpu" "" .Values.routerPods.resources) .Values.routerPods.resources) -}}
{{- $routers := dig "routers" "replicas" 1 .Values.serve -}}
{{- if $podCPU -}}
{{- $cores := ternary (divf (trimSuffix "m" $podCPU | float64) 1000) (float64 $podCPU) (hasSuffix "m" $podCPU) -}}
{{- $room := mul (floor $cores | int) (int .Values.routerPods.replicas) -}}
{{- if lt (float64 $room) (float64 $routers) -}}
{{- fail (printf "serve.routers.replicas: %v routers need a CPU each on the router pods, but %v pods of %s CPUs (routerPods) hold %v" $routers .Values.routerPods.replicas $podCPU $room) -}}
{{- end -}}
{{- end -}}
{{- if not (or (include "rayroute.authEnabled" .) .Values.apiKeys.allowUnauthenticated) -}}
{{- fail "no API keys: set apiKeys.existingSecret (or apiKeys.keys), or apiKeys.allowUnauthenticated: true for an endpoint anyone can call" -}}
{{- end -}}
{{- end -}}

{{/*
serveConfigV2: .Values.serve (a config file's args) as router/app.py's serve_applications expands it, with the
routers pinned to the router pods (see rayservice.yaml's routers group): one application per model, whose args are
that model's entry less what Serve changes in place (in the application's `deployments:` overrides), and the
router application, whose args are each model's routed fields (RoutedModel in deployments/model_config.py) and the rest
of .Values.serve. So a change to one model's entry replaces only that model's replicas, and one to its scaling none.
tests/test_chart.py compares this with serve_applications.
*/}}
{{- define "rayroute.serveConfig" -}}
{{- $args := deepCopy .Values.serve -}}
{{- $routers := default dict $args.routers -}}
{{- $_ := set $routers "ray_resources" (merge (dict "rayroute_router" 1) (default dict $routers.ray_resources)) -}}
{{- $_ = set $args "routers" $routers -}}
{{- $shared := dict -}}
{{- with .Values.python.packages -}}
{{- $_ = set $shared "runtime_env" (dict "pip" .) -}}
{{- end -}}
{{- /* The defaults of the fields Serve changes in place (Autoscaling and ModelConfig in deployments/model_config.py;
Helm cannot read values.schema.json, and tests/test_chart.py fails when these differ from them). */ -}}
{{- $scalingDefaults := dict "min_replicas" 1 "max_replicas" 1 "policy" "requests" "target_ongoing_requests" 16 "target_kv_cache_usage" 0.8 "upscale_delay_s" 30 "downscale_delay_s" 300 "look_back_period_s" 30 -}}
{{- $limitDefaults := dict "max_ongoing_requests" 64 "max_queued_requests" 256 -}}
{{- $apps := list -}}
{{- $routed := list -}}
{{- range $args.models -}}
{{- $model := . -}}
{{- $name := printf "engine-%s" (regexReplaceAll "[^A-Za-z0-9._-]" .id "_") -}}
{{- /* IN_PLACE_FIELDS (deployments/model_config.py) go in the deployment's overrides, as ModelConfig.in_place_options. */ -}}
{{- $scaling := deepCopy $scalingDefaults -}}
{{- range $key, $value := default dict .autoscaling }}{{ $_ := set $scaling $key $value }}{{ end -}}
{{- $options := dict "name" $name "autoscaling_config" (pick $scaling "min_replicas" "max_replicas" "target_ongoing_requests" "upscale_delay_s" "downscale_delay_s" "look_back_period_s") -}}
{{- if eq $scaling.policy "engine_load" -}}
{{- $_ := set $options.autoscaling_config "policy" (dict "policy_function" "deployments.autoscaling:EngineLoadPolicy" "policy_kwargs" (pick $scaling "target_ongoing_requests" "target_kv_cache_usage")) -}}
{{- end -}}
{{- range $key := list "max_ongoing_requests" "max_queued_requests" }}{{ $_ := set $options $key (ternary (index $model $key) (index $limitDefaults $key) (hasKey $model $key)) }}{{ end -}}
{{- $apps = append $apps (merge (dict "name" $name "route_prefix" nil "import_path" "deployments.app:build_engine_app" "args" (dict "model" (omit . "autoscaling" "max_ongoing_requests" "max_queued_requests")) "deployments" (list $options)) (deepCopy $shared)) -}}
{{- /* The engine resolves its own entry's replica_choice; the routers read the one they get. */ -}}
{{- $routed = append $routed (merge (dict "replica_choice" (include "rayroute.replicaChoice" .)) (pick . "id" "aliases" "timeouts" "drain_timeout_s" "multimodal" "allowed_media_domains" "fallbacks" "adapters")) -}}
{{- end -}}
{{- $routerArgs := omit $args "models" -}}
{{- $_ = set $routerArgs "models" $routed -}}
{{- $app := merge (dict "name" "rayroute" "route_prefix" "/" "import_path" "router.app:build_router_app" "args" $routerArgs) $shared -}}
{{- $apps = append $apps $app -}}
{{/*
EveryNode: a proxy on every node that holds a replica, so HTTP load spreads over the pods. keep_alive_timeout_s is
above the 60 s idle timeout of the usual cloud load balancers, so the proxy never closes a connection a balancer is
about to reuse (which the client would see as a 502).
*/}}
{{- toYaml (dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" 8000 "keep_alive_timeout_s" 90) "applications" $apps) -}}
{{- end -}}

{{/* workerGroups with each setting a group leaves out taken whole from workerDefaults (a shallow merge). */}}
{{- define "rayroute.workerGroups" -}}
{{- $groups := list -}}
{{- range .Values.workerGroups -}}
{{- $group := deepCopy $.Values.workerDefaults -}}
{{- range $key, $value := . -}}
{{- $_ := set $group $key $value -}}
{{- end -}}
{{- $groups = append $groups $group -}}
{{- end -}}
{{- toYaml $groups -}}
{{- end -}}

{{/* The longest drain_timeout_s of the served models (300, the config's default, where a model sets none). */}}
{{- define "rayroute.longestDrainSeconds" -}}
{{- $longest := 0 -}}
{{- range .Values.serve.models -}}
{{- $seconds := 300 -}}
{{- if hasKey . "drain_timeout_s" }}{{ $seconds = int (ceil .drain_timeout_s) }}{{ end -}}
{{- if gt $seconds $longest }}{{ $longest = $seconds }}{{ end -}}
{{- end -}}
{{- $longest -}}
{{- end -}}

{{/*
The egress every restricted pod keeps: DNS, to any address (the cluster serves it from kube-dns pods or from a
node-local cache on a link-local address, which no pod selector matches), and the release's pods on any port (Ray).
*/}}
{{- define "rayroute.egressBase" -}}
- ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
- to:
    - podSelector:
        matchLabels:
          {{- include "rayroute.selectorLabels" . | nindent 10 }}
{{- end -}}
