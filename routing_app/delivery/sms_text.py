"""How long an SMS is, in segments, and cutting a text to a number of segments.

An SMS carries 140 octets. GSM-7 text (3GPP TS 23.038, the GSM 03.38 alphabet) packs 160
characters in one segment; a character of the extension table (``€ [ ] { } \\ ^ ~ |`` and form
feed) is an escape plus a character, so it counts 2. Any other character makes the whole message
UCS-2: 70 UTF-16 code units in one segment (a character beyond the BMP, e.g. most emoji, is 2).
A message of several segments spends 6 octets of each on the concatenation header: 153 GSM-7
characters or 67 UCS-2 code units per segment. An escape pair or a surrogate pair is never split
across two segments, so a segment may hold one less.
https://www.3gpp.org/ftp/Specs/archive/23_series/23.038/
"""

from __future__ import annotations

# The basic character set, in table order (0x00..0x7F), without 0x1B (the escape to the
# extension table, not a character of its own).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")
assert len(GSM7_BASIC) == 127 and not GSM7_BASIC & GSM7_EXTENSION

GSM7_SINGLE, GSM7_MULTI = 160, 153  # septets per segment
UCS2_SINGLE, UCS2_MULTI = 70, 67  # UTF-16 code units per segment
GSM7_ELLIPSIS = "..."  # "…" is not GSM-7: it would turn the whole text into UCS-2
UCS2_ELLIPSIS = "…"


def is_gsm7(text: str) -> bool:
    """Whether ``text`` can be sent as GSM-7 (basic set and extension table only)."""
    return all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text)


def _cost(char: str, gsm7: bool) -> int:
    if gsm7:
        return 2 if char in GSM7_EXTENSION else 1
    return 2 if ord(char) > 0xFFFF else 1


def segments(text: str, gsm7: bool | None = None) -> int:
    """The number of segments ``text`` takes (1 for the empty text). ``gsm7``: the encoding to
    count in; by default GSM-7 when the text allows it, else UCS-2."""
    if gsm7 is None:
        gsm7 = is_gsm7(text)
    single, multi = (GSM7_SINGLE, GSM7_MULTI) if gsm7 else (UCS2_SINGLE, UCS2_MULTI)
    costs = [_cost(c, gsm7) for c in text]
    if sum(costs) <= single:
        return 1
    count, used = 1, 0
    for cost in costs:
        if used + cost > multi:  # the pair would straddle two segments: start the next
            count, used = count + 1, 0
        used += cost
    return count


def fit_sms(text: str, max_segments: int) -> tuple[str, int]:
    """``text`` cut to at most ``max_segments`` segments, and the segments the result takes.

    A text that fits is returned unchanged. A longer one is cut at the longest prefix that
    fits together with an ellipsis, trailing whitespace removed before it. The ellipsis is
    "..." when ``text`` is GSM-7, so the result stays GSM-7 (the one-character "…" is not in
    GSM-7 and would make the message UCS-2, less than half as many characters per segment);
    it is "…" when the text is UCS-2 anyway. Cuts fall between code points, so a sequence of
    several code points shown as one symbol (a flag, an emoji with a skin tone) may be split.

    Raises ``ValueError`` when ``max_segments`` is below 1.
    """
    if max_segments < 1:
        raise ValueError(f"max_segments must be at least 1, not {max_segments}")
    gsm7 = is_gsm7(text)
    count = segments(text, gsm7)
    if count <= max_segments:
        return text, count
    ellipsis = GSM7_ELLIPSIS if gsm7 else UCS2_ELLIPSIS

    def fits(length: int) -> bool:
        return segments(text[:length].rstrip() + ellipsis, gsm7) <= max_segments

    # The segment count only grows with the prefix: binary search for the longest one.
    low, high = 0, len(text)  # fits(low) holds (the ellipsis alone fits one segment)
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    result = text[:low].rstrip() + ellipsis
    return result, segments(result, gsm7)
