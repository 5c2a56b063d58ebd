#!/usr/bin/env bash
# Train Memory3 on a Cloud TPU pod slice with m3jax (documentation as a script: read it, set the
# variables, run the steps you need; nothing here runs in the test suite).
#
# Every host of a TPU pod slice runs the SAME command (`gcloud ... ssh --worker=all`):
# `m3jax train` calls jax.distributed.initialize() (M3JAX_DISTRIBUTED=1: on a TPU VM the hosts
# are found through the metadata server); host 0 prepares the data, the tokenizer and (stage 2)
# the reference pairs while the others wait; each host reads its own 1/num_hosts share of every
# global batch, all hosts write the Orbax checkpoints together, and the final params land in
# RUN/model.
#
# Storage: one GCS bucket, mounted with gcsfuse at the same path on every host, holds the
# corpus, the prepared dataset (TFDS array_record + token cache + pairs) and the run directories
# (tokenizer, checkpoints, model). The mount is needed for --out because the training loop writes
# through the local filesystem.
#
# Before a pod run, check on any CPU machine that the step compiles and fits the chips:
#   pip install -e '.[tpu]'        # libtpu 0.0.42.* for jax 0.10.2
#   python experiments/aot_compile.py --config v6e-256 --out aot_v6e.json
# and read the per-chip memory and the largest batch that fits (see README, "Training on a TPU pod").
set -euo pipefail

# ------------------------------------------------------------------ what to create
PROJECT=${PROJECT:-my-gcp-project}
ZONE=${ZONE:-us-east5-b}                       # a zone with capacity for ACCELERATOR
TPU_NAME=${TPU_NAME:-m3jax-pod}
ACCELERATOR=${ACCELERATOR:-v6e-256}            # v6e:16x16, 64 hosts x 4 chips
RUNTIME=${RUNTIME:-v2-alpha-tpuv6e}            # TPU VM image (v5e: v2-alpha-tpuv5-lite; v4: tpu-ubuntu2204-base)
BUCKET=${BUCKET:-my-m3jax-bucket}              # gs://$BUCKET, in the same region
MOUNT=${MOUNT:-/mnt/gcs}
REPO_URL=${REPO_URL:-https://example.com/m3jax.git}   # where your copy of m3jax lives

# ------------------------------------------------------------------ what to train
# memory3-2b, 2048-token sequences, continual stage, as the model is today (aot_compile.py,
# libtpu 0.0.42.1): v6e-256 fits a global batch of 32 (30.2 of 32 GiB per chip); v5e-256 fits
# none (16 GiB chips); v4-128 fits 8, but only on a mesh built with allow_split_physical_axes
# (tensor=8 on the 4x4x4 torus), which `sharding.make_mesh` does not do yet.
PRESET=${PRESET:-memory3-2b}
MESH=${MESH:-1,32,8}             # data,fsdp,tensor: tensor = 8 KV heads, fsdp over the rest (see pod_configs.py)
GLOBAL_BATCH=${GLOBAL_BATCH:-32} # sequences per step, all hosts; the largest that fits (aot_compile.py)
SEQ_LEN=${SEQ_LEN:-2048}
WARMUP_STEPS=${WARMUP_STEPS:-10000}
CONTINUAL_STEPS=${CONTINUAL_STEPS:-5000}

gc() { gcloud compute tpus tpu-vm "$@" --project "$PROJECT" --zone "$ZONE"; }
on_all() { gc ssh "$TPU_NAME" --worker=all --command "$1"; }

step_create() {
  gc create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
  # (add --spot or --reserved as your quota requires; multi-slice: `gcloud compute tpus queued-resources
  #  create ... --node-count 2`, then the slices go on the data axis: MESH=2,32,8)
}

step_install() {
  on_all "sudo apt-get -y -qq install gcsfuse >/dev/null || true
          sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT
          mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT
          test -d m3jax || git clone -q $REPO_URL m3jax
          cd m3jax && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
}

# Data, tokenizer and reference pairs are prepared by the training command itself (host 0, once;
# cached in the bucket: a rerun or the next stage reuses them).

TRAIN="cd m3jax && M3JAX_DISTRIBUTED=1 .venv/bin/m3jax train --data-dir $MOUNT/tfds \
  --corpus $MOUNT/corpus.jsonl --batch-size $GLOBAL_BATCH --seq-len $SEQ_LEN --mesh $MESH \
  --train-set log_every=10 --train-set checkpoint_every=500 --no-progress"

step_warmup() {   # stage 1: LM pretraining without memory (a BPE tokenizer is trained on the corpus)
  on_all "$TRAIN --stage warmup --preset $PRESET --steps $WARMUP_STEPS --lr 3e-4 --out $MOUNT/runs/stage1 \
          > stage1.log 2>&1"
}

step_continual() {  # stage 2: with one reference per 64-token chunk of the corpus, encoded in the step
  on_all "$TRAIN --stage continual --model $MOUNT/runs/stage1 --steps $CONTINUAL_STEPS --lr 1e-4 \
          --out $MOUNT/runs/stage2 > stage2.log 2>&1"
}

step_logs() { gc ssh "$TPU_NAME" --worker=0 --command "tail -n 20 stage1.log stage2.log"; }

step_delete() { gc delete "$TPU_NAME" --quiet; }

# A killed run resumes from its latest checkpoint when the same command is run again (also on a
# slice of another shape: the checkpoint is restored onto the current mesh).

usage() { echo "usage: $0 create|install|warmup|continual|logs|delete"; }
case "${1:-}" in
  create) step_create ;;
  install) step_install ;;
  warmup) step_warmup ;;
  continual) step_continual ;;
  logs) step_logs ;;
  delete) step_delete ;;
  *) usage ;;
esac
