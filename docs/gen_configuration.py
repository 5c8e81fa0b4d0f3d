"""Regenerate docs/configuration.md from the config dataclass's field docstrings.

python docs/gen_configuration.py
"""

import inspect
import re
from dataclasses import MISSING, fields
from pathlib import Path

from sae_lens.config import LanguageModelSAERunnerConfig, field_docs

HEADER = """# Configuration

`LanguageModelSAERunnerConfig` is one dataclass that serves as the Python API, the command line
(`sae-lens train --<field> VALUE`) and the saved `training_config.yaml`. Invalid values are rejected
when the config is built, with a one-line `SAELensError` that names the field. This page is
generated from the field docstrings by `python docs/gen_configuration.py`.

```python
from sae_lens import LanguageModelSAERunnerConfig
cfg = LanguageModelSAERunnerConfig(architecture="standard", l1_coefficient=5e-3)
cfg.to_yaml("run.yaml")
cfg = LanguageModelSAERunnerConfig.from_yaml("run.yaml", lr=3e-4)  # keyword overrides win
```
"""


def main() -> None:
    source = inspect.getsource(LanguageModelSAERunnerConfig)
    groups = [(m.start(), m.group(1)) for m in re.finditer(r"# --- (.+?) ---", source)]
    docs = field_docs(LanguageModelSAERunnerConfig)
    lines = [HEADER]
    current = None
    for f in fields(LanguageModelSAERunnerConfig):
        position = source.index(f"    {f.name}:")
        group = max((start, name) for start, name in groups if start < position)[1]
        if group != current:
            lines += [
                "",
                f"## {group[0].upper()}{group[1:]}",
                "",
                "| field | default | meaning |",
                "|---|---|---|",
            ]
            current = group
        default = "unset" if f.default is None or f.default is MISSING else f.default
        lines.append(f"| `{f.name}` | `{default}` | {docs[f.name].replace('|', '/')} |")
    Path(__file__).with_name("configuration.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
