"""MediaWiki markup to plain prose (the evaluation articles of `assets.py`): templates, tables, refs, files,
categories, comments, HTML tags and reference/link sections removed; links and headings kept as plain text."""
from __future__ import annotations

import html
import re

_DROP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography", "sources",
    "citations", "footnotes", "notes and references", "references and notes", "works cited", "gallery",
    "primary sources", "secondary sources", "selected bibliography", "bibliography and further reading",
    "external links and references", "online", "video", "audio", "websites",
}
_DROP_TAGS = ("math", "gallery", "timeline", "score", "imagemap", "chem", "ce", "hiero", "graph",
              "syntaxhighlight", "source", "mapframe", "templatedata", "references")
_LINK_DROP_NS = ("file", "image", "category", "media")


def _strip_nested(text: str, opener: str, closer: str) -> str:
    """Remove balanced opener...closer spans (nested); an unclosed opener is dropped by itself."""
    out, depth, start, last = [], 0, 0, 0
    pat = re.compile(re.escape(opener) + "|" + re.escape(closer))
    for m in pat.finditer(text):
        if m.group() == opener:
            if depth == 0:
                out.append(text[last:m.start()])
                start = m.start()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                last = m.end()
    if depth > 0:  # unbalanced: keep what follows the outermost unclosed opener
        last = start + len(opener)
    out.append(text[last:])
    return "".join(out)


_FILE_LINK = re.compile(r"\[\[\s*(?:file|image|media)\s*:", re.I)


def _strip_file_links(text: str) -> str:
    """Remove [[File:...]] / [[Image:...]] with their captions (which may hold links and stray brackets)."""
    out, pos = [], 0
    while True:
        m = _FILE_LINK.search(text, pos)
        if not m:
            out.append(text[pos:])
            return "".join(out)
        out.append(text[pos:m.start()])
        depth, single, i = 1, 0, m.end()
        while depth and i < len(text):
            if text.startswith("[[", i):
                depth, i = depth + 1, i + 2
            elif text[i] == "[":  # a single bracket in a caption ("[circa]") closes itself
                single, i = single + 1, i + 1
            elif text[i] == "]" and single:
                single, i = single - 1, i + 1
            elif text.startswith("]]", i):
                depth, i = depth - 1, i + 2
            elif text[i] == "\n" and text.startswith("\n\n", i):
                break  # a link never spans a paragraph: unclosed, drop up to here
            else:
                i += 1
        pos = i


def _link(m: re.Match) -> str:
    inner = m.group(1)
    target, _, label = inner.partition("|")
    target = target.strip()
    prefix = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if prefix in _LINK_DROP_NS and not target.startswith(":"):
        return ""
    if label:
        return label.split("|")[-1]
    if re.fullmatch(r"[a-z]{2,3}(-[a-z]+)?", prefix):  # interlanguage link [[fr:...]]
        return ""
    target = target.lstrip(":")
    return target[1:] if target.startswith("#") else target.split("#")[0]


def strip_wikitext(text: str) -> str:
    """Plain text from MediaWiki markup (good enough for language-model evaluation, not a parser)."""
    text = re.sub(r"<!--.*?(-->|$)", "", text, flags=re.S)
    text = re.sub(r"<ref\b[^>]*/>", "", text, flags=re.I)
    text = re.sub(r"<ref\b[^>]*>.*?</ref\s*>", "", text, flags=re.I | re.S)
    for tag in _DROP_TAGS:
        text = re.sub(rf"<{tag}\b[^>]*/>", "", text, flags=re.I)
        text = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}\s*>", "", text, flags=re.I | re.S)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = _strip_file_links(text)
    for _ in range(8):  # innermost links first, so file captions with links inside go too
        text, n = re.subn(r"\[\[([^\[\]]*)\]\]", _link, text)
        if n == 0:
            break
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[(?:https?:)?//[^\s\]]*\]", "", text)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.I)
    text = re.sub(r"</?[a-zA-Z][^<>]*>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)

    lines, drop_level = [], 0
    for line in text.split("\n"):
        line = line.strip()
        h = re.fullmatch(r"(={2,6})\s*(.*?)\s*\1", line)
        if h:
            level, title = len(h.group(1)), h.group(2).strip()
            if drop_level and level > drop_level:
                continue
            drop_level = level if title.lower() in _DROP_SECTIONS else 0
            if not drop_level and title:
                lines.append(("h", title))
            continue
        if drop_level:
            continue
        if line.startswith(("|", "!", "{", "}")) or re.match(r"(file|image|category)\s*:", line, re.I):
            continue  # table, template or gallery remnants
        line = re.sub(r"^[*#:;]+\s*", "", line)
        if len(re.findall(r"[^\W\d_]{2,}", line)) >= 2:  # drop lines that are no prose: "(UK)", "1987", "*"
            lines.append(("p", line))
    # drop headings with nothing under them
    kept = [ln for i, ln in enumerate(lines) if ln[0] == "p" or (i + 1 < len(lines) and lines[i + 1][0] == "p")]
    return tidy("\n".join(t for _, t in kept))


def tidy(text: str) -> str:
    """Unescape entities, normalise spaces, remove brackets emptied by markup removal, no blank lines."""
    text = html.unescape(text).replace("\xa0", " ").replace("\u200b", "")
    text = text.replace("{{", "").replace("}}", "").replace("[[", "").replace("]]", "")
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    text = re.sub(r"\(\s*[,;:]?\s*\)", "", text)
    text = re.sub(r"\(\s*[,;]\s*", "(", text)
    text = re.sub(r" +([,.;:])", r"\1", text)
    text = re.sub(r" +", " ", text)
    return "\n".join(ln.strip() for ln in text.split("\n") if ln.strip())
