"""The synthetic commercial real estate (CRE) underwriting data set: the built-in domain's generator.

`generate_scenarios` follows the reference's recipe draw for draw, so the reference data sets come back byte
for byte: train is seed 42 with ids cre_00000..cre_02999, eval is seed 43 (the train seed + 1) with
ids cre_10000..cre_10499. Both are written with `json.dump(scenarios, f, indent=2)`.

Any change to the order of draws, to a rounding, or to the key order of a record changes the files;
the tests pin both reference files.
"""

import random

from ...formulas import get_expert
from ...runtime.files import user_path, write_json_atomically
from ..records import EVAL_FILE, TRAIN_FILE

# The reference generator's vocabulary (`shared/reference/generator_vocab.json`), embedded so the
# package reproduces the data set on its own. List order matters: `random.choice` indexes into it.
VOCAB = {
    "property_types": [
        "multifamily", "office", "retail", "industrial", "mixed-use", "hotel", "self-storage",
        "medical office",
    ],
    "locations": [
        "Dallas, TX", "Miami, FL", "Phoenix, AZ", "Denver, CO", "Atlanta, GA", "Chicago, IL",
        "Los Angeles, CA", "New York, NY", "Seattle, WA", "Austin, TX", "Nashville, TN",
        "Charlotte, NC", "Tampa, FL", "Houston, TX", "Portland, OR", "San Diego, CA",
        "Raleigh, NC", "Salt Lake City, UT", "Minneapolis, MN", "Columbus, OH",
    ],
    "name_prefixes": [
        "Oakwood", "Riverstone", "Parkview", "Summit", "Heritage", "Lakeside", "Crossroads",
        "Horizon", "Gateway", "Pinnacle", "Meridian", "Sterling", "Granite", "Cedar",
        "Magnolia", "Falcon", "Eagle", "Harbor", "Midtown", "Uptown", "Westgate", "Northstar",
    ],
    "name_suffixes": {
        "multifamily": ["Apartments", "Residences", "Village", "Gardens", "Heights"],
        "office": ["Center", "Tower", "Plaza", "Campus"],
        "retail": ["Shopping Center", "Plaza", "Marketplace"],
        "industrial": ["Business Park", "Logistics Center"],
        "mixed-use": ["Village", "District"],
        "hotel": ["Hotel", "Suites", "Resort"],
        "self-storage": ["Self Storage", "Storage Center"],
        "medical office": ["Medical Center", "Medical Plaza"],
    },
}

TRAIN_SEED = 42
# Eval ids start here so they can never collide with train ids.
EVAL_ID_OFFSET = 10_000

_UNIT_TYPES = ("multifamily", "hotel")
_SQFT_TYPES = ("office", "retail", "industrial", "medical office", "mixed-use")
# The metrics a complexity-1 question can ask for, in the order `random.choice` indexes them;
# complexity 2 and up carry markers for all four in this order.
_SINGLE_METRICS = ["dscr", "ltv", "cap_rate", "debt_yield"]


def eval_seed(train_seed):
    """The eval set's seed: one past the train seed (42 -> 43, as in the reference)."""
    return train_seed + 1


def _money(amount):
    return "${:,.0f}".format(amount)


def _annual_debt_service(loan, rate, years):
    m = rate / 12
    n = 12 * years
    if m <= 1e-6:
        monthly = loan / n
    else:
        compound = (1 + m) ** n
        monthly = loan * m * compound / (compound - 1)
    return round(12 * monthly, 2)


def _draw_property_and_financials(rng):
    """Steps 2 to 9 of the recipe; every draw happens here, in the recipe's order."""
    property_type = rng.choice(VOCAB["property_types"])
    location = rng.choice(VOCAB["locations"])
    prefix = rng.choice(VOCAB["name_prefixes"])
    name = prefix + " " + rng.choice(VOCAB["name_suffixes"][property_type])

    # All three ranges are drawn before choosing one, so each scenario consumes three randints.
    price_bands = [rng.randint(1, 10), rng.randint(10, 50), rng.randint(50, 200)]
    price = rng.choice(price_bands) * 1_000_000

    ltv_target = rng.uniform(0.55, 0.80)
    loan = round(price * ltv_target / 100_000) * 100_000

    rate = round(rng.uniform(0.045, 0.085), 4)
    amortization_years = rng.choice([25, 30])

    cap = rng.uniform(0.04, 0.10)
    noi = round(price * cap / 1000) * 1000

    expense_ratio = rng.uniform(0.30, 0.55)
    egi = round(noi / (1 - expense_ratio) / 1000) * 1000
    opex = egi - noi

    vacancy = round(rng.uniform(0.03, 0.10), 3)
    gpr = round(egi / (1 - vacancy) / 1000) * 1000
    growth = round(rng.uniform(0.01, 0.05), 3)

    units = rng.choice(range(20, 500, 10)) if property_type in _UNIT_TYPES else None
    sqft = rng.choice(range(10000, 500000, 5000)) if property_type in _SQFT_TYPES else None

    prop = {"name": name, "type": property_type, "location": location, "units": units, "sqft": sqft}
    financials = {
        "purchase_price": price,
        "loan_amount": loan,
        "interest_rate": rate,
        "amortization_years": amortization_years,
        "gpr": gpr,
        "vacancy_rate": vacancy,
        "egi": egi,
        "opex": opex,
        "noi": noi,
        "noi_growth_rate": growth,
    }
    return prop, financials


def _ground_truth(fin):
    price, loan, noi = fin["purchase_price"], fin["loan_amount"], fin["noi"]
    growth = fin["noi_growth_rate"]
    ads = _annual_debt_service(loan, fin["interest_rate"], fin["amortization_years"])
    return {
        "annual_debt_service": ads,
        "dscr": round(noi / ads, 3) if ads > 0 else 0,
        "cap_rate": round(noi / price * 100, 2),
        "ltv": round(loan / price * 100, 2),
        "debt_yield": round(noi / loan * 100, 2) if loan > 0 else 0,
        "noi_year_3": round(noi * (1 + growth) ** 3, 2),
        "noi_year_5": round(noi * (1 + growth) ** 5, 2),
    }


def _prompt(complexity, prop, fin, truth, rng):
    price, loan, noi = _money(fin["purchase_price"]), _money(fin["loan_amount"]), _money(fin["noi"])
    ads = _money(truth["annual_debt_service"])
    rate_pct = f"{fin['interest_rate'] * 100:.2f}%"
    years = fin["amortization_years"]
    name, kind, location = prop["name"], prop["type"], prop["location"]

    if complexity == 1:
        # The only draw made after the ground truth: which single metric the question asks for.
        metric = rng.choice(_SINGLE_METRICS)
        return {
            "dscr": (
                f"What is the DSCR for a property with NOI of {noi} "
                f"and annual debt service of {ads}?"
            ),
            "ltv": f"Calculate the LTV for a {loan} loan on a {price} property.",
            "cap_rate": f"What cap rate does a {price} property with {noi} NOI trade at?",
            "debt_yield": f"What is the debt yield on a {loan} loan with {noi} NOI?",
        }[metric]
    if complexity == 2:
        return (
            f"Compute key metrics for {name}, a {kind} in {location}. "
            f"Price: {price}. Loan: {loan}. NOI: {noi}. ADS: {ads}."
        )
    if complexity == 3:
        return (
            f"Analyze: {name} ({kind}) in {location}. "
            f"Price {price}, loan {loan} at {rate_pct} / {years}yr. NOI {noi}. "
            "Calculate ADS, then DSCR, LTV, cap rate."
        )
    if prop["units"]:
        size = f" ({prop['units']} units)"
    elif prop["sqft"]:
        size = f" ({prop['sqft']:,} SF)"
    else:
        size = ""
    return "\n".join([
        "Full underwriting analysis:",
        "",
        f"Property: {name}{size}",
        f"Type: {kind.title()}",
        f"Location: {location}",
        f"Price: {price}",
        f"Loan: {loan}",
        f"Rate: {rate_pct}",
        f"Amort: {years}yr",
        f"GPR: {_money(fin['gpr'])}",
        f"Vacancy: {fin['vacancy_rate'] * 100:.1f}%",
        f"OpEx: {_money(fin['opex'])}",
        f"NOI: {noi}",
        f"Growth: {fin['noi_growth_rate'] * 100:.1f}%/yr",
        "",
        "Provide DSCR, LTV, cap rate, debt yield, 3-year NOI projection, and recommendation.",
    ])


def _marker(expert, inputs, output, order=None):
    marker = {"expert": expert, "expert_id": get_expert(expert).expert_id, "inputs": inputs, "output": output}
    if order is not None:
        marker["order"] = order
        if expert == "dscr":
            marker["depends_on"] = "annual_debt_service"
    return marker


def _computation_markers(complexity, prompt, fin, truth):
    price, loan, noi = fin["purchase_price"], fin["loan_amount"], fin["noi"]
    ads = truth["annual_debt_service"]
    inputs = {
        "dscr": {"noi": noi, "ads": ads},
        "ltv": {"loan": loan, "value": price},
        "cap_rate": {"noi": noi, "price": price},
        "debt_yield": {"noi": noi, "loan": loan},
    }

    if complexity == 1:
        # The reference recovers the asked metric from the prompt's wording, not from the draw.
        text = prompt.lower()
        if "dscr" in text:
            expert = "dscr"
        elif "ltv" in text:
            expert = "ltv"
        elif "cap rate" in text:
            expert = "cap_rate"
        else:
            expert = "debt_yield"
        return [_marker(expert, inputs[expert], truth[expert])]
    if complexity == 2:
        return [_marker(e, inputs[e], truth[e]) for e in _SINGLE_METRICS]

    markers = [
        _marker(
            "annual_debt_service",
            {"principal": loan, "rate": fin["interest_rate"], "years": fin["amortization_years"]},
            ads,
            order=1,
        )
    ]
    markers += [_marker(e, inputs[e], truth[e], order=2) for e in _SINGLE_METRICS]
    if complexity == 4:
        markers.append(_marker(
            "noi_projection",
            {"noi": noi, "growth": fin["noi_growth_rate"], "years": 3},
            truth["noi_year_3"],
            order=3,
        ))
    return markers


def generate_scenarios(n, seed, id_offset):
    """`n` scenarios drawn from `random.Random(seed)`, with ids cre_{id_offset:05d} onwards."""
    rng = random.Random(seed)
    scenarios = []
    for i in range(n):
        complexity = rng.choices([1, 2, 3, 4], weights=[0.15, 0.25, 0.35, 0.25])[0]
        prop, financials = _draw_property_and_financials(rng)
        truth = _ground_truth(financials)
        prompt = _prompt(complexity, prop, financials, truth, rng)
        scenarios.append({
            "id": "cre_%05d" % (id_offset + i),
            "complexity": complexity,
            "property": prop,
            "financials": financials,
            "ground_truth": truth,
            "input_prompt": prompt,
            "computation_markers": _computation_markers(complexity, prompt, financials, truth),
        })
    return scenarios


def write_dataset(out_dir, seed=TRAIN_SEED, n_train=3000, n_eval=500):
    """Write `train.json` (`seed`, ids from 0) and `eval.json` (`seed + 1`, ids from 10000).

    The defaults reproduce the reference data sets. Returns the two paths, train first.
    """
    out_dir = user_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = out_dir / TRAIN_FILE, out_dir / EVAL_FILE
    write_json_atomically(train_path, generate_scenarios(n_train, seed, 0))
    write_json_atomically(eval_path, generate_scenarios(n_eval, eval_seed(seed), EVAL_ID_OFFSET))
    return train_path, eval_path
