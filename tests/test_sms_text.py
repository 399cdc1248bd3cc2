"""SMS length in segments (GSM-7 and UCS-2) and cutting a text to a number of segments."""

from __future__ import annotations

import pytest

from routing_app.delivery.sms_text import (
    GSM7_BASIC,
    GSM7_EXTENSION,
    fit_sms,
    is_gsm7,
    segments,
)


def test_gsm7_tables_hold_the_03_38_alphabet():
    # 128 positions less the escape; a few characters people get wrong: $ is in, ` is not.
    assert len(GSM7_BASIC) == 127
    assert {"@", "£", "$", "¥", "¤", "§", "¿", "¡", "Δ", "\n", "\r"} <= GSM7_BASIC
    assert set("€[]{}\\^~|\f") == GSM7_EXTENSION
    assert "\x1b" not in GSM7_BASIC
    for char in "`…’“ç":
        assert not is_gsm7(char), char


def test_gsm7_single_segment_holds_160_characters():
    assert segments("a" * 160) == 1
    assert segments("a" * 161) == 2


def test_gsm7_multipart_segments_hold_153_characters():
    assert segments("a" * 306) == 2
    assert segments("a" * 307) == 3
    assert segments("a" * 459) == 3


def test_gsm7_extension_characters_count_two():
    assert segments("€" * 80) == 1
    assert segments("€" * 80 + "a") == 2
    assert segments("a" * 158 + "[") == 1
    assert segments("a" * 159 + "[") == 2


def test_an_escape_pair_is_not_split_across_segments():
    # 152 + 2 septets: the pair does not fit the first segment's last septet.
    text = "a" * 152 + "{" + "a" * 152
    assert segments(text) == 3
    assert segments("a" * 151 + "{" + "a" * 153) == 2


def test_one_non_gsm_character_makes_the_message_ucs2():
    assert segments("a" * 70 + "ж") == 2
    assert segments("ж" * 70) == 1
    assert segments("ж" * 71) == 2
    assert segments("ж" * 134) == 2
    assert segments("ж" * 135) == 3


def test_ucs2_counts_utf16_code_units():
    assert segments("😀" * 35) == 1
    assert segments("😀" * 35 + "a") == 2
    # 33 emoji fill 66 units of a 67-unit segment; the 34th does not fit the last unit.
    assert segments("😀" * 67) == 3
    assert segments("😀" * 66) == 2


def test_gsm_extension_characters_count_one_in_ucs2():
    assert segments("€" * 69 + "ж") == 1


def test_text_that_fits_is_unchanged():
    text = "[ERROR] pod.crashloop on alerts.k8s"
    assert fit_sms(text, 1) == (text, 1)
    assert fit_sms("a" * 306, 2) == ("a" * 306, 2)
    assert fit_sms("", 1) == ("", 1)


def test_gsm7_text_is_cut_with_three_dots_and_stays_gsm7():
    text, count = fit_sms("a" * 500, 3)
    assert text == "a" * 456 + "..."
    assert count == 3
    assert is_gsm7(text)


def test_cut_to_one_segment_uses_the_single_segment_size():
    text, count = fit_sms("b" * 200, 1)
    assert text == "b" * 157 + "..."
    assert count == 1


def test_ucs2_text_is_cut_with_one_ellipsis_character():
    text, count = fit_sms("ж" * 500, 3)
    assert text == "ж" * 200 + "…"
    assert count == 3


def test_cut_drops_whitespace_before_the_ellipsis():
    # The longest prefix that fits with "..." ends in the space: the space goes.
    text, count = fit_sms("a" * 156 + " " + "b" * 10, 1)
    assert text == "a" * 156 + "..."
    assert count == 1


def test_cut_does_not_split_a_surrogate_pair():
    text, count = fit_sms("😀" * 100, 1)
    assert text == "😀" * 34 + "…"
    assert count == 1


def test_cut_with_extension_characters_counts_them_two():
    text, count = fit_sms("€" * 200, 1)
    assert text == "€" * 78 + "..."
    assert count == 1


def test_max_segments_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        fit_sms("hello", 0)
