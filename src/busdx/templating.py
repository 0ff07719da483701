"""Jinja2 templates of the HTML and markdown files busdx writes (``busdx/templates``).

HTML templates (``*.html.j2``) are autoescaped: a file name or a site name can never inject
markup. A missing variable is an error, never an empty string.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

__all__ = ["render"]


@cache
def _environment() -> Environment:
    return Environment(
        loader=PackageLoader("busdx", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html.j2",), default=False),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(name: str, **context: Any) -> str:
    """The template ``busdx/templates/<name>`` filled with ``context``."""
    return _environment().get_template(name).render(**context)
