"""The naive analyst baseline for the speed benchmark: one treatment-outcome pair at a time, the
way an analyst would script it without cohortflow.

`python -m bench.baseline --cdm DIR [--pairs N] [--out FILE]` (normally run by `bench.speed`, in
a child process so its peak memory is measured on its own).

What one pair does (each step timed):
  1. read: `pandas.read_parquet` of person, observation_period, drug_era and
     condition_occurrence (only the columns used), again for every pair, as a per-pair script
     does;
  2. cohort: new users of the treatment and of the comparator with the study's rules (`Rules`,
     the same values bench.speed writes into the study file): time zero = first drug_era of the
     drug; time zero inside an observation period; at least `prior_observation_days` observed
     before it; aged `min_age` or more (index year - year of birth); washout: observed at least
     `washout_days` and no era of the other arm's drug overlapping [-washout_days, -1]; persons
     eligible for both arms removed from both; follow-up from day `start_day` to the end of
     observation, at least one day at risk. The outcome: the first condition record of its
     concept in the risk window (time = event day - risk start + 1, else days at risk); persons
     with a record before the risk start are excluded. (The generated CDM has no deaths, so
     there is no censoring at death.)
  3. covariates: a pandas crosstab (dense 0/1) of condition concepts starting in the window
     [-365, -1], drug_era ingredients overlapping it (the two arm drugs left out), and
     one-hot sex, 5-year age group, index year and index month; covariates in fewer than
     max(1, min_prevalence x n) persons dropped: the same definitions as the study's
     covariates for this benchmark (`bench.speed` writes them into the study file);
  4. propensity: scikit-learn `LogisticRegressionCV`, L1 (`l1_ratios=(1.0,)`, liblinear), 10 C
     values, 3-fold CV on the log loss: cross-validated like ours, but with scikit-learn's own
     default grid and folds, fitted on the pair's analysis population (after the prior-outcome
     exclusion), where cohortflow fits once per comparison on the whole comparison cohort;
  5. outcome model: stabilised IPTW truncated at 10 (as cohortflow), lifelines `CoxPHFitter`
     weighted with robust (sandwich) SE; and the crude (unweighted) lifelines Cox, which checks
     that both paths built the same cohort and outcome (lifelines breaks ties by Efron's
     method, cohortflow by Breslow's: with whole-day times and few tied events the two agree
     to a few 1e-4 on the log scale).
The rules for "not estimable", as cohortflow's: an arm without events; fewer than 10 persons
in an arm (no propensity model); a lifelines fit with SE > MAX_SE (lifelines reports a monotone
partial likelihood as a huge coefficient rather than failing); a lifelines error.

Why: the speed benchmark reports cohortflow's end-to-end time over this baseline's and checks
that both give the same estimates, so the baseline is honest and simple: no caching between
pairs, no vectorisation across pairs, but nothing deliberately slow either.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

STEPS = ("read", "cohort", "covariates", "propensity", "cox")
MAX_SE = 10.0
"""A lifelines fit with a larger SE (log scale) is taken as not estimable (see `checked`)."""


@dataclass(frozen=True)
class Rules:
    """The study design both paths use (bench.speed writes the same values into the YAML)."""

    prior_observation_days: int = 365
    washout_days: int = 365
    min_age: int = 18
    start_day: int = 1
    covariate_window: tuple[int, int] = (-365, -1)
    min_prevalence: float = 0.001
    max_weight: float = 10.0
    min_per_arm: int = 10  # as cohortflow's propensity model (estimators.propensity)
    cv_folds: int = 3
    n_cs: int = 10


@dataclass(frozen=True)
class Pair:
    """One treatment-outcome pair, with the names the study file gives them."""

    treatment: str
    treatment_id: int
    comparator_id: int
    outcome: str
    outcome_id: int
    role: str = "outcome"


def read_tables(cdm: Path) -> dict[str, pd.DataFrame]:
    """The four CDM tables a pair needs, dates as datetime64 (the first thing a script does)."""
    person = pd.read_parquet(cdm / "person.parquet",
                             columns=["person_id", "gender_concept_id", "year_of_birth"])
    period = pd.read_parquet(cdm / "observation_period.parquet", columns=[
        "person_id", "observation_period_start_date", "observation_period_end_date"])
    drugs = pd.read_parquet(cdm / "drug_era.parquet", columns=[
        "person_id", "drug_concept_id", "drug_era_start_date", "drug_era_end_date"])
    conditions = pd.read_parquet(cdm / "condition_occurrence.parquet", columns=[
        "person_id", "condition_concept_id", "condition_start_date"])
    for frame in (period, drugs, conditions):
        for column in frame.columns:
            if column.endswith("_date"):
                frame[column] = pd.to_datetime(frame[column])
    return {"person": person, "period": period, "drugs": drugs, "conditions": conditions}


def new_user_cohort(tables: dict[str, pd.DataFrame], pair: Pair, rules: Rules) -> pd.DataFrame:
    """One row per eligible person: person_id, treated, index_date, risk_start, risk_end,
    days_at_risk, gender_concept_id, year_of_birth."""
    drugs = tables["drugs"]
    arms = drugs[drugs["drug_concept_id"].isin([pair.treatment_id, pair.comparator_id])]
    entries = (arms.groupby(["drug_concept_id", "person_id"], as_index=False)
               ["drug_era_start_date"].min().rename(columns={"drug_era_start_date": "index_date"}))
    entries["treated"] = entries["drug_concept_id"] == pair.treatment_id
    entries = entries.merge(tables["person"], on="person_id")
    entries = entries.merge(tables["period"], on="person_id")
    entries = entries[(entries["index_date"] >= entries["observation_period_start_date"])
                      & (entries["index_date"] <= entries["observation_period_end_date"])]
    observed = (entries["index_date"] - entries["observation_period_start_date"]).dt.days
    entries = entries[observed >= max(rules.prior_observation_days, rules.washout_days)]
    entries = entries[entries["index_date"].dt.year - entries["year_of_birth"] >= rules.min_age]
    # washout: no era of the other arm's drug overlapping [-washout_days, -1]
    other = entries[["person_id", "drug_concept_id", "index_date"]].merge(
        arms.rename(columns={"drug_concept_id": "other_drug"}), on="person_id")
    other = other[other["other_drug"] != other["drug_concept_id"]]
    recent = other[(other["drug_era_start_date"] < other["index_date"])
                   & (other["drug_era_end_date"] >= other["index_date"]
                      - pd.Timedelta(days=rules.washout_days))]
    entries = entries[~entries.set_index(["person_id", "drug_concept_id"]).index.isin(
        recent.set_index(["person_id", "drug_concept_id"]).index)]
    # eligible for both arms: removed from both
    entries = entries[~entries["person_id"].duplicated(keep=False)].copy()
    entries["risk_start"] = entries["index_date"] + pd.Timedelta(days=rules.start_day)
    entries["risk_end"] = entries["observation_period_end_date"]
    entries["days_at_risk"] = (entries["risk_end"] - entries["risk_start"]).dt.days + 1
    entries = entries[entries["days_at_risk"] >= 1]
    return entries[["person_id", "treated", "index_date", "risk_start", "risk_end",
                    "days_at_risk", "gender_concept_id", "year_of_birth"]].reset_index(drop=True)


def add_outcome(tables: dict[str, pd.DataFrame], cohort: pd.DataFrame, pair: Pair
                ) -> pd.DataFrame:
    """The cohort without persons with a prior outcome, with columns time and event."""
    conditions = tables["conditions"]
    events = conditions[conditions["condition_concept_id"] == pair.outcome_id].merge(
        cohort[["person_id", "risk_start", "risk_end"]], on="person_id")
    prior = events.loc[events["condition_start_date"] < events["risk_start"], "person_id"]
    inside = events[(events["condition_start_date"] >= events["risk_start"])
                    & (events["condition_start_date"] <= events["risk_end"])]
    first = inside.groupby("person_id")["condition_start_date"].min()
    cohort = cohort[~cohort["person_id"].isin(prior)].copy()
    event_date = cohort["person_id"].map(first)
    cohort["event"] = event_date.notna().astype(int)
    cohort["time"] = np.where(cohort["event"] == 1,
                              (event_date - cohort["risk_start"]).dt.days + 1,
                              cohort["days_at_risk"]).astype(float)
    return cohort.reset_index(drop=True)


def covariates(tables: dict[str, pd.DataFrame], cohort: pd.DataFrame, pair: Pair,
               rules: Rules) -> pd.DataFrame:
    """Dense 0/1 covariates, one row per cohort person (in cohort order)."""
    start, end = rules.covariate_window
    keys = cohort[["person_id", "index_date"]]
    conditions = tables["conditions"].merge(keys, on="person_id")
    offset = (conditions["condition_start_date"] - conditions["index_date"]).dt.days
    conditions = conditions[(offset >= start) & (offset <= end)]
    drugs = tables["drugs"].merge(keys, on="person_id")
    drugs = drugs[(drugs["drug_era_start_date"] <= drugs["index_date"] + pd.Timedelta(days=end))
                  & (drugs["drug_era_end_date"] >= drugs["index_date"]
                     + pd.Timedelta(days=start))
                  & ~drugs["drug_concept_id"].isin([pair.treatment_id, pair.comparator_id])]
    age = cohort["index_date"].dt.year - cohort["year_of_birth"]
    long = pd.concat([
        pd.DataFrame({"person_id": conditions["person_id"],
                      "covariate": "condition_" + conditions["condition_concept_id"].astype(str)}),
        pd.DataFrame({"person_id": drugs["person_id"],
                      "covariate": "drug_" + drugs["drug_concept_id"].astype(str)}),
        pd.DataFrame({"person_id": cohort["person_id"],
                      "covariate": "sex_" + cohort["gender_concept_id"].astype(str)}),
        pd.DataFrame({"person_id": cohort["person_id"],
                      "covariate": "age_group_" + (age // 5).astype(str)}),
        pd.DataFrame({"person_id": cohort["person_id"],
                      "covariate": "index_year_" + cohort["index_date"].dt.year.astype(str)}),
        pd.DataFrame({"person_id": cohort["person_id"],
                      "covariate": "index_month_" + cohort["index_date"].dt.month.astype(str)}),
    ])
    X = pd.crosstab(long["person_id"], long["covariate"]).clip(upper=1)
    X = X.reindex(cohort["person_id"], fill_value=0)
    floor = max(1.0, rules.min_prevalence * len(cohort))
    return X.loc[:, X.sum() >= floor]


def propensity(X: pd.DataFrame, treated: np.ndarray, rules: Rules, seed: int = 0) -> np.ndarray:
    """P(treated | X) from scikit-learn's cross-validated L1 logistic regression."""
    from sklearn.linear_model import LogisticRegressionCV

    model = LogisticRegressionCV(
        Cs=rules.n_cs, cv=rules.cv_folds, l1_ratios=(1.0,), solver="liblinear",
        scoring="neg_log_loss", max_iter=1000, random_state=seed, use_legacy_attributes=False)
    model.fit(X.to_numpy(dtype=float), treated)
    return model.predict_proba(X.to_numpy(dtype=float))[:, 1]


def stabilised_weights(ps: np.ndarray, treated: np.ndarray, rules: Rules) -> np.ndarray:
    """Stabilised ATE weights truncated at rules.max_weight."""
    share = treated.mean()
    weights = np.where(treated == 1, share / ps, (1 - share) / (1 - ps))
    return np.minimum(weights, rules.max_weight)


def lifelines_cox(frame: pd.DataFrame, weights: np.ndarray | None = None) -> dict:
    """log HR and SE of `treated` from lifelines (weighted: robust SE)."""
    from lifelines import CoxPHFitter

    data = frame[["time", "event", "treated"]].astype(float)
    fitter = CoxPHFitter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if weights is None:
            fitter.fit(data, duration_col="time", event_col="event")
        else:
            fitter.fit(data.assign(w=weights), duration_col="time", event_col="event",
                       weights_col="w", robust=True)
    return {"log_hr": float(fitter.params_["treated"]),
            "se": float(fitter.standard_errors_["treated"])}


def checked(fit: dict) -> dict:
    """A lifelines fit, or ValueError when it has no finite maximum: lifelines reports a
    monotone partial likelihood (no events where the other arm has them, after weighting) as
    a huge coefficient with a huge SE instead of failing; cohortflow's Cox refuses it."""
    if not (np.isfinite(fit["log_hr"]) and np.isfinite(fit["se"])) or fit["se"] > MAX_SE:
        raise ValueError(f"no finite maximum (log HR {fit['log_hr']:.3g}, SE {fit['se']:.3g})")
    return fit


def analyze_pair(cdm: Path, pair: Pair, rules: Rules, seed: int = 0) -> dict:
    """Everything for one pair from the Parquet files; the estimates and seconds per step.

    `status` is the IPTW estimate's (the analysis the script is for); the crude estimate,
    a check, has its own `crude_status`.
    """
    seconds = dict.fromkeys(STEPS, 0.0)
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[step] += now - clock
        clock = now

    row: dict = {**asdict(pair), "status": "ok", "message": None, "crude_status": "failed"}
    step = "read"
    try:
        tables = read_tables(cdm)
        lap(step)
        step = "cohort"
        cohort = add_outcome(tables, new_user_cohort(tables, pair, rules), pair)
        treated = cohort["treated"].to_numpy(dtype=int)
        row.update(n_treated=int(treated.sum()), n_comparator=int((1 - treated).sum()),
                   events_treated=int(cohort.loc[treated == 1, "event"].sum()),
                   events_comparator=int(cohort.loc[treated == 0, "event"].sum()))
        lap(step)
        for arm in ("treated", "comparator"):  # cohortflow's Cox refuses these too
            if row[f"events_{arm}"] == 0:
                raise ValueError(f"no events among the {arm}: hazard ratio not estimable")
        step = "cox"
        try:
            crude = checked(lifelines_cox(cohort))
            row.update(crude_status="ok", crude_log_hr=crude["log_hr"], crude_se=crude["se"])
        except Exception as exc:
            row["crude_message"] = f"{type(exc).__name__}: {exc}"
        lap(step)
        if min(row["n_treated"], row["n_comparator"]) < rules.min_per_arm:
            raise ValueError(f"fewer than {rules.min_per_arm} persons in an arm: no "
                             "propensity model")
        step = "covariates"
        X = covariates(tables, cohort, pair, rules)
        row["n_covariates"] = int(X.shape[1])
        lap(step)
        step = "propensity"
        ps = propensity(X, treated, rules, seed)
        lap(step)
        step = "cox"
        iptw = checked(lifelines_cox(cohort, stabilised_weights(ps, treated, rules)))
        lap(step)
        row.update(iptw_log_hr=iptw["log_hr"], iptw_se=iptw["se"])
    except Exception as exc:  # a pair the data cannot support is recorded, as in a script's log
        lap(step)
        row.update(status="failed", message=f"{type(exc).__name__}: {exc}")
    row["seconds"] = {name: round(value, 4) for name, value in seconds.items()}
    row["total_seconds"] = round(sum(seconds.values()), 4)
    return row


def run_pairs(cdm: Path, pairs: list[Pair], rules: Rules, progress: bool = False) -> list[dict]:
    """Analyse the pairs one after another, as a loop in an analyst's script."""
    rows = []
    for index, pair in enumerate(pairs, start=1):
        rows.append(analyze_pair(cdm, pair, rules))
        if progress:
            row = rows[-1]
            print(f"  baseline pair {index}/{len(pairs)} {pair.treatment} x {pair.outcome}: "
                  f"{row['status']} in {row['total_seconds']:.2f} s", flush=True)
    return rows


def spread_pairs(treatments: list[tuple[str, int]], outcomes: list[tuple[str, int, str]],
                 comparator_id: int, count: int) -> list[Pair]:
    """`count` treatment-outcome pairs spread over both lists: treatments (name, id) evenly
    over the list (it runs from the smallest to the largest drug; with `count` above its length,
    each once per round), outcomes (name, id, role) visited with a stride of 29, shifted by one
    each round (for the scale CDM's 100 x 70 study every pair differs)."""
    count = min(count, len(treatments) * len(outcomes))
    pairs = []
    for index in range(count):
        if count >= len(treatments):
            name, cid = treatments[index % len(treatments)]
        else:
            name, cid = treatments[round(index * (len(treatments) - 1) / max(1, count - 1))]
        shift = index // len(treatments)
        outcome, outcome_id, role = outcomes[(index * 29 + shift) % len(outcomes)]
        pairs.append(Pair(name, cid, comparator_id, outcome, outcome_id, role))
    return pairs


def default_pairs(count: int) -> list[Pair]:
    """`count` pairs of the scale CDM's 100 candidates x (20 outcomes + 50 negative controls)."""
    from bench.scale_cdm import (
        CANDIDATE_IDS,
        COMPARATOR_ID,
        NEGATIVE_CONTROL_IDS,
        OUTCOME_IDS,
        concept_name,
    )

    outcomes = [(concept_name(c), c, "outcome") for c in OUTCOME_IDS] + [
        (concept_name(c), c, "negative_control") for c in NEGATIVE_CONTROL_IDS]
    return spread_pairs([(concept_name(c), c) for c in CANDIDATE_IDS], outcomes, COMPARATOR_ID,
                        count)


def child_main(spec: str) -> None:
    """Entry point of the measured child: spec is JSON (cdm, pairs, rules, out)."""
    args = json.loads(spec)
    rules = Rules(**{k: tuple(v) if isinstance(v, list) else v
                     for k, v in args["rules"].items()})
    pairs = [Pair(**p) for p in args["pairs"]]
    started = time.perf_counter()
    rows = run_pairs(Path(args["cdm"]), pairs, rules, progress=args.get("progress", False))
    Path(args["out"]).write_text(json.dumps(
        {"rows": rows, "seconds": round(time.perf_counter() - started, 3)}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cdm", type=Path, help="a scale CDM folder (bench.scale_cdm)")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child)
        return
    if args.cdm is None:
        parser.error("--cdm is required")
    rows = run_pairs(args.cdm, default_pairs(args.pairs), Rules(), progress=True)
    text = json.dumps(rows, indent=1)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
