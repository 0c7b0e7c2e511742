"""The HTML report of a run (results.report): every section for every comparison, embedded
figures only (no network), small counts masked, store strings escaped; rendered headless in
Chromium when it is installed (screenshots land in data/report-screenshots/)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from cohort.synthetic import generate_demo_cdm
from results.report import SUBSECTIONS, write_report
from tests.plain_run import run_study_plain

ROOT = Path(__file__).parents[1]
GIBLEED = ROOT.parent / "shared" / "data" / "eunomia_gibleed"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "data" / "report-screenshots"
SCRIPT = "<script>alert(1)</script>"
DEMO_SOURCE = "source: ../data/demo/cdm"


class Page(HTMLParser):
    """What the tests look at in a report: ids, links, images, count cells, scripts."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self.images: list[dict] = []
        self.scripts = 0
        self.external: list[str] = []
        self.counts: list[str] = []
        self._in_count = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a" and "href" in attrs:
            self.hrefs.append(attrs["href"])
        if tag == "img":
            self.images.append(attrs)
        if tag == "script":
            self.scripts += 1
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            if value and not value.startswith(("#", "data:")):
                self.external.append(f"{tag} {name}={value}")
        if tag == "link":
            self.external.append(f"link {attrs}")
        self._in_count = tag == "td" and "count" in (attrs.get("class") or "").split()
        if self._in_count:
            self.counts.append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_count = False

    def handle_data(self, data):
        if self._in_count:
            self.counts[-1] += data


def _study(text: str, **replace: str) -> str:
    text = text.replace(DEMO_SOURCE, "source: cdm")
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def _render(results: Path, out: Path, run_id: str | None = None) -> tuple[Path, str, float]:
    started = time.perf_counter()
    path = write_report(results, out, run_id)
    seconds = time.perf_counter() - started
    return path, path.read_text(encoding="utf-8"), seconds


def _comparison_ids(results: Path, run_id: str) -> list[int]:
    with duckdb.connect(str(results), read_only=True) as con:
        return [r[0] for r in con.execute(
            "SELECT DISTINCT comparison_id FROM estimates WHERE run_id = ? ORDER BY 1",
            [run_id]).fetchall()]


def _count_values(page: Page) -> list[str]:
    """Every number-like value shown in a count cell ("2,204 / <5" gives two)."""
    return [part.strip() for cell in page.counts for part in cell.split("/")]


def _assert_masked(page: Page, min_cell_count: int) -> None:
    values = _count_values(page)
    assert values
    for value in values:
        if value in ("-", "0", f"<{min_cell_count}", f"<{min_cell_count} removed"):
            continue
        assert value.replace(",", "").isdigit(), value
        assert int(value.replace(",", "")) >= min_cell_count, value


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("report_demo")
    generate_demo_cdm(out / "cdm", persons=20_000, seed=0)
    study = out / "demo.yaml"
    study.write_text(_study((ROOT / "configs" / "demo.yaml").read_text()))
    results = out / "results.duckdb"
    run = run_study_plain(study, results, out / "data")
    path, text, seconds = _render(results, out / "report.html")  # default: the latest run
    return {"results": results, "run": run, "path": path, "html": text, "page": Page(text),
            "seconds": seconds}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2,000-person CDM with two variants: min_cell_count 1000 and a description holding a
    script tag; and crude estimates only, without negative or positive controls."""
    out = tmp_path_factory.mktemp("report_tiny")
    generate_demo_cdm(out / "cdm", persons=2_000, seed=1)
    demo_text = (ROOT / "configs" / "demo.yaml").read_text()
    masked = out / "masked.yaml"
    masked.write_text(_study(demo_text, **{
        "min_cell_count: 5": "min_cell_count: 1000",
        "description: Synthetic": f"description: {SCRIPT} Synthetic"}))
    controls = demo_text[demo_text.index("negative_controls:"):demo_text.index("follow_up:")]
    crude = out / "crude.yaml"
    crude.write_text(_study(demo_text, **{
        controls: "", "study: demo": "study: demo_crude",
        "estimators: [crude, iptw, ps_strata]": "estimators: [crude]"}))
    runs = {}
    for name, study in (("masked", masked), ("crude", crude)):
        results = out / f"{name}.duckdb"
        run = run_study_plain(study, results, out / "data")
        path, text, _ = _render(results, out / f"{name}.html", run["run_id"])
        runs[name] = {"results": results, "run": run, "path": path, "html": text,
                      "page": Page(text)}
    return runs


@pytest.fixture(scope="module")
def gibleed(tmp_path_factory):
    if not GIBLEED.is_dir():
        pytest.skip(f"{GIBLEED} is absent (team data not here): no GiBleed report")
    out = tmp_path_factory.mktemp("report_gibleed")
    results = out / "results.duckdb"
    run = run_study_plain(ROOT / "configs" / "gibleed.yaml", results, out / "data")
    path, text, seconds = _render(results, out / "gibleed.html")
    return {"results": results, "run": run, "path": path, "html": text, "page": Page(text),
            "seconds": seconds}


def _assert_sections(report) -> None:
    page = report["page"]
    ids = _comparison_ids(report["results"], report["run"]["run_id"])
    assert ids and len(ids) == report["run"]["n_comparisons"]
    assert {"toc", "summary", "ranking", "js-errors"} <= page.ids
    for cid in ids:
        assert f"comparison-{cid}" in page.ids
        assert f"#comparison-{cid}" in page.hrefs                    # table of contents
        for key, _ in SUBSECTIONS:
            assert f"comparison-{cid}-{key}" in page.ids
            assert f"#comparison-{cid}-{key}" in page.hrefs


def _assert_self_contained(report) -> None:
    page, text = report["page"], report["html"]
    assert page.external == []
    assert "http://" not in text and "https://" not in text
    for image in page.images:
        assert image["src"].startswith("data:image/png;base64,")
        png = base64.b64decode(image["src"].split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


def _figures(report) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for image in report["page"].images:
        kinds[image["data-figure"]] = kinds.get(image["data-figure"], 0) + 1
    return kinds


def test_demo_report_has_every_section_for_every_comparison(demo):
    _assert_sections(demo)
    assert demo["run"]["run_id"] in demo["html"]                  # the latest run by default
    assert "Synthetic screen of four drugs" in demo["html"]
    assert demo["html"].count('<table class="sortable') >= 1 + 4 * 3


def test_demo_report_embeds_every_figure(demo):
    assert len(demo["page"].images) == 1 + 4 * 5
    assert _figures(demo) == {"forest": 1, "attrition": 4, "ps": 4, "balance": 4,
                              "calibration": 4, "km": 4}
    _assert_self_contained(demo)


def test_demo_report_renders_in_a_few_seconds(demo):
    print(f"demo report: {demo['seconds']:.2f} s, {demo['path'].stat().st_size / 1e6:.1f} MB")
    assert demo["seconds"] < 20


def test_demo_counts_are_shown_and_small_ones_masked(demo):
    _assert_masked(demo["page"], 5)
    with duckdb.connect(str(demo["results"]), read_only=True) as con:
        treated = con.execute("SELECT treated_persons FROM attrition WHERE comparison_id = 1 "
                              "AND step = 'at_risk'").fetchone()[0]
    assert f"{treated:,}" in demo["page"].counts


def test_counts_below_min_cell_count_are_masked_everywhere(tiny):
    report = tiny["masked"]
    page, text = report["page"], report["html"]
    _assert_masked(page, 1000)
    assert "&lt;1000" in text and sum(v == "<1000" for v in _count_values(page)) > 50
    with duckdb.connect(str(report["results"]), read_only=True) as con:
        small = {v for (v,) in con.execute("""
            SELECT treated_persons FROM attrition UNION SELECT comparator_persons FROM attrition
            UNION SELECT n_treated FROM estimates UNION SELECT events_treated FROM estimates
            UNION SELECT events_comparator FROM estimates""").fetchall()
            if v is not None and 0 < v < 1000}
    assert len(small) > 20
    shown = {v.replace(",", "") for v in _count_values(page)}
    assert not shown & {str(v) for v in small}
    # free text (warnings, failure messages) has its counts masked too
    assert "only 2" not in text
    assert not re.search(r"\b[1-9]\d{0,2} (events|at risk)\b", text)
    assert re.search(r"&lt;1000 (events|at risk)", text)


def test_store_strings_are_escaped(tiny):
    text, page = tiny["masked"]["html"], tiny["masked"]["page"]
    assert SCRIPT not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert page.scripts == 2                                     # the report's own two
    _assert_sections(tiny["masked"])


def test_crude_only_run_without_controls(tiny):
    report = tiny["crude"]
    _assert_sections(report)
    _assert_self_contained(report)
    assert _figures(report) == {"forest": 1, "attrition": 4, "km": 4}
    assert "no negative-control estimates" in report["html"]
    assert "crude hazard ratios only" in report["html"]
    assert "Ranking (crude)" in report["html"]
    _assert_masked(report["page"], 5)


def test_failed_estimates_and_outcomes_without_events(tiny, tmp_path):
    results = tmp_path / "failed.duckdb"
    shutil.copy(tiny["crude"]["results"], results)
    run_id = tiny["crude"]["run"]["run_id"]
    with duckdb.connect(str(results)) as con:
        con.execute("""
            UPDATE estimates SET status = 'failed', estimate = NULL, ci_low = NULL,
                   ci_high = NULL, se = NULL, p_value = NULL, events_treated = 0,
                   message = 'no events among the treated (3 at risk): hazard ratio not '
                             || 'estimable <b>'
            WHERE comparison_id = 1 AND outcome = 'outcome_1'""")
        con.execute("DELETE FROM km_curves WHERE comparison_id = 1 AND outcome = 'outcome_1'")
    _, text, _ = _render(results, tmp_path / "failed.html", run_id)
    page = Page(text)
    assert "failed</span>: no events among the treated (&lt;5 at risk)" in text
    assert "(3 at risk)" not in text and "<b>" not in text and "&lt;b&gt;" in text
    assert len(page.images) == 1 + 4 * 2
    _assert_masked(page, 5)


@pytest.mark.shared_data
def test_gibleed_report(gibleed):
    _assert_sections(gibleed)
    _assert_self_contained(gibleed)
    assert _figures(gibleed) == {"forest": 1, "attrition": 1, "ps": 1, "balance": 1, "km": 1}
    assert "no negative-control estimates" in gibleed["html"]
    assert "celecoxib" in gibleed["html"] and "gi_bleed" in gibleed["html"]
    # IPTW (|SMD| 0.092) and PS strata pass the 0.1 gate and are ranked (issue #16 changed the
    # CV folds: IPTW missed the gate by a hair, 0.101, before)
    assert "No iptw estimate of this run passed every diagnostic" not in gibleed["html"]
    ranking = gibleed["html"].split('<section id="ranking">')[1].split("</section>")[0]
    assert "<td>celecoxib</td><td>diclofenac</td><td>1.34 (1.09" in ranking
    _assert_masked(gibleed["page"], 5)


@pytest.mark.skipif(not CHROMIUM.exists(),
                    reason=f"{CHROMIUM} is absent: apt-get install -y chromium to render "
                           "the report headless")
@pytest.mark.parametrize("which", ["demo", pytest.param("gibleed",
                                                        marks=pytest.mark.shared_data)])
def test_report_renders_in_headless_chromium(which, request, tmp_path):
    report = request.getfixturevalue(which)
    flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    url = report["path"].resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines()
               if "CONSOLE" in line and ("Uncaught" in line or "ERROR" in line)]
    assert console == []
    assert re.search(r'<div id="js-errors">\s*</div>', dom.stdout), "window.onerror fired"
    images = len(report["page"].images)
    assert f'data-images-loaded="{images}/{images}"' in dom.stdout  # every PNG decoded

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / f"{which}.png"
    shot.unlink(missing_ok=True)
    # tall enough for the summary, the ranking and every section of the first comparison
    taken = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1400,9000", url],
                           capture_output=True, text=True, timeout=180)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 20_000
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (9000, 1400)
    assert float(np.std(pixels)) > 0.05                          # not a blank page
    ink = (pixels.min(axis=2) < 0.5).mean(axis=1)                # per row of pixels
    assert ink[:4000].mean() > 0.01
    if which == "demo":  # 4 comparisons: the first one's later sections fill the lower part
        assert all(band.mean() > 0.003 for band in np.array_split(ink, 6))


def test_sections_drawn_in_worker_processes_match_the_sequential_ones(demo, monkeypatch):
    """A screen's sections are drawn by spawned workers: the same HTML, in the same order."""
    from results import report

    data = report.load_run(demo["results"], demo["run"]["run_id"])
    comparisons = report._comparisons(data)
    sequential = report._comparison_sections(data, comparisons)
    monkeypatch.setattr(report, "PARALLEL_FROM", 1)
    monkeypatch.setattr(report.os, "cpu_count", lambda: 2)
    assert report._comparison_sections(data, comparisons) == sequential


def test_kaplan_meier_panels_are_capped_at_the_outcomes_with_most_events(demo, monkeypatch):
    from results import report

    data = report.load_run(demo["results"], demo["run"]["run_id"])
    monkeypatch.setattr(report, "KM_MAX_PANELS", 2)
    section = report._km(data, 1, ("a", "b"), "comparison-1")
    assert "Shown: the 2 of 6 outcomes of interest with the most events" in section


@pytest.mark.parametrize("counts, mcc", [
    ([0, 1, 2, 3, 0, 0, 10, 1, 0, 2], 5),
    ([7, 0, 0, 0, 0, 0, 0, 0, 0, 4], 5),
    ([1] * 10, 3),
    ([0, 0, 40, 0, 0], 5),
    ([2, 2, 2], 0),
])
def test_preference_bars_each_hold_at_least_min_cell_count_persons(counts, mcc):
    from results.masking import pooled_bins

    counts = np.asarray(counts, dtype=float)
    edges = np.linspace(0.0, 1.0, counts.size + 1)
    lows, highs, persons = pooled_bins(edges, counts, mcc)
    assert persons.sum() == counts.sum()                             # nobody lost
    assert (lows[1:] == highs[:-1]).all() and lows[0] == 0 and highs[-1] == 1
    assert set(lows) | set(highs) <= set(edges)
    assert (persons[persons > 0] >= mcc).all()                       # no small bar to read
    if mcc <= 1:
        assert np.allclose(persons, counts)                          # nothing to merge


def test_plotted_curves_and_preference_bars_hide_small_counts(demo, monkeypatch):
    """What reaches the plots: KM points of arms with at least min_cell_count events and at
    least min_cell_count at risk; preference bars of at least min_cell_count persons. The
    store keeps the exact curves."""
    from results import report
    from results.masking import arm_events

    data = report.load_run(demo["results"], demo["run"]["run_id"])
    mcc = 100
    data.min_cell_count = mcc
    assert (data.km["at_risk"] < mcc).any() and data.km["at_risk"].notna().all()
    events = arm_events(data.estimates).set_index(["comparison_id", "outcome", "arm"])
    assert (events["events"] < mcc).any() and (events["events"] >= mcc).any()
    panels_seen, bars_seen = [], []
    monkeypatch.setattr(report.plots, "km_plot",
                        lambda panels, *a: panels_seen.extend(panels) or "")
    monkeypatch.setattr(report.plots, "preference_plot",
                        lambda t, c, *a: bars_seen.extend([t, c]) or "")
    for cid, _, _ in report._comparisons(data):
        report._km(data, cid, ("a", "b"), "x")
        report._preference(data, cid, ("a", "b"), "x")
    plotted = pd.concat([curves for _, curves in panels_seen])
    assert len(plotted) and (plotted["at_risk"] >= mcc).all()
    drawn_arms = set(map(tuple, plotted[["comparison_id", "outcome", "arm"]].to_numpy()))
    assert all(events.loc[key, "events"] >= mcc for key in drawn_arms)
    assert len(drawn_arms) == int((events.loc[events.index.isin(
        set(map(tuple, data.km[["comparison_id", "outcome", "arm"]].to_numpy())))]["events"]
        >= mcc).sum())
    sizes = data.ps.groupby(["comparison_id", "arm"])["persons"].sum()
    arms = [(cid, arm) for cid, _, _ in report._comparisons(data)
            for arm in ("treated", "comparator")]
    assert len(bars_seen) == len(arms)
    for key, bars in zip(arms, bars_seen, strict=True):
        assert (bars is None) == (sizes[key] < mcc)
        if bars is not None:
            edges, density = bars
            persons = density * np.diff(edges) * sizes[key]
            assert (persons[persons > 1e-6] >= mcc - 1e-6).all()
    assert any(bars is not None for bars in bars_seen)


def test_curve_and_histogram_exports_leave_out_small_counts(demo, tmp_path):
    """The demo run with its min_cell_count raised to 100: curves only of arms with 100+
    events, cut where fewer than 100 remain at risk, without the numbers at risk; histogram
    bins pooled to 100+ persons (arm totals kept)."""
    import json

    from flows.cli import main
    from results.masking import arm_events

    results = tmp_path / "results.duckdb"
    shutil.copy(demo["results"], results)
    mcc = 100
    with duckdb.connect(str(results)) as con:
        config = json.loads(con.execute("SELECT config_json FROM runs").fetchone()[0])
        con.execute("UPDATE runs SET config_json = ?",
                    [json.dumps({**config, "min_cell_count": mcc})])
        stored = con.execute("SELECT * FROM km_curves").df()
        bins = con.execute("SELECT * FROM ps_distribution").df()
        events = arm_events(con.execute("SELECT * FROM estimates").df())
    enough = events[events["events"] >= mcc]
    expected = stored[stored["at_risk"] >= mcc].merge(
        enough[["comparison_id", "outcome", "arm"]], on=["comparison_id", "outcome", "arm"])
    assert 0 < len(expected) < int((stored["at_risk"] >= mcc).sum())
    curves, pooled = tmp_path / "km.parquet", tmp_path / "ps.csv"
    assert main(["export", "km_curves", "--out", str(curves), "--results", str(results)]) == 0
    assert main(["export", "ps_distribution", "--out", str(pooled),
                 "--results", str(results)]) == 0
    exported = pd.read_parquet(curves)
    assert "at_risk" not in exported and len(exported) == len(expected)
    shared = pd.read_csv(pooled)
    assert (shared["persons"].astype(int).isin([0]) | (shared["persons"].astype(int) >= mcc)
            ).all()
    totals = bins.groupby(["comparison_id", "arm"])["persons"].sum()
    assert shared.groupby(["comparison_id", "arm"])["persons"].sum().to_dict() == {
        key: total for key, total in totals.items() if total >= mcc}
    assert len(shared) < len(bins)


def test_a_screen_forest_plot_is_subset_and_every_estimate_goes_to_a_volcano(demo,
                                                                             monkeypatch):
    from results import report

    data = report.load_run(demo["results"], demo["run"]["run_id"])
    forest = report._forest_rows(data)
    monkeypatch.setattr(report, "FOREST_MAX_LINES", 12)
    shown = report._forest_subset(forest)
    outcomes = forest["outcome"].nunique()
    per_outcome = max(report.FOREST_MIN_PER_OUTCOME, 12 // outcomes - 1)
    assert (shown.groupby("outcome").size() <= per_outcome).all()
    for outcome, rows in forest.groupby("outcome"):   # passing first, then smallest p
        kept = shown[shown["outcome"] == outcome]
        rest = rows.drop(kept.index)
        if (~kept["passed"]).any():
            assert rest["passed"].sum() == 0
            assert rest["p"].min() >= kept.loc[~kept["passed"], "p"].max()
    section = report._ranking(data)
    assert 'data-figure="volcano"' in section and f"of {len(forest)} estimates" in section


def test_a_store_from_before_at_risk_was_recorded_still_reports_and_shares_no_curves(
        demo, tmp_path):
    from flows.cli import main

    results = tmp_path / "old.duckdb"
    shutil.copy(demo["results"], results)
    with duckdb.connect(str(results)) as con:
        con.execute("ALTER TABLE km_curves DROP COLUMN at_risk")
    _, text, _ = _render(results, tmp_path / "old.html", demo["run"]["run_id"])
    assert "stored before cohortflow recorded persons at risk" in text
    assert _figures({"page": Page(text)})["km"] == 4
    out = tmp_path / "km.csv"
    assert main(["export", "km_curves", "--out", str(out), "--results", str(results)]) == 0
    assert out.read_text().strip().count("\n") == 0                 # a header, no curve
