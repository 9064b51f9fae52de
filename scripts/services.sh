#!/usr/bin/env bash
# Makes sure PostgreSQL (127.0.0.1:5432, database `test`, trust auth for
# local connections) and RabbitMQ (127.0.0.1:5672, guest/guest) are
# reachable. Starts them when they are installed but down; installs them
# from Debian's packages when missing.
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

ensure_postgres
ensure_rabbitmq
log "PostgreSQL on 127.0.0.1:5432 and RabbitMQ on 127.0.0.1:5672 are up"
