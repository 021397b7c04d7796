"""HTML from a notebook's outputs, made safe to put into a page that is sent around.

Owns: `clean_html`, an allowlist sanitizer. It re-writes the HTML from parsed
tokens, so nothing passes that is not on the list: text, tables, lists and
inline formatting with a few harmless attributes; links to http(s), mailto
and fragments; images only from `data:image/...`. Scripts, styles, frames,
forms, SVG/MathML and their content are dropped, as are images from elsewhere, every `on*` attribute,
`id` (it could collide with the report's anchors), and style declarations
that could fetch or run something. End tags that close nothing opened inside
the fragment are dropped and open elements are closed at its end, so an
output cannot close the report's own elements. Standard library only.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

__all__ = ["clean_html"]

_ALLOWED = frozenset("""
    a abbr b bdi bdo blockquote br caption cite code col colgroup dd del details dfn div dl dt em figcaption
    figure h1 h2 h3 h4 h5 h6 hr i img ins kbd li mark ol p pre q s samp small span strong sub summary sup table
    tbody td tfoot th thead time tr tt u ul var wbr
""".split())
# Dropped together with everything inside them.
_DROPPED_WITH_CONTENT = frozenset("""
    applet audio button canvas embed form frame frameset head iframe math noembed noframes noscript object
    plaintext script select style svg template textarea title video xmp
""".split())
_VOID = frozenset("area base br col embed hr img input link meta param source track wbr".split())
_GLOBAL_ATTRIBUTES = frozenset({"class", "title", "style", "align", "valign", "lang", "dir"})
_TAG_ATTRIBUTES = {
    "a": {"href"},
    "img": {"src", "alt", "width", "height"},
    "td": {"colspan", "rowspan"},
    "th": {"colspan", "rowspan", "scope"},
    "table": {"border", "cellpadding", "cellspacing"},
    "col": {"span"},
    "colgroup": {"span"},
    "ol": {"start", "type"},
    "time": {"datetime"},
}
_SAFE_HREF = re.compile(r"^(?:https?:|mailto:|#)", re.I)
_SAFE_IMAGE = re.compile(r"^data:image/(?:png|jpeg|gif|webp|svg\+xml);base64,[A-Za-z0-9+/=\s]*$", re.I)
_CONTROL = re.compile(r"[\x00-\x20\x7f]+")
# A style attribute survives only if it cannot fetch, run or cover anything: plain values, no functions
# but colours, no escapes, no positioning.
_STYLE_UNSAFE = re.compile(r"url|expression|image|import|javascript|behavior|binding|position|\\|@|/\*", re.I)
_STYLE_CALL = re.compile(r"([a-z-]+)\s*\(", re.I)
_COLOUR_FUNCTIONS = frozenset({"rgb", "rgba", "hsl", "hsla"})


def clean_html(text: str) -> str:
    """`text` (an HTML fragment from a notebook output) with only safe elements and attributes left."""
    parser = _Cleaner()
    parser.feed(text)
    parser.close()
    return parser.result()


def _safe_style(value: str) -> bool:
    if _STYLE_UNSAFE.search(value):
        return False
    return all(name.lower() in _COLOUR_FUNCTIONS for name in _STYLE_CALL.findall(value))


def _safe_attribute(tag: str, name: str, value: str) -> bool:
    if name not in _GLOBAL_ATTRIBUTES and name not in _TAG_ATTRIBUTES.get(tag, ()):
        return False
    if name == "href":
        return bool(_SAFE_HREF.match(_CONTROL.sub("", value)))
    if name == "src":
        return bool(_SAFE_IMAGE.match(value.strip()))
    if name == "style":
        return _safe_style(value)
    return True


class _Cleaner(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._out: list[str] = []
        self._open: list[str] = []  # allowed elements opened in the fragment and not yet closed
        self._skipping: str | None = None  # inside a dropped element: its tag
        self._skip_depth = 0

    def result(self) -> str:
        return "".join(self._out) + "".join(f"</{tag}>" for tag in reversed(self._open))

    def _start(self, tag: str, attrs: list[tuple[str, str | None]], self_closing: bool) -> None:
        if self._skipping is not None:
            if tag == self._skipping and tag not in _VOID and not self_closing:
                self._skip_depth += 1
            return
        if tag in _DROPPED_WITH_CONTENT:
            if tag not in _VOID and not self_closing:
                self._skipping, self._skip_depth = tag, 1
            return
        if tag not in _ALLOWED:
            return  # the element goes, its content stays
        kept = [(name, value or "") for name, value in attrs if _safe_attribute(tag, name, value or "")]
        if tag == "img" and not any(name == "src" for name, _ in kept):
            return  # a picture from elsewhere (or none): nothing to show
        if tag == "a" and any(name == "href" for name, _ in kept):
            kept.append(("rel", "noopener noreferrer"))
        rendered = "".join(f' {name}="{html.escape(value, quote=True)}"' for name, value in kept)
        self._out.append(f"<{tag}{rendered}>")
        if tag not in _VOID:
            self._open.append(tag)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, False)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, True)

    def handle_endtag(self, tag: str) -> None:
        if self._skipping is not None:
            if tag == self._skipping:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skipping = None
            return
        if tag not in self._open:
            return  # closes nothing of ours: never the report's elements
        while self._open:
            top = self._open.pop()
            self._out.append(f"</{top}>")
            if top == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._skipping is None:
            self._out.append(html.escape(data, quote=False))

    # comments, doctypes, processing instructions and CDATA go: nothing to add for them
    def handle_comment(self, data: str) -> None:
        pass

    def handle_decl(self, decl: str) -> None:
        pass

    def handle_pi(self, data: str) -> None:
        pass

    def unknown_decl(self, data: str) -> None:
        pass
