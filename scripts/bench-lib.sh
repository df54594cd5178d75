# Helpers shared by the benchmark scripts (sourced, not run).
# shellcheck shell=bash

# CPU ticks (user + system, all threads, live and exited) of a process.
cpu_ticks() {
    local stat
    stat=$(<"/proc/$1/stat")
    stat=${stat##*) }            # drop "pid (comm) ", comm may hold spaces
    local fields
    read -r -a fields <<<"$stat"
    echo $((fields[11] + fields[12]))
}

# json FILE KEY or json FILE OBJECT.KEY: a number from bench's one-line JSON
# ("-" when absent or null).
json() {
    local file=$1 path=$2 text value
    text=$(<"$file")
    if [[ $path == *.* ]]; then
        text=$(grep -o "\"${path%%.*}\":{[^}]*}" <<<"$text" || true)
        path=${path#*.}
    fi
    value=$(grep -o "\"$path\":[-0-9.e+]*" <<<"$text" | head -n1 | cut -d: -f2 || true)
    echo "${value:--}"
}

# ratio A B: A/B with two decimals, "-" if either is missing or B is 0.
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN {
        if (a == "-" || b == "-" || b + 0 == 0) print "-"; else printf "%.2f", a / b }'
}

# whole N: N rounded to an integer ("-" stays "-").
whole() {
    awk -v a="$1" 'BEGIN { if (a == "-") print "-"; else printf "%.0f", a }'
}

# prerequisites: builds the release binary; installs beanstalkd and (when
# STRACE_JOBS > 0) strace if missing. Needs `log` from the calling script.
prerequisites() {
    # BIN_GIVEN: the script was handed a binary (BIN=...): no build.
    if [[ -z ${BIN_GIVEN:-} ]]; then
        log "building spool (release)"
        cargo build --release -p spool >&2
    fi

    if ! command -v beanstalkd >/dev/null; then
        log "installing beanstalkd"
        apt-get update >&2 && apt-get install -y beanstalkd >&2
    fi
    if ((STRACE_JOBS > 0)) && ! command -v strace >/dev/null; then
        log "installing strace (optional)"
        { apt-get install -y strace >&2 || { apt-get update >&2 && apt-get install -y strace >&2; }; } ||
            log "strace unavailable: syscalls per job will be skipped"
    fi
}
