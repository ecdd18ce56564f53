"""Every results folder checks itself (no model runs; reads the committed files only).

For each folder under experiments/results/:
* every number in a markdown table of a result file ``name.md`` equals a number of ``name.json`` at its printed
  precision (a README's tables: a number of any JSON of the folder), so no table is edited by hand;
* the README names the command, the commit, the hardware and the scale, the paper's number with its arXiv id, gives a
  reading, and ENDS with a one-line verdict: reproduced / not reproduced / inconclusive at this scale, and why;
* every JSON carries its provenance (command, hardware, commit, dirty flag, versions) and the sha256 and producer of
  every input it read from another run (``eejax.harness.results.record_input``; ``added_after_run`` lists fields
  restored from git history for results written before the field existed);
* every row of the top README's papers table points at existing folders, appears once, and says the verdict in a word
  beside "done" equal to the folder README's.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
FOLDERS = sorted(p for p in RESULTS.iterdir() if p.is_dir())
VERDICTS = ("reproduced", "not reproduced", "inconclusive at this scale")
VERDICT_RE = re.compile(r"^\*\*Verdict:\*\* (reproduced|not reproduced|inconclusive at this scale)\b(.*)$")
NUMBER_RE = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?:[eE]([-+]?\d+))?(?![\w])")
# Scalings a table may print a stored value at: as is, in percent, FLOPs as MFLOPs / GFLOPs / TFLOPs, s as ms.
SCALES = (1.0, 100.0, 1e-6, 1e-9, 1e-12, 1e3)


def _numbers_in_text(text: str):
    """``(value, decimals)`` of each number written in ``text`` (thousands separators allowed)."""
    for m in NUMBER_RE.finditer(text):
        s = m.group(0).replace(",", "")
        try:
            v = float(s)
        except ValueError:
            continue
        # printed precision: digits after the point, less the exponent (7.683e+04 is precise to 10)
        decimals = len(m.group(1) or "") - int(m.group(2) or 0)
        yield v, decimals


def _json_values(obj, out: list[float]):
    if isinstance(obj, bool):
        out.append(float(obj))
    elif isinstance(obj, (int, float)):
        if math.isfinite(obj):
            out.append(float(obj))
    elif isinstance(obj, str):
        out.extend(v for v, _ in _numbers_in_text(obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _json_values(k, out)
            _json_values(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _json_values(v, out)


class Numbers:
    """The sorted numbers of some JSON files, each also at the table scalings."""

    def __init__(self, paths):
        vals: list[float] = []
        for p in paths:
            _json_values(json.loads(p.read_text()), vals)
        self.sorted = sorted({round(v * s, 12) for v in vals for s in SCALES})

    def has(self, value: float, decimals: int) -> bool:
        half = 0.5 * 10.0 ** -decimals
        tol = half * (1 + 1e-9) + 1e-12 * max(1.0, abs(value))
        i = bisect.bisect_left(self.sorted, value - tol)
        return i < len(self.sorted) and self.sorted[i] <= value + tol


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table_cells(md: str):
    """``(line number, cell text)`` of every body cell of every markdown table (header and rule rows skipped, and
    the columns headed "paper": the paper's own numbers, quoted beside ours, are not in our JSON)."""
    lines = md.splitlines()
    rule = re.compile(r"\|[\s:|-]+\|?")
    paper_cols: set[int] = set()
    for i, line in enumerate(lines):
        if not line.startswith("|") or rule.fullmatch(line.strip()):
            continue
        if i + 1 < len(lines) and rule.fullmatch(lines[i + 1].strip()):
            paper_cols = {j for j, c in enumerate(_cells(line)) if "paper" in c.lower()}
            continue   # a header row
        for j, cell in enumerate(_cells(line)):
            if j not in paper_cols:
                yield i + 1, cell


def _table_mismatches(md_path: pathlib.Path, numbers: Numbers) -> list[str]:
    bad = []
    for line, cell in _table_cells(md_path.read_text()):
        for value, decimals in _numbers_in_text(cell):
            if not numbers.has(value, decimals):
                bad.append(f"{md_path.relative_to(RESULTS)}:{line}: {cell!r} ({value} at {decimals} decimals)")
    return bad


def _result_pairs(folder: pathlib.Path):
    for md in sorted(folder.rglob("*.md")):
        if md.name != "README.md" and md.with_suffix(".json").exists():
            yield md, md.with_suffix(".json")


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_every_table_number_is_in_its_json(folder):
    bad = []
    for md, js in _result_pairs(folder):
        bad += _table_mismatches(md, Numbers([js]))
    every_json = Numbers(sorted(folder.rglob("*.json")))
    for md in sorted(folder.rglob("*.md")):
        if md.name == "README.md" or not md.with_suffix(".json").exists():
            bad += _table_mismatches(md, every_json)
    assert not bad, "table numbers not in the JSON at their printed precision:\n" + "\n".join(bad)


def _readme(folder: pathlib.Path) -> str:
    path = folder / "README.md"
    assert path.exists(), f"{folder.name} has no README.md"
    return path.read_text()


README_PARTS = {
    "command": r"python -m experiments\.\w+|\./launch\.sh \w+",
    "commit": r"[Cc]ommits?:?\*{0,2}\s+`?[0-9a-f]{7,40}",
    "hardware": r"(?i)\bhardware\b",
    "scale": r"(?i)\bscale\b",
    "the paper's number with its arXiv id": r"arXiv:\d{4}\.\d{4,5}",
    "a reading": r"(?im)^#+ .*(reading|reproduced|what the run shows|what we see)",
}


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_readme_has_provenance_reading_and_ends_with_a_verdict(folder):
    text = _readme(folder)
    missing = [name for name, rx in README_PARTS.items() if not re.search(rx, text)]
    assert not missing, f"{folder.name}/README.md lacks: {', '.join(missing)}"
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    m = VERDICT_RE.match(last)
    assert m, (f"{folder.name}/README.md must end with one line '**Verdict:** <{' | '.join(VERDICTS)}> ...', "
               f"got {last!r}")
    assert len(m.group(2).strip(" -—:;,.")) > 20, f"{folder.name}: the verdict must say why: {last!r}"


def verdict_of(folder: pathlib.Path) -> str:
    last = [ln for ln in _readme(folder).splitlines() if ln.strip()][-1]
    m = VERDICT_RE.match(last)
    return m.group(1) if m else ""


PROVENANCE_KEYS = {"command", "device", "commit", "dirty", "versions", "inputs", "date"}
INPUT_KEYS = {"path", "role", "sha256", "producer_commit", "producer_step"}


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_every_json_carries_provenance_and_its_inputs(folder):
    for js in sorted(folder.rglob("*.json")):
        prov = json.loads(js.read_text()).get("provenance")
        where = js.relative_to(RESULTS)
        assert isinstance(prov, dict), f"{where}: no provenance"
        assert PROVENANCE_KEYS <= set(prov), f"{where}: provenance lacks {sorted(PROVENANCE_KEYS - set(prov))}"
        assert re.match(r"^[0-9a-f]{7,40}(\+dirty)?$", prov["commit"]), f"{where}: commit {prov['commit']!r}"
        assert prov["dirty"] == prov["commit"].endswith("+dirty"), f"{where}: dirty flag disagrees with the commit"
        assert prov["versions"].get("jax"), f"{where}: no jax version"
        assert set(prov.get("added_after_run", [])) <= PROVENANCE_KEYS | {"inputs"}
        for art in prov["inputs"]:
            assert INPUT_KEYS <= set(art), f"{where}: input {art} lacks {sorted(INPUT_KEYS - set(art))}"
            assert re.fullmatch(r"[0-9a-f]{64}|not recorded", art["sha256"]), f"{where}: input sha256 {art}"
            local = ROOT / art["path"]
            if art["sha256"] != "not recorded" and local.is_file():
                # An input kept in the repository must still be the file that was read (else: rerun the reader).
                assert hashlib.sha256(local.read_bytes()).hexdigest() == art["sha256"], \
                    f"{where}: input {art['path']} changed since it was read"


def _papers_rows():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Papers and experiments", 1)[1].split("\n## ", 1)[0]
    return [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| paper |")]


def test_papers_table_rows_point_at_folders_once_with_the_folder_verdict():
    rows = _papers_rows()
    assert len(rows) > 20
    seen: dict[str, int] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        status, links = cells[2], re.findall(r"\]\((experiments/results/[^)]+)\)", cells[3])
        assert links, f"row without a results link: {row[:80]}"
        folders = set()
        for link in links:
            assert (ROOT / link).exists(), f"{link} does not exist"
            folders.add((ROOT / link).relative_to(RESULTS).parts[0])
        key = cells[0]
        seen[key] = seen.get(key, 0) + 1
        m = re.match(r"done — (reproduced|not reproduced|inconclusive at this scale)\b", status)
        assert m, f"status must start 'done — <verdict>': {status[:80]!r}"
        for f in folders:
            assert verdict_of(RESULTS / f) == m.group(1), \
                f"{key[:40]}: README verdict of {f} is {verdict_of(RESULTS / f)!r}"
    twice = [k[:60] for k, n in seen.items() if n > 1]
    assert not twice, f"rows appearing more than once: {twice}"
    linked = {(ROOT / link).relative_to(RESULTS).parts[0]
              for row in rows for link in re.findall(r"\]\((experiments/results/[^)]+)\)", row)}
    unlinked = sorted({f.name for f in FOLDERS} - linked)
    assert not unlinked, f"folders no row points at: {unlinked}"


@pytest.mark.parametrize("folder", sorted(__import__("experiments.intervals", fromlist=["FOLDERS"]).FOLDERS))
def test_committed_intervals_recompute_from_the_committed_json(folder):
    """intervals.md / .json hold what experiments/intervals.py computes from the folder's committed JSON today."""
    from experiments import intervals

    name, fn = intervals.FOLDERS[folder]
    sections = fn(json.loads((RESULTS / folder / name).read_text()))
    committed = json.loads((RESULTS / folder / "intervals.json").read_text())["sections"]
    assert [t for t, _, _ in sections] == [s["title"] for s in committed]
    for (_, _, rows), s in zip(sections, committed):
        assert len(rows) == len(s["rows"])
        for new, old in zip(rows, s["rows"]):
            assert new.keys() == old.keys()
            for k, v in new.items():
                if isinstance(v, float):
                    assert v == pytest.approx(old[k], rel=1e-9, abs=1e-12, nan_ok=True), (folder, k)
                else:
                    assert v == old[k], (folder, k)
