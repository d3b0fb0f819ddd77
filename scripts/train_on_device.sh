#!/bin/bash
# Trains several configurations side by side on one lent GPU (the `device` tool runs it in the repo root
# with $OUT set); each run is exported (from its last checkpoint if the time limit cut it) and comes back
# as $OUT/<name>.tgz with its log. The default model was trained this way (its card gives the settings).
# usage: scripts/train_on_device.sh SECONDS name "TrainConfig kwargs" [name "kwargs"] ...
set -u
LIMIT=$1; shift
mkdir -p /tmp/pkg/localist
for d in model server clients; do ln -sfn "$PWD/$d" /tmp/pkg/localist/$d; done
export PYTHONPATH=/tmp/pkg PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L
trainer() {  # name kwargs: the run's Trainer (it resumes from the folder's checkpoint when there is one)
  echo "from localist.model.train import Trainer; from localist.model.train_config import TrainConfig
t = Trainer(TrainConfig(out='/tmp/runs/$1', device='cuda', progress=False, $2))"
}
names=(); kws=()
while [ $# -ge 2 ]; do
  names+=("$1"); kws+=("$2")
  timeout "$LIMIT" python3 -c "$(trainer "$1" "$2"); t.run()" > "/tmp/$1.log" 2>&1 &
  shift 2
done
wait
for i in "${!names[@]}"; do
  name=${names[$i]}
  if [ ! -f "/tmp/runs/$name/model.safetensors" ]; then  # cut by the time limit: export the last checkpoint
    python3 -c "$(trainer "$name" "${kws[$i]}"); print('exported at step', t.step); t.export()" >> "/tmp/$name.log" 2>&1
  fi
  grep -h '"rho=0.0"' "/tmp/$name.log" | tail -20 | sed "s/^/$name /"
  tail -3 "/tmp/$name.log"
  tar czf "$OUT/$name.tgz" -C /tmp/runs --exclude checkpoint.pt --exclude 'checkpoint.pt.tmp' "$name"
  cp "/tmp/$name.log" "$OUT/$name.log"
done
