"""The check on published prompt values for b2's first 512-prompt unit: computing the values once, then checking with
them. Run from the repository root: OMP_NUM_THREADS=1 .venv/bin/python searching/material_cost_512.py"""
import json, time, warnings
warnings.filterwarnings("ignore")
import mechbook
from mechbook.book.searches import _node_circuit
from mechbook.papers.seqcont import task_circuits
from mechbook.core.pruning_checks import check_node_decisions, node_material
ck = str(__import__("pathlib").Path(__file__).resolve().parent / "results/gemma3-270m/_checkpoints/b2_node_pruning") + "/"
model = mechbook.load_model("gemma3-270m")
draw = json.load(open(ck + "draw numerals--512--0.unit.json"))
ts = task_circuits.task_sets_from_record(model, {"numerals": draw["record"]})["numerals"]
found = _node_circuit(json.load(open(ck + "numerals--512--0.unit.json")))
t0 = time.perf_counter()
material = node_material(model, ts.batch, ts.means, ts.metric, found.log, tokens=ts.tokens)
t1 = time.perf_counter()
table = check_node_decisions(model, ts.batch, ts.means, ts.metric, found, threshold=0.2, tokens=ts.tokens, material=material)
t2 = time.perf_counter()
print(f"material (once): {t1-t0:.1f} s, steps {material['steps']}; check with it: {t2-t1:.1f} s, "
      f"{table.attrs['prompts_checked']} of 512 prompts; statuses {table.status.value_counts().to_dict()}; "
      f"{len(json.dumps(material))} bytes of JSON")
print(table[["unit", "check", "logged", "recomputed", "status"]].to_string())
