# Shared by the example scripts (sourced after setting HERE, the example's folder, from the repository root).

WORK="${WORK:-$HERE/work}"   # everything the run makes (git-ignored)
DATA="${DATA:-$HERE/data}"   # the bundled corpus
BIN="$WORK/bin"
CKPT="$WORK/checkpoints"

# Train with TRAIN_CMD (an array), or with TRAIN=0 reuse the checkpoint already in CKPT; print a digest of the training log.
train_or_reuse() {
    if [[ "$TRAIN" == 1 ]]; then
        rm -rf "$CKPT"
        echo "${TRAIN_CMD[*]}"
        "${TRAIN_CMD[@]}" > "$WORK/train.log" 2>&1 || { tail -30 "$WORK/train.log" >&2; exit 1; }
        grep -E "train_inner|valid on|done training" "$WORK/train.log" | sed 's/.*| INFO | //' \
            | sed -E 's/, (ppl|wps|ups|wpb|bsz|gnorm|train_wall|gb_free|clip|loss_scale|best_loss)=[^,]*//g'
    elif [[ ! -f "$CKPT/checkpoint_last.pt" ]]; then
        echo "run.sh: TRAIN=0 but there is no $CKPT/checkpoint_last.pt" >&2
        exit 1
    fi
}
