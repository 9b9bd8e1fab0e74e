"""Data of the worker-pool tests (no Ray import here: a subprocess of the tests uses it without Ray)."""

from __future__ import annotations

from pmet_lens.data import KnownFact

PROMPTS = [
    "The Eiffel Tower is located in the city of", "Danielle Darrieux speaks the language", "Toyota was founded in",
    "The capital of Italy is", "Apple was founded by Steve", "The mother tongue of Danielle Darrieux is",
    "Michael Jordan plays the sport of", "The Louvre is in", "Mount Everest is in the country of",
    "The official language of Brazil is", "Barack Obama was born in", "Honda is headquartered in",
]


def known_facts(model, n: int = 6) -> list[KnownFact]:
    """Facts for ``model`` of which some are known: the even ones' attribute is the model's greedy answer
    (known, unless that token does not start the attribute's tokenisation), the odd ones' a word it does
    not predict (unknown), so averaging skips and counts facts as on real data."""
    import torch

    from pmet_lens.core.tokens import decode_text, encode

    facts = []
    for i, prompt in enumerate(PROMPTS[:n]):
        with torch.inference_mode():
            greedy = int(model(torch.tensor([encode(model, prompt)]))[0, -1].argmax())
        attribute = decode_text(model, [greedy]).strip() if i % 2 == 0 else "zzzqx"
        if not attribute:
            attribute = "zzzqx"
        subject = " ".join(prompt.split()[1:3])
        facts.append(KnownFact(known_id=i, subject=subject, prompt=prompt, attribute=attribute,
                               template=prompt.replace(subject, "{}"), relation_id="P0"))
    return facts
