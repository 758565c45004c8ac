# Source on the GPU host after the staged stack is installed (see ../../docs or shared/gpu/README):
#   . scripts/gpu/env.sh
# install.sh keeps a copy of itself in /tmp/stage and returns at once when its stamp is there.
bash /tmp/stage/install.sh >/dev/null || { echo "the staged stack is not installed yet" >&2; return 3 2>/dev/null || exit 3; }
export PYTHONPATH="$PWD:/tmp/site" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1 DETRL_CACHE=/tmp/detrl-cache
