#!/usr/bin/env bash
# Start CMD detached on the GPU host so it outlives the device call (600 s at most) that starts it.
#   bash scripts/gpu/job.sh NAME "CMD"
# CMD runs in a private copy of the working tree (a later call replaces the tree it was sent in, which
# $CALL_ROOT names), with $JOB_OUT for its results; log, rc and results stay in /tmp/jobs/NAME for wait.sh.
set -euo pipefail
name=$1 cmd=$2 d=/tmp/jobs/$1 root=$PWD
[ ! -e "$d" ] || { echo "job $name exists already: $d" >&2; exit 2; }
mkdir -p "$d/out"
tar --exclude=./.stage --exclude=./.git -cf - . | (mkdir -p "$d/src" && cd "$d/src" && tar -xf -)
cd "$d/src"
JOB_OUT="$d/out" CALL_ROOT="$root" setsid nohup bash -c ". scripts/gpu/env.sh && { $cmd; }; echo \$? > $d/rc" > "$d/log" 2>&1 < /dev/null &
echo "job $name started (pid $!), log $d/log"
