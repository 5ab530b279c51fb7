#!/usr/bin/env bash
# A local Orthanc PACS with its DICOMweb plugin, for the PACS tests and `make pacs`.
#
#   scripts/orthanc.sh start    start one (does nothing when it already runs); prints its address
#   scripts/orthanc.sh stop     stop it and delete its storage
#   scripts/orthanc.sh status   exit 0 when it answers, 1 otherwise
#
# It serves HTTP on 127.0.0.1:$RESMTNET_ORTHANC_PORT (default 18042, away from a system Orthanc
# on 8042); Orthanc refuses connections that are not from this machine (RemoteAccessAllowed
# false) and runs no DICOM (DIMSE) server. Storage, configuration, log and the credentials live
# in $RESMTNET_ORTHANC_DIR (default ${TMPDIR:-/tmp}/resmtnet-orthanc), which `stop` removes.
# HTTP Basic authentication is on, with a random password written to DIR/credentials
# (mode 600) in the form the plugin reads: "basic USER:PASSWORD". The address is in DIR/url.
# Needs the Debian packages orthanc and orthanc-dicomweb (.ci/run installs them).
set -euo pipefail

PORT=${RESMTNET_ORTHANC_PORT:-18042}
DIR=${RESMTNET_ORTHANC_DIR:-${TMPDIR:-/tmp}/resmtnet-orthanc}
PLUGIN=${RESMTNET_ORTHANC_PLUGIN:-/usr/share/orthanc/plugins/libOrthancDicomWeb.so}
URL="http://127.0.0.1:${PORT}/dicom-web"

say() { echo "orthanc.sh: $*"; }

alive() {  # the Orthanc this script started runs and answers with our credentials
  [ -f "$DIR/pid" ] && kill -0 "$(cat "$DIR/pid")" 2>/dev/null || return 1
  local cred
  cred=$(sed -n 's/^basic //p' "$DIR/credentials" 2>/dev/null) || return 1
  # the password goes to curl through a config on stdin, never on its command line
  printf 'user = "%s"\n' "$cred" | curl -fsS -m 5 -K - -o /dev/null "http://127.0.0.1:${PORT}/system" 2>/dev/null
}

start() {
  if alive; then
    say "already running at $URL (credentials in $DIR/credentials)"
    return 0
  fi
  command -v Orthanc >/dev/null || { say "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"; exit 1; }
  [ -f "$PLUGIN" ] || { say "the DICOMweb plugin $PLUGIN is missing (apt-get install orthanc-dicomweb)"; exit 1; }
  command -v curl >/dev/null || { say "curl is needed to check that Orthanc answers"; exit 1; }
  stop_quietly
  mkdir -p "$DIR/db"
  chmod 700 "$DIR"
  local password
  password=$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')
  (umask 077; printf 'basic resmtnet:%s\n' "$password" > "$DIR/credentials")
  (umask 077; cat > "$DIR/orthanc.json" <<EOF
{
  "Name": "resmtnet-local",
  "StorageDirectory": "$DIR/db",
  "IndexDirectory": "$DIR/db",
  "HttpPort": $PORT,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": true,
  "RegisteredUsers": { "resmtnet": "$password" },
  "DicomServerEnabled": false,
  "HttpCompressionEnabled": false,
  "StorageCompression": false,
  "Plugins": [ "$PLUGIN" ],
  "DicomWeb": { "Enable": true, "Root": "/dicom-web/", "EnableWado": false,
                "Host": "127.0.0.1:$PORT", "Ssl": false, "StudiesMetadata": "Full", "SeriesMetadata": "Full" }
}
EOF
  )
  printf '%s\n' "$URL" > "$DIR/url"
  Orthanc --logfile="$DIR/orthanc.log" "$DIR/orthanc.json" >/dev/null 2>&1 &
  echo $! > "$DIR/pid"
  for _ in $(seq 1 100); do
    if alive; then
      say "running at $URL (credentials in $DIR/credentials, log $DIR/orthanc.log)"
      return 0
    fi
    kill -0 "$(cat "$DIR/pid")" 2>/dev/null || break
    sleep 0.2
  done
  say "Orthanc did not start; the end of $DIR/orthanc.log:"
  tail -n 5 "$DIR/orthanc.log" 2>/dev/null | sed 's/^/    /' || true
  stop_quietly
  exit 1
}

stop_quietly() {
  if [ -f "$DIR/pid" ]; then
    local pid
    pid=$(cat "$DIR/pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
  fi
  # only a folder this script made (it holds our config) is removed
  if [ -f "$DIR/orthanc.json" ] || [ -f "$DIR/pid" ]; then rm -rf "$DIR"; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop_quietly; say "stopped" ;;
  status) if alive; then say "running at $URL"; else say "not running"; exit 1; fi ;;
  *) echo "usage: scripts/orthanc.sh start|stop|status" >&2; exit 2 ;;
esac
