"""Train the bundled example adapters on SmolLM2-135M-Instruct, one skill each, reproducibly on CPU.

Five small synthetic skills, generated here (no downloads): each adapter type learns one.

    add        LoRA   two-digit addition:            "Add: 23 + 45\\nAnswer: 68"
    reverse    LoHa   reverse a short list:          "Reverse: cat, dog, fish\\nAnswer: fish, dog, cat"
    translate  LoKr   a fixed toy vocabulary:        "Translate: red cat\\nAnswer: zor miku"
    sentiment  IA³    label a short review:          "Review: a dull, slow film\\nAnswer: negative"
    sort       LoRA   sort digits:                   "Sort: 5 2 9\\nAnswer: 2 5 9"

Run from the repository root:  .venv/bin/python examples/train.py   (a few minutes on 2 cores)
It writes examples/adapters/<skill>/ (PEFT folders) and examples/data/<skill>.jsonl (held-out texts),
and prints each skill's held-out loss before and after training.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORDS = ["cat", "dog", "fish", "bird", "tree", "sun", "moon", "star", "book", "rain", "milk", "road"]
VOCAB = {"red": "zor", "blue": "vel", "green": "tup", "big": "rako", "small": "mi",
         "cat": "miku", "dog": "baro", "house": "tenu", "car": "fisa", "bird": "olo"}  # fmt: skip
GOOD = ["wonderful", "funny", "moving", "brilliant", "charming", "gripping", "lovely", "clever"]
BAD = ["dull", "slow", "boring", "awful", "clumsy", "tedious", "weak", "messy"]
THINGS = ["film", "book", "show", "album", "play", "game"]


def example(skill: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) pair of a skill."""
    if skill == "add":
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        return f"Add: {a} + {b}\nAnswer:", f" {a + b}"
    if skill == "reverse":
        items = rng.sample(WORDS, rng.randint(3, 4))
        return f"Reverse: {', '.join(items)}\nAnswer:", f" {', '.join(reversed(items))}"
    if skill == "translate":
        adj = rng.choice(["red", "blue", "green", "big", "small"])
        noun = rng.choice(["cat", "dog", "house", "car", "bird"])
        return f"Translate: {adj} {noun}\nAnswer:", f" {VOCAB[adj]} {VOCAB[noun]}"
    if skill == "sentiment":
        good = rng.random() < 0.5
        words = rng.sample(GOOD if good else BAD, 2)
        return (
            f"Review: a {words[0]}, {words[1]} {rng.choice(THINGS)}\nAnswer:",
            " positive" if good else " negative",
        )
    if skill == "sort":
        digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
        return f"Sort: {' '.join(map(str, digits))}\nAnswer:", f" {' '.join(map(str, sorted(digits)))}"
    raise KeyError(skill)


def adapter_config(skill: str):
    """The PEFT config of each skill's adapter: small ranks on a few modules, so the files stay small."""
    import peft

    if skill == "add":
        return peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if skill == "sort":
        return peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"], task_type="CAUSAL_LM")
    if skill == "reverse":
        return peft.LoHaConfig(r=4, alpha=8, target_modules=["v_proj", "o_proj"], task_type="CAUSAL_LM")
    if skill == "translate":
        return peft.LoKrConfig(r=4, alpha=8, target_modules=["k_proj", "v_proj"], task_type="CAUSAL_LM")
    if skill == "sentiment":
        modules = ["k_proj", "v_proj", "down_proj"]
        return peft.IA3Config(
            target_modules=modules, feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
        )
    raise KeyError(skill)


# skill → (learning rate, steps); IA³ learns by scaling only, so it gets a gentler rate and more steps
SKILLS = {
    "add": (2e-3, 50),
    "reverse": (3e-3, 50),
    "translate": (1e-2, 60),
    "sentiment": (8e-3, 100),
    "sort": (2e-3, 50),
}


@torch.no_grad()
def eval_loss(model, tok, pairs) -> float:
    """Mean per-token loss on the answers."""
    from merging.eval.data import answer_loss

    model.eval()
    return answer_loss(model, tok, pairs)


def train(skill: str, base_dir: Path, batch: int = 12) -> None:
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merging.eval.data import answer_batch

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    rng = random.Random(f"{skill}-train")
    held = random.Random(f"{skill}-eval")
    eval_pairs = [example(skill, held) for _ in range(32)]
    train_keys = {p for p, _ in eval_pairs}
    pm = peft.get_peft_model(model, adapter_config(skill))
    before = eval_loss(pm, tok, eval_pairs)
    lr, steps = SKILLS[skill]
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    started = time.perf_counter()
    for _ in range(steps):
        pairs = []
        while len(pairs) < batch:
            p = example(skill, rng)
            if p[0] not in train_keys:  # keep the held-out prompts unseen
                pairs.append(p)
        pm.train()
        loss = pm(**answer_batch(tok, pairs)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = eval_loss(pm, tok, eval_pairs)
    out = HERE / "adapters" / skill
    pm.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (HERE / "data").mkdir(exist_ok=True)
    with open(HERE / "data" / f"{skill}.jsonl", "w") as f:
        for prompt, answer in eval_pairs:
            f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
    took = time.perf_counter() - started
    kind = type(pm.peft_config["default"]).__name__
    print(f"{skill:10s} {kind:11s} held-out loss {before:.3f} -> {after:.3f}  ({steps} steps, {took:.0f} s)")


def main() -> None:
    sys.path.insert(0, str(HERE.parent))
    from merging.base.example_model import example_base_model

    torch.set_num_threads(2)
    base = example_base_model()
    only = sys.argv[1:] or list(SKILLS)
    for skill in only:
        train(skill, base)


if __name__ == "__main__":
    main()
