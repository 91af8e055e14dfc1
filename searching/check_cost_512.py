"""What a CI run would spend on b2's first 512-prompt unit (numerals, seed 0): rebuilding and checking its draw, and
checking its pruning. Run from the repository root: OMP_NUM_THREADS=1 .venv/bin/python searching/check_cost_512.py"""
import json, time, warnings
warnings.filterwarnings("ignore")
import torch
import mechbook
from mechbook.book.searches import _node_circuit
from mechbook.papers.seqcont import task_circuits
from mechbook.core.pruning_checks import check_node_decisions
ck = __import__("pathlib").Path(__file__).resolve().parent / "results/gemma3-270m/_checkpoints/b2_node_pruning"
model = mechbook.load_model("gemma3-270m")
print("threads", torch.get_num_threads())
draw = json.load(open(ck / "draw numerals--512--0.unit.json"))
t0 = time.perf_counter()
ts = task_circuits.task_sets_from_record(model, {"numerals": draw["record"]})["numerals"]
t1 = time.perf_counter()
table = task_circuits.check_draw(model, ts, n_prompts=512, n_corrupted=512, seed=0)
t2 = time.perf_counter()
print(f"draw: computed in {draw['computed']['seconds']} s; rebuilt in {t1-t0:.1f} s, checked in {t2-t1:.1f} s",
      table.status.value_counts().to_dict(), "rescored", len(table) - 1, "of", table.attrs["candidates_decided"])
unit = json.load(open(ck / "numerals--512--0.unit.json"))
found = _node_circuit(unit)
t3 = time.perf_counter()
checks = check_node_decisions(model, ts.batch, ts.means, ts.metric, found, threshold=0.2, max_rows=64, tokens=ts.tokens)
t4 = time.perf_counter()
print(f"pruning: computed in {unit['computed']['seconds']} s ({unit['computed']['threads']} thread); checked in {t4-t3:.1f} s",
      checks.status.value_counts().to_dict(), checks.check.value_counts().to_dict())
