"""model.yaml -> RunConfig: the schema's checks (astraea.schema), then the family adapter's.

    cfg = astraea.config.load("model.yaml")      # raises ConfigError naming the key path

The types are astraea.schema's, re-exported here for callers that load configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .families import get_family
from .schema import (  # noqa: F401  (re-exported: the config's vocabulary)
    BACKENDS,
    BENCH_METHODS,
    DTYPES,
    SECTIONS,
    BenchSpec,
    BuildSpec,
    ModelSpec,
    RunConfig,
    SamplingSpec,
    SearchSpec,
    SelectionSpec,
    TargetSpec,
    VideoSpec,
    parse,
    proxy_config,
    to_dict,
)


def from_dict(raw: Any, *, name: str = "run", source: str = "", base: Path | None = None) -> RunConfig:
    """Validate a parsed model.yaml; raises ConfigError naming the first bad key path."""
    cfg = parse(raw, name=name, source=source, base=base)
    family = get_family(cfg.model.family, path="model.family")
    family.validate(cfg)
    if cfg.search.proxy_video:
        try:
            family.validate(proxy_config(cfg))
        except ConfigError as e:
            raise ConfigError("search.proxy_video", f"{e.message} (as the proxy's {e.path})") from None
    return cfg


def load(path: str | Path) -> RunConfig:
    """Read and validate a model.yaml file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("", f"config file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("", f"{p} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    return from_dict(raw, name=p.stem, source=str(p.resolve()), base=p.parent)




def bundled_config(prompts: list[str], steps: int = 20, guidance: float = 5.0, seeds=(0,), device: str = "cpu",
                   family: str = "wan") -> RunConfig:
    """A validated RunConfig sampling a bundled reference model (`family` wan, or opensora:
    the STDiT3 one) at its native video size, fp32."""
    from .bundled import VIDEO

    return from_dict({
        "model": {"family": family, "preset": "bundled", "dtype": "fp32", "device": device},
        "video": dict(zip(("frames", "height", "width"), VIDEO)),
        "sampling": {"steps": steps, "guidance": guidance, "prompts": list(prompts), "seeds": list(seeds)},
    })
