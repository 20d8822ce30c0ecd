#!/usr/bin/env bash
# The FedSeek image's entrypoint: one image, four roles (compose.yaml runs a CA, a coordinator, two sites).
#
#   ca            the consortium CA: create it once, then sign the requests that appear in $INBOX and
#                 publish the answers (bundles, registered SuperNode keys, the signed app) to $OUTBOX;
#                 refresh the CRL before it lapses. `ca --once` signs what is waiting and exits.
#   enroll ROLE   make this party's key and request in $PKI/$NAME, hand the public files to $INBOX,
#                 wait for the CA's bundle in $OUTBOX and install it. Keys never leave $PKI.
#   coordinator   enroll, then run `fedseek coordinator start`.
#   site          enroll, then run `fedseek node start` (a tiny model and demo data where none is given).
#   anything else runs as a command (`fedseek ...`).
#
# Volumes: $PKI and the state are each party's own; $INBOX (requests) and $OUTBOX (answers) hold only
# public files, which is all that crosses between parties, as it would between hosts.
set -euo pipefail

FEDSEEK=${FEDSEEK:-fedseek}
NAME=${FEDSEEK_NAME:-$(hostname)}
PKI=${FEDSEEK_PKI:-/var/lib/fedseek/pki}
STATE=${FEDSEEK_STATE:-/var/lib/fedseek/state}
INBOX=${FEDSEEK_INBOX:-/srv/fedseek/requests}
OUTBOX=${FEDSEEK_OUTBOX:-/srv/fedseek/bundles}
CA_PKI=${FEDSEEK_CA_PKI:-/var/lib/fedseek/ca}
CA_PASSPHRASE_FILE=${FEDSEEK_CA_PASSPHRASE_FILE:-/run/secrets/ca-passphrase}
COORDINATOR=${FEDSEEK_COORDINATOR:-coordinator}
WAIT=${FEDSEEK_WAIT_SECONDS:-600}
POLL=${FEDSEEK_POLL_SECONDS:-2}

say() { echo "[entrypoint $NAME] $*" >&2; }

# Copy a file into place atomically (readers see the old or the new file) when it changed.
publish() {
  local src=$1 dest=$2
  cmp -s "$src" "$dest" 2>/dev/null && return 0
  mkdir -p "$(dirname "$dest")"
  cp "$src" "$dest.tmp.$$" && mv -f "$dest.tmp.$$" "$dest"
}

ca_sign_waiting() {
  local csr dir name role host proof site_key
  for csr in "$INBOX"/*/request.csr; do
    [ -f "$csr" ] || continue
    dir=$(dirname "$csr")
    name=$(basename "$dir")
    # The CA's policy, not the request, decides: the coordinator's name gets the coordinator role and
    # its service name; every other party is a site, under its own service name.
    if [ "$name" = "$COORDINATOR" ]; then role=coordinator; else role=node; fi
    host=$name
    proof=()
    [ -f "$dir/renewal.sig" ] && proof=(--proof "$dir/renewal.sig")
    site_key=()
    [ -f "$dir/supernode_auth.pub" ] && site_key=(--site-key "$dir/supernode_auth.pub")
    [ "$role" = node ] || site_key=()
    if "$FEDSEEK" ca sign "$csr" --pki "$CA_PKI" --role "$role" --host "$host" "${proof[@]}" "${site_key[@]}" \
      --passphrase-file "$CA_PASSPHRASE_FILE"; then
      for f in cert.pem ca.pem crl.pem publishers.json; do
        [ -f "$CA_PKI/$name/$f" ] && publish "$CA_PKI/$name/$f" "$OUTBOX/$name/$f"
      done
    else
      say "refused the request of '$name' (see above); it stays in $dir.refused"
      rm -rf "$dir.refused" && mv "$dir" "$dir.refused" && continue
    fi
    rm -rf "$dir"
  done
  # The CA's public records, which the coordinator decides who may join by: its certificate, index
  # (serials, expiry, revocation) and CRL, the registered SuperNode keys; and each party's new CRL.
  for f in ca.pem index.json crl.pem; do publish "$CA_PKI/ca/$f" "$OUTBOX/ca/$f"; done
  if [ -d "$CA_PKI/site-keys" ]; then
    for f in "$CA_PKI"/site-keys/*.pub; do [ -f "$f" ] && publish "$f" "$OUTBOX/site-keys/$(basename "$f")"; done
  fi
  for d in "$OUTBOX"/*/; do
    name=$(basename "$d")
    [ -f "$CA_PKI/$name/crl.pem" ] && publish "$CA_PKI/$name/crl.pem" "$OUTBOX/$name/crl.pem"
  done
  return 0
}

run_ca() {
  mkdir -p "$INBOX" "$OUTBOX"
  if [ ! -f "$CA_PKI/ca/ca.pem" ]; then
    say "creating the consortium CA in $CA_PKI"
    "$FEDSEEK" ca init --pki "$CA_PKI" --consortium "${FEDSEEK_CONSORTIUM:-fedseek}" \
      --passphrase-file "$CA_PASSPHRASE_FILE"
  fi
  if [ ! -f "$OUTBOX/app/.signed" ]; then  # the app the coordinator submits and the sites accept
    "$FEDSEEK" app sign --pki "$CA_PKI" --out "$OUTBOX/app.new" --passphrase-file "$CA_PASSPHRASE_FILE"
    rm -rf "$OUTBOX/app" && mv "$OUTBOX/app.new" "$OUTBOX/app" && touch "$OUTBOX/app/.signed"
  fi
  while true; do
    ca_sign_waiting
    "$FEDSEEK" ca crl --pki "$CA_PKI" --if-due 3 --passphrase-file "$CA_PASSPHRASE_FILE" >/dev/null
    [ "${1:-}" = --once ] && return 0
    sleep "$POLL"
  done
}

enroll() {
  local role=$1 start=$SECONDS
  if [ -f "$PKI/$NAME/cert.pem" ]; then
    return 0
  fi
  [ -f "$PKI/$NAME/request.csr" ] || "$FEDSEEK" node enroll --pki "$PKI" --name "$NAME" --host "$NAME"
  mkdir -p "$INBOX/.$NAME.new"
  cp "$PKI/$NAME/request.csr" "$PKI/$NAME/supernode_auth.pub" "$INBOX/.$NAME.new/"
  rm -rf "${INBOX:?}/$NAME" && mv "$INBOX/.$NAME.new" "$INBOX/$NAME"  # the CA sees a request whole or not at all
  say "request for a $role certificate handed to the CA; waiting for $OUTBOX/$NAME"
  until [ -f "$OUTBOX/$NAME/cert.pem" ] && "$FEDSEEK" node enroll --pki "$PKI" --name "$NAME" --accept "$OUTBOX/$NAME"; do
    [ -d "$INBOX/$NAME.refused" ] && { say "the CA refused the request"; return 1; }
    [ $((SECONDS - start)) -lt "$WAIT" ] || { say "no answer from the CA after ${WAIT}s"; return 1; }
    sleep "$POLL"
  done
}

# The CA re-signs the CRL; each party reads its own copy, so keep it current (the daemons re-read it).
sync_crl() {
  [ -f "$OUTBOX/$NAME/crl.pem" ] && publish "$OUTBOX/$NAME/crl.pem" "$PKI/$NAME/crl.pem"
  return 0
}

# The coordinator decides who may join from the CA's public records (coordinator/sites.py reads
# PKI/ca/ca.pem, PKI/ca/index.json, every party's PKI/<name>/cert.pem and PKI/site-keys/): mirror them
# from the CA's answers next to the coordinator's own directory, whose key stays its own.
sync_public_pki() {
  local d name f
  for f in ca.pem index.json crl.pem; do [ -f "$OUTBOX/ca/$f" ] && publish "$OUTBOX/ca/$f" "$PKI/ca/$f"; done
  for d in "$OUTBOX"/*/; do
    name=$(basename "$d")
    case "$name" in ca | app | site-keys | "$NAME") continue ;; esac
    for f in cert.pem ca.pem crl.pem; do [ -f "$d$f" ] && publish "$d$f" "$PKI/$name/$f"; done
  done
  if [ -d "$OUTBOX/site-keys" ]; then
    for f in "$OUTBOX"/site-keys/*.pub; do [ -f "$f" ] && publish "$f" "$PKI/site-keys/$(basename "$f")"; done
  fi
  sync_crl
}

follow() {
  while sleep "${FEDSEEK_SYNC_SECONDS:-30}"; do "$@"; done
}

run_coordinator() {
  enroll coordinator
  mkdir -p "$STATE"
  [ -d "$STATE/app" ] || cp -r "$OUTBOX/app" "$STATE/app"
  mkdir -p "$PKI/site-keys"
  sync_public_pki
  follow sync_public_pki &
  exec "$FEDSEEK" coordinator start --pki "$PKI" --state "$STATE" --fleet-host 0.0.0.0 \
    --fleet-port "${FEDSEEK_FLEET_PORT:-9443}"
}

run_site() {
  enroll node
  local model=${FEDSEEK_MODEL_DIR:-$STATE/model} data=${FEDSEEK_DATA_DIR:-$STATE/data}
  mkdir -p "$STATE"
  if [ ! -f "$model/config.json" ]; then
    say "no model in $model: writing the tiny demo model"
    "$FEDSEEK" model tiny --out "$model"
  fi
  if [ ! -f "$data/dataset.json" ]; then
    say "no data in $data: writing synthetic demo records"
    python -c "import sys; from pathlib import Path; from fedseek_examples.demo.data import write_site_dataset; \
write_site_dataset(Path(sys.argv[1]), site_index=int(sys.argv[2]), n_sites=int(sys.argv[3]))" \
      "$data" "${FEDSEEK_SITE_INDEX:-0}" "${FEDSEEK_SITES:-2}"
  fi
  python -c 'import json, sys; n, model, data, state, pki, coord, port = sys.argv[1:8]; json.dump({
    "name": n, "model_dir": model, "data_dir": data, "state_dir": state + "/node", "pki_dir": pki,
    "coordinator": coord + ":" + sys.argv[8], "coordinator_name": coord, "api_host": "0.0.0.0",
    "api_port": int(port)}, open(state + "/node.json", "w"), indent=2)' \
    "$NAME" "$model" "$data" "$STATE" "$PKI" "$COORDINATOR" "${FEDSEEK_API_PORT:-8443}" "${FEDSEEK_FLEET_PORT:-9443}"
  follow sync_crl &
  exec "$FEDSEEK" node start --config "$STATE/node.json"
}

case "${1:-}" in
  ca) shift; run_ca "$@" ;;
  enroll) enroll "${2:?enroll ROLE}" ;;
  sync) sync_public_pki ;;
  coordinator) run_coordinator ;;
  site) run_site ;;
  "") echo "usage: entrypoint.sh ca|enroll ROLE|coordinator|site|COMMAND..." >&2; exit 2 ;;
  *) exec "$@" ;;
esac
