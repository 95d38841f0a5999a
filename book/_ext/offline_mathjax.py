"""Serve MathJax 3 from the built site itself, so that equations render without a CDN (offline
readers, headless checks). The files come from the `django-static-mathjax` wheel (MathJax 3.2.2 as
plain static files; nothing of Django is imported), listed in pyproject's [book] extra."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

# What tex-chtml.js loads at run time: TeX extensions on demand, the CHTML fonts, the menu and a11y.
_PARTS = ["tex-chtml.js", "input", "output", "ui", "a11y"]


def _mathjax_root() -> Path:
    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("MathJax files not found: install the book extra (pip install -e '.[book]')")
    root = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax" / "es5"
    if not (root / "tex-chtml.js").exists():
        raise RuntimeError(f"no tex-chtml.js under {root}")
    return root


def _copy(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    src, dst = _mathjax_root(), Path(app.outdir) / "_static" / "mathjax"
    for part in _PARTS:
        if (src / part).is_dir():
            shutil.copytree(src / part, dst / part, dirs_exist_ok=True)
        else:
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / part, dst / part)


def setup(app):
    _mathjax_root()  # fail early, with the reason, if the files are missing
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
