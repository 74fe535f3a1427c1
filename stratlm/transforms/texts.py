"""Built-in text, so collapse and heal need no download: calibration paragraphs of varied
kinds, and a seeded generator of varied prompts for self-distillation."""

from __future__ import annotations

import random

from stratlm.core.errors import ConfigError

CALIBRATION_TEXTS = (
    "The river rose quickly after three days of rain. By the morning of the fourth day the lower streets of the town "
    "were under water, and the baker carried his bread to the church on the hill, where most of the families had gathered.",
    "To make a simple tomato sauce, warm two tablespoons of olive oil in a pan, add a chopped onion and cook it slowly "
    "until soft. Stir in crushed garlic, then a tin of tomatoes and a pinch of salt, and let it simmer for twenty minutes.",
    "Photosynthesis converts light energy into chemical energy. In the chloroplasts of plant cells, water and carbon "
    "dioxide are turned into glucose and oxygen, and the glucose is then used to build cellulose and store energy as starch.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])",
    "Dear Ms. Patel, thank you for your letter of 12 March. I am pleased to confirm that your order has been shipped and "
    "should arrive within five working days. Please do not hesitate to contact us if you have any further questions.",
    "The Treaty of Westphalia, signed in 1648, ended the Thirty Years' War and established the principle that each state "
    "has sovereignty over its own territory. Historians often describe it as the beginning of the modern system of states.",
    "If a train leaves the station at 9:15 and travels at 80 kilometres per hour, it covers 120 kilometres by 10:45. "
    "The average speed is the distance divided by the time, so 120 km over 1.5 hours is 80 km/h.",
    "User: What is the best way to learn a new language?\nAssistant: Practise a little every day, listen to native "
    "speakers, and try to hold simple conversations early, even if you make mistakes.",
    "The committee met on Tuesday to review the budget. After a long discussion, members agreed to reduce spending on "
    "travel by ten percent and to invest the savings in training for new staff.",
    "Stars form in clouds of gas and dust. As gravity pulls the material together, the core heats up until hydrogen "
    "begins to fuse into helium, releasing the energy that makes the star shine for billions of years.",
)

TOPICS = (
    "the ocean", "a small village", "computers", "friendship", "the moon", "cooking pasta", "a rainy day", "birds",
    "the history of paper", "learning to swim", "mountains", "a lost key", "electricity", "gardening", "trains",
    "a birthday party", "volcanoes", "music lessons", "the desert", "honey bees", "bicycles", "a city at night",
    "the human heart", "winter", "chess", "a library", "clouds", "robots", "the first day of school", "coffee",
)

TEMPLATES = (
    "Write a short story about {topic}.",
    "Explain {topic} to a child.",
    "Give three facts about {topic}.",
    "Describe {topic} in a few sentences.",
    "What is interesting about {topic}?",
    "Write a short poem about {topic}.",
    "List some questions people ask about {topic}, with answers.",
    "Write a diary entry about {topic}.",
)


HELDOUT_RESERVE = 32  # the last prompts of every seeded order: never used for training


def all_prompts(seed: int = 0) -> list[str]:
    """Every topic x template prompt, in a seeded order."""
    pairs = [(t, p) for t in TOPICS for p in TEMPLATES]
    random.Random(seed).shuffle(pairs)
    return [template.format(topic=topic) for topic, template in pairs]


def varied_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` distinct training prompts: the head of the seeded order (the held-out tail excluded)."""
    limit = len(TOPICS) * len(TEMPLATES) - HELDOUT_RESERVE
    if not 0 <= count <= limit:
        raise ConfigError(f"the built-in prompts give at most {limit} training texts, asked for {count}")
    return all_prompts(seed)[:count]


def heldout_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` prompts from the held-out tail of the same seeded order: disjoint from varied_prompts."""
    if not 0 < count <= HELDOUT_RESERVE:
        raise ConfigError(f"held-out prompts: between 1 and {HELDOUT_RESERVE}, asked for {count}")
    return all_prompts(seed)[-count:]
