"""What every HTML report alignloop writes shares (the feedback report, the evaluation report).

- :data:`CSP`: the page's Content-Security-Policy (a ``<meta>`` tag, as the page is a file):
  no script, no request anywhere; only inline ``data:`` images and the inline style. Even a
  mistake in escaping could then neither run code nor call home.
- :func:`esc`: the one way outside text (names, prompts, completions) reaches the page.
- :func:`html_page`: the page around a body (charset, CSP, title, style).
- Plots: :func:`figure` and :func:`png` (matplotlib's Agg canvas, no pyplot state; the saved
  image is cropped to what is drawn, so no title or label is clipped), :func:`plain_text` (a
  decorator: text in the plot is never parsed as markup, so ``$x$`` or ``\\x`` in a labeller or
  policy name is drawn as typed instead of failing in mathtext) and :func:`plot_label` (control
  characters shown as escapes, long names cut with an ellipsis so they cannot overlap).
"""

from __future__ import annotations

import functools
import html
import io
from collections.abc import Callable
from typing import Any, TypeVar

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

F = TypeVar("F", bound=Callable[..., Any])


def esc(x: Any) -> str:
    """HTML-escape any value (quotes too)."""
    return html.escape(str(x), quote=True)


def html_page(title: str, style: str, body: str) -> str:
    """A complete, self-contained HTML page carrying :data:`CSP`; ``body`` is already escaped HTML."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{esc(title)}</title><style>{style}</style></head><body>\n{body}\n</body></html>\n"
    )


def plain_text(fn: F) -> F:
    """Run a plotting function with every text drawn as plain text: no mathtext (``$...$``), no TeX.

    matplotlib reads ``text.parse_math`` when a text object is made (tick labels are made as
    late as drawing), so the whole function, saving included, runs under the setting.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def plot_label(text: Any, n: int = 24) -> str:
    """``text`` for a plot: control characters as their escapes (a newline shows as ``\\n``),
    at most ``n`` characters (the rest cut with an ellipsis; the page's tables have it whole)."""
    s = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
    return s if len(s) <= n else s[: n - 1] + "…"


def figure(width: float = 7.0, height: float = 3.6) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def png(fig: Any) -> bytes:
    """The figure as PNG bytes, cropped to what is drawn (titles and labels are never cut off)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()
