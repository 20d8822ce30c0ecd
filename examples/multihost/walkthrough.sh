#!/usr/bin/env bash
# A FedSeek consortium spread over separate hosts, on one Linux machine (run as root).
#
#   sudo examples/multihost/walkthrough.sh [WORKDIR]
#
# Each party gets a host of its own: a network namespace with one interface on a private switch (a
# bridge in a namespace of its own), so the coordinator and the sites reach each other only through
# the addresses their certificates name, as on real machines. Then, as an operator would:
#   1. the CA office creates the consortium CA, the coordinator's and the monitor's certificates;
#   2. each site makes its own key and a certificate request (`fedseek node enroll`), the CA signs the
#      request (`fedseek ca sign`), the site installs the answer (`fedseek node enroll --accept`):
#      no private key leaves the site;
#   3. the coordinator and the two sites start (`fedseek coordinator start`, `fedseek node start`;
#      on real hosts these are deploy/systemd/fedseek-coordinator.service and fedseek-node.service);
#   4. a one-round federated run (`fedseek run`);
#   5. Prometheus scrapes the coordinator and both sites over mutual TLS
#      (`fedseek monitoring prometheus-config`, deploy/monitoring/alerts.yml) and sees every target up;
#   6. the CRL is refreshed as the timer would (`fedseek ca crl --if-due 3`), the sites' ledgers and
#      audit logs are checked (`fedseek budget`, `fedseek audit verify`).
# Everything it made (namespaces, processes) is removed on exit, also after a failure; WORKDIR stays.
#
# Environment: FEDSEEK (the command, default `fedseek`), SUBNET_PREFIX (default 10.78.0), KEEP=1 to keep
# the consortium running until Ctrl-C, ROUNDS (default 1).
set -euo pipefail

FEDSEEK=${FEDSEEK:-fedseek}
PREFIX=${SUBNET_PREFIX:-10.78.0}
ROUNDS=${ROUNDS:-1}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORK=$(realpath -m "${1:-$(mktemp -d /tmp/fedseek-multihost.XXXXXX)}")
TAG="fsw$$"                       # namespace names carry our pid: two walkthroughs never collide
HOSTS=(coord site-a site-b)
declare -A ADDR=([coord]="$PREFIX.10" [site-a]="$PREFIX.21" [site-b]="$PREFIX.22")
FLEET_PORT=9443 ADMIN_PORT=9444 API_PORT=8443 PROM_PORT=9090
PIDS=()

say() { printf '\n== %s\n' "$*"; }
run() { printf '+ %s\n' "$*"; "$@"; }     # show each command as the operator would type it
ns() { echo "$TAG-$1"; }
on() { local host=$1; shift; printf '+ [%s] %s\n' "$host" "$*"; ip netns exec "$(ns "$host")" "$@"; }

kill_tree() {   # a process and all its descendants (a node's SuperNode runs in a namespace of its own)
    local child
    for child in $(pgrep -P "$1" 2>/dev/null || true); do kill_tree "$child" "$2"; done
    kill "-$2" "$1" 2>/dev/null || true
}

cleanup() {
    local rc=$? pid host
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill_tree "$pid" TERM; done
    for _ in $(seq 1 20); do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive == 0 ]] && break
        sleep 0.5
    done
    for pid in "${PIDS[@]}"; do kill_tree "$pid" KILL; done
    for host in "${HOSTS[@]}" switch; do ip netns del "$(ns "$host")" 2>/dev/null || true; done
    if [[ $rc != 0 ]]; then
        echo "walkthrough failed (exit $rc); logs under $WORK/*/logs:" >&2
        tail -n 30 "$WORK"/*/logs/*.log >&2 2>/dev/null || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

background() {  # background HOST LOG CMD...: a daemon on HOST, as systemd would keep it
    local host=$1 log=$2; shift 2
    mkdir -p "$(dirname "$log")"
    printf '+ [%s] %s &\n' "$host" "$*"
    ip netns exec "$(ns "$host")" env OMP_NUM_THREADS=1 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1 \
        TRANSFORMERS_OFFLINE=1 "$@" >"$log" 2>&1 &
    PIDS+=($!)
}

wait_file() {   # wait_file PATH SECONDS WHAT
    local i
    for i in $(seq 1 $(($2 * 2))); do
        [[ -s $1 ]] && return 0
        for pid in "${PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null || { echo "a daemon exited while waiting for $3" >&2; return 1; }
        done
        sleep 0.5
    done
    echo "timed out after $2 s waiting for $3" >&2
    return 1
}

[[ $(id -u) == 0 ]] || { echo "run as root: it makes network namespaces" >&2; exit 77; }
command -v ip >/dev/null || { echo "needs iproute2 (ip)" >&2; exit 77; }
mkdir -p "$WORK"
cd "$WORK"
umask 077

say "1. hosts: a switch and one namespace per party ($PREFIX.0/24)"
run ip netns add "$(ns switch)"
run ip -n "$(ns switch)" link add br0 type bridge
run ip -n "$(ns switch)" link set br0 up
i=0
for host in "${HOSTS[@]}"; do
    i=$((i + 1))
    run ip netns add "$(ns "$host")"
    run ip -n "$(ns switch)" link add "p$i" type veth peer name eth0 netns "$(ns "$host")"
    run ip -n "$(ns switch)" link set "p$i" master br0 up
    run ip -n "$(ns "$host")" addr add "${ADDR[$host]}/24" dev eth0
    run ip -n "$(ns "$host")" link set eth0 up
    run ip -n "$(ns "$host")" link set lo up
done

say "2. the CA office: consortium CA, coordinator and monitor certificates (ca init also makes the app-publisher key)"
head -c 32 /dev/urandom | base64 >ca-passphrase
CA=(--pki ca-office --passphrase-file ca-passphrase)
run "$FEDSEEK" ca init "${CA[@]}" --consortium walkthrough
run "$FEDSEEK" ca issue coordinator "${CA[@]}" --role coordinator --host "${ADDR[coord]}"
run "$FEDSEEK" ca issue monitor "${CA[@]}" --role monitor

say "3. enrollment by certificate request: each site's key stays on its host"
for site in site-a site-b; do
    run "$FEDSEEK" node enroll --pki "$site/pki" --name "$site" --host "${ADDR[$site]}"
    # carried to the CA office: request.csr and supernode_auth.pub (public)
    mkdir -p "inbox/$site"
    cp "$site/pki/$site/request.csr" "$site/pki/$site/supernode_auth.pub" "inbox/$site/"
    run "$FEDSEEK" ca sign "inbox/$site/request.csr" "${CA[@]}" --role node --host "${ADDR[$site]}"
    # carried back: the bundle (cert.pem, ca.pem, crl.pem, publishers.json)
    run "$FEDSEEK" node enroll --pki "$site/pki" --name "$site" --accept "ca-office/$site"
    test ! -e "ca-office/$site/key.pem"   # the CA never held the site's key
done
run "$FEDSEEK" ca list --pki ca-office

say "4. the coordinator's host: the CA's public files, its certificate, who may join, the signed app"
mkdir -p coord/pki/ca
cp ca-office/ca/{ca.pem,crl.pem,index.json,publishers.json} coord/pki/ca/
cp -r ca-office/coordinator ca-office/site-keys coord/pki/
for party in site-a site-b monitor; do
    mkdir -p "coord/pki/$party" && cp "ca-office/$party"/{cert.pem,ca.pem,crl.pem} "coord/pki/$party/"
done
run "$FEDSEEK" app sign "${CA[@]}" --out coord/state/app
cat >coord/coordinator.json <<EOF
{"pki_dir": "$WORK/coord/pki", "state_dir": "$WORK/coord/state",
 "fleet_host": "${ADDR[coord]}", "fleet_port": $FLEET_PORT,
 "admin_host": "${ADDR[coord]}", "admin_port": $ADMIN_PORT,
 "site_keys_dir": "$WORK/coord/pki/site-keys", "pki_poll_seconds": 2.0}
EOF

say "5. the sites: model, data and config (on real hosts: /etc/fedseek/node.json)"
run "$FEDSEEK" model tiny --out model
COORD_NAME=$(python3 -c 'import sys; from federation.security import pki; print(pki.coordinator_host(sys.argv[1]))' walkthrough)
i=0
for site in site-a site-b; do
    python3 -c 'import sys, pathlib
from fedseek_examples.demo.data import write_site_dataset
write_site_dataset(pathlib.Path(sys.argv[1]), site_index=int(sys.argv[2]), n_sites=2, n_train=48, n_eval=12)' \
        "$site/data" "$i"
    i=$((i + 1))
    cat >"$site/node.json" <<EOF
{"name": "$site", "model_dir": "$WORK/model", "data_dir": "$WORK/$site/data",
 "state_dir": "$WORK/$site/state", "pki_dir": "$WORK/$site/pki",
 "coordinator": "${ADDR[coord]}:$FLEET_PORT", "coordinator_name": "$COORD_NAME",
 "coordinator_admin": "${ADDR[coord]}:$ADMIN_PORT",
 "api_host": "${ADDR[$site]}", "api_port": $API_PORT, "pki_poll_seconds": 2.0}
EOF
done

say "6. start the coordinator and the sites (deploy/systemd/fedseek-{coordinator,node}.service on real hosts)"
background coord coord/logs/coordinator.log "$FEDSEEK" coordinator start --config "$WORK/coord/coordinator.json"
wait_file coord/state/coordinator.json 240 "the coordinator"
for site in site-a site-b; do
    background "$site" "$site/logs/node.log" "$FEDSEEK" node start --config "$WORK/$site/node.json"
done
for site in site-a site-b; do
    wait_file "$site/state/node.json" 420 "$site"
    # Each site admits the monitor in its access policy (read without a restart): it may read /metrics only.
    grep -qx "g, monitor, $site" "$site/state/access-policy.csv" || echo "g, monitor, $site" >>"$site/state/access-policy.csv"
done

say "7. a federated run of $ROUNDS round(s) over both sites"
on coord "$FEDSEEK" run --state "$WORK/coord/state" --name walkthrough --rounds "$ROUNDS" --min-nodes 2 --timeout 600
python3 - "$WORK/coord/state/registry/runs/walkthrough.json" "$ROUNDS" <<'EOF'
import json, sys
run = json.load(open(sys.argv[1]))
made = [r for r in run.get("rounds", []) if r.get("version")]
print(f"run {run.get('status')}: {len(made)} round(s) made a version")
sys.exit(0 if len(made) >= int(sys.argv[2]) else 1)
EOF

say "8. monitoring: Prometheus scrapes every party over mutual TLS"
mkdir -p monitor/pki/ca    # the Prometheus host: its monitor certificate and the CA certificate only
cp ca-office/ca/ca.pem monitor/pki/ca/
cp -r ca-office/monitor monitor/pki/monitor
ALERTS="$HERE/../../deploy/monitoring/alerts.yml"
RULES=()
if [[ -f $ALERTS ]]; then cp "$ALERTS" monitor/alerts.yml; RULES=(--rules alerts.yml); fi
run "$FEDSEEK" monitoring prometheus-config --pki "$WORK/monitor/pki" --monitor monitor \
    --coordinator "${ADDR[coord]}:$ADMIN_PORT" --node "site-a=${ADDR[site-a]}:$API_PORT" \
    --node "site-b=${ADDR[site-b]}:$API_PORT" "${RULES[@]}" --interval 2s --out monitor/prometheus.yml
if command -v prometheus >/dev/null; then
    background coord monitor/logs/prometheus.log prometheus --config.file="$WORK/monitor/prometheus.yml" \
        --storage.tsdb.path="$WORK/monitor/tsdb" --web.listen-address="127.0.0.1:$PROM_PORT"
    up=""
    for _ in $(seq 1 120); do
        up=$(ip netns exec "$(ns coord)" curl -sf "http://127.0.0.1:$PROM_PORT/api/v1/targets" | python3 -c '
import json, sys
targets = json.load(sys.stdin)["data"]["activeTargets"]
print(" ".join(sorted(t["labels"]["job"] + ("/" + t["labels"]["site"] if "site" in t["labels"] else "") + "=" + t["health"] for t in targets)))' 2>/dev/null || true)
        [[ -n $up && $up != *=down* && $up != *=unknown* ]] && break
        sleep 1
    done
    echo "targets: $up"
    [[ $up == "fedseek-coordinator=up fedseek-node/site-a=up fedseek-node/site-b=up" ]]
else
    echo "no prometheus here (apt-get install prometheus); scraping with curl and the monitor's certificate"
    M="$WORK/monitor/pki/monitor"
    for target in "${ADDR[coord]}:$ADMIN_PORT" "${ADDR[site-a]}:$API_PORT" "${ADDR[site-b]}:$API_PORT"; do
        on coord curl -sf --cacert "$M/ca.pem" --cert "$M/cert.pem" --key "$M/key.pem" \
            -o /dev/null "https://$target/metrics"
        echo "up: $target"
    done
fi

say "9. day-2: CRL refresh (the timer's command), ledgers, audit logs"
run "$FEDSEEK" ca crl "${CA[@]}" --if-due 3
for site in site-a site-b; do
    run "$FEDSEEK" budget --state "$site/state" --witness coord/state --site "$site"
    run "$FEDSEEK" audit verify "$site/state/audit.jsonl" --witness coord/state --site "$site" \
        --site-keys coord/pki/site-keys
done

if [[ ${KEEP:-0} == 1 ]]; then
    say "running: Prometheus at http://127.0.0.1:$PROM_PORT in $(ns coord) (ip netns exec $(ns coord) ...); Ctrl-C stops"
    wait
fi
say "done: the consortium's files are in $WORK"
