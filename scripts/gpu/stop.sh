#!/usr/bin/env bash
# Stop the named detached jobs and everything they started (their process groups).
for n in "$@"; do
  for p in $(pgrep -f "/tmp/jobs/$n/" || true); do kill -TERM -- "-$(ps -o pgid= "$p" | tr -d ' ')" 2>/dev/null || true; done
  echo stopped > "/tmp/jobs/$n/rc"
done
