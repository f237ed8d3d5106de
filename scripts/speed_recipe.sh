# The speed round's cuts and healing recipe, sourced by scripts/speed_round.sh,
# scripts/heal_regen.sh and scripts/heal_scale_speed.sh so that every draft of a cut is cut and
# healed the same way whatever its --data: SPEED_PRUNE[<cut>] the layers removed, SPEED_R for
# every cut, then SPEED_CUT[<cut>] (later flags win: drop 1 trains two epochs, embedding frozen).
# shellcheck shell=bash disable=SC2034
SPEED_R="--full --n 384 --epochs 1 --batch-size 16 --micro-batch-size 8 --max-seq-len 384 \
--max-answer-tokens 192 --freeze-below-cut --eval-every 8 --eval-n 40 --eval-max-new-tokens 64"
declare -A SPEED_PRUNE=([keep12]="--keep 12 --start 3" [drop6]="--drop 6 --start 12"
                        [drop3]="--drop 3 --start 13" [drop1]="--drop 1")
declare -A SPEED_CUT=([keep12]="--lr 3e-4" [drop6]="--lr 1e-4" [drop3]="--lr 1e-4"
                      [drop1]="--lr 1e-4 --epochs 2 --freeze-embeddings")
