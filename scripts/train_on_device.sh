#!/bin/bash
# Trains several configurations side by side on one lent GPU (the `device` tool runs it in the repo root
# with $OUT set); each run is exported (from its last checkpoint if the time limit cut it) and comes back
# as $OUT/<name>.tgz with its log. The default model was trained this way (its card gives the settings).
#
# A run spans several calls: a folder .init/<name>/ (carried) seeds it, and with KEEP_CKPT=1 its
# checkpoint comes back as $OUT/<name>.ckpt.* (optimizer moments in bfloat16 so that it fits the
# transfer limits; AdamW casts them back on load) to be reassembled into .init/<name>/checkpoint.pt.
# A name "dst:src" starts run dst from .init/src (a branch: e.g. the μ = 0 twin shares the steps
# before μ ramps in, where the two runs are the same computation).
# usage: [KEEP_CKPT=1] scripts/train_on_device.sh SECONDS name[:src] "TrainConfig kwargs" ...
set -u
LIMIT=$1; shift
mkdir -p /tmp/pkg/localist /tmp/runs
for d in model server clients; do ln -sfn "$PWD/$d" /tmp/pkg/localist/$d; done
export PYTHONPATH=/tmp/pkg PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L
trainer() {  # name kwargs: the run's Trainer (it resumes from the folder's checkpoint when there is one)
  echo "from localist.model.train import Trainer; from localist.model.train_config import TrainConfig
t = Trainer(TrainConfig(out='/tmp/runs/$1', device='cuda', progress=False, $2))"
}
names=(); kws=()
while [ $# -ge 2 ]; do
  name=${1%%:*}; src=${1#*:}
  if [ -d ".init/$src" ]; then
    mkdir -p "/tmp/runs/$name" && cp -r ".init/$src/." "/tmp/runs/$name/"
    if ls "/tmp/runs/$name"/checkpoint.pt.part* >/dev/null 2>&1; then
      cat "/tmp/runs/$name"/checkpoint.pt.part* > "/tmp/runs/$name/checkpoint.pt" && rm "/tmp/runs/$name"/checkpoint.pt.part*
    fi
    rm -f "/tmp/runs/$name/model.safetensors"  # an export of an earlier call: this call exports anew
  fi
  names+=("$name"); kws+=("$2")
  timeout "$LIMIT" python3 -c "$(trainer "$name" "$2"); t.run()" > "/tmp/$name.log" 2>&1 &
  shift 2
done
wait
for i in "${!names[@]}"; do
  name=${names[$i]}; run=/tmp/runs/$name
  if [ ! -f "$run/model.safetensors" ]; then  # cut by the time limit: export the last checkpoint
    python3 -c "$(trainer "$name" "${kws[$i]}"); print('exported at step', t.step); t.export()" >> "/tmp/$name.log" 2>&1
  fi
  grep -h '"rho=0.0"' "/tmp/$name.log" | tail -20 | sed "s/^/$name /"
  tail -3 "/tmp/$name.log"
  cp "/tmp/$name.log" "$run/device.log"
  tar czf "$OUT/$name.tgz" -C /tmp/runs --exclude checkpoint.pt --exclude 'checkpoint.pt.tmp' "$name"
  if [ "${KEEP_CKPT:-0}" = 1 ] && [ -f "$run/checkpoint.pt" ]; then
    python3 - "$run/checkpoint.pt" <<'PY'
import sys, torch
path = sys.argv[1]
state = torch.load(path, map_location="cpu", weights_only=False)
for s in state["opt"]["state"].values():
    for k, v in s.items():
        if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0:
            s[k] = v.to(torch.bfloat16)
torch.save(state, path + ".transport")
PY
    split -b 15M "$run/checkpoint.pt.transport" "$OUT/$name.ckpt."
  fi
done
ls -la "$OUT"
