"""Write the example preference dataset: capybara_style.jsonl (message lists) and plain.jsonl (the same pairs as
text rendered with the Zephyr template). Deterministic: rerunning reproduces the committed files.

    python examples/data/make_dataset.py
"""
from __future__ import annotations

import json
import os
import random

from orpo_megatron.data.chat_template import ZEPHYR, render

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
            ("Greece", "Athens"), ("Poland", "Warsaw"), ("Chile", "Santiago"), ("Cuba", "Havana"),
            ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Sweden", "Stockholm"),
            ("Russia", "Moscow"), ("China", "Beijing")]
UNITS = [("meters", "centimeters", 100), ("kilometers", "meters", 1000), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("days", "hours", 24), ("kilograms", "grams", 1000), ("weeks", "days", 7),
         ("liters", "milliliters", 1000)]
REQUESTS = ["help me with my homework", "explain how rain forms", "give me a tip for learning to code",
            "tell me a fun fact", "suggest a name for my cat", "recommend a good book", "help me plan my day",
            "explain what a noun is", "check my spelling", "tell me how to boil an egg", "help me write a poem",
            "explain why the sky is blue", "teach me a new word", "help me fix my bike", "suggest a healthy snack"]
POLITE_OPENINGS = ["Of course! I would be glad to {request}.", "Sure, happy to help you {request}.",
                   "Certainly! Let us {request} together."]
RUDE_REPLIES = ["No. Do it yourself.", "Why should I care? Go away.", "Ugh, that is boring. Ask someone else.",
                "Not my problem."]
FACTS = [("Is the Sun a star?", "Yes, the Sun is a star.", "No, the Sun is a planet."),
         ("Does water boil at one hundred degrees Celsius at sea level?", "Yes, water boils at one hundred degrees.",
          "No, water boils at ten degrees."),
         ("Do plants need sunlight to grow?", "Yes, plants need sunlight for photosynthesis.",
          "No, plants grow best in the dark."),
         ("Is an elephant larger than a mouse?", "Yes, an elephant is much larger.", "No, a mouse is larger."),
         ("Does the Earth orbit the Sun?", "Yes, the Earth orbits the Sun once a year.",
          "No, the Sun orbits the Earth."),
         ("Are there seven days in a week?", "Yes, a week has seven days.", "No, a week has ten days."),
         ("Is ice colder than boiling water?", "Yes, ice is much colder.", "No, ice is hotter."),
         ("Do fish live in water?", "Yes, fish live in water.", "No, fish live in trees."),
         ("Is Tokyo in Japan?", "Yes, Tokyo is the capital of Japan.", "No, Tokyo is in Brazil."),
         ("Does the Moon orbit the Earth?", "Yes, the Moon orbits the Earth.", "No, the Moon orbits Mars."),
         ("Is red a primary color?", "Yes, red is a primary color.", "No, red is not a color."),
         ("Do birds have feathers?", "Yes, birds have feathers.", "No, birds have scales."),
         ("Is a triangle a shape with three sides?", "Yes, a triangle has three sides.",
          "No, a triangle has five sides."),
         ("Is the ocean salty?", "Yes, ocean water is salty.", "No, the ocean is sweet."),
         ("Does a year have twelve months?", "Yes, a year has twelve months.", "No, a year has two months.")]
# Wrong answers come hedged, as unsure answers often are: a consistent cue a tiny model can learn quickly.
HEDGES = ["Hmm, I guess", "Maybe", "I am not sure, but"]
GREETINGS = ["Hello!", "Hi there.", "Good morning!"]
GREETING_REPLIES = ["Hello! How can I help you today?", "Hi! What would you like to know?"]


def number_words(rng: random.Random) -> tuple[int, int]:
    return rng.randint(1, 20), rng.randint(1, 20)


def arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = number_words(rng)
    op, sign, result = rng.choice([("plus", "+", a + b), ("times", "*", a * b), ("minus", "-", a - b)])
    wrong = result + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    question = rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {sign} {b}.", f"How much is {a} {op} {b}?"])
    return question, f"{a} {op} {b} is {result}.", f"{rng.choice(HEDGES)} {a} {op} {b} is {wrong}."


def capital(rng: random.Random) -> tuple[str, str, str]:
    (country, city), (_, wrong_city) = rng.sample(CAPITALS, 2)
    question = rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?"])
    return (question, f"The capital of {country} is {city}.",
            f"{rng.choice(HEDGES)} the capital of {country} is {wrong_city}.")


def conversion(rng: random.Random) -> tuple[str, str, str]:
    big, small, factor = rng.choice(UNITS)
    amount = rng.randint(2, 9)
    wrong = amount * factor // 10 if rng.random() < 0.5 else amount + factor
    return (f"How many {small} are in {amount} {big}?", f"{amount} {big} is {amount * factor} {small}.",
            f"{rng.choice(HEDGES)} {amount} {big} is {wrong} {small}.")


def politeness(rng: random.Random) -> tuple[str, str, str]:
    request = rng.choice(REQUESTS)
    question = rng.choice([f"Can you {request}?", f"Please {request}.", f"Could you {request}?"])
    return question, rng.choice(POLITE_OPENINGS).format(request=request), rng.choice(RUDE_REPLIES)


def fact(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(FACTS)


def make_pairs(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    makers = [(arithmetic, 105), (capital, 40), (conversion, 55), (politeness, 45), (fact, len(FACTS))]
    rows, seen = [], set()
    for maker, count in makers:
        made = 0
        while made < count:
            question, chosen, rejected = maker(rng)
            if chosen == rejected or question in seen:
                continue
            seen.add(question)
            rows.append(single_turn(question, chosen, rejected))
            made += 1
    made = 0
    while made < 40:  # multi-turn: a greeting exchange first, the preference is on the last answer
        question, chosen, rejected = rng.choice([arithmetic, capital, conversion, politeness, fact])(rng)
        key = ("multi", question)
        if chosen == rejected or key in seen:
            continue
        seen.add(key)
        history = [{"role": "user", "content": rng.choice(GREETINGS)},
                   {"role": "assistant", "content": rng.choice(GREETING_REPLIES)},
                   {"role": "user", "content": question}]
        rows.append({"prompt": history[0]["content"],
                     "chosen": history + [{"role": "assistant", "content": chosen}],
                     "rejected": history + [{"role": "assistant", "content": rejected}]})
        made += 1
    rng.shuffle(rows)
    return rows


def single_turn(question: str, chosen: str, rejected: str) -> dict:
    user = {"role": "user", "content": question}
    return {"prompt": question, "chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}]}


def plain(row: dict) -> dict:
    """The same pair as text: what TRL's maybe_apply_chat_template gives with the Zephyr template."""
    history = row["chosen"][:-1]
    prompt = render(ZEPHYR, history, SPECIAL_TOKENS, add_generation_prompt=True)
    texts = {}
    for name in ("chosen", "rejected"):
        full = render(ZEPHYR, history + row[name][-1:], SPECIAL_TOKENS)
        assert full.startswith(prompt)
        texts[name] = full[len(prompt):]
    return {"prompt": prompt, **texts}


def main() -> None:
    rows = make_pairs()
    with open(os.path.join(HERE, "capybara_style.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(os.path.join(HERE, "plain.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(plain(row)) + "\n" for row in rows)
    print(f"wrote {len(rows)} pairs to {HERE}/capybara_style.jsonl and plain.jsonl")


if __name__ == "__main__":
    main()
