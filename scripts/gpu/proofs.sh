#!/usr/bin/env bash
# The GPU runs that prove the open claims, one at a time (runs sharing the GPU with another job starve
# each other's engines), each under a time limit so one hang cannot take the session. Run as a job:
#   bash scripts/gpu/job.sh proofs "bash scripts/gpu/proofs.sh [STEP...]"
# Steps (default: all, in this order): smol qwen tests plant cost; and issue 29's start-up: imports (a fresh
# process's imports, then the site's bytecode compiled as pip would), hidden (SGLang's model runner, which
# imports Megatron through its dumper in the scheduler's set-up, with and without Megatron importable, and the
# slowest parts), start (a cold flow with SGLang's own log of its start-up parts), warm (the same flow on the
# caches start filled), before (warm without SGLang's processes started ahead, the baseline of warm on the same
# host), kernels (what start's and warm's compile cache holds: time, size and path of each file, so the cold
# engine's first-use JIT can be split by kind), ahead (the GPU test of that hand-over), ipcwarm and osync (GPU
# tests of the weight-sync transports), profile (a cold flow under py-spy), profilewarm (a warm one) and
# profileone (one cold run of one iteration), attn (the GPU test of the attention module built ahead); off and
# offplain (the schedule's teeth: determinism off, seeds pinned, run B perturbed or not); base and basewarm
# (start's and warm's flows for the tree in .base-tree, the commit before a change), outside and clean (see
# `written`). Logs and records go to $JOB_OUT, and `steps` there gets one line per finished step: its name, exit
# status (124: its time ran out) and wall seconds. SET=KEY=VALUE adds one config override to the start, warm,
# base and basewarm flows.
set -u
export R=${JOB_OUT:?run it through scripts/gpu/job.sh}  # (exported: `written` runs in child shells)
E=train.on_policy=exact
step() {
  local name=$1 limit=$2 began=$SECONDS rc; shift 2
  echo "$(date -u +%T) $name: $*" >> "$R/steps.log"
  # --foreground: plain timeout puts the step in a process group of its own, and such a group was killed
  # (SIGKILL, exit 137) when the device call that started the job ended; the job's own group survives
  timeout --foreground "$limit" "$@" > "$R/$name.log" 2>&1; rc=$?
  # and its whole wall time, the process's start and imports included (a flow's own figure starts at its call)
  echo "$name $rc $((SECONDS - began))s" >> "$R/steps"
}
# every file written since this job began, outside its own records, the flows' ledgers, the staged stack's
# archive and the trees later device calls send: the first-use output a flow leaves behind (compile caches
# outside det-rl's, Prefect's database, bytecode); `outside` lists it by folder, with when it was written, and
# `clean` deletes it (and drops the page cache where it may), to start the next flow as a fresh host would
written() {
  find / \( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /tmp/jobs -o -path '/tmp/n-*' \
    -o -path /tmp/stage -o -path "${CALL_ROOT:-/tmp/jobs}" \) -prune -o -type f -newer "$R/gpu.txt" "$@"
}
# a py-spy recorder for each Ray actor process (ray::RolloutActor, ray::TrainerActor) that appears within SECS,
# to DIR/actor-PID.txt (`profile` below says why)
pyspy_actors() {
  local dir=$1 end=$((SECONDS + $2)) seen=" " pid
  while [ $SECONDS -lt $end ]; do
    for pid in $(pgrep -f '^ray::(RolloutActor|TrainerActor)'); do
      case "$seen" in *" $pid "*) ;; *) seen="$seen$pid "
        /tmp/pyspy/bin/py-spy record --pid "$pid" --idle --nonblocking --full-filenames --rate 25 --format raw \
          --output "$dir/actor-$pid.txt" > /dev/null 2>&1 & ;; esac
    done; sleep 0.5
  done
}
# the ledgers of a flow's runs, flat (wait.sh brings back files, not deep folders), finished or not
ledgers() { for f in "$2"/*/*/run_?/ledger.jsonl; do [ -f "$f" ] && cp "$f" "$R/$1-$(basename "$(dirname "$f")")-ledger.jsonl"; done; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/gpu.txt"
for s in "${@:-smol qwen tests plant cost}"; do for s in $s; do case $s in
  smol) step smol 480 python benchmarks/nightly_gpu.py --json "$R/h200-smollm2-exact-flow.json" --phases cold \
          --set $E --cache /tmp/c-smol --out /tmp/n-smol; ledgers smol /tmp/n-smol ;;
  qwen) step qwen 600 python benchmarks/nightly_gpu.py --profile gsm8k-qwen2.5-0.5b-smoke --phases cold \
          --json "$R/h200-qwen-exact-flow.json" --set $E --cache /tmp/c-qwen --out /tmp/n-qwen; ledgers qwen /tmp/n-qwen ;;
  tests) step tests 900 python -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -v \
          -k "scoring_under_run_b or exact_attention_backward or loop_twice" ;;
  cost) step cost 420 python benchmarks/onpolicy_diff.py --profile gsm8k-smollm2-135m --cost --repeats 2 \
          --cache /tmp/c-smol --json "$R/h200-smollm2-onpolicy-cost.json" ;;
  plant) DETRL_RUNS=/tmp/plant-runs step plant 450 python -m flows.detrl_flow --profile gsm8k-smollm2-135m \
          --set $E --plant 1:decoder.layers.0.mlp.linear_fc2.weight --cache /tmp/c-smol ;;
  hidden) step hidden 300 python benchmarks/import_time.py --json "$R/h200-imports-hidden.json" --without megatron \
          --top 25 sglang.srt.model_executor.model_runner sglang.srt.managers.scheduler ;;
  imports) step imports 300 python benchmarks/import_time.py --json "$R/h200-imports.json" --compile /tmp/site ;;
  start|warm|base|basewarm) P=cold; case $s in *warm) P=warm ;; esac
        t=.; case $s in base*) t=.base-tree ;; esac  # base: the tree of the commit before a change
        [ -d $t ] || { echo "$s: no $t (git archive BASE | tar -x -C .base-tree)" >&2; exit 2; }
        (cd $t && PYTHONPATH="$PWD:/tmp/site" step $s 540 python benchmarks/nightly_gpu.py \
          --json "$R/h200-startup-flow-$s.json" --phases $P --set rollout.sglang.log_level=info ${SET:+--set $SET} \
          --cache /tmp/c-start --out /tmp/n-$s); ledgers $s /tmp/n-$s ;;
  # per folder: bytes, files, the first and last write (epoch seconds: which phase of a flow's log wrote it)
  outside) o=$((${o:-0} + 1)); step outside$o 120 bash -c "$(declare -f written); written -printf '%s %T@ %p\\n' | awk '{split(\$3, p, \"/\");
          d = \"/\" p[2] \"/\" p[3] \"/\" p[4]; n[d]++; b[d] += \$1; t = int(\$2); if (!(d in lo) || t < lo[d]) lo[d] = t;
          if (t > hi[d]) hi[d] = t} END {for (d in n) print b[d], n[d], lo[d], hi[d], d}' | sort -rn" ;;
  clean) step clean 300 bash -c "$(declare -f written); written -print0 | xargs -0 -r rm -f; rm -rf /tmp/c-start; sync;
          echo 3 > /proc/sys/vm/drop_caches && echo 'page cache dropped' || echo 'page cache not dropped'" ;;
  before) step before 540 python benchmarks/nightly_gpu.py --json "$R/h200-startup-flow-before.json" --phases warm \
          --set rollout.sglang.log_level=info --set rollout.sglang.start_ahead=false --cache /tmp/c-start \
          --out /tmp/n-before; ledgers before /tmp/n-before ;;
  # a flow (or one run) under py-spy (its wheel carried in .gpu/): every process's stacks, sampled, idle included,
  # so the engine's imports, a cold engine's first CUDA-graph batch, its self-test and the driver's Ray start can
  # be split by what they ran; the splits are written in the step's folder too, should the samples be too large
  # to come back
  profile|profilewarm|profileone) pip install -q --no-deps --target /tmp/pyspy .gpu/py_spy-*.whl >/dev/null 2>&1
        P=cold; [ $s = profilewarm ] && P=warm  # profilewarm: on the caches profile filled
        # profileone: one run of one iteration, cold, outside the flow (what fits a small device budget)
        cmd=(python benchmarks/nightly_gpu.py --json "$R/h200-startup-flow-$s.json" --phases $P
             --set rollout.sglang.log_level=info --cache /tmp/c-prof --out /tmp/n-$s)
        [ $s = profileone ] && cmd=(python -m detrl run --profile gsm8k-smollm2-135m --set train.steps=1
             --set rollout.sglang.log_level=info --cache /tmp/c-prof1 --out /tmp/n-$s)
        # py-spy loses a Ray worker that its runtime env's set-up exec's into, as the actors' are (it keeps the
        # processes those start, SGLang's among them): each actor gets a recorder of its own once it has a name
        mkdir -p "$R/$s"; pyspy_actors "$R/$s" 480 & watcher=$!
        step $s 540 /tmp/pyspy/bin/py-spy record --subprocesses --idle --full-filenames --rate 25 --format raw \
          --output "$R/$s/pyspy.txt" -- "${cmd[@]}"; ledgers $s /tmp/n-$s
        kill $watcher 2>/dev/null; sleep 5; gzip -f "$R/$s/pyspy.txt" "$R/$s"/actor-*.txt; n=0
        # (py-spy names methods by qualified name: BaseRunner.warmup, Scheduler.event_loop_overlap, ...; and a
        # module's import by its `<module>` frame: what the scheduler's and the engine's imports spend. The
        # recorders write full file names: py-spy's short ones drop some modules' package path, SGLang's
        # scheduler recorded as plain `scheduler.py`, which the module splits here would not find)
        for u in "" run_scheduler_process capture_one_shape "\.warmup \(" "\.event_loop_" "^init .*ray/_private/worker" \
          "^<module> .*sglang/srt/managers/scheduler\.py" "^<module> .*sglang/srt/entrypoints/engine\.py"; do
          n=$((n + 1)); python benchmarks/stack_split.py "$R/$s/pyspy.txt.gz" --rate 25 --top 40 --under "$u" > "$R/$s/split-$n.txt"
        done
        for f in "$R/$s"/actor-*.txt.gz; do for u in "" "RolloutActor\.(prepare|setup|selftest) \(" \
          "^<module> .*sglang/srt/entrypoints/engine\.py"; do n=$((n + 1))
          python benchmarks/stack_split.py "$f" --rate 25 --top 40 --under "$u" > "$R/$s/split-$n.txt"; done; done ;;
  kernels) step kernels 60 bash -c "find /tmp/c-start/compile -type f -printf '%T@ %s %P\\n' | sort -n" ;;
  # the schedule's teeth: determinism off with the draws pinned (production kernels, batch-variant), run B
  # perturbed must diverge (off) and, under run A's schedule, may repeat itself (offplain); one iteration,
  # since the first rollout is where batch variance shows
  off|offplain) b=true; [ $s = offplain ] && b=false
        step $s 480 python -m detrl reproduce --profile gsm8k-smollm2-135m --set determinism.enabled=false \
          --set determinism.pin_seeds=true --set train.on_policy=approx --set verify.perturb_schedule=$b --set train.steps=1 \
          --cache /tmp/c-start --out /tmp/n-$s ;;
  attn) step attn 300 python -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -v -k "attention_module_built_ahead" ;;
  ahead) step ahead 300 python -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -v -k "started_ahead" ;;
  osync) step osync 300 python -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -v -k "object_store_payload" ;;
  ipcwarm) step ipcwarm 300 python -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -v -k ipc_transports_warm ;;
  *) echo "unknown step $s" >&2; exit 2 ;;
esac; done; done
