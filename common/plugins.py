"""Brand plugins: one folder per brand, discovered at start.

    plugins/<slug>/manifest.json
    {
      "slug": "audi",                     # must equal the folder name
      "name": "Audi",                     # display name
      "makes": ["Audi"],                  # Stanford Cars make names this brand covers
      "logos": ["data:car_logos/optimized/audi.png"],
      "model": {"name": "efficientnet_lite0", "signature": "audi"}   # optional: served model + signature
    }

A logo path starting with "data:" is relative to the shared data root
($CARRECOG_DATA_DIR, default ../shared/data); any other path is relative to the
plugin folder. A brand without "model" is still matched by the logo service,
but the router answers it with the global model and says why.

Adding a brand is adding a folder (and a served model), never code. A broken
manifest fails at start with a message that names the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PLUGINS_DIR = Path(__file__).resolve().parent.parent / "plugins"
_ALLOWED_KEYS = {"slug", "name", "makes", "logos", "model", "description"}


class PluginError(ValueError):
    """A plugin folder or manifest is broken; the message names the file."""


@dataclass(frozen=True)
class ModelRef:
    """Which TF Serving model (and signature) classifies this brand's photos."""

    name: str
    signature: str = "serving_default"


@dataclass(frozen=True)
class BrandPlugin:
    slug: str
    name: str
    makes: tuple[str, ...]
    logos: tuple[Path, ...]
    model: ModelRef | None
    folder: Path = field(compare=False)


def _resolve_logo(entry: str, folder: Path, data_dir: Path) -> Path:
    if entry.startswith("data:"):
        return data_dir / entry[len("data:"):]
    return folder / entry


def load_plugin(manifest_path: Path, data_dir: Path, check_logos: bool = True) -> BrandPlugin:
    """Read and validate one manifest; check_logos=False for services that never read the logos."""
    where = str(manifest_path)
    try:
        raw = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PluginError(f"{where}: cannot read manifest: {exc}") from exc
    if not isinstance(raw, dict):
        raise PluginError(f"{where}: manifest must be a JSON object")
    unknown = set(raw) - _ALLOWED_KEYS
    if unknown:
        raise PluginError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_ALLOWED_KEYS)}")
    folder = manifest_path.parent
    slug = raw.get("slug")
    if slug != folder.name:
        raise PluginError(f"{where}: slug {slug!r} must equal the folder name {folder.name!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise PluginError(f"{where}: 'name' must be a non-empty string")
    makes = raw.get("makes", [name])
    if not isinstance(makes, list) or not all(isinstance(m, str) and m for m in makes):
        raise PluginError(f"{where}: 'makes' must be a list of make names")
    logos_raw = raw.get("logos", [])
    if not isinstance(logos_raw, list) or not all(isinstance(p, str) for p in logos_raw):
        raise PluginError(f"{where}: 'logos' must be a list of paths")
    logos = tuple(_resolve_logo(p, folder, data_dir) for p in logos_raw)
    for logo in logos if check_logos else ():
        if not logo.is_file():
            raise PluginError(f"{where}: logo image {logo} does not exist")
    model = None
    if "model" in raw:
        spec = raw["model"]
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise PluginError(f"{where}: 'model' must be an object with a non-empty 'name'")
        model = ModelRef(name=spec["name"], signature=spec.get("signature", "serving_default"))
    return BrandPlugin(slug=slug, name=name, makes=tuple(makes), logos=logos, model=model, folder=folder)


def load_plugins(plugins_dir: Path, data_dir: Path, check_logos: bool = True) -> dict[str, BrandPlugin]:
    """Every plugin under plugins_dir, by slug. Raises PluginError on any broken one."""
    if not plugins_dir.is_dir():
        raise PluginError(f"{plugins_dir}: plugins folder does not exist")
    registry: dict[str, BrandPlugin] = {}
    for folder in sorted(p for p in plugins_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            raise PluginError(f"{manifest}: plugin folder has no manifest.json")
        plugin = load_plugin(manifest, data_dir, check_logos)
        if plugin.slug in registry:
            raise PluginError(f"{manifest}: duplicate brand slug {plugin.slug!r}")
        registry[plugin.slug] = plugin
    return registry


def brand_for_make(plugins: dict[str, BrandPlugin], make: str) -> BrandPlugin | None:
    """The plugin covering a Stanford Cars make name, if any."""
    for plugin in plugins.values():
        if make in plugin.makes:
            return plugin
    return None
