"""The core imports neither Prefect, a connector nor a web framework at import time."""

import json
import pkgutil
import subprocess
import sys

import relance

CORE = sorted(m.name for m in pkgutil.iter_modules(relance.__path__, "relance.") if m.name not in {"relance.web"})
FORBIDDEN = ("prefect", "fastapi", "uvicorn", "apscheduler", "connectors", "flows")


def test_importing_every_core_module_loads_nothing_forbidden():
    code = (
        "import importlib, json, sys\n"
        f"for name in {CORE!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
    assert "relance.dispatch" in CORE and "relance.cli" in CORE
