#!/usr/bin/env bash
# Makes sure PostgreSQL (127.0.0.1:5432, database `test`, trust auth for
# local connections) and RabbitMQ (127.0.0.1:5672, guest/guest) are
# reachable. Starts them when they are installed but down; installs them
# from Debian's packages when missing.
# Also makes test certificates and turns on TLS on both (PostgreSQL on 5432,
# RabbitMQ on 127.0.0.1:5671) for the TLS tests: see "TLS for the tests".
# Safe to run again: does nothing when both are already up.
set -euo pipefail

log() { echo "services: $*" >&2; }

# Root runs commands directly; anyone else goes through sudo.
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
as_postgres() { if [ "$(id -u)" = 0 ]; then su postgres -c "$*"; else sudo -u postgres sh -c "$*"; fi; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # name port seconds
    local deadline=$((SECONDS + $3))
    until port_open "$2"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "$1 did not open port $2 within $3 s"
            return 1
        fi
        sleep 0.5
    done
}

apt_install() {
    log "installing $* from Debian's packages"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_postgres() {
    if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
        apt_install postgresql postgresql-contrib
    fi
    # The Rust crates link libpq.
    if ! ldconfig -p | grep -q 'libpq\.so '; then
        apt_install libpq-dev
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -1)
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    # The tests connect as postgres over TCP without a password: allow that
    # for loopback only (this is a development and CI machine).
    if ! as_root grep -Eq '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
        log "allowing trust auth on 127.0.0.1 in $hba"
        as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
        if port_open 5432; then
            as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
        fi
    fi
    if ! port_open 5432; then
        log "starting PostgreSQL $version"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
    fi
    wait_port PostgreSQL 5432 60
    local deadline=$((SECONDS + 60))
    until pg_isready -q -h 127.0.0.1 -p 5432; do
        [ "$SECONDS" -lt "$deadline" ] || { log "PostgreSQL not ready within 60 s"; return 1; }
        sleep 0.5
    done
    if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1; then
        log "creating database test"
        psql -h 127.0.0.1 -U postgres -d postgres -qc 'CREATE DATABASE test'
    fi
}

ensure_rabbitmq() {
    if ! command -v rabbitmq-server >/dev/null; then
        apt_install rabbitmq-server
    fi
    if ! port_open 5672; then
        log "starting RabbitMQ"
        as_root rabbitmq-server -detached
    fi
    wait_port RabbitMQ 5672 120
    as_root rabbitmqctl -q await_startup --timeout 120 >/dev/null
}

# --- TLS for the tests -------------------------------------------------------
# The TLS tests need both servers to speak TLS with certificates from a CA the
# tests know. This makes a CA, a server certificate for the name `localhost`
# only (no IP address in it, so `verify-full` to 127.0.0.1 must fail), a
# client certificate from the same CA and one from another CA, under
# $TLS_DIR; turns on PostgreSQL's TLS with them and opens a RabbitMQ TLS
# listener on 127.0.0.1:5671. Test keys only: never use them for anything else.
TLS_DIR=${OUTBOX_TEST_TLS_DIR:-/etc/outbox-test-tls}

tls_files_fresh() {
    local f
    for f in ca.pem server.pem client.pem client.key other-ca.pem other-client.pem \
        other-client.key postgres/server.key rabbitmq/server.key; do
        [ -s "$TLS_DIR/$f" ] || return 1
    done
    # Renew a day before anything expires.
    openssl x509 -checkend 86400 -noout -in "$TLS_DIR/server.pem" >/dev/null &&
        openssl x509 -checkend 86400 -noout -in "$TLS_DIR/client.pem" >/dev/null
}

make_ca() { # name subject
    openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=$2" \
        -keyout "$1.key" -out "$1.pem" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        2>/dev/null
}

sign() { # name ca subject extfile
    openssl req -new -newkey rsa:2048 -nodes -subj "/CN=$3" -keyout "$1.key" -out "$1.csr" 2>/dev/null
    openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial \
        -days 365 -extfile "$4" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr"
}

ensure_tls_files() {
    if tls_files_fresh; then return 0; fi
    log "making test certificates in $TLS_DIR"
    as_root mkdir -p "$TLS_DIR"
    local work
    work=$(mktemp -d)
    (
        cd "$work"
        make_ca ca "outbox test CA"
        make_ca other-ca "another CA"
        printf '%s\n' 'basicConstraints=CA:FALSE' 'keyUsage=critical,digitalSignature,keyEncipherment' \
            'extendedKeyUsage=serverAuth' 'subjectAltName=DNS:localhost' >server.ext
        printf '%s\n' 'basicConstraints=CA:FALSE' 'keyUsage=critical,digitalSignature,keyEncipherment' \
            'extendedKeyUsage=clientAuth' >client.ext
        sign server ca localhost server.ext
        sign client ca outbox-test-client client.ext
        sign other-client other-ca outbox-test-client client.ext
    )
    as_root cp "$work"/{ca,other-ca,server,client,other-client}.pem "$work"/{client,other-client}.key "$TLS_DIR/"
    # libpq refuses a key others can read (0640 is its limit for root's).
    as_root chmod 0644 "$TLS_DIR"/*.pem
    as_root chmod 0640 "$TLS_DIR"/*.key
    # Each server reads its key as its own user and PostgreSQL refuses a key
    # others can read.
    as_root mkdir -p "$TLS_DIR/postgres" "$TLS_DIR/rabbitmq"
    as_root install -m 0600 -o postgres -g postgres "$work/server.key" "$TLS_DIR/postgres/server.key"
    if id rabbitmq >/dev/null 2>&1; then
        as_root install -m 0600 -o rabbitmq -g rabbitmq "$work/server.key" "$TLS_DIR/rabbitmq/server.key"
    else
        as_root install -m 0600 "$work/server.key" "$TLS_DIR/rabbitmq/server.key"
    fi
    rm -rf "$work"
    # New files: both servers must load them again.
    TLS_RENEWED=1
}

pg_tls_works() {
    psql "host=localhost port=5432 user=postgres dbname=test sslmode=verify-full sslrootcert=$TLS_DIR/ca.pem" \
        -tAc 'SELECT 1' >/dev/null 2>&1
}

ensure_postgres_tls() {
    if [ -z "${TLS_RENEWED:-}" ] && pg_tls_works; then return 0; fi
    log "turning on PostgreSQL's TLS with the test certificates"
    psql -h 127.0.0.1 -U postgres -d postgres -q \
        -c "ALTER SYSTEM SET ssl = on" \
        -c "ALTER SYSTEM SET ssl_cert_file = '$TLS_DIR/server.pem'" \
        -c "ALTER SYSTEM SET ssl_key_file = '$TLS_DIR/postgres/server.key'" \
        -c "ALTER SYSTEM SET ssl_ca_file = '$TLS_DIR/ca.pem'" \
        -c "SELECT pg_reload_conf()" >/dev/null
    local deadline=$((SECONDS + 30))
    until pg_tls_works; do
        [ "$SECONDS" -lt "$deadline" ] || { log "PostgreSQL does not accept TLS with $TLS_DIR/ca.pem"; return 1; }
        sleep 0.5
    done
}

ensure_rabbitmq_tls() {
    local conf=/etc/rabbitmq/rabbitmq.conf
    as_root mkdir -p /etc/rabbitmq
    as_root touch "$conf"
    if ! as_root grep -q '^listeners.ssl' "$conf"; then
        log "adding a TLS listener on 127.0.0.1:5671 to $conf"
        # Plain AMQP stays where the other tests expect it.
        as_root grep -q '^listeners.tcp' "$conf" ||
            echo 'listeners.tcp.local = 127.0.0.1:5672' | as_root tee -a "$conf" >/dev/null
        as_root tee -a "$conf" >/dev/null <<EOF
listeners.ssl.local = 127.0.0.1:5671
ssl_options.cacertfile = $TLS_DIR/ca.pem
ssl_options.certfile = $TLS_DIR/server.pem
ssl_options.keyfile = $TLS_DIR/rabbitmq/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
EOF
        TLS_RENEWED=1
    fi
    # A running broker reads its listeners at boot only.
    if port_open 5672 && { [ -n "${TLS_RENEWED:-}" ] || ! port_open 5671; }; then
        log "restarting RabbitMQ to load its TLS listener"
        as_root rabbitmqctl -q stop >/dev/null || true
        local deadline=$((SECONDS + 60))
        while port_open 5672; do
            [ "$SECONDS" -lt "$deadline" ] || { log "RabbitMQ did not stop within 60 s"; return 1; }
            sleep 0.5
        done
    fi
}

ensure_postgres
ensure_tls_files
ensure_postgres_tls
ensure_rabbitmq_tls
ensure_rabbitmq
wait_port 'RabbitMQ TLS' 5671 60
log "PostgreSQL on 127.0.0.1:5432 and RabbitMQ on 127.0.0.1:5672 (TLS on 5671) are up; test certificates in $TLS_DIR"
