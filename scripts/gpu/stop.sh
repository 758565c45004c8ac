#!/usr/bin/env bash
# Stop the named detached jobs and everything they started (their process groups), never the caller's
# own group: the device command that runs this names the job's folder too.
me=$(ps -o pgid= $$ | tr -d ' ')
for n in "$@"; do
  for p in $(pgrep -f "/tmp/jobs/$n/" || true); do
    g=$(ps -o pgid= "$p" | tr -d ' ')
    [ -n "$g" ] && [ "$g" != "$me" ] && kill -TERM -- "-$g" 2>/dev/null || true
  done
  echo stopped > "/tmp/jobs/$n/rc"
done
