#!/bin/bash
# LoRA fine-tunes of SmolLM2-135M-Instruct on one lent GPU (the `device` tool runs this in the repo root
# with $OUT set). The base GGUF (94 MiB) is more than one call may carry beside the repository, so it
# travels in pieces made here with `split -n 3 -d -a 1 FILE .carry/gguf.part` (.carry/ is git-ignored),
# one per call, each call inside the machine's warm window; its sha256 is in .carry/gguf.sha256, and the
# sha256 of the float32 weights converted here (.carry/weights_sha.py) in .carry/base_weights.sha256.
# Wheels in .whl (gguf: transformers needs it to read a GGUF; not in the GPU image) are installed first.
#   scripts/finetune_on_device.sh piece N                         keep piece N in /tmp/gguf
#   scripts/finetune_on_device.sh bench SECONDS "kwargs" ...      step times on random weights of the base's
#                                                                 shape (.carry/smol), one run per kwargs,
#                                                                 then PEFT loads the first adapter
#   scripts/finetune_on_device.sh train SECONDS name "kwargs" ...  join and check the GGUF, convert it to
#                                                                 float32, train the runs side by side
# "kwargs" are FinetuneConfig keyword arguments. Each run comes back as $OUT/<name>.tgz (adapter, finetune.json,
# train_log.jsonl, device.log).
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
import torch; f = Finetuner(FinetuneConfig(out='/tmp/runs/$3', base='$2', device='cuda', progress=False, num_workers=2,
time_limit_s=$1, $4)); f.run(); print('steps', f.step, 'peak GiB', round(torch.cuda.max_memory_allocated() / 2**30, 1))" \
    > "/tmp/$3.log" 2>&1 &
}

collect() {  # name: its log and adapter into $OUT
  grep -h '"validation"' "/tmp/runs/$1/train_log.jsonl" | python3 -c "import sys, json
for l in sys.stdin:
    r = json.loads(l); print('$1', r['step'], r.get('elapsed_s'), json.dumps(r['validation']))"
  tail -2 "/tmp/$1.log"
  cp "/tmp/$1.log" "/tmp/runs/$1/device.log"
  tar czf "$OUT/$1.tgz" -C /tmp/runs "$1"
}

peft_check() {  # base adapter: PEFT reads the adapter and merges it to what merge_adapter writes
  python3 -c "import torch; from peft import PeftModel; from transformers import AutoModelForCausalLM
from localist.model.finetune import merge_adapter
merged = AutoModelForCausalLM.from_pretrained(str(merge_adapter('$1', '$2', '/tmp/merged')))
peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('$1'), '$2').merge_and_unload()
ids = torch.randint(0, 49152, (1, 64)); a, b = merged(ids).logits, peft(ids).logits
print('PEFT loads the adapter; max |merged - PEFT| logits', float((a - b).abs().max()))" 2>&1 | tail -1
}

case $mode in
piece)
  cp ".carry/gguf.part$1" /tmp/gguf/ && ls -la /tmp/gguf
  python3 -c "import torch, transformers, peft, gguf; print(torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
  ;;
bench)
  LIMIT=$1; shift
  nvidia-smi -L
  python3 -c "import torch; from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0); c = AutoConfig.from_pretrained('.carry/smol')
AutoModelForCausalLM.from_config(c, dtype=torch.float32).save_pretrained('/tmp/randbase')
AutoTokenizer.from_pretrained('.carry/smol').save_pretrained('/tmp/randbase')" || exit 1
  names=()
  for kw in "$@"; do name=bench${#names[@]}; names+=("$name"); launch "$LIMIT" /tmp/randbase "$name" "$kw"; done
  wait
  for name in "${names[@]}"; do tail -3 "/tmp/runs/$name/train_log.jsonl" | cut -c1-400; tail -1 "/tmp/$name.log"; done
  peft_check /tmp/randbase /tmp/runs/bench0
  ;;
train)
  LIMIT=$1; shift
  cp .carry/gguf.part2 /tmp/gguf/ && cat /tmp/gguf/gguf.part0 /tmp/gguf/gguf.part1 /tmp/gguf/gguf.part2 > "$GGUF" || exit 1
  [ "$(sha256sum "$GGUF" | cut -d' ' -f1)" = "$(cat .carry/gguf.sha256)" ] && echo "GGUF sha256 ok" || { echo "GGUF sha256 MISMATCH"; exit 1; }
  python3 -c "from localist.model.gguf_import import import_gguf; import_gguf('$GGUF', '/tmp/base', 'float32')" 2>&1 | tail -2
  [ "$(python3 .carry/weights_sha.py /tmp/base/model.safetensors)" = "$(cat .carry/base_weights.sha256)" ] \
    && echo "float32 weights sha256 ok (same as this repository's conversion)" || echo "float32 weights sha256 DIFFER"
  names=()
  while [ $# -ge 2 ]; do names+=("$1"); launch "$LIMIT" /tmp/base "$1" "$2"; shift 2; done
  wait
  for name in "${names[@]}"; do collect "$name"; done
  peft_check /tmp/base "/tmp/runs/${names[0]}"
  ;;
esac
ls -la "$OUT"
