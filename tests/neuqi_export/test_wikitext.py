"""Wiki markup to prose (neuqi_export/wikitext.py)."""
from neuqi_export.wikitext import strip_wikitext, tidy


def test_strip_wikitext():
    raw = """{{Infobox person|name=X|born={{birth date|1900|1|1}}}}
'''Ada Lovelace''' (born ''Augusta Ada Byron''<ref name="a">{{cite web|url=http://x}}</ref>; 1815) was an [[England|English]] [[mathematician]].<ref name="b"/>
[[File:Ada.jpg|thumb|Portrait of [[Ada Lovelace|Ada]] in 1840 [circa]]]
<!-- a comment -->
== Early life ==
She was born in [[London]].&nbsp;Her father was [[Lord Byron|Byron]]<sup>1</sup>.
{| class="wikitable"
|-
| cell || cell
|}
* A list item about [http://example.com her notes].
=== Empty heading ===
== References ==
{{reflist}}
* Some citation, 1999.
== External links ==
* [http://example.org Official site]
[[Category:Mathematicians]]
[[fr:Ada Lovelace]]"""
    out = strip_wikitext(raw)
    assert out == ("Ada Lovelace (born Augusta Ada Byron; 1815) was an English mathematician.\n"
                   "Early life\n"
                   "She was born in London. Her father was Byron1.\n"
                   "A list item about her notes.")


def test_tidy():
    """Entities unescaped, markup brackets and emptied parentheses removed, spaces and lines normalised."""
    assert tidy("A&amp;B\xa0 ( ; )  x ,y\n\n  [[z]] (, w)\n") == "A&B x,y\nz (w)"
