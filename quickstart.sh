#!/usr/bin/env bash
# The README's two commands, from a fresh clone:
#   bash quickstart.sh demo   install, make the demo phantom, train briefly, test, show where the outputs are
#   bash quickstart.sh test   install with the test tools, run the test suite
# Installs into ./.venv (or $VENV). On a CUDA machine, install the torch build for your driver into
# that venv first; requirements.txt pins a release that has a CPU wheel.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
job="${1:-}"
case "$job" in demo|test) ;; *) echo "usage: bash quickstart.sh demo|test" >&2; exit 2 ;; esac

if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
PY="$VENV/bin/python"
# visdom 0.2.4 is a source package whose setup.py needs pkg_resources, gone from setuptools 81:
# put an older setuptools in the venv and build there (no isolated build with the newest one).
"$PY" -m pip install -q "setuptools<81" wheel
install() { "$PY" -m pip install -q --no-build-isolation -r "$1"; }

if [ "$job" = test ]; then
  install requirements-dev.txt
  exec "$PY" -m pytest -q
fi

install requirements.txt
DATA=./datasets/ct_phases_dataset
NAME=ct_phase0_demo
# A small respiratory phantom: 8 training and 2 test patients, 128 x 128 x 32 voxels.
"$PY" datasets/make_phantom.py --output_dir "$DATA" --num_train 8 --num_test 2 --overwrite
# The reference's training flags, sized for a CPU (128-pixel slices, a U-Net for 128, 20
# epochs = 1,280 steps of 4 slices), with the recommended recipe --preset phase0 (residual
# generator, fixed HU window, one neighbouring slice on each side, lsgan, L1 x1000 inside the
# body; README "Choosing options"). With the neighbours the network takes 3 channels: the
# reference's --input_nc 1 stays right, it counts the CT's own channel.
"$PY" train.py --dataroot "$DATA" --name "$NAME" --model pix2pix --dataset_mode robust_nifti \
  --skip_corrupted --preprocess none --input_nc 1 --output_nc 1 --axial_slice --norm instance --preset phase0 \
  --netG unet_128 --ngf 32 --ndf 32 --batch_size 4 --lr 0.0002 --resize_to 128 \
  --display_freq 100 --save_epoch_freq 5 --n_epochs 15 --n_epochs_decay 5 --display_id 0 --overwrite
"$PY" test.py --dataroot "$DATA" --name "$NAME" --model pix2pix --dataset_mode robust_nifti \
  --preprocess none --input_nc 1 --output_nc 1 --axial_slice --epoch latest
"$PY" use_model.py --input_nifti "$DATA/testA/patient_1.nii.gz" --model_name "$NAME" --epoch latest --output_dir ./results
cat <<DONE

Demo finished. Outputs:
  checkpoints/$NAME/            latest_net_G.pth, latest_net_D.pth, <epoch>_net_*.pth, train_opt.txt/.json, web/index.html
  logs/train_log_*.txt          options, data summary, losses, epoch times
  results/$NAME/test_latest/    index.html (slices side by side), metrics.csv, metrics.json, volumes/
  results/patient_1_phase0.nii.gz   one volume made by use_model.py, on the input's grid
DONE
