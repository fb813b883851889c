"""Write data/raw/extract.jsonl: order sentences -> the order's fields as compact JSON (`data=extract`).

    python scripts/make_extract_data.py [--rows 1200] [--seed 7] [--out data/raw/extract.jsonl]

Each row is {"text": a sentence or a note about one order, "answer": its fields as one-line JSON}: the
customer's `name`, the order `date` (ISO, YYYY-MM-DD), the delivery `city`, the `amount` paid (a number)
and the `product`, in that order, `null` where the text does not give one. What varies, so that no field
can be looked up by position or by a fixed phrase (docs/tasks.md):
- wording: several verbs, prepositions and clause shapes per field, two styles (a prose sentence, a
  record-like note with varied key names) and free-form openings;
- order: the clauses of a sentence and the entries of a note are shuffled;
- formats: dates in five spellings (answers normalize them), amounts with or without currency signs,
  thousands separators, cents or words ("dollars", "USD", "EUR");
- distractors: a second city the parcel ships from, a referrer's name, an order number, a quantity,
  an earlier order's date, each in a share of the rows and never part of the answer;
- missing fields: each is left out of about one row in six (its answer is null).
The same seed writes the same file byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIRST = (
    "Maria Anna Tom Lena Omar Priya Jonas Chloe Wei Sofia Liam Aisha Noah Elena Ravi Mia Lucas Yuki "
    "Carlos Ines Hannah Mateo Zoe Felix Amara Ivan Nora Diego Leila Sam Grace Tariq Emma Jakob Alice"
).split()
LAST = (
    "Lopez Schmidt Okafor Rossi Nakamura Patel Novak Dubois Chen Larsen Garcia Kowalski Silva Haddad "
    "Murphy Jensen Moreau Tanaka Costa Becker Ivanova Fischer Khan Weber Santos Berg Ortiz Dahl"
).split()
CITIES = (
    "Lyon|Berlin|Madrid|Oslo|Porto|Dublin|Vienna|Prague|Zurich|Lisbon|Milan|Krakow|Seville|Hamburg|Gdansk|"
    "Bristol|Leeds|Toronto|Denver|Austin|Boston|Seattle|Osaka|Nairobi|Lagos|Cairo|Dubai|Mumbai|Perth|"
    "Auckland|Quebec|Bergen|Turin|Valencia|Antwerp|Ghent|Malmo|Tartu|Riga|Sao Paulo|New York|Cape Town"
).split("|")
PRODUCTS = (
    "coffee grinder|desk lamp|running shoes|wool scarf|phone case|standing desk|yoga mat|kettle|"
    "laptop stand|backpack|bluetooth speaker|rain jacket|office chair|blender|water bottle|headphones|"
    "garden hose|bike helmet|table fan|cast iron pan|notebook set|winter boots|camera bag|toaster|"
    "electric toothbrush|board game|tent|sleeping bag|wall clock|air purifier|mechanical keyboard|monitor|"
    "hair dryer|picture frame|rice cooker|sunglasses|leather wallet|tea set|drill|vacuum cleaner"
).split("|")
MONTHS = "January February March April May June July August September October November December".split()
FIELDS = ("name", "date", "city", "amount", "product")
MISSING = 1 / 6


def draw_date(rng: random.Random) -> tuple[str, str]:
    """(how the text writes it, ISO)."""
    year, month, day = rng.randint(2021, 2025), rng.randint(1, 12), rng.randint(1, 28)
    iso = f"{year}-{month:02d}-{day:02d}"
    name = MONTHS[month - 1]
    shapes = [
        f"{name} {day}, {year}",
        f"{day} {name} {year}",
        f"{day} {name[:3]} {year}",
        iso,
        f"{name[:3]}. {day}, {year}",
    ]
    return rng.choice(shapes), iso


def draw_amount(rng: random.Random) -> tuple[str, float | int]:
    """(how the text writes it, the number)."""
    whole = rng.choice([rng.randint(5, 99), rng.randint(100, 999), rng.randint(1000, 4999)])
    cents = rng.choice([0, 0, rng.randint(1, 99)])
    value: float | int = whole if cents == 0 else round(whole + cents / 100, 2)
    number = f"{whole:,}" if whole >= 1000 and rng.random() < 0.5 else str(whole)
    if cents:
        number += f".{cents:02d}"
    shape = rng.choice(["${n}", "{n} dollars", "USD {n}", "{n} USD", "€{n}", "{n} EUR", "{n}"])
    return shape.format(n=number), value


def distractor_city(rng: random.Random, city: str | None) -> str:
    return rng.choice([c for c in CITIES if c != city])


def prose(rng: random.Random, facts: dict, shown: dict) -> str:
    """A sentence: subject and verb, then the other clauses shuffled; a date or city clause may lead."""
    name, product = shown.get("name"), shown.get("product")
    subject = name or rng.choice(["A customer", "Someone", "A buyer", "One client", "A shopper"])
    verb = rng.choice(["bought", "ordered", "purchased", "picked up", "paid for", "got"])
    article = "an" if product and product[0] in "aeiou" else "a"
    thing = f"{article} {product}" if product else rng.choice(["an item", "something", "one article", "a gift"])
    clauses = []
    if "amount" in shown:
        clauses.append(
            rng.choice(["for {a}", "paying {a}", "at {a}", "for a total of {a}", "({a})"]).format(a=shown["amount"])
        )
    if "city" in shown:
        clauses.append(
            rng.choice(
                ["in {c}", "delivered to {c}", "for delivery in {c}", "to be sent to {c}", "from our {c} store"]
            ).format(c=shown["city"])
        )
    if "date" in shown:
        clauses.append(rng.choice(["on {d}", "on {d}", "dated {d}", "({d})"]).format(d=shown["date"]))
    if facts.get("ship_from"):
        clauses.append(f"shipped from {facts['ship_from']}")
    if facts.get("referrer"):
        clauses.append(f"referred by {facts['referrer']}")
    if facts.get("quantity"):
        clauses.append(f"quantity {facts['quantity']}")
    rng.shuffle(clauses)
    lead = ""
    if clauses and clauses[0].startswith(("on ", "in ")) and rng.random() < 0.5:
        lead = clauses.pop(0)
        lead = lead[0].upper() + lead[1:] + ", "
        subject = subject if name else subject[0].lower() + subject[1:]
    sentence = f"{lead}{subject} {verb} {thing}" + (" " + " ".join(clauses) if clauses else "") + "."
    if facts.get("order_no"):
        sentence = rng.choice([f"Order #{facts['order_no']}: {sentence}", f"{sentence} Ref {facts['order_no']}."])
    if facts.get("earlier"):
        sentence += f" Their previous order was on {facts['earlier']}."
    return sentence[0].upper() + sentence[1:]


KEYS = {
    "name": ["customer", "client", "buyer", "name"],
    "date": ["date", "ordered on", "order date", "day"],
    "city": ["ship to", "deliver to", "city", "destination"],
    "amount": ["total", "paid", "amount", "price"],
    "product": ["item", "product", "article", "goods"],
}


def record(rng: random.Random, facts: dict, shown: dict) -> str:
    """A note: `key: value` entries, shuffled, with varied key names and separators."""
    entries = [f"{rng.choice(KEYS[field])}: {shown[field]}" for field in FIELDS if field in shown]
    if facts.get("ship_from"):
        entries.append(f"{rng.choice(['from', 'warehouse', 'ships from'])}: {facts['ship_from']}")
    if facts.get("order_no"):
        entries.append(f"{rng.choice(['order', 'ref', 'no.'])}: {facts['order_no']}")
    if facts.get("quantity"):
        entries.append(f"{rng.choice(['qty', 'units'])}: {facts['quantity']}")
    if facts.get("referrer"):
        entries.append(f"referred by: {facts['referrer']}")
    rng.shuffle(entries)
    separator = rng.choice(["; ", " | ", ", "])
    opening = rng.choice(["", "Order note - ", "New order: ", "Sales log: "])
    return opening + separator.join(entries)


def row(rng: random.Random) -> dict:
    answer: dict = {}
    shown: dict = {}
    present = {field: rng.random() >= MISSING for field in FIELDS}
    if not any(present.values()):
        present["product"] = True
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    date_text, iso = draw_date(rng)
    city = rng.choice(CITIES)
    amount_text, amount = draw_amount(rng)
    product = rng.choice(PRODUCTS)
    for field, (text, value) in {
        "name": (name, name),
        "date": (date_text, iso),
        "city": (city, city),
        "amount": (amount_text, amount),
        "product": (product, product),
    }.items():
        answer[field] = value if present[field] else None
        if present[field]:
            shown[field] = text
    facts = {
        "ship_from": distractor_city(rng, city) if rng.random() < 0.2 else None,
        "referrer": f"{rng.choice(FIRST)} {rng.choice(LAST)}" if rng.random() < 0.12 else None,
        "order_no": rng.randint(1000, 99999) if rng.random() < 0.2 else None,
        "quantity": rng.randint(2, 6) if rng.random() < 0.12 else None,
        "earlier": draw_date(rng)[0] if rng.random() < 0.08 else None,
    }
    style = prose if rng.random() < 0.7 else record
    text = style(rng, facts, shown)
    return {"text": text, "answer": json.dumps(answer, ensure_ascii=False, separators=(",", ":"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("data/raw/extract.jsonl"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows, seen = [], set()
    while len(rows) < args.rows:
        made = row(rng)
        if made["text"] not in seen:
            seen.add(made["text"])
            rows.append(made)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
