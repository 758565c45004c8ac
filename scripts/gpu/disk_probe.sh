#!/usr/bin/env bash
# Is a fresh host's cold start partly a disk read? A cold flow's first CUDA-graph capture spends seconds that
# write no compile-cache file (benchmarks/results/*kernels-cold*), and a warm flow does not: the page cache
# holding the CUDA libraries would explain it. Run first on a fresh host, staged stack or not:
#   mkdir -p $OUT; bash scripts/gpu/disk_probe.sh | tee $OUT/disk_probe.log
# It times reading torch's and the nvidia packages' large libraries cold, warm, and cold again after the page
# cache is dropped, and a fresh process's torch import, CUDA start and first bf16 matmul at each point.
set -u
SP=$(python -c "import site,sys; print([p for p in sys.path if p.endswith('site-packages')][0])" 2>/dev/null)
echo "site-packages: $SP"; df -h / /tmp "$SP" | sed 's/^/df /'
mount | grep -E " / | /opt| /tmp" | head
libs=$(find "$SP/nvidia" "$SP/torch/lib" -name "*.so*" -size +20M 2>/dev/null)
echo "big libs: $(echo "$libs" | wc -l), $(du -cb $libs | tail -1)"
du -b $libs | sort -rn | head -12
read_all() { local t0=$EPOCHREALTIME; cat $libs > /dev/null; awk -v a=$t0 -v b=$EPOCHREALTIME -v n="$1" "BEGIN{printf \"read %s: %.2f s\\n\", n, b-a}"; }
mm() { python - <<'PY'
import time; t0=time.perf_counter()
import torch; t1=time.perf_counter()
a=torch.randn(256,256,device="cuda",dtype=torch.bfloat16); torch.cuda.synchronize(); t2=time.perf_counter()
(a@a).sum().item(); torch.cuda.synchronize(); t3=time.perf_counter()
print(f"import torch {t1-t0:.2f} s, cuda init {t2-t1:.2f} s, first bf16 matmul {t3-t2:.2f} s")
PY
}
echo "== fresh host"; mm; read_all "after one process (cold part)"
read_all warm; mm
sync; echo 3 > /proc/sys/vm/drop_caches && echo "page cache dropped"
echo "== after drop"; read_all cold; mm
sync; echo 3 > /proc/sys/vm/drop_caches; echo "== after drop, process first"; mm; mm
