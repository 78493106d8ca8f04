#!/bin/sh
# Container entry point of foundry-local-py (Dockerfile, Dockerfile.cuda).
#
#   docker run IMAGE                     -> foundry-local serve
#   docker run IMAGE serve --parallel 8  -> foundry-local serve --parallel 8
#   docker run IMAGE --parallel 8        -> the same
#   docker run IMAGE foundry-local model list, or any other command -> run as given
#
# Inside a container the server listens on 0.0.0.0 (FOUNDRY_LOCAL_HOST), which the published
# port makes reachable from other machines. It starts only when that is protected: an API key
# (FOUNDRY_LOCAL_API_KEY, or FOUNDRY_LOCAL_API_KEY_FILE naming a file that holds it, e.g. a
# Docker or Kubernetes secret), or an explicit opt-out
# (FOUNDRY_LOCAL_ALLOW_UNAUTHENTICATED_REMOTE=true or --allow-unauthenticated-remote), for a
# server behind a gateway that authenticates. A loopback FOUNDRY_LOCAL_HOST needs neither.
set -eu

# FOUNDRY_LOCAL_EXEC: the server command (tests point it elsewhere).
server="${FOUNDRY_LOCAL_EXEC:-foundry-local}"

if [ "$#" -eq 0 ]; then
    set -- serve
elif [ "${1#-}" != "$1" ]; then
    set -- serve "$@"
fi
if [ "$1" != serve ]; then
    exec "$@"
fi
shift

if [ -n "${FOUNDRY_LOCAL_API_KEY_FILE:-}" ]; then
    if [ ! -r "$FOUNDRY_LOCAL_API_KEY_FILE" ]; then
        echo "foundry-local: FOUNDRY_LOCAL_API_KEY_FILE=$FOUNDRY_LOCAL_API_KEY_FILE cannot be read" >&2
        exit 64
    fi
    FOUNDRY_LOCAL_API_KEY="$(tr -d '\r\n' < "$FOUNDRY_LOCAL_API_KEY_FILE")"
    if [ -z "$FOUNDRY_LOCAL_API_KEY" ]; then
        echo "foundry-local: the API key file $FOUNDRY_LOCAL_API_KEY_FILE is empty" >&2
        exit 64
    fi
    export FOUNDRY_LOCAL_API_KEY
fi
unset FOUNDRY_LOCAL_API_KEY_FILE

export FOUNDRY_LOCAL_HOST="${FOUNDRY_LOCAL_HOST:-0.0.0.0}"

# The last --host / --api-key / opt-out on the command line wins over the environment.
host="$FOUNDRY_LOCAL_HOST"
key="${FOUNDRY_LOCAL_API_KEY:-}"
optout="${FOUNDRY_LOCAL_ALLOW_UNAUTHENTICATED_REMOTE:-false}"
prev=""
for arg in "$@"; do
    case "$prev" in
        --host) host="$arg" ;;
        --api-key) key="$arg" ;;
    esac
    case "$arg" in
        --host=*) host="${arg#--host=}" ;;
        --api-key=*) key="${arg#--api-key=}" ;;
        --allow-unauthenticated-remote) optout=true ;;
    esac
    prev="$arg"
done

case "$(printf '%s' "$optout" | tr '[:upper:]' '[:lower:]')" in
    1 | true | yes | on) optout=true ;;
    *) optout=false ;;
esac

case "$host" in
    127.* | localhost | ::1 | "[::1]") loopback=true ;;
    *) loopback=false ;;
esac

if [ "$loopback" = false ] && [ -z "$key" ] && [ "$optout" = false ]; then
    cat >&2 <<MSG
foundry-local: refusing to serve on $host without an API key.
  Set FOUNDRY_LOCAL_API_KEY (or FOUNDRY_LOCAL_API_KEY_FILE, a file holding it): clients then send
  'Authorization: Bearer <key>'. Or, behind a gateway that authenticates, opt out explicitly with
  FOUNDRY_LOCAL_ALLOW_UNAUTHENTICATED_REMOTE=true (or --allow-unauthenticated-remote).
MSG
    exit 64
fi
if [ "$optout" = true ]; then
    export FOUNDRY_LOCAL_ALLOW_UNAUTHENTICATED_REMOTE=true
fi

exec "$server" serve "$@"
