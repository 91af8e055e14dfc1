#!/usr/bin/env bash
# Paper B's searches at the paper's sample size: hours of node pruning, run once, then checked on
# every run of the book (README, "Searched once, checked on every run").
#
#   bash scripts/paper_size.sh MODEL CHAPTER      e.g. bash scripts/paper_size.sh gemma3-270m b2
#
# Runs `python -m mechbook run --resume` with the plan's parameters for MODEL and CHAPTER (below)
# into searching/results/ (or $MECHBOOK_RESULTS). Every finished pruning and every decision of the
# one under way is checkpointed in searching/results/MODEL/_checkpoints/CHAPTER/; those files are
# the partial logs that are committed as they grow. Stopped anywhere (Ctrl-C, a lost machine),
# the same command takes up the checkpoints and ends with the logs of an uninterrupted run. When
# the chapter completes, its results in searching/results/MODEL/CHAPTER/ replace
# results/MODEL/CHAPTER/ and the chapter's defaults become the plan's parameters, so that every
# later run loads these searches and re-checks a sample of them.
# Threads: OMP_NUM_THREADS (default 2, this machine's cores); the searches' records note them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
model="${1:?usage: bash scripts/paper_size.sh MODEL CHAPTER}"
chapter="${2:?usage: bash scripts/paper_size.sh MODEL CHAPTER}"

# The plan: the paper prunes on 512 prompts per task (its run_node_ablation.py); five draws at that
# size give each component's inclusion frequency (stability selection, chapter b2).
# b7 (how many prompts a circuit needs) adds 64 and 128 prompts to its sizes, 3 seeds each, and moves each
# draw alone over the seeds at 64. `reads` are the chapters whose committed results the run reads.
case "$model:$chapter" in
  gemma3-270m:b2) params=(-p n_prompts=512 -p n_corrupted=512 -p "seeds=[0, 1, 2, 3, 4]"); reads=() ;;
  # SmolLM2-135M has 300 heads and MLPs to try (gemma3-270m 90), so a pruning costs about 3.3 times as much at one
  # size: 128 prompts is the largest at which its five draws fit in about 3.5 hours on 2 cores.
  smollm2-135m:b2) params=(-p n_prompts=128 -p n_corrupted=128 -p "seeds=[0, 1, 2, 3, 4]"); reads=() ;;
  gemma3-270m:b7) params=(-p "sizes=[8, 16, 32, 64, 128]" -p "seeds=[0, 1, 2]" -p apart_size=64); reads=(b2) ;;
  # After b2: b3 path patches every edge of b2's circuits on the first 128 of its prompts (on all 512 it would take
  # about 2.6 hours on 2 cores), and b4 scores every circuit and its random controls on all of b2's prompts. Both
  # read b2's results from this folder; they can run side by side, one thread each.
  gemma3-270m:b3) params=(-p n_prompts=128); reads=(b2) ;;
  gemma3-270m:b4) params=(); reads=(b2) ;;
  *) echo "no plan for $model $chapter; plans: gemma3-270m b2, b3, b4 and b7, smollm2-135m b2" >&2; exit 2 ;;
esac

export MECHBOOK_RESULTS="${MECHBOOK_RESULTS:-$PWD/searching/results}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
mkdir -p "$MECHBOOK_RESULTS/$model"
# The chapter's committed results (their searches are checked, not computed again) and those of the chapters
# it reads, where the searches' folder has none of its own yet.
for c in "$chapter" "${reads[@]}"; do
  for committed in results/"$model"/"$c"_*/; do
    [ -d "$committed" ] || continue
    here="$MECHBOOK_RESULTS/$model/$(basename "$committed")"
    [ -e "$here" ] || cp -r "$committed" "$here"
  done
done
"${PYTHON:-.venv/bin/python}" -m mechbook run --model "$model" --chapters "$chapter" --resume \
    --no-book-update --out searching/runs "${params[@]}"
