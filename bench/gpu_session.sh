#!/usr/bin/env bash
# One prepared GPU session (run on a lent CUDA machine, from the repository root): versions, then the seed's
# scenario end to end (bench/gpu_session.py: every stage of each seed recipe on cuda:0, eval, sweep, T4 emulation,
# the step beside HF Trainer + peft and Unsloth; ~10 minutes on one H100). With PARTS, also the GPU check
# (throughput, MFU, recipe memory), data-parallel and FSDP steps under accelerate, and tasktune's tests on CUDA.
# Everything printed goes to $OUT/gpu-session.log (or ./gpu-session.log); RESULTS.md entries to $OUT too.
# Optional: wheels in .whl (packages the machine lacks or has too old) and pure-Python packages in .gpusite.
set -uo pipefail
OUT=${OUT:-.}
PARTS=${PARTS:-"session"}  # add check, launch, tests for the older parts (each a few minutes)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/.gpusite:$PWD/src
cp bench/RESULTS.md /tmp/RESULTS.before.md
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
  if [[ $PARTS == *session* ]]; then echo "== gpu_session"; timeout 600 python3 bench/gpu_session.py --work /tmp/gpu-session; fi
  if [[ $PARTS == *check* ]]; then echo "== gpu_check"; timeout 240 python3 bench/gpu_check.py --steps 10; fi
  for cfg in ddp fsdp fsdp2; do
    [[ $PARTS == *launch* ]] || break
    echo "== accelerate launch ($cfg, 1 process)"
    timeout 90 python3 -m accelerate.commands.launch --config_file src/tasktune/recipes/accelerate/$cfg.yaml \
      --num_processes 1 bench/gpu_ddp_check.py --steps 10
  done
  [[ $PARTS == *tests* ]] || exit 0
  echo "== tests on CUDA"
  timeout 240 python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_train.py tests/test_infer.py tests/test_squad_e2e.py \
    tests/test_resume.py tests/test_cli.py 2>&1 | grep -v -E '^(Loading|score|generate| +[0-9]+%)' | tail -150
} 2>&1 | grep -v -E "FutureWarning|warnings.warn" | tee "$OUT/gpu-session.log"
diff /tmp/RESULTS.before.md bench/RESULTS.md | sed -n 's/^> //p' > "$OUT/RESULTS.gpu.md"
