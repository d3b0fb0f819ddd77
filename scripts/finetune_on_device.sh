#!/bin/bash
# LoRA fine-tunes of SmolLM2-135M-Instruct on one lent GPU (the `device` tool runs this in the repo root
# with $OUT set). The base GGUF (94 MiB) is more than one call may carry beside the repository, so it
# travels in pieces made here with `split -n 3 -d -a 1 FILE .carry/gguf.part` (.carry/ is git-ignored),
# one per call, each call inside the machine's warm window; its sha256 is in .carry/gguf.sha256.
# .carry/smol holds the base's config and tokenizer (no weights) for the bench on random weights.
# Wheels in .whl (gguf: transformers needs it to read a GGUF; not in the GPU image) are installed first.
#   scripts/finetune_on_device.sh piece N                         keep piece N in /tmp/gguf
#   scripts/finetune_on_device.sh bench SECONDS name "kwargs" ...  the runs side by side on random weights
#                                                                 of the base's shape: step time, memory
#   scripts/finetune_on_device.sh train SECONDS name "kwargs" ...  join and check the GGUF (once), convert
#                                                                 it to float32, train the runs side by side;
#                                                                 a run whose folder holds trainer_state.pt
#                                                                 resumes where the last call stopped
# "kwargs" are FinetuneConfig keyword arguments. Each run comes back as $OUT/<name>.tgz.aa, .ab, … (cat them:
# adapter, finetune.json, train_log.jsonl, device.log).
set -u
mode=$1; shift
mkdir -p /tmp/pkg/localist /tmp/gguf /tmp/runs
for d in model server clients; do ln -sfn "$PWD/$d" /tmp/pkg/localist/$d; done
export PYTHONPATH=/tmp/pkg PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/pkg:/tmp/site || exit 1
fi
GGUF=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf

launch() {  # limit base name kwargs: one run in the background
  python3 -c "from localist.model.finetune import Finetuner; from localist.model.train_config import FinetuneConfig
import torch; f = Finetuner(FinetuneConfig(out='/tmp/runs/$3', base='$2', device='cuda', progress=False, num_workers=5,
bf16=True, time_limit_s=$1, $4)); f.run(); print('steps', f.step, 'peak GiB', round(torch.cuda.max_memory_allocated() / 2**30, 1))" \
    >> "/tmp/$3.log" 2>&1 &
}

collect() {  # name: its log and adapter into $OUT
  python3 -c "import json
for l in open('/tmp/runs/$1/train_log.jsonl'):
    r = json.loads(l)
    if 'validation' in r or r['step'] % 100 == 0:
        print('$1', r['step'], r.get('elapsed_s'), *(f'{k}={r[k]:.3f}' for k in ('answer_nll', 'pointing_nll', 'penalty', 'off_target') if k in r), json.dumps(r.get('validation', '')))"
  tail -3 "/tmp/$1.log"
  cp "/tmp/$1.log" "/tmp/runs/$1/device.log"
  tar czf - -C /tmp/runs --exclude=trainer_state.pt "$1" | split -b 15M - "$OUT/$1.tgz."  # 16 MiB a file comes back
}

run_all() {  # limit base name kwargs ...: the runs side by side, then their logs and adapters
  limit=$1 base=$2; shift 2
  names=()
  while [ $# -ge 2 ]; do names+=("$1"); launch "$limit" "$base" "$1" "$2"; shift 2; done
  wait
  nvidia-smi --query-gpu=memory.used --format=csv
  for name in "${names[@]}"; do collect "$name"; done
}

case $mode in
piece)
  cp ".carry/gguf.part$1" /tmp/gguf/ && ls -la /tmp/gguf
  ;;
bench)
  nvidia-smi -L
  python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0); c = AutoConfig.from_pretrained('.carry/smol')
AutoModelForCausalLM.from_config(c, dtype=torch.float32).save_pretrained('/tmp/randbase')
AutoTokenizer.from_pretrained('.carry/smol').save_pretrained('/tmp/randbase')" || exit 1
  limit=$1; shift
  run_all "$limit" /tmp/randbase "$@"
  rm -rf /tmp/runs/*
  ;;
train)
  if [ ! -f "$GGUF" ]; then
    cp .carry/gguf.part2 /tmp/gguf/ && cat /tmp/gguf/gguf.part0 /tmp/gguf/gguf.part1 /tmp/gguf/gguf.part2 > "$GGUF" || exit 1
    [ "$(sha256sum "$GGUF" | cut -d' ' -f1)" = "$(cat .carry/gguf.sha256)" ] && echo "GGUF sha256 ok" || { echo "GGUF sha256 MISMATCH"; rm "$GGUF"; exit 1; }
    python3 -c "from localist.model.gguf_import import import_gguf; import_gguf('$GGUF', '/tmp/base', 'float32')" 2>&1 | tail -1
  fi
  limit=$1; shift
  run_all "$limit" /tmp/base "$@"
  ;;
esac
ls -la "$OUT"
