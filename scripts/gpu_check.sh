#!/bin/bash
# The one-shot GPU check for one lent H200, in one run well under 8 minutes (python -m nextstep_jax.bench.gpu_check:
# 14B generation of one 512x512 image against the weight-streaming roofline and the paper's H100 figure, and the
# train-step MFU of a ~1.4B model), plus a check that the SLURM launcher's XLA_FLAGS parse in the machine's jax.
#
#   bash scripts/gpu_check.sh            # on the GPU machine; results in $OUT (or ./gpu_check_out)
#   bash scripts/gpu_check.sh --smoke    # tiny sizes, any machine (CI runs the smoke mode as a test)
#
# The GPU machine runs its own Python 3.12 image (jax with CUDA, flax, optax, orbax-checkpoint, tensorstore,
# tokenizers) without network and without ml-collections, so that one travels as a wheel in .whl/, with flax and
# optax in case the image's versions fall outside what requirements.txt admits (then the carried ones are used).
# Nothing on the check's path imports grain. Fetch the wheels once, from the repository root, on a machine with
# network (.whl/ is kept out of git by .git/info/exclude):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl ml-collections==1.1.0 flax==0.12.8 optax==0.2.8
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)

# The wheels the image lacks, or holds at versions requirements.txt does not admit.
if [ -d .whl ]; then
  wheels=$("$PY" - <<'EOF'
import glob, importlib.metadata as md, re
from packaging.requirements import Requirement
pins = {}
for line in open("requirements.txt"):
    line = line.split("#")[0].strip()
    if line and not line.startswith("-"):
        req = Requirement(line)
        pins[re.sub(r"[-_.]+", "-", req.name).lower()] = req.specifier
for wheel in sorted(glob.glob(".whl/*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.split("/")[-1].split("-")[0]).lower()
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have is None or (name in pins and not pins[name].contains(have, prereleases=True)):
        print(wheel)
EOF
)
  if [ -n "$wheels" ]; then
    echo "installing: $wheels" | tee "$OUT/wheels.txt"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
      || { echo "gpu_check: installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi

{
  date -u +%FT%TZ; uname -a; nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import sys, jax, flax, optax, ml_collections as mc; print(sys.version); print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'ml_collections', mc.__version__); print(jax.devices())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The SLURM launcher's XLA flags: an unknown one makes XLA abort at start-up.
flags=$("$PY" -c "import runpy; print(' '.join(runpy.run_path('launch/gpu_slurm.py')['XLA_FLAGS']))")
XLA_FLAGS="$flags" timeout 120 "$PY" -c "import jax, jax.numpy as jnp; print(jax.devices(), \
float(jax.jit(lambda a: (a @ a).sum())(jnp.ones((256, 256)))))" > "$OUT/xla_flags.txt" 2>&1
echo "rc=$? XLA_FLAGS=$flags" >> "$OUT/xla_flags.txt"
tail -n 1 "$OUT/xla_flags.txt"

# Everything after leaves 8 minutes minus what came before, less a margin; the JSON is rewritten after each part.
budget=$(( 450 - ($(date +%s) - start) ))
timeout "$budget" "$PY" -m nextstep_jax.bench.gpu_check "$@" --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check: rc=$rc after $(( $(date +%s) - start )) s; results in $OUT/gpu_check.json"
exit "$rc"
