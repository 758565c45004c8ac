#!/usr/bin/env bash
# Wait up to SECS for the named jobs to end, then copy each one's log and small results to $OUT/NAME
# (whether or not it ended, so a device call that runs out of time still brings back what there is).
#   TAIL=40 bash scripts/gpu/wait.sh SECS NAME...
secs=$1; shift
end=$((SECONDS + secs))
while [ $SECONDS -lt $end ]; do
  left=0; for n in "$@"; do [ -f "/tmp/jobs/$n/rc" ] || left=1; done
  [ $left = 0 ] && break; sleep 5
done
for n in "$@"; do
  d=/tmp/jobs/$n; o="${OUT:-/tmp/out}/$n"; mkdir -p "$o"
  echo "=== $n: rc $(cat "$d/rc" 2>/dev/null || echo running)"
  tail -n "${TAIL:-40}" "$d/log"
  cp "$d/log" "$o/log"
  (cd "$d/out" && find . -type f -size -8M -print0 | xargs -0 -r cp --parents -t "$o")
done
