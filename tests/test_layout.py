"""How the code is laid out: dependencies point one way, from offline tools to the services."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVING = ["common", "logo_service", "router_service", "model_server", "client"]
# Each offline room and the rooms it may import (besides itself and the serving code). Dependencies
# point one way: serving <- dataset <- builders (serving artifacts) <- training <- evaluation; the stack
# harness is used by tools, evaluation and tests, never by serving, and itself uses serving code only.
OFFLINE = {
    "dataset": set(),
    "harness": set(),
    "builders": {"dataset"},
    "training": {"dataset", "builders"},
    "evaluation": {"dataset", "builders", "training", "harness"},
    "scripts": {"dataset", "builders", "training", "evaluation", "harness"},
    "tests": {"dataset", "builders", "training", "evaluation", "harness", "scripts"},
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def room_imports() -> dict[str, set[str]]:
    """Room -> the other project rooms its Python files import."""
    rooms = SERVING + list(OFFLINE)
    return {room: {package for path in (ROOT / room).rglob("*.py") for package in imported_packages(path)
                   if package in rooms and package != room}
            for room in rooms}


def test_serving_code_never_imports_offline_code():
    offenders = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & set(OFFLINE))
                 for package in SERVING for path in (ROOT / package).rglob("*.py")
                 if imported_packages(path) & set(OFFLINE)}
    assert offenders == {}


def test_each_offline_room_imports_only_the_rooms_below_it():
    imports = room_imports()
    wrong = {room: sorted(imports[room] - set(SERVING) - allowed) for room, allowed in OFFLINE.items()
             if imports[room] - set(SERVING) - allowed}
    assert wrong == {}


def test_no_loop_between_folders():
    imports = room_imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})) for nxt in imports[start])

    assert [room for room in imports if reaches(room, room, {room})] == []


def test_offline_code_uses_only_public_names_of_serving_code():
    private = []
    for room in OFFLINE:
        for path in (ROOT / room).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in SERVING
                        and any(alias.name.startswith("_") for alias in node.names)):
                    private.append(f"{path.relative_to(ROOT)}: {node.module}")
    assert private == []


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


def test_service_settings_load_without_tensorflow():
    """Each service reads its settings before its logs become JSON lines (common.logs): TensorFlow's
    native start-up lines must come after that, so the settings modules never import it."""
    import subprocess
    import sys

    for settings in ("router_service.settings", "logo_service.settings"):
        check = f"import sys, {settings}; sys.exit('tensorflow' in sys.modules)"
        assert subprocess.run([sys.executable, "-c", check], cwd=ROOT).returncode == 0, settings
