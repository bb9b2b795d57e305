"""``CircuitResult``: the edges (screened and path-patched), the receivers, faithfulness, the costs.

``to_dataframe()`` is one row per edge, the columns of ``edges.csv``:

============  ==================================================================================
column        meaning
============  ==================================================================================
sender        the head cut, ``"L3H5"``
receiver      the head it feeds (``"L5H1"``), or ``"logits"`` for a direct effect on the answer
input         ``q``, ``k``, ``v`` or ``logits``
effect        how much cutting this one edge hurts, positive when it hurts: on the receiver's own
              attention score for ``q``/``k``, on the receiver's direct effect on the task metric
              for ``v``, on the task metric for ``logits`` (``metric`` names it; ``circuits.paths``)
stderr        standard error of ``effect`` over prompts
method        ``path_patching`` (measured exactly) or ``screen`` (first-order estimate only)
screen        the screen's estimate of ``effect`` (every row)
fraction      ``effect`` over the receiver's clean value of the same metric (e.g. 0.73: the cut
              removes 73% of the receiver's induction score)
metric        what ``effect`` is measured on
============  ==================================================================================
"""

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lens_attn.files import dumps_strict, write_text_atomic

EDGE_COLUMNS = (
    "sender", "receiver", "input", "effect", "stderr", "method", "screen", "fraction", "metric",
)  # fmt: skip


@dataclass(frozen=True)
class Edge:
    sender: str
    receiver: str
    input: str
    effect: float
    stderr: float
    method: str
    screen: float
    fraction: float
    metric: str

    @property
    def name(self) -> str:
        """``"L0H0 -> L1H3.k"`` (``"L3H1 -> logits"`` for a direct effect)."""
        if self.input == "logits":
            return f"{self.sender} -> logits"
        return f"{self.sender} -> {self.receiver}.{self.input}"


@dataclass(frozen=True)
class Faithfulness:
    """The circuit alone: its heads kept, every other head mean-ablated (MLPs kept).

    ``share = (circuit - ablated) / (clean - ablated)`` on ``metric`` (higher is better for it):
    1 means the circuit's heads alone recover everything the heads do, 0 nothing."""

    metric: str
    clean: float
    circuit: float
    ablated: float
    share: float
    nodes: list[str]


@dataclass
class CircuitResult:
    """What ``lens_attn.circuit`` found; see the module docstring for the edge columns."""

    edges: list[Edge]
    receivers: dict[str, dict]  # name -> {"score", "clean", "clean_stderr", "direct"}
    labels: dict[str, list[str]]  # head name -> its labels, for drawing
    passes: dict[str, int]
    spearman: float  # screen vs path patching over the edges measured exactly
    faithfulness: Faithfulness | None = None
    settings: dict = field(default_factory=dict)

    def measured(self) -> list[Edge]:
        return [e for e in self.edges if e.method == "path_patching"]

    def circuit_edges(self, min_effect: float | None = None) -> list[Edge]:
        """The measured edges kept in the circuit: effect >= ``min_effect`` (default: the run's
        ``keep``) and more than two standard errors above 0."""
        keep = self.settings.get("keep", 0.05) if min_effect is None else min_effect
        return [e for e in self.measured() if e.effect >= keep and e.effect > 2 * e.stderr]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([asdict(e) for e in self.edges], columns=list(EDGE_COLUMNS))

    def to_json(self) -> dict:
        return {
            "receivers": self.receivers,
            "labels": self.labels,
            "circuit": [e.name for e in self.circuit_edges()],
            "measured": [asdict(e) for e in self.measured()],
            "spearman_screen_vs_path_patching": self.spearman,
            "faithfulness": None if self.faithfulness is None else asdict(self.faithfulness),
            "passes": self.passes,
            "settings": self.settings,
        }

    def files(self) -> dict[str, str]:
        """``{"edges.csv": ..., "circuit.json": ...}``: the text of each output file."""
        return {
            "edges.csv": self.to_dataframe().to_csv(index=False),
            "circuit.json": dumps_strict(self.to_json(), indent=1) + "\n",
        }

    def save(self, directory: "str | os.PathLike") -> Path:
        """``edges.csv`` and ``circuit.json`` in ``directory`` (each written atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in self.files().items():
            write_text_atomic(directory / name, text)
        return directory

    def summary(self, k: int = 12) -> str:
        """The receivers, the ``k`` strongest measured edges, the costs and faithfulness, as text."""
        lines = ["receivers (clean score): " + ", ".join(
            f"{name} {info['clean']:.2f}" for name, info in self.receivers.items())]  # fmt: skip
        lines.append(f"{'edge':<24}{'effect':>9}{'stderr':>9}{'fraction':>10}{'screen':>9}  metric")
        for e in sorted(self.measured(), key=lambda e: -e.effect)[:k]:
            lines.append(f"{e.name:<24}{e.effect:>9.3f}{e.stderr:>9.3f}{e.fraction:>10.2f}"
                         f"{e.screen:>9.3f}  {e.metric}")  # fmt: skip
        p = self.passes
        lines.append(f"screen: {p['edges_screened']} edges from {p['screen_forward_passes']} forward "
                     f"passes; path patching: {p['edges_measured']} edges; Spearman(screen, exact) "
                     f"= {self.spearman:.2f}")  # fmt: skip
        if self.faithfulness is not None:
            f = self.faithfulness
            lines.append(f"faithfulness: {len(f.nodes)} heads keep {f.share:.0%} of {f.metric} "
                         f"(clean {f.clean:.3f}, circuit {f.circuit:.3f}, no heads {f.ablated:.3f})")  # fmt: skip
        return "\n".join(lines)
