"""`sae-lens inspect SAE [SAE_ID] "some text"`: each token of a text with its strongest features.

Prints the prompt-centric view as an aligned table; `--html out.html` writes the same view as the
prompt section of a dashboard page.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sae_lens.cli._common import quiet_libraries
from sae_lens.cli.dashboard import add_source_flags, check_writable, load_model_for, load_sae_checked
from sae_lens.errors import SAELensError

COMMAND = "inspect"
HELP = "print each token's top features for a text"
DESCRIPTION = "Run the model and the SAE on TEXT and print each token's strongest features and values."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `inspect` arguments."""
    parser.add_argument(
        "positionals", metavar="SAE [SAE_ID] TEXT", nargs="+", help="the SAE (and its id), then the text"
    )
    add_source_flags(parser)
    parser.add_argument("--top", type=int, default=5, help="features shown per token (default 5)")
    parser.add_argument("--html", help="also write the view as an HTML page")


def run(args: argparse.Namespace) -> int:
    """Print the table (and write the page). Returns the exit code."""
    if len(args.positionals) not in (2, 3):
        raise SAELensError('inspect takes SAE [SAE_ID] TEXT, e.g. sae-lens inspect ./my_sae "some text"')
    args.sae, *middle, text = args.positionals
    args.sae_id = middle[0] if middle else None
    if args.top <= 0:
        raise SAELensError(f"--top must be positive, got {args.top}")
    html_path = Path(args.html).expanduser() if args.html else None
    if html_path is not None:
        check_writable(html_path, folder=False)
    quiet_libraries()
    from sae_lens.dashboard import check_model_matches, make_store, prompt_features, sae_summary
    from sae_lens.html import render_prompt_text

    sae, name = load_sae_checked(args)
    model = load_model_for(args, sae)
    store = make_store(
        model, sae, hook_name=args.hook, exclude_special_tokens=not args.include_special_tokens
    )
    check_model_matches(sae, store)
    prompt = prompt_features(sae, store, text, k=args.top, show_special_tokens=args.include_special_tokens)
    print(render_prompt_text(prompt, max_features=args.top), end="")
    if html_path is not None:
        from sae_lens.html import write_dashboard_html

        data = {
            "title": f"{name} · prompt",
            "sae": sae_summary(sae, name, store.hook_point),
            "n_tokens": 0,
            "interval_kind": "quantile",
            "logit_source": None,
            "features": [],
            "prompt": prompt,
        }
        write_dashboard_html(data, html_path)
        print(f"Wrote {html_path} (open it at #prompt)")
    return 0
