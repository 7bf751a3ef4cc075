"""Seeded generator of grade-school math word problems and arithmetic drills with worked solutions.

Each record is a GSM8K-style problem whose numbers are drawn from a seeded RNG and whose
solution is computed in code, one step per line. Every equation in a solution has the form
`<expr> = <int>` over non-negative integers with `+ - * /` and parentheses, and holds exactly;
the last line is `#### <answer>`. So a solution can be verified line by line
(`check_equations`) and graded by its final answer (`extract_answer`), which is what the
pretraining mix, SFT, preference pairs and RL rewards need.

Determinism: item `i` of `generate(n, seed)` depends only on `(seed, i)`, never on `n`, so
`generate(k, seed) == generate(n, seed)[:k]` for `k <= n`. Templates are dealt in seeded
rounds (every template once per round) so any prefix is balanced across templates.

Run:
    python -m lmforge.data.mathgen --n 5 --seed 0          # JSON lines on stdout
    python -m lmforge.data.mathgen --n 3 --seed 0 --text   # "Question: ...\\nAnswer: ..."
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "TEMPLATES",
    "WORD_TEMPLATES",
    "ARITHMETIC_TEMPLATES",
    "generate",
    "generate_one",
    "format_document",
    "extract_answer",
    "find_equations",
    "check_equations",
    "evaluate",
]

_PLACEHOLDER = "§"
_ANSWER_RE = re.compile(r"####\s*(-?\d+)\s*$")
# An equation is the shortest run of digits, spaces, operators and parentheses that starts at
# a digit or "(" and ends right before "= <int>". Solutions never use "=" for anything else.
_EQUATION_RE = re.compile(r"(?P<lhs>[(\d][\d \t+\-*/()]*?)[ \t]*=[ \t]*(?P<rhs>\d+)(?!\.?\d)")


# --------------------------------------------------------------------------- arithmetic


def evaluate(expr: str) -> Fraction:
    """Exact value of an integer expression with + - * / and parentheses.

    Anything else (names, calls, floats, unary minus, powers) is rejected, so this is safe
    to run on model output.
    """
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {expr!r}") from exc
    return _eval_node(tree.body, expr)


def _eval_node(node: ast.AST, expr: str) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp):
        left, right = _eval_node(node.left, expr), _eval_node(node.right, expr)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if isinstance(node.op, ast.Div):
            if right == 0:
                raise ValueError(f"division by zero in {expr!r}")
            return left / right
    raise ValueError(f"unsupported element {ast.dump(node)} in {expr!r}")


def find_equations(text: str) -> list[tuple[str, int]]:
    """All `(lhs, rhs)` pairs of `<expr> = <int>` equations in `text`, in order."""
    return [(m.group("lhs").strip(), int(m.group("rhs"))) for m in _EQUATION_RE.finditer(text)]


def check_equations(text: str) -> list[str]:
    """Problems with the equations in a worked solution; an empty list means all hold.

    Reports an equation whose left side does not evaluate to its right side, and any "="
    that is not part of a well-formed equation (a solution that hides arithmetic in prose
    cannot be verified).
    """
    errors: list[str] = []
    equations = find_equations(text)
    for lhs, rhs in equations:
        try:
            value = evaluate(lhs)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        if value != rhs:
            errors.append(f"{lhs} = {rhs} is wrong: {lhs} is {value}")
    if text.count("=") != len(equations):
        errors.append(f"{text.count('=')} '=' signs but {len(equations)} well-formed equations")
    return errors


def extract_answer(text: str) -> int | None:
    """The integer after the last `####` marker at the end of `text`, or None."""
    match = _ANSWER_RE.search(text.strip())
    return int(match.group(1)) if match else None


def format_document(record: dict) -> str:
    """The pretraining form of a record: `Question: ...\\nAnswer: <solution ending in #### N>`."""
    return f"Question: {record['question']}\nAnswer: {record['solution']}"


# --------------------------------------------------------------------------- solution builder


class _Solution:
    """Collects solution lines; every number in an equation comes from evaluating it here."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def step(self, expr: str, sentence: str) -> int:
        """Evaluate `expr`, put `expr = value` where `sentence` has the placeholder, return value."""
        value = evaluate(expr)
        if value.denominator != 1 or value < 0:
            # A template produced a non-integer or negative intermediate: a bug in its ranges.
            raise ArithmeticError(f"step {expr!r} gives {value}, not a non-negative integer")
        if sentence.count(_PLACEHOLDER) != 1:
            raise ValueError(f"sentence needs exactly one {_PLACEHOLDER!r}: {sentence!r}")
        self.lines.append(sentence.replace(_PLACEHOLDER, f"{expr} = {value.numerator}"))
        return value.numerator

    def say(self, sentence: str) -> None:
        if "=" in sentence or _PLACEHOLDER in sentence:
            raise ValueError(f"prose lines must not contain '=': {sentence!r}")
        self.lines.append(sentence)

    def finish(self, answer: int, expected: int) -> tuple[str, int]:
        # `expected` is the same quantity computed directly in Python: two independent
        # derivations must agree before a record is emitted.
        if answer != expected:
            raise ArithmeticError(f"worked answer {answer} != direct computation {expected}")
        if answer < 0:
            raise ArithmeticError(f"negative answer {answer}")
        return "\n".join([*self.lines, f"#### {answer}"]), answer


# --------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class _Person:
    name: str
    subj: str
    obj: str
    poss: str

    @property
    def cap_subj(self) -> str:
        return self.subj.capitalize()


def _people(names: str, subj: str, obj: str, poss: str) -> list[_Person]:
    return [_Person(n, subj, obj, poss) for n in names.split()]


_PEOPLE: tuple[_Person, ...] = tuple(
    _people(
        "Ava Maya Sofia Priya Hannah Chloe Zara Amara Lucia Mei Fatima Olivia Ingrid Rosa Leila Nadia "
        "Grace Elena Aisha Tara",
        "she", "her", "her",
    )
    + _people(
        "Liam Noah Mateo Ravi Omar Lucas Kenji Daniel Ethan Samuel Diego Felix Tomas Kwame Arjun Yusuf "
        "Hugo Marco Jonah Malik",
        "he", "him", "his",
    )
)

# (singular, plural, lowest price, highest price) in whole dollars.
_GOODS: tuple[tuple[str, str, int, int], ...] = (
    ("notebook", "notebooks", 2, 6),
    ("pencil", "pencils", 1, 3),
    ("apple", "apples", 1, 2),
    ("sandwich", "sandwiches", 4, 9),
    ("comic book", "comic books", 3, 8),
    ("T-shirt", "T-shirts", 8, 20),
    ("flower pot", "flower pots", 5, 12),
    ("board game", "board games", 15, 40),
    ("water bottle", "water bottles", 6, 15),
    ("pack of stickers", "packs of stickers", 2, 5),
    ("loaf of bread", "loaves of bread", 3, 6),
    ("candle", "candles", 4, 10),
)
_BIG_PURCHASES = ("bicycle", "guitar", "tablet", "telescope", "skateboard", "camera", "keyboard", "tent")
_COLLECTIBLES = ("stamps", "stickers", "trading cards", "coins", "seashells", "postcards", "marbles")
_BAKED = ("muffins", "cupcakes", "cookies", "brownies", "rolls", "bagels")
_STOCK = ("shirts", "mugs", "books", "toy cars", "umbrellas", "backpacks", "lamps")
_SHOPS = ("bakery", "bookstore", "farm stand", "toy shop", "flower shop", "corner store")
_VEHICLES = ("car", "van", "bus", "truck")
_SUBJECTS = ("math", "science", "history", "reading", "music", "art")
_CHORES = ("washing dishes", "walking the dog", "tidying up", "practising piano", "reading",
           "watering plants", "folding laundry")
_INGREDIENTS = (("cups of flour", "pancakes"), ("eggs", "cakes"), ("cups of milk", "muffins"),
                ("spoons of sugar", "cookies"), ("cups of oats", "bars"))


def _pick_people(rng: random.Random, k: int) -> list[_Person]:
    # Distinct names so "Ava gives Ava ..." never happens.
    idx = rng.sample(range(len(_PEOPLE)), k)
    return [_PEOPLE[i] for i in idx]


# --------------------------------------------------------------------------- templates

_Template = Callable[[random.Random], tuple[str, str, int]]
_REGISTRY: dict[str, tuple[str, _Template]] = {}


def _template(name: str, kind: str) -> Callable[[_Template], _Template]:
    def register(fn: _Template) -> _Template:
        if name in _REGISTRY:
            raise ValueError(f"duplicate template name {name!r}")
        _REGISTRY[name] = (kind, fn)
        return fn

    return register


@_template("shopping_two_items", "word")
def _shopping_two_items(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    g1, g2 = rng.sample(_GOODS, 2)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    pa, pb = rng.randint(g1[2], g1[3]), rng.randint(g2[2], g2[3])
    q = (f"{p.name} buys {a} {g1[1]} for ${pa} each and {b} {g2[1]} for ${pb} each. "
         f"How many dollars does {p.subj} spend in total?")
    s = _Solution()
    c1 = s.step(f"{a} * {pa}", f"The {g1[1]} cost § dollars.")
    c2 = s.step(f"{b} * {pb}", f"The {g2[1]} cost § dollars.")
    total = s.step(f"{c1} + {c2}", f"Altogether {p.subj} spends § dollars.")
    return q, *s.finish(total, a * pa + b * pb)


@_template("change_from_bill", "word")
def _change_from_bill(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    g = rng.choice(_GOODS)
    n = rng.randint(2, 8)
    price = rng.randint(g[2], g[3])
    cost = n * price
    bill = next(b for b in (10, 20, 50, 100, 200, 500) if b > cost)
    q = (f"{p.name} buys {n} {g[1]} that cost ${price} each and pays with a ${bill} bill. "
         f"How much change, in dollars, does {p.subj} get back?")
    s = _Solution()
    c = s.step(f"{n} * {price}", f"The {g[1]} cost § dollars.")
    change = s.step(f"{bill} - {c}", "The change is § dollars.")
    return q, *s.finish(change, bill - cost)


@_template("savings_weeks", "word")
def _savings_weeks(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    thing = rng.choice(_BIG_PURCHASES)
    per_week = rng.choice((5, 8, 10, 12, 15, 20, 25))
    weeks = rng.randint(3, 16)
    have = rng.randint(1, 20) * 5
    price = have + per_week * weeks
    q = (f"{p.name} wants a {thing} that costs ${price}. {p.cap_subj} already has ${have} and saves "
         f"${per_week} every week. How many weeks will it take {p.obj} to have enough money?")
    s = _Solution()
    rest = s.step(f"{price} - {have}", f"{p.cap_subj} still needs § dollars.")
    w = s.step(f"{rest} / {per_week}", f"At {per_week} dollars a week that takes § weeks.")
    return q, *s.finish(w, weeks)


@_template("fraction_left", "word")
def _fraction_left(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    baked = rng.choice(_BAKED)
    k, word = rng.choice(((2, "half"), (3, "a third"), (4, "a quarter"), (5, "a fifth"), (6, "a sixth")))
    total = k * rng.randint(4, 12)
    eaten = rng.randint(1, total - total // k - 1)
    q = (f"{p.name} baked {total} {baked}. {p.cap_subj} gave {word} of them to the neighbours and ate "
         f"{eaten}. How many {baked} are left?")
    s = _Solution()
    given = s.step(f"{total} / {k}", f"{p.cap_subj} gave away § {baked}.")
    after = s.step(f"{total} - {given}", f"That leaves § {baked}.")
    left = s.step(f"{after} - {eaten}", f"After eating {eaten}, § {baked} are left.")
    return q, *s.finish(left, total - total // k - eaten)


@_template("percent_discount", "word")
def _percent_discount(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    thing = rng.choice(_BIG_PURCHASES)
    pct = rng.choice((10, 20, 25, 30, 40, 50))
    price = rng.randint(2, 30) * 20
    q = (f"A {thing} normally costs ${price}. {p.name} buys it during a sale with {pct}% off. "
         f"How many dollars does {p.subj} pay?")
    s = _Solution()
    off = s.step(f"{price} * {pct} / 100", "The discount is § dollars.")
    pay = s.step(f"{price} - {off}", f"{p.cap_subj} pays § dollars.")
    return q, *s.finish(pay, price * (100 - pct) // 100)


@_template("two_leg_trip", "word")
def _two_leg_trip(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    v1, v2 = rng.randint(4, 12) * 5, rng.randint(4, 12) * 5
    t1, t2 = rng.randint(1, 5), rng.randint(1, 4)
    q = (f"{p.name} drives at {v1} km per hour for {t1} hours, then at {v2} km per hour for {t2} "
         f"hours. How many kilometres does {p.subj} drive in total?")
    s = _Solution()
    d1 = s.step(f"{v1} * {t1}", "The first part of the trip is § km.")
    d2 = s.step(f"{v2} * {t2}", "The second part is § km.")
    total = s.step(f"{d1} + {d2}", "In total that is § km.")
    return q, *s.finish(total, v1 * t1 + v2 * t2)


@_template("weekly_wages", "word")
def _weekly_wages(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    rate, hours, days, weeks = rng.randint(9, 25), rng.randint(3, 8), rng.randint(2, 6), rng.randint(2, 5)
    q = (f"{p.name} earns ${rate} an hour. {p.cap_subj} works {hours} hours a day, {days} days a week. "
         f"How many dollars does {p.subj} earn in {weeks} weeks?")
    s = _Solution()
    day = s.step(f"{rate} * {hours}", f"In one day {p.subj} earns § dollars.")
    week = s.step(f"{day} * {days}", f"In one week {p.subj} earns § dollars.")
    total = s.step(f"{week} * {weeks}", f"In {weeks} weeks {p.subj} earns § dollars.")
    return q, *s.finish(total, rate * hours * days * weeks)


@_template("ages_sum_future", "word")
def _ages_sum_future(rng: random.Random) -> tuple[str, str, int]:
    a, b = _pick_people(rng, 2)
    k, word = rng.choice(((2, "twice"), (3, "three times"), (4, "four times")))
    young = rng.randint(3, 15)
    later = rng.randint(2, 12)
    q = (f"{a.name} is {word} as old as {b.name}. {b.name} is {young} years old. "
         f"What will the sum of their ages be in {later} years?")
    s = _Solution()
    old = s.step(f"{young} * {k}", f"{a.name} is § years old now.")
    old_later = s.step(f"{old} + {later}", f"In {later} years {a.name} will be § years old.")
    young_later = s.step(f"{young} + {later}", f"{b.name} will be § years old.")
    total = s.step(f"{old_later} + {young_later}", "The sum of their ages will be §.")
    return q, *s.finish(total, young * k + young + 2 * later)


@_template("recipe_scaling", "word")
def _recipe_scaling(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    ingredient, dish = rng.choice(_INGREDIENTS)
    per, makes, times = rng.randint(2, 6), rng.randint(4, 12), rng.randint(2, 6)
    want = makes * times
    q = (f"A recipe uses {per} {ingredient} to make {makes} {dish}. {p.name} wants to make {want} "
         f"{dish}. How many {ingredient} does {p.subj} need?")
    s = _Solution()
    batches = s.step(f"{want} / {makes}", f"{p.cap_subj} needs § batches.")
    need = s.step(f"{batches} * {per}", f"So {p.subj} needs § {ingredient}.")
    return q, *s.finish(need, per * times)


@_template("orchard_harvest", "word")
def _orchard_harvest(rng: random.Random) -> tuple[str, str, int]:
    rows, per_row = rng.randint(3, 12), rng.randint(4, 15)
    fallen = rng.randint(1, rows * per_row // 3)
    fruit = rng.randint(5, 30)
    kind = rng.choice(("apple", "pear", "orange", "plum", "lemon"))
    q = (f"An orchard has {rows} rows of {kind} trees with {per_row} trees in each row. A storm "
         f"knocks down {fallen} trees. Each remaining tree gives {fruit} {kind}s. How many {kind}s "
         f"does the orchard produce?")
    s = _Solution()
    trees = s.step(f"{rows} * {per_row}", "The orchard had § trees.")
    standing = s.step(f"{trees} - {fallen}", "After the storm § trees remain.")
    total = s.step(f"{standing} * {fruit}", f"They produce § {kind}s.")
    return q, *s.finish(total, (rows * per_row - fallen) * fruit)


@_template("class_fraction", "word")
def _class_fraction(rng: random.Random) -> tuple[str, str, int]:
    num, den = rng.choice(((1, 2), (1, 3), (2, 3), (1, 4), (3, 4), (2, 5), (3, 5), (3, 8)))
    total = den * rng.randint(3, 15)
    words = {2: "halves", 3: "thirds", 4: "quarters", 5: "fifths", 8: "eighths"}
    unit = {2: "half", 3: "third", 4: "quarter", 5: "fifth", 8: "eighth"}
    frac = f"one {unit[den]}" if num == 1 else f"{['', '', 'two', 'three'][num]} {words[den]}"
    club = rng.choice(("chess club", "choir", "science club", "class", "swim team", "school band", "drama club",
                       "robotics club", "art class"))
    q = f"There are {total} students in the {club}. {frac.capitalize()} of them are girls. How many boys are there?"
    s = _Solution()
    part = s.step(f"{total} / {den}", f"One {unit[den]} of the students is § students.")
    if num > 1:
        girls = s.step(f"{part} * {num}", "So there are § girls.")
    else:
        girls = part
        s.say(f"So there are {girls} girls.")
    boys = s.step(f"{total} - {girls}", "There are § boys.")
    return q, *s.finish(boys, total - total * num // den)


@_template("bakery_boxes", "word")
def _bakery_boxes(rng: random.Random) -> tuple[str, str, int]:
    baked = rng.choice(_BAKED)
    per_box, boxes, price = rng.choice((4, 6, 8, 12)), rng.randint(3, 20), rng.randint(5, 18)
    total = per_box * boxes
    shop = rng.choice(_SHOPS)
    q = (f"A {shop} bakes {total} {baked} and packs them in boxes of {per_box}. Each box sells for "
         f"${price}. How many dollars does the {shop} make if it sells every box?")
    s = _Solution()
    n = s.step(f"{total} / {per_box}", "There are § boxes.")
    money = s.step(f"{n} * {price}", f"The {shop} makes § dollars.")
    return q, *s.finish(money, boxes * price)


@_template("reading_pages", "word")
def _reading_pages(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    per_day, days = rng.randint(8, 40), rng.randint(2, 9)
    pages = per_day * days + rng.randint(5, 200)
    q = (f"A book has {pages} pages. {p.name} reads {per_day} pages every day for {days} days. "
         f"How many pages does {p.subj} still have to read?")
    s = _Solution()
    read = s.step(f"{per_day} * {days}", f"{p.cap_subj} reads § pages.")
    left = s.step(f"{pages} - {read}", "There are § pages left.")
    return q, *s.finish(left, pages - per_day * days)


@_template("store_inventory", "word")
def _store_inventory(rng: random.Random) -> tuple[str, str, int]:
    item = rng.choice(_STOCK)
    monday = rng.randint(5, 30)
    start = 3 * monday + rng.randint(10, 120)
    delivery = rng.randint(10, 80)
    q = (f"A store has {start} {item}. It sells {monday} on Monday and twice as many on Tuesday. "
         f"On Wednesday a delivery brings {delivery} more. How many {item} does the store have now?")
    s = _Solution()
    tuesday = s.step(f"{monday} * 2", f"On Tuesday it sells § {item}.")
    sold = s.step(f"{monday} + {tuesday}", f"In the two days it sells § {item}.")
    left = s.step(f"{start} - {sold}", f"That leaves § {item}.")
    now = s.step(f"{left} + {delivery}", f"After the delivery there are § {item}.")
    return q, *s.finish(now, start - 3 * monday + delivery)


@_template("fence_cost", "word")
def _fence_cost(rng: random.Random) -> tuple[str, str, int]:
    length, width, cost = rng.randint(5, 40), rng.randint(3, 25), rng.randint(2, 15)
    q = (f"A rectangular garden is {length} metres long and {width} metres wide. Fencing costs "
         f"${cost} per metre. How many dollars does it cost to fence the whole garden?")
    s = _Solution()
    perimeter = s.step(f"2 * ({length} + {width})", "The perimeter is § metres.")
    total = s.step(f"{perimeter} * {cost}", "The fence costs § dollars.")
    return q, *s.finish(total, 2 * (length + width) * cost)


@_template("floor_tiles", "word")
def _floor_tiles(rng: random.Random) -> tuple[str, str, int]:
    per_box = rng.choice((2, 3, 4, 5))
    length = per_box * rng.randint(2, 6)
    width = rng.randint(3, 10)
    price = rng.randint(12, 45)
    q = (f"A room is {length} metres long and {width} metres wide. One box of tiles covers "
         f"{per_box} square metres and costs ${price}. How many dollars do the tiles for the floor cost?")
    s = _Solution()
    area = s.step(f"{length} * {width}", "The floor is § square metres.")
    boxes = s.step(f"{area} / {per_box}", "That takes § boxes.")
    total = s.step(f"{boxes} * {price}", "The tiles cost § dollars.")
    return q, *s.finish(total, length * width // per_box * price)


@_template("split_bill", "word")
def _split_bill(rng: random.Random) -> tuple[str, str, int]:
    friends = rng.randint(2, 8)
    each = rng.randint(9, 40)
    tip = rng.randint(1, friends * 3) * 2
    meal = friends * each - tip
    q = (f"{friends} friends eat dinner together. The meal costs ${meal} and they leave a ${tip} tip. "
         f"They share the total equally. How many dollars does each friend pay?")
    s = _Solution()
    total = s.step(f"{meal} + {tip}", "The total is § dollars.")
    share = s.step(f"{total} / {friends}", "Each friend pays § dollars.")
    return q, *s.finish(share, each)


@_template("collection_growth", "word")
def _collection_growth(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    thing = rng.choice(_COLLECTIBLES)
    have, per_month, months = rng.randint(10, 150), rng.randint(3, 25), rng.randint(2, 12)
    give = rng.randint(1, have)
    q = (f"{p.name} has {have} {thing}. {p.cap_subj} gets {per_month} more every month for {months} months, "
         f"then gives {give} to a friend. How many {thing} does {p.name} have now?")
    s = _Solution()
    gained = s.step(f"{per_month} * {months}", f"{p.cap_subj} gets § {thing}.")
    peak = s.step(f"{have} + {gained}", f"{p.cap_subj} then has § {thing}.")
    now = s.step(f"{peak} - {give}", f"After giving some away {p.subj} has § {thing}.")
    return q, *s.finish(now, have + per_month * months - give)


@_template("tank_fill", "word")
def _tank_fill(rng: random.Random) -> tuple[str, str, int]:
    rate, minutes = rng.randint(2, 25), rng.randint(4, 40)
    already = rng.randint(1, 60) * 5
    capacity = already + rate * minutes
    q = (f"A water tank holds {capacity} litres and already contains {already} litres. A hose adds "
         f"{rate} litres every minute. How many minutes does it take to fill the tank?")
    s = _Solution()
    need = s.step(f"{capacity} - {already}", "The tank needs § more litres.")
    t = s.step(f"{need} / {rate}", "That takes § minutes.")
    return q, *s.finish(t, minutes)


@_template("ticket_sales", "word")
def _ticket_sales(rng: random.Random) -> tuple[str, str, int]:
    venue = rng.choice(("museum", "zoo", "cinema", "aquarium", "theatre"))
    adult, child = rng.randint(10, 30), rng.randint(4, 12)
    na, nc = rng.randint(10, 120), rng.randint(10, 150)
    q = (f"A {venue} sells adult tickets for ${adult} and child tickets for ${child}. One day it sells "
         f"{na} adult tickets and {nc} child tickets. How many dollars does the {venue} take in?")
    s = _Solution()
    a = s.step(f"{na} * {adult}", "Adult tickets bring in § dollars.")
    c = s.step(f"{nc} * {child}", "Child tickets bring in § dollars.")
    total = s.step(f"{a} + {c}", "Together that is § dollars.")
    return q, *s.finish(total, na * adult + nc * child)


@_template("training_plan", "word")
def _training_plan(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    first, extra, days = rng.randint(1, 6), rng.randint(1, 3), rng.randint(3, 6)
    q = (f"{p.name} runs {first} km on the first day of training and {extra} km more each day than "
         f"the day before. How many kilometres does {p.subj} run in {days} days?")
    s = _Solution()
    dist = [first]
    s.say(f"Day 1: {first} km.")
    for day in range(2, days + 1):
        dist.append(s.step(f"{dist[-1]} + {extra}", f"Day {day}: § km."))
    total = s.step(" + ".join(str(d) for d in dist), "In total § km.")
    return q, *s.finish(total, days * first + extra * days * (days - 1) // 2)


@_template("resale_profit", "word")
def _resale_profit(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    g = rng.choice(_GOODS)
    n, cost = rng.randint(10, 60), rng.randint(2, 15)
    price = cost + rng.randint(2, 10)
    ads = rng.randint(1, n * (price - cost) // 2)
    q = (f"{p.name} buys {n} {g[1]} for ${cost} each and sells all of them for ${price} each. "
         f"{p.cap_subj} also spends ${ads} on advertising. What is {p.poss} profit in dollars?")
    s = _Solution()
    spent = s.step(f"{n} * {cost}", "Buying costs § dollars.")
    earned = s.step(f"{n} * {price}", "Selling brings in § dollars.")
    profit = s.step(f"{earned} - {spent} - {ads}", "The profit is § dollars.")
    return q, *s.finish(profit, n * (price - cost) - ads)


@_template("test_average", "word")
def _test_average(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    k = rng.randint(3, 5)
    scores = [rng.randint(55, 100) for _ in range(k - 1)]
    # Nudge the last score down so the mean is a whole number (stays within 51..100).
    last = rng.randint(55, 100)
    scores.append(last - (sum(scores) + last) % k)
    subject = rng.choice(_SUBJECTS)
    listed = ", ".join(str(x) for x in scores[:-1]) + f" and {scores[-1]}"
    q = f"{p.name} scored {listed} on {p.poss} {k} {subject} tests. What is {p.poss} average score?"
    s = _Solution()
    total = s.step(" + ".join(str(x) for x in scores), "The scores add up to §.")
    mean = s.step(f"{total} / {k}", "The average is §.")
    return q, *s.finish(mean, sum(scores) // k)


@_template("needed_score", "word")
def _needed_score(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    k = rng.randint(3, 5)
    while True:
        target = rng.randint(70, 92)
        scores = [rng.randint(60, 100) for _ in range(k - 1)]
        need = target * k - sum(scores)
        if 0 <= need <= 100:
            break
    subject = rng.choice(_SUBJECTS)
    listed = ", ".join(str(x) for x in scores[:-1]) + f" and {scores[-1]}" if k > 2 else str(scores[0])
    q = (f"{p.name} wants an average of {target} over {k} {subject} tests. {p.cap_subj} scored {listed} "
         f"on the first {k - 1}. What score does {p.subj} need on the last test?")
    s = _Solution()
    total = s.step(f"{target} * {k}", f"{p.cap_subj} needs § points in total.")
    so_far = s.step(" + ".join(str(x) for x in scores), f"So far {p.subj} has § points.")
    last = s.step(f"{total} - {so_far}", f"{p.cap_subj} needs § on the last test.")
    return q, *s.finish(last, need)


@_template("chore_minutes", "word")
def _chore_minutes(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    chores = rng.sample(_CHORES, 3)
    mins = [rng.randint(5, 40) for _ in chores]
    days = rng.choice((5, 6, 7))
    q = (f"Every day {p.name} spends {mins[0]} minutes {chores[0]}, {mins[1]} minutes {chores[1]} and "
         f"{mins[2]} minutes {chores[2]}. How many minutes does {p.subj} spend on these in {days} days?")
    s = _Solution()
    daily = s.step(" + ".join(str(m) for m in mins), "Each day takes § minutes.")
    total = s.step(f"{daily} * {days}", f"In {days} days that is § minutes.")
    return q, *s.finish(total, sum(mins) * days)


@_template("coin_count", "word")
def _coin_count(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    qn, dn, nn, pn = rng.randint(1, 12), rng.randint(1, 15), rng.randint(0, 10), rng.randint(1, 20)
    q = (f"{p.name} has {qn} quarters, {dn} dimes, {nn} nickels and {pn} pennies. A quarter is worth "
         f"25 cents, a dime 10 cents, a nickel 5 cents and a penny 1 cent. How many cents does {p.subj} have?")
    s = _Solution()
    a = s.step(f"{qn} * 25", "The quarters are worth § cents.")
    b = s.step(f"{dn} * 10", "The dimes are worth § cents.")
    c = s.step(f"{nn} * 5", "The nickels are worth § cents.")
    total = s.step(f"{a} + {b} + {c} + {pn}", "Adding the pennies gives § cents.")
    return q, *s.finish(total, 25 * qn + 10 * dn + 5 * nn + pn)


@_template("ratio_share", "word")
def _ratio_share(rng: random.Random) -> tuple[str, str, int]:
    a, b = _pick_people(rng, 2)
    ra, rb = rng.choice([(x, y) for x in range(1, 8) for y in range(1, 8) if x != y and math.gcd(x, y) == 1])
    unit = rng.randint(2, 30)
    money = (ra + rb) * unit
    q = f"{a.name} and {b.name} share ${money} in the ratio {ra}:{rb}. How many dollars does {b.name} get?"
    s = _Solution()
    parts = s.step(f"{ra} + {rb}", "There are § parts.")
    per = s.step(f"{money} / {parts}", "Each part is § dollars.")
    share = s.step(f"{per} * {rb}", f"{b.name} gets § dollars.")
    return q, *s.finish(share, unit * rb)


@_template("juice_glasses", "word")
def _juice_glasses(rng: random.Random) -> tuple[str, str, int]:
    jugs, litres = rng.randint(2, 9), rng.randint(1, 5)
    glass = rng.choice((100, 125, 200, 250, 500))
    drink = rng.choice(("juice", "lemonade", "milk", "iced tea", "water"))
    q = (f"There are {jugs} jugs of {drink}, and each jug holds {litres} litres. Each glass holds "
         f"{glass} millilitres. How many glasses can be filled? (1 litre is 1000 millilitres.)")
    s = _Solution()
    total = s.step(f"{jugs} * {litres}", f"There are § litres of {drink}.")
    ml = s.step(f"{total} * 1000", "That is § millilitres.")
    glasses = s.step(f"{ml} / {glass}", "That fills § glasses.")
    return q, *s.finish(glasses, jugs * litres * 1000 // glass)


@_template("farm_legs", "word")
def _farm_legs(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    two = rng.choice(("chickens", "ducks", "geese", "turkeys"))
    four = rng.choice(("cows", "goats", "sheep", "pigs", "horses"))
    n2, n4 = rng.randint(3, 40), rng.randint(2, 25)
    q = f"{p.name}'s farm has {n2} {two} and {n4} {four}. How many legs do the animals have altogether?"
    s = _Solution()
    a = s.step(f"{n2} * 2", f"The {two} have § legs.")
    b = s.step(f"{n4} * 4", f"The {four} have § legs.")
    total = s.step(f"{a} + {b}", "Altogether there are § legs.")
    return q, *s.finish(total, 2 * n2 + 4 * n4)


@_template("marbles_game", "word")
def _marbles_game(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    start = rng.randint(5, 60)
    won = rng.randint(1, 30)
    if (start + won) % 2:
        won += 1
    bought = rng.randint(1, 20)
    q = (f"{p.name} had {start} marbles. {p.cap_subj} won {won} marbles in the first game, then lost half "
         f"of {p.poss} marbles in the second game. Afterwards {p.subj} bought {bought} more. "
         f"How many marbles does {p.subj} have now?")
    s = _Solution()
    after_win = s.step(f"{start} + {won}", f"After winning {p.subj} had § marbles.")
    lost = s.step(f"{after_win} / 2", f"{p.cap_subj} lost § marbles.")
    left = s.step(f"{after_win} - {lost}", f"{p.cap_subj} had § marbles left.")
    now = s.step(f"{left} + {bought}", f"After buying more {p.subj} has § marbles.")
    return q, *s.finish(now, (start + won) // 2 + bought)


@_template("simple_interest", "word")
def _simple_interest(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    principal, rate, years = rng.randint(2, 50) * 100, rng.randint(1, 9), rng.randint(2, 6)
    q = (f"{p.name} puts ${principal} in a savings account that pays {rate}% simple interest per year. "
         f"How many dollars will be in the account after {years} years?")
    s = _Solution()
    yearly = s.step(f"{principal} * {rate} / 100", "Each year the interest is § dollars.")
    interest = s.step(f"{yearly} * {years}", f"Over {years} years the interest is § dollars.")
    total = s.step(f"{principal} + {interest}", "The account will hold § dollars.")
    return q, *s.finish(total, principal + principal * rate * years // 100)


@_template("bus_passengers", "word")
def _bus_passengers(rng: random.Random) -> tuple[str, str, int]:
    start = rng.randint(10, 45)
    off1, on1 = rng.randint(1, start), rng.randint(0, 20)
    mid = start - off1 + on1
    off2, on2 = rng.randint(0, mid), rng.randint(0, 15)
    q = (f"A bus leaves the station with {start} passengers. At the first stop {off1} get off and "
         f"{on1} get on. At the second stop {off2} get off and {on2} get on. How many passengers are "
         f"on the bus now?")
    s = _Solution()
    after1 = s.step(f"{start} - {off1} + {on1}", "After the first stop there are § passengers.")
    after2 = s.step(f"{after1} - {off2} + {on2}", "After the second stop there are § passengers.")
    return q, *s.finish(after2, mid - off2 + on2)


@_template("wage_difference", "word")
def _wage_difference(rng: random.Random) -> tuple[str, str, int]:
    a, b = _pick_people(rng, 2)
    while True:
        ra, ha, rb, hb = rng.randint(10, 30), rng.randint(10, 40), rng.randint(10, 30), rng.randint(10, 40)
        if ra * ha > rb * hb:
            break
    q = (f"{a.name} earns ${ra} an hour and works {ha} hours this week. {b.name} earns ${rb} an hour and "
         f"works {hb} hours. How many more dollars does {a.name} earn this week than {b.name}?")
    s = _Solution()
    ea = s.step(f"{ra} * {ha}", f"{a.name} earns § dollars.")
    eb = s.step(f"{rb} * {hb}", f"{b.name} earns § dollars.")
    diff = s.step(f"{ea} - {eb}", f"{a.name} earns § dollars more.")
    return q, *s.finish(diff, ra * ha - rb * hb)


@_template("packs_round_up", "word")
def _packs_round_up(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    per_pack = rng.choice((6, 8, 10, 12, 15, 20, 24))
    full = rng.randint(1, 9)
    need = full * per_pack + rng.randint(1, per_pack - 1)
    item = rng.choice(("paper plates", "balloons", "napkins", "party hats", "cups"))
    q = (f"{p.name} needs {need} {item} for a party. They come in packs of {per_pack}. "
         f"How many packs must {p.subj} buy?")
    s = _Solution()
    covered = s.step(f"{full} * {per_pack}", f"{full} packs hold § {item}.")
    s.step(f"{need} - {covered}", f"That is § {item} short, so one more pack is needed.")
    packs = s.step(f"{full} + 1", f"{p.cap_subj} must buy § packs.")
    return q, *s.finish(packs, -(-need // per_pack))


@_template("fuel_cost", "word")
def _fuel_cost(rng: random.Random) -> tuple[str, str, int]:
    vehicle = rng.choice(_VEHICLES)
    per100, hundreds, price = rng.randint(4, 15), rng.randint(1, 12), rng.randint(1, 4)
    km = hundreds * 100
    q = (f"A {vehicle} uses {per100} litres of fuel for every 100 km. Fuel costs ${price} per litre. "
         f"How many dollars does the fuel for a {km} km trip cost?")
    s = _Solution()
    h = s.step(f"{km} / 100", "The trip is § lots of 100 km.")
    litres = s.step(f"{h} * {per100}", "It uses § litres.")
    cost = s.step(f"{litres} * {price}", "The fuel costs § dollars.")
    return q, *s.finish(cost, hundreds * per100 * price)


@_template("flower_beds", "word")
def _flower_beds(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    beds, per_bed = rng.randint(2, 9), rng.randint(4, 20)
    k, word = rng.choice(((2, "twice"), (3, "three times")))
    q = (f"{p.name} plants {per_bed} tulips in each of {beds} flower beds. {p.cap_subj} also plants {word} "
         f"as many daffodils as tulips. How many flowers does {p.subj} plant in total?")
    s = _Solution()
    tulips = s.step(f"{per_bed} * {beds}", f"{p.cap_subj} plants § tulips.")
    daffodils = s.step(f"{tulips} * {k}", f"{p.cap_subj} plants § daffodils.")
    total = s.step(f"{tulips} + {daffodils}", "In total § flowers.")
    return q, *s.finish(total, per_bed * beds * (k + 1))


@_template("pizza_leftover", "word")
def _pizza_leftover(rng: random.Random) -> tuple[str, str, int]:
    pizzas, slices = rng.randint(2, 10), rng.choice((6, 8, 10, 12))
    people = rng.randint(2, 12)
    each = rng.randint(1, max(1, pizzas * slices // people))
    q = (f"A party orders {pizzas} pizzas, each cut into {slices} slices. {people} people each eat "
         f"{each} slices. How many slices are left over?")
    s = _Solution()
    total = s.step(f"{pizzas} * {slices}", "There are § slices.")
    eaten = s.step(f"{people} * {each}", "The guests eat § slices.")
    left = s.step(f"{total} - {eaten}", "§ slices are left.")
    return q, *s.finish(left, pizzas * slices - people * each)


@_template("phone_plan", "word")
def _phone_plan(rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(_PEOPLE)
    fee, per_gb, gb, months = rng.randint(5, 30), rng.randint(1, 6), rng.randint(1, 15), rng.randint(2, 12)
    q = (f"{p.name}'s phone plan costs ${fee} a month plus ${per_gb} for each gigabyte of data. "
         f"{p.cap_subj} uses {gb} gigabytes every month. How many dollars does {p.subj} pay over {months} months?")
    s = _Solution()
    data = s.step(f"{per_gb} * {gb}", "Data costs § dollars a month.")
    monthly = s.step(f"{fee} + {data}", "Each month's bill is § dollars.")
    total = s.step(f"{monthly} * {months}", f"Over {months} months {p.subj} pays § dollars.")
    return q, *s.finish(total, (fee + per_gb * gb) * months)


@_template("library_shelves", "word")
def _library_shelves(rng: random.Random) -> tuple[str, str, int]:
    shelves, per_shelf, extra_each = rng.randint(3, 15), rng.randint(10, 40), rng.randint(1, 8)
    books, new = shelves * per_shelf, shelves * extra_each
    q = (f"A library has {books} books spread equally over {shelves} shelves. It buys {new} new books "
         f"and spreads them equally over the same shelves. How many books are on each shelf now?")
    s = _Solution()
    before = s.step(f"{books} / {shelves}", "Each shelf had § books.")
    added = s.step(f"{new} / {shelves}", "Each shelf gets § new books.")
    now = s.step(f"{before} + {added}", "Each shelf now holds § books.")
    return q, *s.finish(now, per_shelf + extra_each)


# ----- basic arithmetic, worked the way a teacher would write it on the board


def _place_parts(n: int) -> list[int]:
    """Non-zero place-value parts, largest first: 407 -> [400, 7]."""
    digits = str(n)
    return [int(d) * 10 ** (len(digits) - i - 1) for i, d in enumerate(digits) if d != "0"] or [0]


@_template("arith_add", "arithmetic")
def _arith_add(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randint(100, 9999), rng.randint(10, 999)
    q = f"What is {a} + {b}?"
    s = _Solution()
    s.say(f"Add {b} to {a} one place value at a time.")
    acc = a
    for part in _place_parts(b):
        acc = s.step(f"{acc} + {part}", "§")
    return q, *s.finish(acc, a + b)


@_template("arith_sub", "arithmetic")
def _arith_sub(rng: random.Random) -> tuple[str, str, int]:
    a = rng.randint(200, 9999)
    b = rng.randint(10, min(999, a))
    q = f"What is {a} - {b}?"
    s = _Solution()
    s.say(f"Take {b} away from {a} one place value at a time.")
    acc = a
    for part in _place_parts(b):
        acc = s.step(f"{acc} - {part}", "§")
    return q, *s.finish(acc, a - b)


@_template("arith_mul", "arithmetic")
def _arith_mul(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randint(12, 999), rng.randint(11, 99)
    q = f"What is {a} * {b}?"
    s = _Solution()
    s.say(f"Split {b} into tens and ones and multiply each part by {a}.")
    parts = [s.step(f"{a} * {part}", "§") for part in _place_parts(b)]
    total = s.step(" + ".join(str(x) for x in parts), "§") if len(parts) > 1 else parts[0]
    return q, *s.finish(total, a * b)


@_template("arith_div", "arithmetic")
def _arith_div(rng: random.Random) -> tuple[str, str, int]:
    d, quotient = rng.randint(3, 19), rng.randint(12, 99)
    n = d * quotient
    tens = quotient // 10 * 10
    q = f"What is {n} / {d}?"
    s = _Solution()
    chunk = s.step(f"{d} * {tens}", f"{d} goes into {n} at least {tens} times: §.")
    rest = s.step(f"{n} - {chunk}", "What remains is §.")
    more = s.step(f"{rest} / {d}", "§.")
    total = s.step(f"{tens} + {more}", "So the quotient is §.")
    return q, *s.finish(total, quotient)


@_template("arith_order_of_operations", "arithmetic")
def _arith_order_of_operations(rng: random.Random) -> tuple[str, str, int]:
    a, b, c = rng.randint(2, 99), rng.randint(2, 12), rng.randint(2, 12)
    d = rng.randint(1, a + b * c)
    q = f"What is {a} + {b} * {c} - {d}?"
    s = _Solution()
    s.say("Multiply first, then add and subtract from left to right.")
    prod = s.step(f"{b} * {c}", "§")
    plus = s.step(f"{a} + {prod}", "§")
    total = s.step(f"{plus} - {d}", "§")
    return q, *s.finish(total, a + b * c - d)


@_template("arith_parentheses", "arithmetic")
def _arith_parentheses(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    c = rng.randint(5, 40)
    d = rng.randint(1, c - 1)
    q = f"What is ({a} + {b}) * ({c} - {d})?"
    s = _Solution()
    s.say("Work out the parentheses first.")
    x = s.step(f"{a} + {b}", "§")
    y = s.step(f"{c} - {d}", "§")
    total = s.step(f"{x} * {y}", "§")
    return q, *s.finish(total, (a + b) * (c - d))


@_template("arith_sum_list", "arithmetic")
def _arith_sum_list(rng: random.Random) -> tuple[str, str, int]:
    nums = [rng.randint(3, 250) for _ in range(rng.randint(4, 6))]
    q = f"Add these numbers: {', '.join(str(x) for x in nums)}."
    s = _Solution()
    s.say("Keep a running total.")
    acc = nums[0]
    for x in nums[1:]:
        acc = s.step(f"{acc} + {x}", "§")
    return q, *s.finish(acc, sum(nums))


@_template("arith_square", "arithmetic")
def _arith_square(rng: random.Random) -> tuple[str, str, int]:
    n = rng.randint(11, 299)
    parts = _place_parts(n)
    q = f"What is {n} squared?"
    s = _Solution()
    s.say(f"{n} squared means {n} times {n}. Split the second {n} into {' and '.join(map(str, parts))}.")
    products = [s.step(f"{n} * {part}", "§") for part in parts]
    total = s.step(" + ".join(str(x) for x in products), "§") if len(products) > 1 else products[0]
    return q, *s.finish(total, n * n)


@_template("arith_remainder", "arithmetic")
def _arith_remainder(rng: random.Random) -> tuple[str, str, int]:
    d = rng.randint(3, 25)
    quotient, r = rng.randint(2, 60), rng.randint(1, d - 1)
    n = d * quotient + r
    q = f"What is the remainder when {n} is divided by {d}?"
    s = _Solution()
    s.say(f"The largest multiple of {d} that is not more than {n} uses {quotient} groups.")
    m = s.step(f"{d} * {quotient}", "§")
    rem = s.step(f"{n} - {m}", "The remainder is §.")
    return q, *s.finish(rem, n % d)


@_template("arith_product_then_divide", "arithmetic")
def _arith_product_then_divide(rng: random.Random) -> tuple[str, str, int]:
    c = rng.randint(2, 12)
    a = c * rng.randint(2, 20)
    b = rng.randint(2, 30)
    q = f"What is {a} * {b} / {c}?"
    s = _Solution()
    s.say("Work from left to right.")
    prod = s.step(f"{a} * {b}", "§")
    total = s.step(f"{prod} / {c}", "§")
    return q, *s.finish(total, a * b // c)


@_template("arith_percent_of", "arithmetic")
def _arith_percent_of(rng: random.Random) -> tuple[str, str, int]:
    pct = rng.choice((5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 80))
    n = rng.randint(1, 100) * 20
    q = f"What is {pct}% of {n}?"
    s = _Solution()
    s.say(f"{pct}% means {pct} out of every 100.")
    value = s.step(f"{n} * {pct} / 100", "§")
    return q, *s.finish(value, n * pct // 100)


@_template("arith_mean", "arithmetic")
def _arith_mean(rng: random.Random) -> tuple[str, str, int]:
    k = rng.randint(3, 6)
    nums = [rng.randint(1, 99) for _ in range(k - 1)]
    last = rng.randint(1, 99)
    nums.append(last + (-(sum(nums) + last)) % k)
    q = f"What is the mean of {', '.join(str(x) for x in nums)}?"
    s = _Solution()
    total = s.step(" + ".join(str(x) for x in nums), "The sum is §.")
    mean = s.step(f"{total} / {k}", f"There are {k} numbers, so the mean is §.")
    return q, *s.finish(mean, sum(nums) // k)


TEMPLATES: tuple[str, ...] = tuple(sorted(_REGISTRY))
WORD_TEMPLATES: tuple[str, ...] = tuple(t for t in TEMPLATES if _REGISTRY[t][0] == "word")
ARITHMETIC_TEMPLATES: tuple[str, ...] = tuple(t for t in TEMPLATES if _REGISTRY[t][0] == "arithmetic")


# --------------------------------------------------------------------------- public API


def generate_one(template: str, rng: random.Random) -> dict:
    """One record from a named template, drawing numbers from `rng`."""
    if template not in _REGISTRY:
        raise KeyError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    kind, fn = _REGISTRY[template]
    question, solution, answer = fn(rng)
    return {"question": question, "solution": solution, "answer": answer, "template": template, "kind": kind}


def generate(n: int, seed: int, templates: Sequence[str] | None = None) -> list[dict]:
    """`n` problems with worked solutions, a pure function of `(n, seed, templates)`.

    Records have `question`, `solution` (steps, then `#### <answer>`), `answer` (a
    non-negative int), `template` and `kind` ("word" or "arithmetic"). Templates are dealt in
    rounds: each round is a seeded permutation of `templates` (all of them by default).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    names = tuple(TEMPLATES if templates is None else templates)
    if not names:
        raise ValueError("templates must not be empty")
    unknown = sorted(set(names) - set(_REGISTRY))
    if unknown:
        raise KeyError(f"unknown templates {unknown}; known: {', '.join(TEMPLATES)}")
    records: list[dict] = []
    order: list[str] = []
    for i in range(n):
        if i % len(names) == 0:
            # String seeds are hashed with SHA-512 by `random`, so they are stable across runs
            # and processes (unlike hash()).
            order = random.Random(f"lmforge.mathgen:{seed}:round:{i // len(names)}").sample(names, len(names))
        rng = random.Random(f"lmforge.mathgen:{seed}:item:{i}")
        records.append(generate_one(order[i % len(names)], rng))
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5, help="number of problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template", action="append", choices=TEMPLATES, help="restrict to these (repeatable)")
    parser.add_argument("--text", action="store_true", help="print pretraining documents instead of JSON")
    args = parser.parse_args(argv)
    for record in generate(args.n, args.seed, args.template):
        if args.text:
            sys.stdout.write(format_document(record) + "\n\n")
        else:
            sys.stdout.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
