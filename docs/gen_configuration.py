"""Regenerate docs/configuration.md from the config dataclasses' field docstrings.

python docs/gen_configuration.py
"""

import inspect
import re
from dataclasses import fields
from pathlib import Path

from sae_lens.config import LanguageModelSAERunnerConfig, architecture_option_docs
from sae_lens.config_fields import field_default, field_docs
from sae_lens.training.config import TrainerConfig

HEADER = """# Configuration

`LanguageModelSAERunnerConfig` is one dataclass that serves as the Python API, the command line
(`sae-lens train --<field> VALUE`) and the saved `training_config.yaml`. It is a `TrainerConfig`
(what `SAETrainer` needs) plus the model, the data and the SAE's shape. Each architecture declares
its own options in its own file; the runner config accepts them by name and keeps them in
`sae_options`. Invalid values are rejected when the config is built, with a one-line `SAELensError`
that names the field. This page is generated from the field docstrings by
`python docs/gen_configuration.py`.

```python
from sae_lens import LanguageModelSAERunnerConfig
cfg = LanguageModelSAERunnerConfig(architecture="standard", l1_coefficient=5e-3)
cfg.to_yaml("run.yaml")
cfg = LanguageModelSAERunnerConfig.from_yaml("run.yaml", lr=3e-4)  # keyword overrides win
```
"""


def _table(title: str) -> list[str]:
    return ["", f"## {title}", "", "| field | default | meaning |", "|---|---|---|"]


def _row(name: str, default: object, doc: str) -> str:
    shown = "unset" if default is None else default
    return f"| `{name}` | `{shown}` | {doc.replace('|', '/')} |"


def main() -> None:
    lines = [HEADER]
    for cls in (LanguageModelSAERunnerConfig, TrainerConfig):
        source = inspect.getsource(cls)
        groups = [(m.start(), m.group(1)) for m in re.finditer(r"# --- (.+?) ---", source)]
        docs = field_docs(cls)
        own = [f for f in fields(cls) if f"    {f.name}:" in source]
        current = None
        for f in own:
            position = source.index(f"    {f.name}:")
            group = max((start, name) for start, name in groups if start < position)[1]
            if group != current:
                lines += _table(f"{group[0].upper()}{group[1:]}")
                current = group
            lines.append(_row(f.name, field_default(f), docs[f.name]))
    for architecture, options in architecture_option_docs().items():
        title = "SAE options of every architecture" if architecture == "all architectures" else architecture
        lines += _table(title if title.startswith("SAE") else f"SAE options: `{title}`")
        lines += [_row(name, default, doc) for name, (doc, default) in options.items()]
    Path(__file__).with_name("configuration.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
