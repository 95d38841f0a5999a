"""The registry, the generated table of contents and coverage page, and the packaging files agree
with each other, with the catalog, and with what is on disk."""
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "book"))
import generate  # noqa: E402

CATALOG = ROOT.parent / "shared" / "catalog.json"
REG = generate.load_registry()
PAPERS = {p["id"]: p for p in REG["papers"]}
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*/*.ipynb"))


@pytest.mark.skipif(not CATALOG.exists(), reason="the project's shared catalog is not beside this checkout")
def test_registry_has_every_catalog_paper_and_nothing_else():
    catalog = {p["id"]: p for p in json.loads(CATALOG.read_text())}
    assert set(PAPERS) == set(catalog), (set(PAPERS) ^ set(catalog))
    moved = {i: (PAPERS[i]["part"], catalog[i]["part"]) for i in catalog if PAPERS[i]["part"] != catalog[i]["part"]}
    assert not moved, f"registry parts differ from the catalog: {moved}"
    assert len(PAPERS) == 313


def test_generated_files_are_up_to_date():
    out = subprocess.run([sys.executable, str(ROOT / "book" / "generate.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_toc_file_exists():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for e in entries:
            if "file" in e:
                files.append(e["file"])
            walk(e.get("sections", []) + e.get("chapters", []))

    for part in toc["parts"]:
        walk(part["chapters"])
    missing = [f for f in files if not any((ROOT / (f + ext)).exists() for ext in (".md", ".ipynb"))]
    assert not missing, missing
    assert len(files) == len(set(files)), "a file appears twice in the toc"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_notebook_is_registered_and_tested(nb):
    paper = PAPERS.get(nb.stem)
    assert paper is not None, f"{nb.name} has no registry entry"
    assert paper["part"] == nb.parent.name
    assert paper["status"] in ("drafted", "verified"), "a written chapter cannot be 'planned'"
    assert (ROOT / "book" / "parts" / f"{paper['part']}.md").exists(), "the part has no opener page"
    assert (ROOT / "tests" / paper["part"] / f"test_{nb.stem}.py").exists()
    if paper["verification"] == "official-golden" and paper["status"] == "verified":
        assert (ROOT / "tests" / "golden" / nb.stem / "PROVENANCE.md").exists()


def test_verified_chapters_exist():
    for p in REG["papers"]:
        if p["status"] != "planned":
            assert generate.written(p), f"{p['id']} is {p['status']} but has no notebook"


def test_generator_rejects_bad_registry(tmp_path):
    bad = {"parts": [{"id": "norm", "title": "N"}],
           "papers": [{"id": "x", "title": "X", "part": "norm", "status": "done", "verification": "paper-only"}]}
    path = tmp_path / "papers.yml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="status must be one of"):
        generate.load_registry(path)
    bad["papers"][0].update(status="drafted")
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="needs a `note`"):
        generate.load_registry(path)


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"])
    for extra in ("book", "test", "official"):
        wanted |= set(project["optional-dependencies"][extra])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    have = {re.sub(r"\s+#.*", "", d) for d in pip if d != "-e ."}
    assert have == wanted, f"only in environment.yml: {have - wanted}; only in pyproject: {wanted - have}"
    assert not any("==" in d for d in wanted), "no exact pins in what a reader installs"


def test_repository_url_is_named_once_and_notebooks_agree():
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"].rstrip("/")
    colab = url.replace("https://github.com", "https://colab.research.google.com/github")
    for nb in NOTEBOOKS:
        text = nb.read_text()
        rel = nb.relative_to(ROOT).as_posix()
        assert f"{colab}/blob/main/{rel}" in text, f"{rel}: Colab badge does not point at {colab}/blob/main/{rel}"
        setup = "".join(next(c for c in json.loads(text)["cells"] if c["cell_type"] == "code")["source"])
        assert f'"git", "clone", "-q", "--depth", "1", "{url}"' in setup, f"{rel}: the Colab cell does not clone {url}"
        assert '"/content/d3l[official]"' in setup, f"{rel}: the Colab cell does not install refimpl[official]"
        assert f'os.chdir("/content/d3l/{nb.parent.relative_to(ROOT).as_posix()}")' in setup, f"{rel}: no chdir"


def test_pages_name_the_configured_repository():
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"].rstrip("/")
    for page in [ROOT / "README.md", *sorted((ROOT / "book").rglob("*.md"))]:
        for found in re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", page.read_text()):
            assert found == url, f"{page.relative_to(ROOT)} names {found}, but _config.yml says {url}"
