"""How the code is laid out: dependencies point one way, from offline tools to the services."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVING = ["common", "logo_service", "router_service", "model_server", "client"]
OFFLINE = {"training", "scripts", "tests"}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_serving_code_never_imports_training_scripts_or_tests():
    offenders = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & OFFLINE)
                 for package in SERVING for path in (ROOT / package).rglob("*.py")
                 if imported_packages(path) & OFFLINE}
    assert offenders == {}


def test_no_test_hard_codes_a_machine_path():
    machine_paths = ("/work/", "/root/", "/home/", "/tmp/")
    offenders = [str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("*.py")
                 if path.name != "test_layout.py" and any(p in path.read_text() for p in machine_paths)]
    assert offenders == []


# Import name -> PyPI distribution, for the packages the services use.
DISTRIBUTION = {"grpc": "grpcio", "grpc_tools": "grpcio-tools", "grpc_health": "grpcio-health-checking",
                "grpc_reflection": "grpcio-reflection", "google": "protobuf", "numpy": "numpy",
                "cv2": "opencv-python-headless", "tensorflow": "tensorflow", "tensorflow_serving":
                "tensorflow-serving-api", "prometheus_client": "prometheus-client", "opentelemetry": "opentelemetry-api"}
LOCAL = {"carrecog", "common", "logo_service", "router_service", "model_server", "client"}


def pins(path: Path) -> dict[str, str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return dict(line.split("==") for line in lines if "==" in line)


def test_each_service_image_installs_what_its_code_imports_at_the_projects_pins():
    import sys
    project = pins(ROOT / "requirements.txt")
    for service in ("logo_service", "router_service"):
        own = pins(ROOT / service / "requirements.txt")
        assert {name: pin for name, pin in own.items() if project.get(name) != pin} == {}, service
        code = [p for package in (service, "common") for p in (ROOT / package).rglob("*.py")]
        third_party = {name for p in code for name in imported_packages(p)} - LOCAL - set(sys.stdlib_module_names)
        unknown = third_party - set(DISTRIBUTION)
        assert not unknown, f"add {unknown} to DISTRIBUTION and to {service}/requirements.txt"
        assert {DISTRIBUTION[name] for name in third_party} <= set(own), service
    assert "tensorflow" not in pins(ROOT / "logo_service" / "requirements.txt")
