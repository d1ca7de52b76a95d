"""Locust users for the HTTP endpoint, run headless by benchmarks/bench_serve_load.py and by
tests/test_serve.py (a short run). Each user posts {"history": [...], "k": K} with a random
history of items the model knows, one request after the other (no wait: a closed loop); an
answer counts as a failure unless it is 200 with K items.

Environment: DIFFREC_LOAD_SPEC, the path of a JSON file {"items": [...], "max_history": L,
"k": K, "seed": S} (the item ids to draw from, the longest history to send, k, a seed).
"""

import itertools
import json
import os
import random

from locust import FastHttpUser, constant, task

with open(os.environ["DIFFREC_LOAD_SPEC"], encoding="utf-8") as handle:
    SPEC = json.load(handle)
_user_numbers = itertools.count()


class RecommendUser(FastHttpUser):
    wait_time = constant(0)

    def on_start(self):
        self.rng = random.Random(SPEC["seed"] * 1000 + next(_user_numbers))

    @task
    def recommend(self):
        length = self.rng.randint(1, SPEC["max_history"])
        history = [self.rng.choice(SPEC["items"]) for _ in range(length)]
        with self.client.post("/recommend", json={"history": history, "k": SPEC["k"]}, name="/recommend",
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
            elif len(response.json().get("items", [])) != SPEC["k"]:
                response.failure(f"expected {SPEC['k']} items: {response.text[:200]}")
