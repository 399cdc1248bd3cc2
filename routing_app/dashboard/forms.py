"""The dashboard's forms: a silence, and the topic console's test notification."""

from __future__ import annotations

import json

from django import forms
from django.utils import timezone

from ..models import SEVERITIES, Silence
from ..topics import is_valid_topic


class SilenceForm(forms.ModelForm):
    """A silence from now (or ``starts_at``) until ``ends_at``; ``created_by`` is the view's."""

    starts_at = forms.DateTimeField(
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
        help_text="empty = now (UTC)",
    )
    ends_at = forms.DateTimeField(
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}), help_text="UTC"
    )

    class Meta:
        model = Silence
        fields = ["rule", "scope_value", "starts_at", "ends_at", "comment"]
        labels = {"rule": "Rule", "scope_value": "Scope"}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["rule"].empty_label = "every rule"

    def clean_starts_at(self):
        return self.cleaned_data.get("starts_at") or timezone.now()


class ConsolePublishForm(forms.Form):
    topic = forms.CharField(max_length=200)
    event = forms.CharField(max_length=100, required=False)
    severity = forms.ChoiceField(
        choices=[(s, s) for s in SEVERITIES], required=False, initial="info"
    )
    data = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="a JSON object (optional)",
    )

    def clean_topic(self) -> str:
        topic = self.cleaned_data["topic"].strip()
        if not is_valid_topic(topic):
            raise forms.ValidationError(
                "lowercase segments of a-z, 0-9, _ or - separated by '.' or ':'"
            )
        return topic

    def clean_data(self) -> dict:
        text = self.cleaned_data.get("data", "").strip()
        if not text:
            return {}
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise forms.ValidationError(f"not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise forms.ValidationError('give a JSON object, e.g. {"note": "hello"}')
        return value
