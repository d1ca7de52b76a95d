"""Validation NDCG@10 of a trained DiffRec under inference variants: S noise draws, and the slot
noise scaled by c (c = 0: the expected input, one deterministic pass)."""
import json, sys, time
import torch
from diffrec_ext.checkpoint import load_model
from diffrec_ext.data import load_dataset
from diffrec_ext.train import evaluate

torch.set_num_threads(2)
run = sys.argv[1]
model, config, items, meta = load_model(run, device="cpu")
dataset = load_dataset("../shared/data/ml-1m/ml-1m.txt.gz", k_core=5, item_k_core=0)
base = model.sqrt_one_minus_abar.clone()
rows = []
for c, S in [(1.0, 10), (1.0, 1), (1.0, 30), (0.5, 10), (0.0, 1)]:
    model.sqrt_one_minus_abar.copy_(base * c)
    t = time.perf_counter()
    m = evaluate(model, dataset, "valid", num_samples=S, seed=config.seed)
    rows.append({"noise_scale": c, "S": S, "NDCG@10": round(m["NDCG@10"], 4), "HR@10": round(m["HR@10"], 4),
                 "seconds": round(time.perf_counter() - t, 1)})
    print(rows[-1], flush=True)
model.sqrt_one_minus_abar.copy_(base)
json.dump(rows, open(run + "/inference_variants.json", "w"), indent=1)
