"""Make the README's figure and report screenshot from the bundled checkpoint.

    python experiments/make_readme_figures.py                       # -> experiments/figures/
    python experiments/make_readme_figures.py --model DIR --out runs/figures

Scores every head on repeated random-token probes, finds the strongest induction head, and runs a
prompt of one natural sentence written twice, so induction shows as a stripe under the diagonal:

``attention.png``  the induction head's map next to the layer x head grid of induction scores.
``report.png``     headless chromium's screenshot (network blocked) of the offline HTML report
                   opened on that head. Needs Debian's chromium (``apt-get install -y chromium``).
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lens_attn.files import open_atomic

FIGURES = Path(__file__).parent / "figures"
SCORES = ["induction", "previous_token", "duplicate_token", "bos"]  # the report's score grids
CHROMIUM_OFFLINE = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
]  # fmt: skip


def fitting_periods(n_ctx: int) -> tuple[int, ...]:
    """The default induction-probe periods whose ``[BOS, r, r]`` sequences fit the context."""
    from lens_attn.probes import DEFAULT_PERIODS

    return tuple(p for p in DEFAULT_PERIODS if 2 * p + 1 <= n_ctx) or ((n_ctx - 1) // 2,)


def repeated_prompt(model, n_tokens: int = 24) -> torch.Tensor:
    """``[1, 1 + 2 n]``: BOS, then the first ``n`` tokens of a shipped natural prompt, twice."""
    from lens_attn.probes import natural_prompts

    body = model.to_tokens(natural_prompts()[0], prepend_bos=False)[0, :n_tokens].cpu()
    bos = model.to_tokens("", prepend_bos=True)[0, :1].cpu()
    return torch.cat([bos, body, body])[None]


def attention_figure(patterns, scores, layer: int, head: int):
    from matplotlib.figure import Figure

    from lens_attn.render.figures import plot_head
    from lens_attn.render.grids import plot_scores

    fig = Figure(figsize=(11.5, 5.2), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.35, 1])
    plot_head(patterns, layer, head, ax=left)
    plot_scores(scores, "induction", ax=right)
    return fig


def screenshot(html: Path, png: Path, *, width: int = 1200, height: int = 1000) -> None:
    """Headless chromium's screenshot of ``html``, shrunk to 900 px wide, 256 colours."""
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        raw = Path(profile) / "shot.png"
        subprocess.run(
            [chromium, *CHROMIUM_OFFLINE, f"--user-data-dir={profile}/user",
             f"--window-size={width},{height}", "--virtual-time-budget=5000",
             f"--screenshot={raw}", html.resolve().as_uri()],
            check=True, capture_output=True, timeout=120, start_new_session=True,
        )  # fmt: skip
        image = Image.open(raw).convert("RGB")
    image = image.resize((900, round(image.height * 900 / image.width)), Image.Resampling.LANCZOS)
    with open_atomic(png) as fh:
        image.quantize(colors=256).save(fh, format="PNG", optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model source (default: bundled checkpoint)")
    parser.add_argument("--out", type=Path, default=FIGURES, help=f"default: {FIGURES}")
    args = parser.parse_args(argv)

    from lens_attn.loading import load_model
    from lens_attn.patterns import capture_patterns
    from lens_attn.probes import induction_probes
    from lens_attn.render.figures import save_figure
    from lens_attn.render.report import render_report
    from lens_attn.scoring.runner import score_heads

    torch.manual_seed(0)
    model = load_model(args.model, device="cpu")
    probes = induction_probes(model, periods=fitting_periods(model.cfg.n_ctx))
    scores = score_heads(model, probes, scores=SCORES, progress=False)
    layer, head, value = scores.top("induction", k=1)[0]
    print(f"strongest induction head: L{layer}H{head} (induction score {value:.2f})")
    patterns = capture_patterns(model, repeated_prompt(model))

    args.out.mkdir(parents=True, exist_ok=True)
    fig = attention_figure(patterns, scores, layer, head)
    figure = save_figure(fig, args.out / "attention.png", dpi=100)
    print(f"wrote {figure}")
    with tempfile.TemporaryDirectory() as tmp:
        report = render_report(
            patterns, scores, path=Path(tmp) / "report.html", open_head=(layer, head),
            title="lens-attn report: the bundled tiny Llama 2, one sentence written twice",
        )  # fmt: skip
        screenshot(report, args.out / "report.png")
    print(f"wrote {args.out / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
