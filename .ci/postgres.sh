# A throwaway PostgreSQL server for the test suite. Sourced, not run:
#     . .ci/postgres.sh && start_postgres    # then KNOWLEDGER_TEST_POSTGRES_URL is set
# start_postgres installs Debian's `postgresql` package when no server binaries are found (as
# root: CI runs as root on a fresh Debian machine), initdb's a cluster in a new temporary folder,
# starts it listening on a unix socket in that folder only (no TCP: nothing else on the machine
# can reach it), creates the database knowledger_test and exports
#     KNOWLEDGER_TEST_POSTGRES_URL=postgresql+psycopg://postgres@/knowledger_test?host=<dir>&port=5432
# An EXIT trap stops the server and removes the folder. Started by root, the server runs as the
# `postgres` user (PostgreSQL refuses to run as root), else as the calling user. fsync is off: a
# test server holds nothing worth keeping.

_pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

_as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

stop_postgres() {
    if [ -n "${_KPG_DIR:-}" ]; then
        _as_pg "$_KPG_BIN/pg_ctl" -D "$_KPG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
        rm -rf "$_KPG_DIR"
        _KPG_DIR=
    fi
}

start_postgres() {
    local t0 user
    _KPG_BIN="$(_pg_bin)"
    if [ -z "$_KPG_BIN" ] || [ ! -x "$_KPG_BIN/initdb" ]; then
        if [ "$(id -u)" != 0 ]; then
            echo "postgres.sh: no PostgreSQL server in /usr/lib/postgresql/*/bin; install Debian's" \
                 "postgresql package (apt-get install postgresql)" >&2
            return 1
        fi
        t0=$(date +%s)
        # no system cluster: the package would initdb (and try to start) one we never use
        mkdir -p /etc/postgresql-common/createcluster.d
        echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/knowledger-ci.conf
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        echo "postgres.sh: installed postgresql in $(( $(date +%s) - t0 )) s" >&2
        _KPG_BIN="$(_pg_bin)"
    fi
    _KPG_DIR="$(mktemp -d /tmp/knowledger-pg.XXXXXX)"
    if [ "$(id -u)" = 0 ]; then user=postgres; chown postgres: "$_KPG_DIR"; else user="$(id -un)"; fi
    chmod 700 "$_KPG_DIR"
    trap stop_postgres EXIT
    _as_pg "$_KPG_BIN/initdb" -D "$_KPG_DIR/data" -U "$user" --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    _as_pg "$_KPG_BIN/pg_ctl" -D "$_KPG_DIR/data" -l "$_KPG_DIR/server.log" -w -t 60 \
        -o "-c listen_addresses='' -c unix_socket_directories='$_KPG_DIR' -c port=5432 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
        start >/dev/null
    _as_pg "$_KPG_BIN/createdb" -h "$_KPG_DIR" -p 5432 -U "$user" knowledger_test
    export KNOWLEDGER_TEST_POSTGRES_URL="postgresql+psycopg://$user@/knowledger_test?host=$_KPG_DIR&port=5432"
    echo "postgres.sh: PostgreSQL $("$_KPG_BIN/postgres" --version | awk '{print $3}') at" \
         "$KNOWLEDGER_TEST_POSTGRES_URL" >&2
}
