"""``counterfact-sample``: 200 true facts in CounterFact's record format, built in (offline).

Countries (capital, official language, continent, currency), cities (country), products
(manufacturer) and people (occupation), each record with ROME's fields: a ``requested_rewrite``
(template, subject, relation, true target and a counterfactual one from the same relation),
two paraphrase prompts and one neighbourhood prompt. It stands in for CounterFact's 21,919
records where the hub cannot be reached; its facts are common knowledge, its prompts ours.
"""

from __future__ import annotations

import random

NAME = "counterfact-sample"

COUNTRIES = """France|Paris|French|Europe|euro
Germany|Berlin|German|Europe|euro
Italy|Rome|Italian|Europe|euro
Spain|Madrid|Spanish|Europe|euro
Portugal|Lisbon|Portuguese|Europe|euro
Japan|Tokyo|Japanese|Asia|yen
China|Beijing|Mandarin|Asia|renminbi
India|New Delhi|Hindi|Asia|rupee
Russia|Moscow|Russian|Europe|ruble
Brazil|Brasília|Portuguese|South America|real
Argentina|Buenos Aires|Spanish|South America|peso
Mexico|Mexico City|Spanish|North America|peso
Canada|Ottawa|English|North America|dollar
Australia|Canberra|English|Oceania|dollar
Egypt|Cairo|Arabic|Africa|pound
Kenya|Nairobi|Swahili|Africa|shilling
Nigeria|Abuja|English|Africa|naira
Sweden|Stockholm|Swedish|Europe|krona
Norway|Oslo|Norwegian|Europe|krone
Poland|Warsaw|Polish|Europe|złoty
Greece|Athens|Greek|Europe|euro
Turkey|Ankara|Turkish|Asia|lira
Iran|Tehran|Persian|Asia|rial
Thailand|Bangkok|Thai|Asia|baht
Vietnam|Hanoi|Vietnamese|Asia|đồng
South Korea|Seoul|Korean|Asia|won
Chile|Santiago|Spanish|South America|peso
Peru|Lima|Spanish|South America|sol
Hungary|Budapest|Hungarian|Europe|forint
Finland|Helsinki|Finnish|Europe|euro"""

CITIES = """Marseille|France
Lyon|France
Munich|Germany
Hamburg|Germany
Milan|Italy
Naples|Italy
Barcelona|Spain
Seville|Spain
Porto|Portugal
Osaka|Japan
Kyoto|Japan
Shanghai|China
Mumbai|India
Saint Petersburg|Russia
São Paulo|Brazil
Rio de Janeiro|Brazil
Córdoba|Argentina
Guadalajara|Mexico
Toronto|Canada
Vancouver|Canada
Sydney|Australia
Melbourne|Australia
Alexandria|Egypt
Mombasa|Kenya
Lagos|Nigeria
Gothenburg|Sweden
Bergen|Norway
Kraków|Poland
Istanbul|Turkey
Busan|South Korea"""

PRODUCTS = """Toyota Corolla|Toyota
Honda Civic|Honda
Ford Mustang|Ford
iPhone|Apple
MacBook|Apple
Galaxy S21|Samsung
PlayStation|Sony
Walkman|Sony
Xbox|Microsoft
Windows|Microsoft
ThinkPad|Lenovo
Boeing 747|Boeing
Airbus A320|Airbus
Volkswagen Golf|Volkswagen
Model S|Tesla
Pixel|Google
Kindle|Amazon
Game Boy|Nintendo
Chevrolet Corvette|Chevrolet
Porsche 911|Porsche"""

PEOPLE = """Albert Einstein|physicist
Isaac Newton|physicist
Marie Curie|chemist
Pablo Picasso|painter
Vincent van Gogh|painter
Claude Monet|painter
Frida Kahlo|painter
Wolfgang Amadeus Mozart|composer
Ludwig van Beethoven|composer
Johann Sebastian Bach|composer
Frédéric Chopin|composer
William Shakespeare|playwright
Jane Austen|novelist
Leo Tolstoy|novelist
Fyodor Dostoevsky|novelist
Ernest Hemingway|novelist
Charles Darwin|naturalist
Galileo Galilei|astronomer
Ada Lovelace|mathematician
Alan Turing|mathematician
Carl Friedrich Gauss|mathematician
Nikola Tesla|inventor
Miles Davis|trumpeter
Serena Williams|tennis player
Roger Federer|tennis player
Lionel Messi|footballer
Pelé|footballer
Usain Bolt|sprinter
Michael Jordan|basketball player
Sigmund Freud|neurologist"""

RELATIONS = {
    "P36": ("The capital of {} is", ["What is the capital of {}? It is",
                                     "Talking about {}, its capital city is"]),
    "P37": ("The official language of {} is", ["In {}, people officially speak",
                                               "The language of the government of {} is"]),
    "P30": ("{} is located in the continent of", ["Geographically, {} belongs to",
                                                   "On a map, {} lies in"]),
    "P38": ("The currency of {} is the", ["To pay for bread in {} you use the",
                                          "Prices in {} are given in the"]),
    "P17": ("{} is a city in the country of", ["The city of {} lies in",
                                              "If you visit {}, you are in"]),
    "P176": ("{} is produced by", ["The maker of the {} is", "{} was developed by"]),
    "P106": ("The profession of {} is", ["{} was famous as a", "By trade, {} was a"]),
}


def _table(text: str) -> list[list[str]]:
    return [line.split("|") for line in text.splitlines()]


def _facts() -> list[tuple[str, str, str]]:
    """(relation id, subject, true target), in a fixed shuffled order (so that the last
    records, a study's held-out shards, cover every relation)."""
    countries = _table(COUNTRIES)
    facts = [(rel, row[0], row[col]) for rel, col in (("P36", 1), ("P37", 2), ("P30", 3),
                                                      ("P38", 4)) for row in countries]
    facts += [("P17", s, t) for s, t in _table(CITIES)]
    facts += [("P176", s, t) for s, t in _table(PRODUCTS)]
    facts += [("P106", s, t) for s, t in _table(PEOPLE)]
    random.Random(0).shuffle(facts)
    return facts


def sample_records() -> list[dict]:
    """The 200 records, ``case_id`` 0…199."""
    facts = _facts()
    by_relation: dict[str, list[tuple[str, str]]] = {}
    for rel, subject, target in facts:
        by_relation.setdefault(rel, []).append((subject, target))
    records = []
    for case_id, (rel, subject, target) in enumerate(facts):
        template, paraphrases = RELATIONS[rel]
        peers = by_relation[rel]
        i = peers.index((subject, target))
        new = next(t for _, t in peers[i + 1:] + peers[:i] if t != target)
        neighbour = next(s for s, _ in peers[i + 1:] + peers[:i] if s != subject)
        records.append({
            "case_id": case_id,
            "requested_rewrite": {"prompt": template, "subject": subject, "relation_id": rel,
                                  "target_true": {"str": target, "id": None},
                                  "target_new": {"str": new, "id": None}},
            "paraphrase_prompts": [p.format(subject) for p in paraphrases],
            "neighborhood_prompts": [template.format(neighbour)],
        })
    return records
