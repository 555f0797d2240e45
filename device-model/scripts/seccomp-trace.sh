#!/usr/bin/env bash
# seccomp-trace.sh TRACE...: the syscalls crashmon-device made once sandboxed, from `strace -f
# -o TRACE` logs (see SECURITY.md, "Deriving the syscall list"). For each syscall seen after the
# process installed its seccomp filter: the count, and "NOT LISTED" if it is missing from
# sandbox::SYSCALLS. Then every call that failed with EPERM or EACCES (what the sandbox refused).
set -euo pipefail
[ "$#" -gt 0 ] || { echo "usage: $0 TRACE..." >&2; exit 2; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
listed="$(sed -n 's/.*("\([a-z0-9_]*\)", SYS_.*/\1/p' "$here/../src/sandbox.rs" | sort -u)"

after_filter() {
    for f in "$@"; do
        awk '/seccomp\(SECCOMP_SET_MODE_FILTER/ {on=1; next} on' "$f"
    done | sed -E 's/^[0-9]+ +//' | grep -v '^+++\|^---' || true
}

echo "syscalls after the filter (count, name):"
after_filter "$@" \
    | sed -E 's/^<\.\.\. ([a-z0-9_]+) resumed>.*/\1/; s/^([a-z0-9_]+)\(.*/\1/' \
    | grep -E '^[a-z0-9_]+$' | sort | uniq -c | sort -rn \
    | while read -r count name; do
        if grep -qx "$name" <<<"$listed"; then
            printf '%8d %s\n' "$count" "$name"
        else
            printf '%8d %s  NOT LISTED\n' "$count" "$name"
        fi
    done
echo "refused (EPERM, EACCES):"
after_filter "$@" | grep -E '= -1 (EPERM|EACCES)' | cut -c1-160 | sort | uniq -c || true
